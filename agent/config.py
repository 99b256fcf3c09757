"""Agent configuration: a YAML file (`--config`), overridden by command-line flags."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ROLES = ("computing", "daemons")
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_KEYS = {"id", "controller", "roles", "capabilities", "state_dir", "services_root",
         "heartbeat_interval", "provides", "service_driver"}
PROVIDES = ("mysql", "redis", "nginx")


class ConfigError(ValueError):
    """A bad agent configuration; the message names the key (and file)."""


@dataclass(frozen=True)
class AgentConfig:
    id: str
    controller: str
    roles: tuple[str, ...]
    capabilities: tuple[str, ...] = ()
    state_dir: Path = Path("/var/lib/deployer-agent")
    services_root: Path = Path("/srv/services")
    heartbeat_interval: float = 5.0
    settings: tuple[tuple[str, str], ...] = ()  # flattened `provides`: ("mysql.port", "3306"), …
    service_driver: str = "auto"


def load(args: argparse.Namespace) -> AgentConfig:
    values: dict = {}
    where = "command line"
    if args.config:
        where = args.config
        try:
            with open(args.config) as f:
                values = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"{args.config}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{args.config}: not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{args.config}: expected a mapping of settings")
        unknown = sorted(set(values) - _KEYS)
        if unknown:
            raise ConfigError(f"{args.config}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    for key in ("id", "controller", "state_dir", "services_root", "heartbeat_interval", "service_driver"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    if args.role:
        values["roles"] = args.role
    if args.capability:
        values["capabilities"] = args.capability
    for item in getattr(args, "provide", None) or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and name):
            raise ConfigError(f"--provide {item!r}: expected SERVICE.SETTING=VALUE, e.g. mysql.port=3306")
        values.setdefault("provides", {}).setdefault(section, {})[name] = value
    return _validate(values, where)


def _validate(values: dict, where: str) -> AgentConfig:
    agent_id = str(values.get("id") or "")
    if not _ID.match(agent_id):
        raise ConfigError(f"{where}: id {agent_id!r} must match [a-z0-9][a-z0-9._-]* (at most 63 characters)")
    controller = str(values.get("controller") or "")
    if not controller:
        raise ConfigError(f"{where}: controller is required (HOST:PORT or unix:PATH)")
    roles = tuple(values.get("roles") or ())
    if not roles:
        raise ConfigError(f"{where}: roles: give at least one of {', '.join(ROLES)}")
    for role in roles:
        if role not in ROLES:
            raise ConfigError(f"{where}: roles: unknown role {role!r} (known: {', '.join(ROLES)})")
    try:
        interval = float(values.get("heartbeat_interval", 5.0))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: heartbeat_interval must be a number of seconds") from None
    provides = values.get("provides") or {}
    if not isinstance(provides, dict):
        raise ConfigError(f"{where}: provides must map {', '.join(PROVIDES)} to their settings")
    settings = []
    for section, entries in sorted(provides.items()):
        if section not in PROVIDES:
            raise ConfigError(f"{where}: provides: unknown service {section!r} (known: {', '.join(PROVIDES)})")
        if not isinstance(entries, dict):
            raise ConfigError(f"{where}: provides.{section}: expected a mapping of settings")
        settings += [(f"{section}.{k}", str(v)) for k, v in sorted(entries.items())]
    capabilities = list(dict.fromkeys([*(str(c) for c in values.get("capabilities") or ()), *sorted(provides)]))
    driver = str(values.get("service_driver") or "auto")
    if driver not in ("auto", "systemd", "supervisor"):
        raise ConfigError(f"{where}: service_driver must be auto, systemd or supervisor")
    return AgentConfig(
        id=agent_id, controller=controller, roles=roles, service_driver=driver,
        capabilities=tuple(capabilities), settings=tuple(settings),
        state_dir=Path(values.get("state_dir") or "/var/lib/deployer-agent"),
        services_root=Path(values.get("services_root") or "/srv/services"),
        heartbeat_interval=interval,
    )
