"""Pure builders of operations: they return protobuf messages and never send anything.

Only the dispatcher sends operations; procedures compose these builders.
"""

from __future__ import annotations

import secrets
import time
from typing import Mapping, Sequence

from protos import deployer_pb2 as pb


def new_op_id(now: float | None = None) -> str:
    """Sortable by creation time, unique without coordination: op-20261125T091502-3f9a1c2e."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"op-{stamp}-{secrets.token_hex(4)}"


def exec_op(op_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            cwd: str = "", stdin: bytes = b"", timeout_s: float = 0.0, user: str = "",
            kill_grace_s: float = 0.0) -> pb.Operation:
    return pb.Operation(id=op_id, exec=pb.ExecSpec(
        argv=list(argv), env=dict(env or {}), cwd=cwd, stdin=stdin, timeout_s=timeout_s,
        user=user, kill_grace_s=kill_grace_s))


def summary(op: pb.Operation) -> list[str]:
    """What an operator sees of an operation in listings (never its env, file content, or the
    credentials of a URL in its command line)."""
    from .sources import sanitise
    kind = op.WhichOneof("kind")
    if kind == "exec":
        return [sanitise(arg) for arg in op.exec.argv]
    if kind == "write_file":
        return ["write_file", op.write_file.path, oct(op.write_file.mode or 0o644)]
    return [kind or "unknown"]


# ---------------------------------------------------------------- builders for deploy procedures
# Each returns what to run; passwords travel on stdin or in files, never in argv.

def _sql_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def mysql_create(database: str, user: str, password: str) -> bytes:
    """SQL creating a database and a user that can use that database and nothing else."""
    return (
        f"CREATE DATABASE {_sql_ident(database)} CHARACTER SET utf8mb4;\n"
        f"CREATE USER {_sql_string(user)}@'%' IDENTIFIED BY {_sql_string(password)};\n"
        f"GRANT ALL PRIVILEGES ON {_sql_ident(database)}.* TO {_sql_string(user)}@'%';\n"
    ).encode()


def mysql_user(database: str, user: str, password: str) -> bytes:
    """Recreate a missing user with its recorded password and grants (the data is not touched)."""
    return (
        f"CREATE USER IF NOT EXISTS {_sql_string(user)}@'%' IDENTIFIED BY {_sql_string(password)};\n"
        f"GRANT ALL PRIVILEGES ON {_sql_ident(database)}.* TO {_sql_string(user)}@'%';\n"
    ).encode()


def mysql_drop(database: str, user: str) -> bytes:
    return (f"DROP DATABASE IF EXISTS {_sql_ident(database)};\n"
            f"DROP USER IF EXISTS {_sql_string(user)}@'%';\n").encode()


def redis_create_user(user: str, prefix: str, password: str) -> bytes:
    """An ACL user confined to `prefix*` keys: data commands only. Commands that reveal or touch
    other tenants' keys (SCAN, RANDOMKEY, DBSIZE, SELECT, flushes…) are refused too."""
    return (f"ACL SETUSER {user} reset on >{password} ~{prefix}* resetchannels -@all "
            "+@connection +@read +@write +@keyspace +@transaction +@scripting -@dangerous -select "
            "-move -scan -randomkey -dbsize -function -script|flush -script|kill -script|debug "
            "-client|tracking -client|caching -client|getredir\n").encode()


def redis_drop_user(user: str) -> bytes:
    return f"ACL DELUSER {user}\n".encode()


# Deletes every key under a prefix on the server itself, in SCAN batches (KEYS would block the
# server), with the exact key bytes: nothing in a key name can turn into another argument.
_PURGE_LUA = ("local cursor = '0' repeat local r = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 500) "
              "cursor = r[1] for _, k in ipairs(r[2]) do redis.call('UNLINK', k) end until cursor == '0' "
              "return 0")


def redis_purge_script(cli: str, prefix: str) -> str:
    import shlex
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    return f"{cli} EVAL {shlex.quote(_PURGE_LUA)} 0 {shlex.quote(pattern)} >/dev/null"


def env_file(values: dict[str, str]) -> bytes:
    """`.env` content: KEY=VALUE lines, newlines in values refused (they would split a line)."""
    lines = []
    for name, value in sorted(values.items()):
        if "\n" in value or "\r" in value:
            raise ValueError(f"the value of {name} contains a newline")
        lines.append(f"{name}={value}\n")
    return "".join(lines).encode()


def nginx_config(env_key: str, domain: str, listen: str, routes: list[tuple[str, str, int]]) -> bytes:
    """The environment's nginx file: one location per web service (path, host, port).

    A service mounted at /api sees /api/x as /x (its health path is checked the same way, on
    its own port) and learns its mount point from X-Forwarded-Prefix.
    """
    out = [f"# {env_key}: written by the deployer; edits are overwritten\n",
           "server {\n", f"    listen {listen};\n", f"    server_name {domain};\n"]
    for path, host, port in sorted(routes):
        prefix = path.rstrip("/")
        if prefix:
            out.append(f"    location = {prefix} {{ return 301 {prefix}/$is_args$args; }}\n")
        out += [
            f"    location {prefix}/ {{\n",
            f"        proxy_pass http://{host}:{port}/;\n",
            "        proxy_http_version 1.1;\n",
            "        proxy_set_header Connection \"\";\n",
            "        proxy_set_header Host $host;\n",
            "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n",
            f"        proxy_set_header X-Forwarded-Prefix {prefix or '/'};\n",
            "        proxy_next_upstream error timeout;\n",
            "    }\n",
        ]
    out.append("}\n")
    return "".join(out).encode()


def nginx_switch_script(conf: str, staged: str, test: str, reload: str) -> str:
    """Swap the staged file in, test the whole configuration, reload — or put the old one back
    (and reload it) and fail. Every step is checked: success means nginx runs the new file."""
    return f"""set -u
conf={_sh(conf)}; staged={_sh(staged)}; backup="$conf.previous"
[ -f "$staged" ] || {{ echo "the staged file $staged is missing" >&2; exit 1; }}
if [ -f "$conf" ]; then cp -p "$conf" "$backup" || exit 1; else rm -f "$backup"; fi
restore() {{
  if [ -f "$backup" ]; then mv -f "$backup" "$conf"; else rm -f "$conf"; fi
}}
mv -f "$staged" "$conf" || {{ rm -f "$backup"; exit 1; }}
if ! out=$({test} 2>&1); then
  restore
  echo "nginx rejected the new configuration; the previous one is back:" >&2
  echo "$out" >&2
  exit 1
fi
if ! out=$({reload} 2>&1); then
  restore
  {reload} >/dev/null 2>&1
  echo "nginx could not reload; the previous configuration is back:" >&2
  echo "$out" >&2
  exit 1
fi
rm -f "$backup"
"""


def _sh(value: str) -> str:
    import shlex
    return shlex.quote(value)
