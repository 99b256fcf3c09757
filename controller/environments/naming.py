"""Every `auto-*` name the deployer gives to things on the servers (DESIGN.md §3), pure and deterministic."""

from __future__ import annotations

import hashlib
import posixpath
import re

PREFIX = "auto-"
NAME_MAX = 20
HASH_CHARS = 8
DATABASE_MAX = 64      # MySQL identifier limit
MYSQL_USER_MAX = 32    # MySQL ≥ 5.7 / MariaDB user name limit
UNIX_USER_MAX = 32     # useradd's limit
FILE_NAME_MAX = 255    # names are short enough that only the database and user limits ever bite

_NAME_CHARS = re.compile(r"[a-z0-9-]*")
_UNIT_INSTANCE = re.compile(r"(?P<base>[a-z0-9-]+)@(?P<n>[1-9][0-9]*)\.service")


def name_problem(name: object) -> str | None:
    """Why `name` is not a valid app, environment or service name, or None when it is."""
    if not isinstance(name, str):
        return "must be a string"
    if not name:
        return "is empty"
    if name != name.lower():
        return "has uppercase letters; names use lowercase letters, digits and single hyphens"
    if not _NAME_CHARS.fullmatch(name):
        bad = next(c for c in name if not _NAME_CHARS.fullmatch(c))
        return f"contains {bad!r}; names use lowercase letters, digits and single hyphens"
    if not name[0].isalpha():
        return "must start with a letter"
    if "--" in name:
        return "contains a double hyphen"
    if name.endswith("-"):
        return "ends with a hyphen"
    if len(name) > NAME_MAX:
        return f"is {len(name)} characters long; at most {NAME_MAX}"
    return None


def is_ours(name: str) -> bool:
    return name.startswith(PREFIX)


def service_dir(root: str, app: str, env: str, service: str) -> str:
    return posixpath.join(root, _name((app, env, service)))


def database_name(app: str, env: str, service: str, n: int) -> str:
    return _name((app, env, service), n, DATABASE_MAX)


def database_user(app: str, env: str, service: str, n: int) -> str:
    return _name((app, env, service), n, MYSQL_USER_MAX)


def redis_user(app: str, env: str, service: str, n: int) -> str:
    return database_name(app, env, service, n)


def redis_prefix(app: str, env: str, service: str, n: int) -> str:
    return database_name(app, env, service, n) + ":"


def nginx_file(app: str, env: str) -> str:
    return _name((app, env)) + ".conf"


def unit_base(app: str, env: str, service: str) -> str:
    """The systemd unit name before `@`: `auto-<app>-<env>-<service>`."""
    return _name((app, env, service))


def redis_unit(app: str, env: str, service: str) -> str:
    """The unit of a service's dedicated Redis servers (instance: the Redis instance number).
    A name no service's unit can have: the parts differ, so `_name` keeps them apart."""
    return _name((app, env, service, "redis"))


def redis_data_dir(service_dir: str, n: int) -> str:
    """Where dedicated Redis instance n keeps its data: in a root-owned folder of the service's,
    which only a destroy with --purge-data removes."""
    _check_number(n)
    return posixpath.join(service_dir, "data", f"redis-{n}")


def unit_template(app: str, env: str, service: str) -> str:
    return unit_base(app, env, service) + "@.service"


def unit_instance(app: str, env: str, service: str, n: int) -> str:
    _check_number(n)
    return f"{unit_base(app, env, service)}@{n}.service"


def parse_unit_instance(unit: str) -> tuple[str, int] | None:
    """`auto-…@3.service` → (`auto-…@.service`, 3); None for anything else."""
    found = _UNIT_INSTANCE.fullmatch(unit)
    if not found or not is_ours(unit):
        return None
    return f"{found['base']}@.service", int(found["n"])


def unix_user(app: str, env: str) -> str:
    return _name((app, env), limit=UNIX_USER_MAX)


def _name(parts: tuple[str, ...], n: int | None = None, limit: int = FILE_NAME_MAX) -> str:
    """`auto-<parts joined by ->[-<n>]`, with a hash suffix when it is too long or ambiguous.

    The hash is taken over the parts with `/` between them (a character names cannot contain), so
    distinct inputs get distinct suffixes even when their hyphen-joined forms coincide.
    """
    for part in parts:
        problem = name_problem(part)
        if problem:
            raise ValueError(f"{part!r} {problem}")
    tail = ""
    if n is not None:
        _check_number(n)
        tail = f"-{n}"
    full = PREFIX + "-".join(parts) + tail
    if len(full) <= limit and not _ambiguous(parts):
        return full
    identity = "/".join(parts) + (f"/{n}" if n is not None else "")
    digest = hashlib.sha256(identity.encode()).hexdigest()[:HASH_CHARS]
    room = limit - len(tail) - 1 - HASH_CHARS
    head = (PREFIX + "-".join(parts))[:room].rstrip("-")
    return f"{head}{tail}-{digest}"


def _ambiguous(parts: tuple[str, ...]) -> bool:
    """True if another valid split of the hyphen-joined parts exists (`a-b` + `c` vs `a` + `b-c`).

    A part can only begin at a token that starts with a letter, so the split is unique exactly when
    the joined form has no more such tokens after its first than there are boundaries between parts.
    """
    tokens = "-".join(parts).split("-")[1:]
    return sum(t[0].isalpha() for t in tokens) != len(parts) - 1


def _check_number(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"instance numbers start at 1, got {n!r}")
