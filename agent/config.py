"""Agent configuration: a YAML file (`--config`), overridden by command-line flags."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.provides import PROVIDES, check_setting
from common.tls import is_loopback
from common import errors

ROLES = ("computing", "daemons", "routing")
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")
_KEYS = {"id", "controller", "roles", "capabilities", "state_dir", "services_root",
         "heartbeat_interval", "provides", "service_driver", "tls_dir", "enroll_address", "insecure",
         "write_roots"}


class ConfigError(errors.BadInput):
    """A bad agent configuration; the message names the key (and file)."""


@dataclass(frozen=True)
class AgentConfig:
    id: str
    controller: str
    roles: tuple[str, ...]
    capabilities: tuple[str, ...] = ()
    state_dir: Path = Path("/var/lib/deployer-agent")
    services_root: Path = Path("/srv/services")
    write_roots: tuple[Path, ...] = ()  # write_file writes only under these; () means services_root
    heartbeat_interval: float = 5.0
    settings: tuple[tuple[str, str], ...] = ()  # flattened `provides`: ("mysql.port", "3306"), …
    service_driver: str = "auto"
    tls_dir: Path | None = None        # default STATE_DIR/tls: agent.key, agent.crt, ca.crt
    enroll_address: str = ""           # default: the controller's host, next port
    insecure: bool = False             # plain link to a loopback controller, no certificate

    @property
    def tls_folder(self) -> Path:
        return self.tls_dir or self.state_dir / "tls"

    @property
    def enrolment_address(self) -> str:
        if self.enroll_address:
            return self.enroll_address
        host, _, port = self.controller.rpartition(":")
        return f"{host}:{int(port) + 1}"




def load(args: argparse.Namespace, need_roles: bool = True) -> AgentConfig:
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
    for key in ("id", "controller", "state_dir", "services_root", "heartbeat_interval", "service_driver",
                "tls_dir", "enroll_address"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    if getattr(args, "insecure", False):
        values["insecure"] = True
    if args.role:
        values["roles"] = args.role
    if args.capability:
        values["capabilities"] = args.capability
    if getattr(args, "write_root", None):
        values["write_roots"] = args.write_root
    for item in getattr(args, "provide", None) or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and name):
            raise ConfigError(f"--provide {item!r}: expected SERVICE.SETTING=VALUE, e.g. mysql.port=3306")
        values.setdefault("provides", {}).setdefault(section, {})[name] = value
    if not need_roles and not values.get("roles"):
        values["roles"] = list(ROLES[:1])  # enrolment: the roles come with the token
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
    for key, value in settings:
        # The controller refuses a hello with a malformed setting; say so here, at start.
        problem = check_setting(key, value)
        if problem:
            raise ConfigError(f"{where}: provides.{key}: {value[:80]!r}: {problem}")
    capabilities = list(dict.fromkeys([*(str(c) for c in values.get("capabilities") or ()), *sorted(provides)]))
    insecure = values.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{where}: insecure must be true or false")
    if insecure and not is_loopback(controller):
        raise ConfigError(f"{where}: insecure: a plain link is allowed only to a loopback controller, "
                          f"not {controller}")
    if not controller.startswith("unix:") and not controller.rpartition(":")[2].isdigit():
        raise ConfigError(f"{where}: controller {controller!r} must be HOST:PORT or unix:PATH")
    driver = str(values.get("service_driver") or "auto")
    if driver not in ("auto", "systemd", "supervisor"):
        raise ConfigError(f"{where}: service_driver must be auto, systemd or supervisor")
    return AgentConfig(
        id=agent_id, controller=controller, roles=roles, service_driver=driver,
        capabilities=tuple(capabilities), settings=tuple(settings),
        state_dir=Path(values.get("state_dir") or "/var/lib/deployer-agent"),
        services_root=Path(values.get("services_root") or "/srv/services"),
        write_roots=_write_roots(values, where, settings),
        heartbeat_interval=interval, insecure=insecure,
        tls_dir=Path(values["tls_dir"]) if values.get("tls_dir") else None,
        enroll_address=str(values.get("enroll_address") or ""),
    )


def _write_roots(values: dict, where: str, settings: list[tuple[str, str]]) -> tuple[Path, ...]:
    """The folders write_file may write under: as configured, else the services root and the
    nginx folder this agent provides."""
    roots = values.get("write_roots")
    if roots is None:
        roots = [str(values.get("services_root") or "/srv/services")]
        roots += [value for key, value in settings if key == "nginx.conf_dir"]
    if not isinstance(roots, list) or not roots:
        raise ConfigError(f"{where}: write_roots: expected a list of absolute folders")
    for root in roots:
        if not isinstance(root, str) or not root.startswith("/"):
            raise ConfigError(f"{where}: write_roots: {root!r} is not an absolute folder")
    return tuple(Path(root) for root in roots)
