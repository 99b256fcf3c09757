"""Environment specs and deploy options (docs/spec-format.md): loading, validating, canonical form.

One module, though long: it is the single reader of one format, and every rule a spec must meet
(with the file, line and key an error names) is kept beside the others, so that a rule cannot be
checked in one place and forgotten in another."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import yaml

from controller.environments.naming import name_problem
from common import envfile, errors, sizes

VERSION = 1
COMPONENTS = ("mysql", "redis")
# What the deployer writes into a service's .env for each component it uses (and PORT, in a web
# service's environment): an `env` value can be built from them with ${NAME}.
GENERATED = {"mysql": ("DATABASE_URL", "DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD"),
             "redis": ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_USER", "REDIS_PASSWORD", "REDIS_PREFIX")}
RESERVED_ENV = ("PORT", "DATABASE_URL", "DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD",
                "REDIS_URL", "REDIS_PREFIX")  # never set in `env`; the rest of GENERATED only where generated
DEFAULT_HEALTH = "/"
DEFAULT_HEALTHY_AFTER = 5.0
DEFAULT_DRAIN = 30.0   # the longest wait for the old instance's requests to end after a switch

TOP_KEYS = ("version", "app", "environment", "domain", "aliases", "tls", "limits", "logs", "services")
TOP_REQUIRED = ("app", "environment", "domain", "services")
SERVICE_KEYS = ("path", "source", "ref", "root", "install", "build", "migrate", "start", "health",
                "healthy_after", "drain", "env", "secrets", "uses", "redis", "restart", "writable", "host",
                "host_labels", "replicas")
WEB_HEALTH_KEYS = ("path", "status", "timeout", "interval", "deadline")
DAEMON_HEALTH_KEYS = ("command", "timeout", "interval", "deadline")
SERVICE_REQUIRED = ("source", "ref", "start")
OPTION_KEYS = ("services", "renew", "refs")
LIMIT_KEYS = ("memory", "cpu", "processes", "mysql_connections")
LOG_KEYS = ("file", "service", "environment")
REDIS_KEYS = ("mode", "maxmemory")
RESTART_KEYS = ("attempts", "stable_after")
REDIS_MODES = ("prefix", "dedicated")  # an ACL user and key prefix on a shared server, or a server of its own
REDIS_MAXMEMORY = 64 << 20             # a dedicated server's default memory bound
REDIS_MAXMEMORY_MIN, REDIS_MAXMEMORY_MAX = 1 << 20, 64 << 30

_HINTS = {
    "app": "the app's name, like shop",
    "environment": "the environment's name, like prod",
    "domain": "the nginx server_name, like shop.example.com",
    "services": "a mapping of service names to their settings",
    "source": "a git URL or a local path to a repository",
    "ref": "a branch, tag or full commit",
    "start": "the command that runs the service in the foreground",
}
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_PATH_CHARS = re.compile(r"[A-Za-z0-9._~/-]*")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_DEPTH = 32         # nesting levels, aliases expanded (a spec needs 5)
MAX_VALUES = 100_000   # values once aliases are expanded (a spec needs a few hundred)

Key = tuple  # a key path: mapping keys (str) and list indexes (int)


class SpecError(errors.BadInput):
    """A bad spec, options or diff file; str() is one line: `FILE:LINE: KEY: MESSAGE`."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.file = file
        self.line = line
        self.key = key or None
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ":".join(part for part in (self.file, str(self.line) if self.line else None) if part)
        text = ": ".join(part for part in (where, self.key, self.message) if part)
        # One line that is safe on a terminal: line breaks and control characters are escaped.
        return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


@dataclass(frozen=True)
class HealthCheck:
    """How an instance is found healthy: for a web service, the answers its health path may give
    (none listed: any 2xx or 3xx); for a daemon, a command that must succeed, if any. Tried every
    `interval` seconds, each try at most `timeout`, until `deadline`."""

    statuses: tuple[int, ...] = ()
    command: str | None = None
    timeout: float = 2.0
    interval: float = 0.5
    deadline: float = 30.0

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        if self.statuses:
            out["status"] = list(self.statuses)
        if self.command is not None:
            out["command"] = self.command
        for key, default in (("timeout", 2.0), ("interval", 0.5), ("deadline", 30.0)):
            if getattr(self, key) != default:
                out[key] = _plain_number(getattr(self, key))
        return out


@dataclass(frozen=True)
class RedisSettings:
    """A service's own Redis instance: `prefix` (an ACL user limited to its key prefix on the
    provider's shared server) or `dedicated` (a redis-server of its own, bounded by `maxmemory`)."""

    mode: str = "prefix"
    maxmemory: int = REDIS_MAXMEMORY

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        if self.mode != "prefix":
            out["mode"] = self.mode
            if self.maxmemory != REDIS_MAXMEMORY:
                out["maxmemory"] = memory_text(self.maxmemory)
        return out


@dataclass(frozen=True)
class RestartPolicy:
    """Whether the controller restarts a live process that ended on its own, and when it gives up:
    after `attempts` restarts in a row that did not stay up `stable_after` seconds (a crash loop)."""

    enabled: bool = True
    attempts: int = 5
    stable_after: float = 30.0

    def to_dict(self) -> str | dict | None:
        if not self.enabled:
            return "never"
        out = {k: _plain_number(getattr(self, k)) for k, default in (("attempts", 5), ("stable_after", 30.0))
               if getattr(self, k) != default}
        return out or None


@dataclass(frozen=True)
class Service:
    name: str
    path: str | None = None
    source: str = ""
    ref: str = ""
    root: str | None = None
    install: str | None = None
    build: str | None = None
    migrate: str | None = None
    start: str = ""
    health: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    secrets: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    healthy_after: float = DEFAULT_HEALTHY_AFTER
    check: HealthCheck = HealthCheck()
    drain: float = DEFAULT_DRAIN
    shared: tuple[tuple[str, str], ...] = ()  # (component, service): another service's instance it uses
    redis: RedisSettings = RedisSettings()
    restart: RestartPolicy = RestartPolicy()
    writable: tuple[str, ...] = ()  # paths in the working folder linked to `shared/` (decision 033)
    host: str = ""                  # pinned to this agent (decision 034)
    host_labels: tuple[tuple[str, str], ...] = ()  # pinned to agents granted these labels
    replicas: int = 1               # a web service's processes, on different hosts where it can

    def owner_of(self, component: str) -> str:
        """The service whose instance of `component` this one uses: itself, or the one it shares."""
        return dict(self.shared).get(component, self.name)

    @property
    def is_web(self) -> bool:
        return self.path is not None

    @property
    def role(self) -> str:
        return "computing" if self.is_web else "daemons"

    def to_dict(self) -> dict:
        """The canonical form: defaults and empty settings left out, so equal services are equal dicts."""
        out: dict[str, Any] = {}
        if self.path is not None:
            out["path"] = self.path
        out["source"] = self.source
        out["ref"] = self.ref
        for key in ("root", "install", "build", "migrate"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["start"] = self.start
        check = self.check.to_dict()
        if check:
            out["health"] = ({"path": self.health} if self.is_web else {}) | check
        elif self.is_web and self.health != DEFAULT_HEALTH:
            out["health"] = self.health
        if not self.is_web and self.healthy_after != DEFAULT_HEALTHY_AFTER:
            out["healthy_after"] = _plain_number(self.healthy_after)
        if self.is_web and self.drain != DEFAULT_DRAIN:
            out["drain"] = _plain_number(self.drain)
        if self.env:
            out["env"] = dict(self.env)
        if self.secrets:
            out["secrets"] = list(self.secrets)
        if self.uses:
            out["uses"] = [c if self.owner_of(c) == self.name else f"{self.owner_of(c)}.{c}" for c in self.uses]
        if self.redis.to_dict():
            out["redis"] = self.redis.to_dict()
        if self.restart.to_dict() is not None:
            out["restart"] = self.restart.to_dict()
        if self.writable:
            out["writable"] = list(self.writable)
        if self.host:
            out["host"] = self.host
        if self.host_labels:
            out["host_labels"] = dict(self.host_labels)
        if self.replicas != 1:
            out["replicas"] = self.replicas
        return out


@dataclass(frozen=True)
class Limits:
    """What bounds the environment on each host it runs on (all its services' processes there
    together, install to service), and each of its MariaDB users."""

    memory: int = 512 << 20        # bytes, swap included
    cpu: float = 1.0               # CPUs' worth of time, and the weight under contention
    processes: int = 512           # processes and threads
    mysql_connections: int = 30    # at once, per MariaDB user of the environment

    def to_dict(self) -> dict:
        """Only what differs from the defaults, memory as it is best read (512M, 1G)."""
        out: dict[str, Any] = {}
        default = Limits()
        if self.memory != default.memory:
            out["memory"] = memory_text(self.memory)
        if self.cpu != default.cpu:
            out["cpu"] = _plain_number(self.cpu)
        if self.processes != default.processes:
            out["processes"] = self.processes
        if self.mysql_connections != default.mysql_connections:
            out["mysql_connections"] = self.mysql_connections
        return out


@dataclass(frozen=True)
class Logs:
    """How much of its services' output an environment keeps on each host: files of `file` bytes,
    at most `service` bytes per service and `environment` bytes for all of them together
    (docs/decisions/030-service-logs.md)."""

    file: int = 10 << 20
    service: int = 100 << 20
    environment: int = 1 << 30

    def keep(self, services: int) -> int:
        """The bytes one service may keep: its own cap, or its share of the environment's."""
        return min(self.service, self.environment // max(services, 1))

    def to_dict(self) -> dict:
        default = Logs()
        return {k: memory_text(getattr(self, k)) for k in LOG_KEYS if getattr(self, k) != getattr(default, k)}


def memory_text(n: int) -> str | int:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return n


@dataclass(frozen=True)
class Spec:
    version: int
    app: str
    environment: str
    domain: str
    services: tuple[Service, ...]
    limits: Limits = Limits()
    logs: Logs = Logs()
    source: "_Source | None" = field(default=None, compare=False, repr=False)  # where each value was read
    aliases: tuple[str, ...] = ()   # more host names the environment answers (decision 035)
    tls: "Tls | None" = None        # HTTPS: the operator's certificate, or ACME's (`tls: auto`)

    @property
    def names(self) -> tuple[str, ...]:
        """Every host name the environment answers: its domain, then its aliases."""
        return (self.domain, *self.aliases)

    def error(self, key: Key, message: str) -> "SpecError":
        """An error about a value of this spec, naming its file and line where it was read from one."""
        return (self.source or _Source(None)).error(key, message)

    @property
    def key(self) -> str:
        return f"{self.app}/{self.environment}"

    def service(self, name: str) -> Service:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(f"no service {name!r} in {self.key}")

    def to_dict(self) -> dict:
        out = {"version": self.version, "app": self.app, "environment": self.environment,
               "domain": self.domain}
        if self.aliases:
            out["aliases"] = list(self.aliases)
        if self.tls is not None:
            out["tls"] = self.tls.to_dict()
        if self.limits.to_dict():
            out["limits"] = self.limits.to_dict()
        if self.logs.to_dict():
            out["logs"] = self.logs.to_dict()
        out["services"] = {s.name: s.to_dict() for s in self.services}
        return out


@dataclass(frozen=True)
class Tls:
    """`tls: {certificate: SECRET, key: SECRET}`: HTTPS with the operator's certificate and key,
    held in two of the environment's secrets (decision 035); `tls: auto` (both empty): with
    certificates the controller obtains and renews by ACME (decision 036)."""

    certificate: str = ""   # secret names
    key: str = ""

    @property
    def auto(self) -> bool:
        return not self.certificate

    def to_dict(self) -> dict | str:
        return "auto" if self.auto else {"certificate": self.certificate, "key": self.key}


@dataclass(frozen=True)
class Options:
    """deploy-options.yml, checked against the spec; empty `services` means every service."""

    services: tuple[str, ...] = ()
    renew: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    refs: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        if self.services:
            out["services"] = list(self.services)
        if self.renew:
            out["renew"] = {name: list(components) for name, components in self.renew.items()}
        if self.refs:
            out["refs"] = dict(self.refs)
        return out


def code_fingerprint(service: Service, limits: Limits | None = None) -> str:
    """Everything that defines a code instance except the ref (the planner adds the resolved commit).

    The environment's limits count too, so changing them restarts its processes under the new
    ones; the defaults leave the fingerprint as it was before limits existed."""
    defining = {"source": service.source, "root": service.root, "install": service.install,
                "build": service.build, "migrate": service.migrate, "start": service.start,
                "health": service.health, "env": dict(service.env), "secrets": list(service.secrets),
                "path": service.path, "healthy_after": float(service.healthy_after)}
    if service.writable:
        defining["writable"] = list(service.writable)
    if service.host or service.host_labels:  # a new pin moves the service: a new instance where it points
        defining["placement"] = {"host": service.host, "labels": dict(service.host_labels)}
    if service.check.to_dict():
        defining["check"] = service.check.to_dict()
    if service.replicas != 1:  # another count: a new instance, on as many hosts
        defining["replicas"] = service.replicas
    if limits is not None and limits.to_dict():
        defining["limits"] = limits.to_dict()
    canonical = json.dumps(defining, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def ref_problem(ref: str) -> str | None:
    """Why `ref` cannot name a branch, tag or commit, or None when it can."""
    if not ref:
        return "is empty"
    if any(c.isspace() for c in ref) or not ref.isprintable():
        return f"{ref!r} contains spaces or control characters"
    if ref.startswith("-"):
        return f"{ref!r} starts with '-'"
    if ".." in ref:
        return f"{ref!r} contains '..'"
    return None


# ---------------------------------------------------------------- loading

def key_line(text: str, key: Sequence[str | int]) -> int | None:
    """The line of `key` (like ["services", "web", "ref"]) in a YAML text, or None if it is not there."""
    try:
        _, source = _parse_yaml(text, "")
    except SpecError:
        return None
    return source.lines.get(tuple(key))


def load_spec(path: str | Path) -> Spec:
    return parse_spec(_read(path), str(path))


def parse_spec(text: str, filename: str) -> Spec:
    data, source = _parse_yaml(text, filename)
    return _spec(data, source)


def spec_from_dict(data: Any, filename: str | None = None) -> Spec:
    """Validate an already-parsed spec (a stored one, say); errors have no line numbers."""
    return _spec(data, _Source(filename))


def load_options(path: str | Path, spec: Spec) -> Options:
    return parse_options(_read(path), str(path), spec)


def parse_options(text: str, filename: str, spec: Spec) -> Options:
    data, source = _parse_yaml(text, filename)
    return _options(data, source, spec)


def merge_diff(stored: dict, diff_text: str, filename: str) -> Spec:
    """Merge an environment diff over a stored spec: mappings merge key by key, anything else
    replaces, null removes a key. Errors name the diff's file, and its line where the key is in it."""
    data, source = _parse_yaml(diff_text, filename)
    if data is None:
        return _spec(stored, source)
    if not isinstance(data, dict):
        raise source.error((), f"a diff must be a mapping (a partial spec), not {_kind(data)}")
    for key in ("app", "environment"):
        if key in data and data[key] != stored.get(key):
            raise source.error((key,), f"a diff cannot change the {key} (it is {stored.get(key)!r}); "
                                       "submit a full spec for another environment")
    return _spec(_merge(stored, data), source)


def _merge(base: Any, over: Any) -> Any:
    if not isinstance(over, dict):
        return over
    merged = dict(base) if isinstance(base, dict) else {}
    for key, value in over.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge(merged.get(key), value)
    return merged


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror}", str(path)) from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"not UTF-8 text (byte {exc.start})", str(path)) from None


# ---------------------------------------------------------------- YAML with positions

class _Source:
    """Where the values of one YAML document came from, so errors can name the file and line."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.lines: dict[Key, int] = {}
        self.scalars: dict[Key, str] = {}  # the text as written, for values read as strings

    def error(self, key: Key, message: str, line: int | None = None) -> SpecError:
        return SpecError(message, self.file, line or self.line(key), _key_text(key))

    def line(self, key: Key) -> int | None:
        # A key that is absent (missing, or only in the stored spec) is placed at its nearest parent.
        for end in range(len(key), -1, -1):
            if key[:end] in self.lines:
                return self.lines[key[:end]]
        return None

    def text(self, key: Key, value: Any) -> str:
        """A scalar as the operator wrote it: `1.10` stays "1.10", `010` stays "010"."""
        if isinstance(value, str):
            return value
        return self.scalars.get(key, str(value))


def _key_text(key: Key) -> str:
    text = ""
    for part in key:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing deep nesting before its recursive composer overflows the stack."""

    depth = 0

    def compose_node(self, parent, index):
        if self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                              self.peek_event().start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _parse_yaml(text: str, filename: str) -> tuple[Any, _Source]:
    source = _Source(filename)
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return None, source
        _check_duplicates(node, source, (), set())
        _check_expansion(node, source)
        source.lines[()] = node.start_mark.line + 1
        return _construct(loader, node, (), source, frozenset()), source
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = ", ".join(part for part in (exc.context, exc.problem) if part) or "syntax error"
        if mark:
            problem += f" (column {mark.column + 1})"
        raise SpecError(f"invalid YAML: {problem}", filename, mark.line + 1 if mark else None) from None
    except yaml.reader.ReaderError as exc:
        line = text[:exc.position].count("\n") + 1
        raise SpecError(f"invalid YAML: character #x{exc.character:04x}: {exc.reason}", filename,
                        line) from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_duplicates(node: yaml.Node, source: _Source, key: Key, seen: set[int]) -> None:
    # PyYAML silently keeps the last of two equal keys; this runs on the raw node tree, before merge
    # keys (<<) are flattened, because a key that overrides a merged one is not a duplicate.
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicates(item, source, key + (index,), seen)
    elif isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            name, line = key_node.value, key_node.start_mark.line + 1
            if name in first:
                raise source.error(key + (name,), f"duplicate key {name!r} (first at line {first[name]}); "
                                                  "YAML would silently keep only the last one", line)
            first[name] = line
            _check_duplicates(value_node, source, key + (name,), seen)


def _check_expansion(root: yaml.Node, source: _Source) -> None:
    """Refuse aliases that multiply a document (a "billion laughs") or nest it too deeply once
    expanded, before anything expands them. Each node is measured once."""
    measured: dict[int, tuple[int, int]] = {}  # id → (values, depth) of the node expanded

    def refuse(node: yaml.Node, why: str) -> SpecError:
        return SpecError(f"{why} once its aliases are expanded", source.file, node.start_mark.line + 1)

    def measure(node: yaml.Node, level: int, active: set[int]) -> tuple[int, int]:
        if id(node) in measured:
            values, depth = measured[id(node)]
        elif id(node) in active or isinstance(node, yaml.ScalarNode):
            values, depth = 1, 1  # a recursive alias is reported by _construct, with its key
        else:
            if level > MAX_DEPTH:
                raise refuse(node, f"the document is nested deeper than {MAX_DEPTH} levels")
            active.add(id(node))
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            values, depth = 1, 0
            for child in children:
                child_values, child_depth = measure(child, level + 1, active)
                values, depth = values + child_values, max(depth, child_depth)
                if values > MAX_VALUES:
                    raise refuse(node, f"the document has more than {MAX_VALUES} values")
            active.discard(id(node))
            depth += 1
            measured[id(node)] = values, depth
        if level + depth - 1 > MAX_DEPTH:
            raise refuse(node, f"the document is nested deeper than {MAX_DEPTH} levels")
        return values, depth

    measure(root, 1, set())


def _construct(loader: yaml.SafeLoader, node: yaml.Node, key: Key, source: _Source,
               parents: frozenset[int]) -> Any:
    if isinstance(node, yaml.ScalarNode):
        source.scalars[key] = node.value
        try:
            return loader.construct_object(node)
        except yaml.YAMLError:
            raise
        except Exception:
            # PyYAML lets a bad value of a tag (`2024-02-30`, `!!int ""`, 5000 digits) escape bare.
            kind = node.tag.rsplit(":", 1)[-1]
            raise source.error(key, f"invalid YAML: {node.value[:40]!r} is not a valid {kind}; quote it if it "
                                    "is text", node.start_mark.line + 1) from None
    if id(node) in parents:
        raise source.error(key, "an alias refers to a node that contains it; recursive values are not allowed")
    parents = parents | {id(node)}
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            source.lines[key + (index,)] = item.start_mark.line + 1
            items.append(_construct(loader, item, key + (index,), source, parents))
        return items
    loader.flatten_mapping(node)
    mapping: dict[str, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise source.error(key, "keys must be plain names, not lists or mappings",
                               key_node.start_mark.line + 1)
        # Keys as written: `ON:` or `1:` stay "ON" and "1" instead of becoming True and 1.
        name = key_node.value
        source.lines[key + (name,)] = key_node.start_mark.line + 1
        mapping[name] = _construct(loader, value_node, key + (name,), source, parents)
    return mapping


# ---------------------------------------------------------------- validation: the spec

def _spec(data: Any, source: _Source) -> Spec:
    if data is None:
        raise source.error((), "the spec is empty; expected a mapping with app, environment, domain "
                               "and services")
    _mapping(source, (), data, "the spec")
    _known_keys(source, (), data, TOP_KEYS)
    _required_keys(source, (), data, TOP_REQUIRED)
    version = data.get("version")
    if version is not None and (type(version) is not int or version != VERSION):
        shown = source.text(("version",), version) if type(version) in (int, float) else _kind(version)
        raise source.error(("version",), f"unsupported version {shown}; the only version is {VERSION}")
    app = _name(source, ("app",), data["app"])
    environment = _name(source, ("environment",), data["environment"])
    domain = _domain(source, ("domain",), data["domain"])
    services = _services(source, data["services"])
    limits = _limits(source, ("limits",), data.get("limits"))
    logs = _logs(source, ("logs",), data.get("logs"), len(services))
    aliases = _aliases(source, ("aliases",), data.get("aliases"), domain)
    tls = _tls(source, ("tls",), data.get("tls"))
    return Spec(VERSION, app, environment, domain, services, limits, logs, source, aliases, tls)


ALIASES_MAX = 16
SECRET_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def _aliases(source: _Source, key: Key, value: Any, domain: str) -> tuple[str, ...]:
    """`aliases: [www.shop.example, shop.example]`: more host names, routed and certified like the domain."""
    entries = _list(source, key, value, "[www.shop.example.com]")
    if len(entries) > ALIASES_MAX:
        raise source.error(key, f"{len(entries)} aliases; at most {ALIASES_MAX}")
    out: list[str] = []
    for index, entry in enumerate(entries):
        name = _domain(source, key + (index,), entry)
        if name == domain or name in out:
            raise source.error(key + (index,), f"{name} is named twice (the domain and aliases are each one name)")
        out.append(name)
    return tuple(out)


def _tls(source: _Source, key: Key, value: Any) -> Tls | None:
    """`tls: auto` or `tls: {certificate: SECRET, key: SECRET}`; none: plain HTTP."""
    if value is None:
        return None
    if value == "auto":
        return Tls()
    if not isinstance(value, dict):
        raise source.error(key, f"{source.text(key, value)!r} is not a TLS setting: auto (certificates by ACME), "
                                "or {certificate: SECRET, key: SECRET}, the environment's secrets holding a "
                                "certificate and its key")
    _known_keys(source, key, value, ("certificate", "key"))
    _required_keys(source, key, value, ("certificate", "key"))
    names = []
    for part in ("certificate", "key"):
        name = value[part]
        if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
            raise source.error(key + (part,), f"{name!r} is not a secret name (A-Z, 0-9 and _, like TLS_CERT): "
                                              "the value is set with deployctl secret set")
        names.append(name)
    if names[0] == names[1]:
        raise source.error(key + ("key",), "the certificate and the key are two secrets")
    return Tls(*names)


MEMORY_MIN, MEMORY_MAX = 16 << 20, 1 << 40
CPU_MIN, CPU_MAX = 0.01, 1024.0
PROCESSES_MIN, PROCESSES_MAX = 8, 4_194_304
MYSQL_CONNECTIONS_MAX = 100_000


def _limits(source: _Source, key: Key, value: Any) -> Limits:
    if value is None:
        return Limits()
    _mapping(source, key, value)
    _known_keys(source, key, value, LIMIT_KEYS)
    default = Limits()
    return Limits(
        memory=_memory(source, key + ("memory",), value["memory"]) if "memory" in value else default.memory,
        cpu=_cpu(source, key + ("cpu",), value["cpu"]) if "cpu" in value else default.cpu,
        processes=_count(source, key + ("processes",), value.get("processes"), default.processes,
                         PROCESSES_MIN, PROCESSES_MAX, "processes"),
        mysql_connections=_count(source, key + ("mysql_connections",), value.get("mysql_connections"),
                                 default.mysql_connections, 1, MYSQL_CONNECTIONS_MAX, "connections"))


LOG_FILE_MIN, LOG_FILE_MAX = 64 << 10, 1 << 30


def _logs(source: _Source, key: Key, value: Any, services: int) -> Logs:
    if value is None:
        return Logs()
    _mapping(source, key, value)
    _known_keys(source, key, value, LOG_KEYS)
    default = Logs()
    file = _size(source, key + ("file",), value["file"], LOG_FILE_MIN, LOG_FILE_MAX) if "file" in value else default.file
    cap = {k: _size(source, key + (k,), value[k], 2 * file, 1 << 40) if k in value else getattr(default, k)
           for k in ("service", "environment")}
    logs = Logs(file, cap["service"], cap["environment"])
    if logs.keep(services) < 2 * file:
        at = key + ("environment",) if "environment" in value else key + ("file",)
        raise source.error(at, f"{memory_text(logs.environment)} for {services} services leaves each less than "
                               f"two files of {memory_text(file)}: raise logs.environment or lower logs.file")
    for k in ("service", "environment"):
        if k not in value and cap[k] < 2 * file:
            raise source.error(key + ("file",), f"{memory_text(file)} files leave fewer than two under the "
                                                f"default {k} cap of {memory_text(cap[k])}")
    return logs


def _memory(source: _Source, key: Key, value: Any) -> int:
    return _size(source, key, value, MEMORY_MIN, MEMORY_MAX) // 4096 * 4096  # the kernel counts in pages


def _size(source: _Source, key: Key, value: Any, low: int, high: int) -> int:
    shown = source.text(key, value) if value is not None else "null"
    number = sizes.parse(shown.strip()) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if number is None:
        raise source.error(key, f"{shown!r} is not a size; write bytes or a number with K, M, G or T "
                                "(powers of 1024), like 512M or 2G")
    if not low <= number <= high:
        raise source.error(key, f"{shown} is out of range: between {memory_text(low)} and {memory_text(high)}")
    return int(number)


def _cpu(source: _Source, key: Key, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not CPU_MIN <= value <= CPU_MAX:
        shown = source.text(key, value) if value is not None else "null"
        raise source.error(key, f"must be a number of CPUs between {CPU_MIN:g} and {CPU_MAX:g}, like 0.5 or 2, "
                                f"not {shown!r}")
    return float(value)


def _count(source: _Source, key: Key, value: Any, default: int, low: int, high: int, what: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = source.text(key, value) if value is not None else "null"
        raise source.error(key, f"must be a whole number of {what} between {low} and {high}, not {shown!r}")
    return value


def _services(source: _Source, raw: Any) -> tuple[Service, ...]:
    key = ("services",)
    if not isinstance(raw, dict):
        raise source.error(key, f"must be a mapping of service names to settings, not {_kind(raw)}")
    if not raw:
        raise source.error(key, "must name at least one service")
    services = [_service(source, name, body) for name, body in raw.items()]
    _unique_paths(source, services)
    _shared_owners(source, raw, services)
    return tuple(sorted(services, key=lambda s: s.name))


def _service(source: _Source, name: str, body: Any) -> Service:
    at = ("services", name)
    _name(source, at, name, "service name")
    if not isinstance(body, dict):
        raise source.error(at, f"must be a mapping of settings, not {_kind(body)}")
    _known_keys(source, at, body, SERVICE_KEYS)
    _required_keys(source, at, body, SERVICE_REQUIRED)
    path = _web_path(source, at + ("path",), body["path"]) if body.get("path") is not None else None
    repository = _repository(source, at + ("source",), body["source"])
    ref = _ref(source, at + ("ref",), body["ref"])
    root = _root(source, at + ("root",), body.get("root"))
    install, build, migrate = (_command(source, at + (k,), body.get(k)) for k in ("install", "build", "migrate"))
    start = _string(source, at + ("start",), body["start"], what="a command (a string)")
    health, check = _health(source, at + ("health",), body.get("health"), path is not None)
    healthy_after = _healthy_after(source, at + ("healthy_after",), body.get("healthy_after"), path is not None)
    drain = _drain(source, at + ("drain",), body.get("drain"), path is not None)
    secrets = _secrets(source, at + ("secrets",), body.get("secrets"))
    env = _env(source, at + ("env",), body.get("env"), secrets)
    uses, shared = _uses(source, at + ("uses",), body.get("uses"), name)
    _env_references(source, at + ("env",), env, uses, path is not None)
    redis = _redis(source, at + ("redis",), body.get("redis"), uses, dict(shared))
    restart = _restart(source, at + ("restart",), body.get("restart"))
    writable = _writable(source, at + ("writable",), body.get("writable"))
    host = _host(source, at + ("host",), body.get("host"))
    host_labels = _host_labels(source, at + ("host_labels",), body.get("host_labels"))
    replicas = _replicas(source, at + ("replicas",), body.get("replicas"), path is not None)
    return Service(name, path, repository, ref, root, install, build, migrate, start, health, env, secrets,
                   uses, healthy_after, check, drain, shared, redis, restart, writable, host, host_labels, replicas)


REPLICAS_MAX = 32


def _replicas(source: _Source, key: Key, value: Any, is_web: bool) -> int:
    """`replicas: N`: a web service's processes of one code instance, behind one nginx upstream."""
    if value is None:
        return 1
    if not is_web:
        raise source.error(key, "only a web service (with a path) runs replicas behind its route; a daemon runs once")
    return _count(source, key, value, 1, 1, REPLICAS_MAX, "replicas")


# An agent id, and a label's key or value: what `deployctl agents grant --label` accepts.
LABEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
HOST_LABELS_MAX = 8


def _host(source: _Source, key: Key, value: Any) -> str:
    """`host: computing-2`: the agent every new instance of the service goes to."""
    if value is None:
        return ""
    text = _string(source, key, value, what="an agent id, like computing-2")
    if not LABEL.fullmatch(text):
        raise source.error(key, f"{text!r} is not an agent id (lowercase letters, digits and . _ -)")
    return text


def _host_labels(source: _Source, key: Key, value: Any) -> tuple[tuple[str, str], ...]:
    """`host_labels: {zone: eu-1}`: new instances go only to agents granted every one of them."""
    if value is None:
        return ()
    if not isinstance(value, dict) or not value:
        raise source.error(key, "must be a mapping of labels, like {zone: eu-1}")
    if len(value) > HOST_LABELS_MAX:
        raise source.error(key, f"{len(value)} labels; at most {HOST_LABELS_MAX}")
    out = []
    for label, wanted in value.items():
        text = source.text(key + (label,), wanted) if not isinstance(wanted, (dict, list)) and wanted is not None else None
        if not isinstance(label, str) or not LABEL.fullmatch(label) or text is None or not LABEL.fullmatch(text):
            raise source.error(key + (str(label),), f"{label}: {wanted!r} is not a label (lowercase letters, digits "
                                                    "and . _ -, like zone: eu-1)")
        out.append((label, text))
    return tuple(sorted(out))


WRITABLE_MAX = 32
_WRITABLE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def _writable(source: _Source, key: Key, value: Any) -> tuple[str, ...]:
    """`[tmp/, storage/, whoami]`: paths of the working folder that stay writable once the release
    is sealed, each a link into the service's `shared` folder (a folder with a trailing /)."""
    entries = _list(source, key, value, "[tmp/, storage/]")
    if len(entries) > WRITABLE_MAX:
        raise source.error(key, f"{len(entries)} paths; at most {WRITABLE_MAX}")
    out: list[str] = []
    for index, entry in enumerate(entries):
        at = key + (index,)
        if not isinstance(entry, str) or not entry.strip("/"):
            raise source.error(at, "must be a path inside the working folder, like tmp/ or storage/uploads/")
        parts = entry.rstrip("/").split("/")
        if entry.startswith("/") or not all(_WRITABLE_PART.fullmatch(p) for p in parts) or len(entry) > 200:
            raise source.error(at, f"{entry!r} is not a relative path of letters, digits and . _ - "
                                   "(no .., no leading dot or slash)")
        if parts[0] in (".env", ".git") or parts[0].startswith(".env"):
            raise source.error(at, f"{entry!r} is the deployer's (the .env) or the checkout's own")
        name = "/".join(parts)
        if any(name == o.rstrip("/") or name.startswith(o.rstrip("/") + "/") or o.startswith(name + "/")
               for o in out):
            raise source.error(at, f"{entry!r} overlaps another writable path")
        out.append(name + "/" if entry.endswith("/") else name)
    return tuple(out)


def _unique_paths(source: _Source, services: list[Service]) -> None:
    # `/api` and `/api/` would route the same requests, so they count as the same path.
    first: dict[str, str] = {}
    for service in services:
        if service.path is None:
            continue
        route = service.path.rstrip("/") or "/"
        if route in first:
            raise source.error(("services", service.name, "path"),
                               f"path {service.path} is already used by service {first[route]}")
        first[route] = service.name


def _name(source: _Source, key: Key, value: Any, what: str = "") -> str:
    if value is None or isinstance(value, (dict, list)):
        raise source.error(key, f"must be a name like shop, not {_kind(value)}")
    text = source.text(key, value)  # as written, so `environment: on` is the name "on", not True
    problem = name_problem(text)
    if problem:
        raise source.error(key, " ".join(part for part in (what, repr(text), problem) if part))
    return text


def _domain(source: _Source, key: Key, value: Any) -> str:
    text = _string(source, key, value).lower()
    labels = text.split(".")
    if len(text) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise source.error(key, f"{value!r} is not a hostname (letters, digits and hyphens in "
                                "dot-separated labels, like shop.example.com or shop.localhost)")
    return text


def _web_path(source: _Source, key: Key, value: Any) -> str:
    path = _string(source, key, value)
    if not path.startswith("/"):
        raise source.error(key, f"must start with '/', like /{path.lstrip('/') or 'api'}")
    if not _PATH_CHARS.fullmatch(path):
        bad = next(c for c in path if not _PATH_CHARS.fullmatch(c))
        raise source.error(key, f"contains {bad!r}; a path uses letters, digits and . _ ~ / -")
    for bad in ("..", "//"):
        if bad in path:
            raise source.error(key, f"{path!r} contains {bad!r}")
    return path


def _repository(source: _Source, key: Key, value: Any) -> str:
    text = _string(source, key, value)
    if not text.isprintable() or text != text.strip():
        raise source.error(key, "contains control characters or leading/trailing spaces")
    if text.startswith("-"):
        raise source.error(key, f"{text!r} starts with '-' (git would read it as an option)")
    return text


def _ref(source: _Source, key: Key, value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = source.text(key, value)  # an unquoted tag like 1.10
    text = _string(source, key, value, what="a string (a branch, tag or full commit)")
    problem = ref_problem(text)
    if problem:
        raise source.error(key, f"{problem}; a ref is a branch, tag or full commit")
    return text


def _root(source: _Source, key: Key, value: Any) -> str | None:
    if value is None:
        return None
    text = _string(source, key, value)
    if text.startswith("/"):
        raise source.error(key, f"{text!r} must be relative to the repository, like web/")
    if ".." in text:
        raise source.error(key, f"{text!r} contains '..'; root must stay inside the repository")
    if not _PATH_CHARS.fullmatch(text):
        bad = next(c for c in text if not _PATH_CHARS.fullmatch(c))
        raise source.error(key, f"contains {bad!r}; a folder uses letters, digits and . _ ~ / -")
    normal = posixpath.normpath(text)
    return None if normal == "." else normal


def _command(source: _Source, key: Key, value: Any) -> str | None:
    if value is None:
        return None
    return _string(source, key, value, what="a command (a string)")


def _health(source: _Source, key: Key, value: Any, is_web: bool) -> tuple[str | None, HealthCheck]:
    """`health: /path`, or a mapping: path, status, timeout, interval, deadline for a web
    service; command, timeout, interval, deadline for a daemon."""
    if value is None:
        return (DEFAULT_HEALTH if is_web else None), HealthCheck()
    if not isinstance(value, dict):
        if not is_web:
            raise source.error(key, "a daemon's health is a mapping with a command, like {command: node check.js}; "
                                    "without one it is healthy once it stays up for healthy_after seconds")
        return _health_path(source, key, value), HealthCheck()
    _known_keys(source, key, value, WEB_HEALTH_KEYS if is_web else DAEMON_HEALTH_KEYS)
    timing = {k: _seconds(source, key + (k,), value[k]) for k in ("timeout", "interval", "deadline") if k in value}
    if is_web:
        path = _health_path(source, key + ("path",), value["path"]) if "path" in value else DEFAULT_HEALTH
        return path, HealthCheck(statuses=_statuses(source, key + ("status",), value.get("status")), **timing)
    if "command" not in value:
        raise source.error(key, "needs a command, like {command: node check.js}")
    return None, HealthCheck(command=_command(source, key + ("command",), value["command"]), **timing)


def _health_path(source: _Source, key: Key, value: Any) -> str:
    text = _string(source, key, value)
    if not text.startswith("/") or any(c.isspace() for c in text) or not text.isprintable():
        raise source.error(key, f"{text!r} must be a URL path starting with '/', like /health")
    return text


def _statuses(source: _Source, key: Key, value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    found = []
    for index, item in enumerate(items):
        at = key + (index,) if isinstance(value, list) else key
        if isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 599:
            raise source.error(at, f"{source.text(at, item)!r} is not an HTTP status (100 to 599)")
        found.append(item)
    if not found:
        raise source.error(key, "lists no status; leave it out for any 2xx or 3xx")
    return tuple(sorted(set(found)))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m)")


def _seconds(source: _Source, key: Key, value: Any) -> float:
    """A duration: a number of seconds, or a string like 500ms, 2s, 1.5m."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        seconds = float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)] if match else None
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        seconds = float(value)
    else:
        seconds = None
    if seconds is None or not 0 < seconds <= 3600:
        raise source.error(key, f"{source.text(key, value)!r} is not a duration between 1ms and 1 hour, "
                                "like 2s, 500ms or 1m")
    return seconds


def _drain(source: _Source, key: Key, value: Any, is_web: bool) -> float:
    if value is None:
        return DEFAULT_DRAIN
    if not is_web:
        raise source.error(key, "only web services (with a path) are drained; a daemon is stopped at once")
    return _seconds(source, key, value)


def _healthy_after(source: _Source, key: Key, value: Any, is_web: bool) -> float:
    if value is None:
        return DEFAULT_HEALTHY_AFTER
    if is_web:
        raise source.error(key, "only daemons have healthy_after; a web service is healthy when its "
                                "health path answers")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise source.error(key, f"must be a positive number of seconds, not {source.text(key, value)!r}")
    return float(value)


def _env(source: _Source, key: Key, value: Any, secrets: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    _mapping(source, key, value)
    pairs = []
    for name, setting in value.items():
        at = key + (name,)
        _env_name(source, at, name)
        if name in secrets:
            raise source.error(at, f"{name} is also declared in secrets; a secret's value is set with "
                                   "`deployctl secret set`, never in the spec")
        pairs.append((name, _env_value(source, at, setting)))
    return tuple(sorted(pairs))


def _env_value(source: _Source, key: Key, value: Any) -> str:
    if value is None:
        raise source.error(key, 'has no value; write "" for an empty value, or remove it')
    if isinstance(value, bool):
        raise source.error(key, f"{source.text(key, value)} is read by YAML as a boolean; quote it, "
                                f'like "{source.text(key, value)}"')
    if isinstance(value, (dict, list)):
        raise source.error(key, f"must be a single value, not {_kind(value)}")
    text = source.text(key, value)
    if "\0" in text:
        raise source.error(key, "contains a NUL character")
    if "\n" in text or "\r" in text:
        raise source.error(key, "contains a line break, which a .env file cannot hold")
    return text


def generated_names(uses: tuple[str, ...], web: bool) -> tuple[str, ...]:
    """The generated variables a service has: PORT for a web service, and each used component's."""
    return (("PORT",) if web else ()) + tuple(name for component in uses for name in GENERATED[component])


def _env_references(source: _Source, key: Key, env: tuple[tuple[str, str], ...], uses: tuple[str, ...],
                    web: bool) -> None:
    """Every ${NAME} in an env value names a generated value this service has, and no env entry
    takes the name of one."""
    have = generated_names(uses, web)
    for name, value in env:
        at = key + (name,)
        if name in have:
            raise source.error(at, f"{name} is set by the deployer for this service (it uses "
                                   f"{' and '.join(uses) or 'no component'}); build another name from ${{{name}}}")
        try:
            names = envfile.references(value)
        except ValueError as exc:
            raise source.error(at, str(exc)) from None
        for ref in names:
            if ref in have:
                continue
            owner = next((c for c, generated in GENERATED.items() if ref in generated), None)
            if owner:
                why = f"this service does not use {owner} (add it to uses)"
            elif ref == "PORT":
                why = "PORT is given to web services only (a service with a path)"
            else:
                why = f"it has {', '.join(have) or 'none'}; write $$ for a literal $"
            raise source.error(at, f"${{{ref}}} is not a generated value of this service: {why}")


def _secrets(source: _Source, key: Key, value: Any) -> tuple[str, ...]:
    names = _list(source, key, value, "[SESSION_KEY]")
    for index, name in enumerate(names):
        _env_name(source, key + (index,), name)
        if names.index(name) != index:
            raise source.error(key + (index,), f"{name} is listed twice")
    return tuple(sorted(names))


def _env_name(source: _Source, key: Key, name: Any) -> None:
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        raise source.error(key, f"{source.text(key, name)!r} is not an environment variable name "
                                "(uppercase letters, digits and _, not starting with a digit)")
    if name in RESERVED_ENV:
        raise source.error(key, f"{name} is set by the deployer (reserved: {', '.join(RESERVED_ENV)})")


def _uses(source: _Source, key: Key, value: Any, name: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """`[mysql, redis]`: instances of the service's own; `web.mysql`: service web's instance.
    (the components, the (component, service) pairs of the shared ones)."""
    entries = _list(source, key, value, "[mysql, redis] or [web.mysql]")
    components, shared = [], []
    for index, entry in enumerate(entries):
        owner, dot, component = entry.rpartition(".") if isinstance(entry, str) else ("", "", entry)
        _component(source, key + (index,), component)
        if component in components:
            raise source.error(key + (index,), f"{component} is listed twice; a service uses one {component} "
                                               "instance, its own or another service's")
        if dot:
            if owner == name:
                raise source.error(key + (index,), f"{entry} is this service's own instance; write {component}")
            _name(source, key + (index,), owner, "service name")
            shared.append((component, owner))
        components.append(component)
    return tuple(c for c in COMPONENTS if c in components), tuple(sorted(shared))


def _shared_owners(source: _Source, raw: dict, services: list[Service]) -> None:
    """A shared instance is another service's own: `web.mysql` needs a service web using mysql."""
    by_name = {s.name: s for s in services}
    for service in services:
        for index, entry in enumerate(raw[service.name].get("uses") or ()):
            owner, _, component = entry.rpartition(".")
            if not owner:
                continue
            at = ("services", service.name, "uses", index)
            if owner not in by_name:
                raise source.error(at, f"{entry}: no service {owner!r} in this spec "
                                       f"(services: {', '.join(sorted(by_name))})")
            theirs = by_name[owner].owner_of(component)
            if component not in by_name[owner].uses:
                raise source.error(at, f"{entry}: service {owner} does not use {component}")
            if theirs == service.name:
                raise source.error(at, f"{entry}: service {owner} uses this service's {component}; one of the "
                                       f"two must have its own ({component})")
            if theirs != owner:
                raise source.error(at, f"{entry}: service {owner} uses {theirs}'s {component} itself; "
                                       f"write {theirs}.{component}")
    for service in services:  # an owner is made before its users: no service may wait on itself
        seen, path = set(), [service.name]
        while path[-1] not in seen:
            seen.add(path[-1])
            owners = sorted({o for _, o in by_name[path[-1]].shared})
            if not owners:
                break
            if service.name in owners:
                raise source.error(("services", service.name, "uses"),
                                   f"{' → '.join(path + [service.name])}: these services use each other's "
                                   "instances, so none of them can be made first; let one own them all")
            path.append(owners[0])


def shared_depth(services) -> dict[str, int]:
    """How many owners stand before each service (0: it uses no other service's instance): the
    order in which their instances can be made."""
    by_name = {s.name: s for s in services}
    depth: dict[str, int] = {}

    def of(name: str, trail: frozenset = frozenset()) -> int:
        if name not in depth:
            owners = [o for _, o in by_name[name].shared if o in by_name and o not in trail] if name in by_name else []
            depth[name] = 1 + max((of(o, trail | {name}) for o in owners), default=-1)
        return depth[name]
    for name in by_name:
        of(name)
    return depth


def _restart(source: _Source, key: Key, value: Any) -> RestartPolicy:
    """`restart: always` (the default), `never`, or `{attempts: 5, stable_after: 30s}`."""
    if value is None or value == "always":
        return RestartPolicy()
    if value == "never":
        return RestartPolicy(enabled=False)
    if not isinstance(value, dict):
        raise source.error(key, f"{source.text(key, value)!r} is not a restart policy: always (the default), never, "
                                "or a mapping like {attempts: 5, stable_after: 30s}")
    _known_keys(source, key, value, RESTART_KEYS)
    default = RestartPolicy()
    return RestartPolicy(True, _count(source, key + ("attempts",), value.get("attempts"), default.attempts, 1, 100,
                                      "restarts"),
                         _stable_after(source, key + ("stable_after",), value["stable_after"]) if "stable_after" in value
                         else default.stable_after)


def _stable_after(source: _Source, key: Key, value: Any) -> float:
    seconds = _seconds(source, key, value)
    if seconds < 1:  # shorter, a process that dies just after starting would be restarted forever
        raise source.error(key, f"{source.text(key, value)!r} is shorter than 1s")
    return seconds


def _redis(source: _Source, key: Key, value: Any, uses: tuple[str, ...], shared: dict[str, str]) -> RedisSettings:
    """`redis: {mode: prefix | dedicated, maxmemory: 64M}`, for a service's own Redis instance."""
    if value is None:
        return RedisSettings()
    if "redis" not in uses:
        raise source.error(key, "this service does not use redis (add it to uses)")
    if "redis" in shared:
        raise source.error(key, f"this service uses {shared['redis']}'s Redis instance; its mode and memory "
                                f"are set on service {shared['redis']}")
    _mapping(source, key, value)
    _known_keys(source, key, value, REDIS_KEYS)
    mode = value.get("mode", "prefix")
    if mode not in REDIS_MODES:
        raise source.error(key + ("mode",), f"unknown mode {source.text(key + ('mode',), mode)!r}; "
                                            f"known modes: {', '.join(REDIS_MODES)}")
    if "maxmemory" not in value:
        return RedisSettings(mode)
    if mode != "dedicated":
        raise source.error(key + ("maxmemory",), "only a dedicated Redis has a memory bound of its own; "
                                                 "a prefix user shares the server's (mode: dedicated)")
    return RedisSettings(mode, _size(source, key + ("maxmemory",), value["maxmemory"],
                                     REDIS_MAXMEMORY_MIN, REDIS_MAXMEMORY_MAX))


def _component(source: _Source, key: Key, value: Any) -> str:
    if value not in COMPONENTS:
        shown = source.text(key, value) if value is not None else "null"
        raise source.error(key, f"unknown component {shown!r}; known components: {', '.join(COMPONENTS)}")
    return value


# ---------------------------------------------------------------- validation: deploy options

def _options(data: Any, source: _Source, spec: Spec) -> Options:
    if data is None:
        return Options()
    _mapping(source, (), data, "deploy options")
    _known_keys(source, (), data, OPTION_KEYS)
    limited = _option_services(source, data.get("services"), spec)
    in_scope = limited or tuple(s.name for s in spec.services)
    refs = _option_refs(source, data.get("refs"), spec, in_scope)
    renew = _option_renew(source, data.get("renew"), spec, in_scope)
    return Options(limited, MappingProxyType(renew), MappingProxyType(refs))


def _option_services(source: _Source, value: Any, spec: Spec) -> tuple[str, ...]:
    key = ("services",)
    if value is None:
        return ()
    names = _list(source, key, value, "[web]")
    if not names:
        raise source.error(key, "is empty; leave it out to deploy every service")
    for index, name in enumerate(names):
        _spec_service(source, key + (index,), name, spec, _service_names(spec))
        if names.index(name) != index:
            raise source.error(key + (index,), f"{name} is listed twice")
    return tuple(sorted(names))


def _option_refs(source: _Source, value: Any, spec: Spec, in_scope: tuple[str, ...]) -> dict[str, str]:
    key = ("refs",)
    if value is None:
        return {}
    _mapping(source, key, value)
    return {name: _ref(source, key + (name,), value[name])
            for name in sorted(value) if _spec_service(source, key + (name,), name, spec, in_scope)}


def _option_renew(source: _Source, value: Any, spec: Spec,
                  in_scope: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    key = ("renew",)
    if value is None:
        return {}
    if isinstance(value, list):
        return _renew_everywhere(source, key, value, spec, in_scope)
    if not isinstance(value, dict):
        raise source.error(key, f"must be a list like [mysql] or a mapping like {{web: [mysql]}}, "
                                f"not {_kind(value)}")
    renew = {}
    for name in sorted(value):
        at = key + (name,)
        service = _spec_service(source, at, name, spec, in_scope)
        components = _list(source, at, value[name], "[mysql]")
        for index, component in enumerate(components):
            _component(source, at + (index,), component)
            if component not in service.uses:
                raise source.error(at + (index,), f"service {name} does not use {component} "
                                                  f"(uses: {', '.join(service.uses) or 'nothing'})")
            if service.owner_of(component) != name:
                owner = service.owner_of(component)
                raise source.error(at + (index,), f"service {name} uses {owner}'s {component}; renew it there "
                                                  f"({{{owner}: [{component}]}}), which deploys {name} too")
        if components:
            renew[name] = tuple(c for c in COMPONENTS if c in components)
    return renew


def _renew_everywhere(source: _Source, key: Key, components: list, spec: Spec,
                      in_scope: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    # The list form means "these components, wherever the deployed services use them".
    for index, component in enumerate(components):
        _component(source, key + (index,), component)
        if not any(_owns(spec.service(name), component) for name in in_scope):
            raise source.error(key + (index,), f"no service in this deploy has a {component} instance of its own "
                                               f"(services: {', '.join(in_scope)})")
    renew = {}
    for name in in_scope:
        used = tuple(c for c in COMPONENTS if c in components and _owns(spec.service(name), c))
        if used:
            renew[name] = used
    return renew


def _owns(service: Service, component: str) -> bool:
    return component in service.uses and service.owner_of(component) == service.name


def _spec_service(source: _Source, key: Key, name: Any, spec: Spec, in_scope: tuple[str, ...]) -> Service:
    names = _service_names(spec)
    if name not in names:
        raise source.error(key, f"no service {source.text(key, name)!r} in {spec.key} "
                                f"(services: {', '.join(names)})")
    if name not in in_scope:
        raise source.error(key, f"service {name} is not among the services this deploy is limited "
                                f"to ({', '.join(in_scope)})")
    return spec.service(name)


def _service_names(spec: Spec) -> tuple[str, ...]:
    return tuple(s.name for s in spec.services)


# ---------------------------------------------------------------- shared checks

def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _mapping(source: _Source, key: Key, value: Any, what: str = "") -> None:
    if not isinstance(value, dict):
        raise source.error(key, f"{what} must be a mapping, not {_kind(value)}".lstrip())


def _list(source: _Source, key: Key, value: Any, example: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise source.error(key, f"must be a list, like {example}, not {_kind(value)}")
    return value


def _string(source: _Source, key: Key, value: Any, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise source.error(key, f"must be {what}, not {_kind(value)}")
    if not value.strip():
        raise source.error(key, "must not be empty")
    return value


def _known_keys(source: _Source, key: Key, mapping: dict, known: tuple[str, ...]) -> None:
    for name in mapping:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise source.error(key + (name,), f"unknown key {name!r}{hint}; known keys: {', '.join(known)}")


def _required_keys(source: _Source, key: Key, mapping: dict, required: tuple[str, ...]) -> None:
    for name in required:
        if name not in mapping:
            raise source.error(key, f"missing required key {name!r} ({_HINTS[name]})")


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
