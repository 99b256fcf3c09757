"""Pure builders of what deploy procedures send: they return SQL, scripts and protobuf
messages and never send anything. Only the dispatcher sends operations; procedures compose
these builders (an operation's id and its summary are the fleet's: controller/fleet/operations.py).

One module, though long: a catalogue of short, independent builders, kept together so that
everything the controller can send to an agent is read in one place (and tabled in
tests/data/commands.json); guarded creates and drops are in ownership.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import hashlib
import re

from common import envfile
from common.provides import check_setting, url_host, valid_host
from protos import deployer_pb2 as pb
from common import errors


# ---------------------------------------------------------------- builders for deploy procedures
# Each returns what to run; passwords travel on stdin or in files, never in argv.

def _sql_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def mysql_create(database: str, user: str, password: str, max_connections: int = 0, mark: str = "") -> bytes:
    """SQL creating a database and a user that can use that database and nothing else (and, with
    `max_connections`, at most that many connections at once); the database carries `mark` as
    its comment, the proof that it is ours (see ownership.py)."""
    comment = f" COMMENT {_sql_string(mark)}" if mark else ""
    return (
        f"CREATE DATABASE {_sql_ident(database)} CHARACTER SET utf8mb4{comment};\n"
        f"CREATE USER {_sql_string(user)}@'%' IDENTIFIED BY {_sql_string(password)}{_max_conn(max_connections)};\n"
        f"GRANT ALL PRIVILEGES ON {_sql_ident(database)}.* TO {_sql_string(user)}@'%';\n"
    ).encode()


def mysql_user(database: str, user: str, password: str, max_connections: int = 0) -> bytes:
    """Recreate a missing user with its recorded password and grants (the data is not touched)."""
    return (
        f"CREATE USER IF NOT EXISTS {_sql_string(user)}@'%' IDENTIFIED BY {_sql_string(password)}"
        f"{_max_conn(max_connections)};\n"
        f"GRANT ALL PRIVILEGES ON {_sql_ident(database)}.* TO {_sql_string(user)}@'%';\n"
    ).encode()


def _max_conn(n: int) -> str:
    # One tenant must not take every connection of the shared server.
    return f" WITH MAX_USER_CONNECTIONS {int(n)}" if n else ""


def mysql_limit(user: str, max_connections: int) -> bytes:
    """The connection limit of an existing user, as the spec has it now (0: none)."""
    return f"ALTER USER IF EXISTS {_sql_string(user)}@'%' WITH MAX_USER_CONNECTIONS {int(max_connections)};\n".encode()


# What well-behaved clients send at connect (INFO for a ready check, CLIENT SETNAME…), and
# pub/sub, added to the data commands of a `prefix` user: INFO shows server-wide figures but no
# tenant's keys or values; channels are confined like keys (`&prefix*`; a PSUBSCRIBE pattern must
# be that very pattern, Redis 7.0 compares patterns literally). PUBSUB CHANNELS/NUMSUB stay
# refused: they would list other tenants' channels.
REDIS_CLIENT_RULES = ("+info +subscribe +psubscribe +unsubscribe +punsubscribe +publish "
                      "+ssubscribe +sunsubscribe +spublish")


def redis_create_user(user: str, prefix: str, password: str) -> bytes:
    """An ACL user confined to `prefix*` keys and channels: data commands, pub/sub and what
    clients send at connect. Commands that reveal or touch other tenants' keys (SCAN, RANDOMKEY,
    DBSIZE, SELECT, flushes…) are refused, and so is whatever can hold the whole server (decision
    019): scripts and functions (Redis 7.0 cannot kill one that has written), @dangerous (KEYS,
    SORT, DEBUG, MONITOR, CLIENT PAUSE…), WAIT, and LCS (quadratic in its strings)."""
    return (f"ACL SETUSER {user} reset on >{password} ~{prefix}* resetchannels &{prefix}* -@all "
            "+@connection +@read +@write +@keyspace +@transaction -@scripting -@dangerous "
            f"{REDIS_CLIENT_RULES} -select -move -copy -scan -randomkey -dbsize -wait -lcs "
            "-client|tracking -client|caching -client|getredir\n").encode()


def redis_widen_user(user: str, prefix: str) -> bytes:
    """Give a user made before connect commands and pub/sub were allowed what a new one gets,
    adding only (no reset: its live connections keep what they have)."""
    return f"ACL SETUSER {user} &{prefix}* {REDIS_CLIENT_RULES}\n".encode()


def redis_if_user_exists(redis_cli: str, user: str, script: str) -> str:
    """Run `script` only if the ACL user exists: ACL SETUSER would otherwise create one (verify
    reports a missing user, repair recreates it whole)."""
    return f'[ -n "$({redis_cli} ACL GETUSER {_sh(user)} </dev/null | head -n 1)" ] || exit 0\n{script}'


# Deletes every key under a prefix on the server itself, in SCAN batches (KEYS would block the
# server), with the exact key bytes: nothing in a key name can turn into another argument.
_PURGE_LUA = ("local cursor = '0' repeat local r = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 500) "
              "cursor = r[1] for _, k in ipairs(r[2]) do redis.call('UNLINK', k) end until cursor == '0' "
              "return 0")


def redis_purge_script(cli: str, prefix: str) -> str:
    import shlex
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    return f"{cli} EVAL {shlex.quote(_PURGE_LUA)} 0 {shlex.quote(pattern)} >/dev/null"


# ---------------------------------------------------------------- dedicated Redis servers

def redis_server_conf(bind: str, port: int, password: str, data_dir: str, maxmemory: int) -> bytes:
    """A dedicated redis-server's configuration: its own port and password (which clients that
    send no user name accept), persistence in its data folder, its memory bound. Writes are
    refused, never evicted, at the bound: a queue must not lose jobs silently. Module loading
    and DEBUG stay off (Redis 7's defaults, said again)."""
    for value in (bind, data_dir, password):
        if any(c in value for c in ' "\'\n\r\0'):
            raise ValueError(f"a Redis setting holds a space, a quote or a line break: {value[:40]!r}")
    return "\n".join([
        f"bind {bind}", f"port {port}", "protected-mode yes", f"requirepass {password}", "daemonize no",
        'logfile ""', f"dir {data_dir}", "dbfilename dump.rdb", "appendonly yes", "appendfsync everysec",
        "save 3600 1 300 100 60 10000", f"maxmemory {maxmemory}", "maxmemory-policy noeviction",
        "enable-debug-command no", "enable-module-command no", "enable-protected-configs no", ""]).encode()


def redis_server_make(service_dir: str, data_dir: str, user: str) -> str:
    """Make a dedicated Redis instance's data folder with its configuration (read on standard
    input), as root and before the user can reach it, then give it to the user. The folders
    above it (the service's, `data`, `logs`) are root's and the environment's group's, as on a
    code host. Run after `ownership.absent`: a folder that exists already is not ours."""
    return f"""set -eu
d={_sh(service_dir)}; dd={_sh(data_dir)}; u={_sh(user)}
mkdir -p "$d/data" "$d/logs"; chown root:"$u" "$d" "$d/data" "$d/logs"; chmod 0750 "$d" "$d/data" "$d/logs"
mkdir -m 0700 "$dd"; umask 077; cat > "$dd/redis.conf"; chown -R "$u:$u" "$dd"
"""


def folder_exists(path: str) -> str:
    """Prints `present` or `missing`: whether `path` is a folder (a link is not one)."""
    return f'if [ -d {_sh(path)} ] && [ ! -L {_sh(path)} ]; then echo present; else echo missing; fi'


def remove_all_but_data() -> str:
    """In a service folder of ours ($d): remove it, or, where it keeps dedicated Redis data, all
    of it but `data` (a destroy keeps data unless --purge-data)."""
    # What is kept is root's until a deploy uses it again: the environment's user can then go.
    return ('if [ -d "$d/data" ] && [ ! -L "$d/data" ] && [ -n "$(ls -A "$d/data")" ]; then '
            'find "$d" -mindepth 1 -maxdepth 1 ! -name data ! -name .deployer-owner -exec rm -rf -- {} +; '
            'chown root:root "$d" "$d/data"; chmod 0700 "$d" "$d/data"; '
            'else rm -rf -- "$d"; fi')


def remove_if_only_data() -> str:
    """In a service folder of ours ($d): remove it if nothing but an empty `data` is left."""
    return ('rmdir "$d/data" 2>/dev/null; '
            '[ -n "$(ls -A "$d" | grep -vx .deployer-owner)" ] || rm -rf -- "$d"')


def redis_server_reown(service_dir: str, data_dir: str, user: str) -> str:
    """Give a kept data folder to the environment's user (who may have been made again since,
    with another uid): never `chown -R`, which would follow a hard link the tenant left there to
    a file of root's (`-h` only spares symbolic links)."""
    return f"""set -eu
d={_sh(service_dir)}; dd={_sh(data_dir)}; u={_sh(user)}
mkdir -p "$d/logs"; chown root:"$u" "$d" "$d/data" "$d/logs"; chmod 0750 "$d" "$d/data" "$d/logs"
[ -d "$dd" ] && [ ! -L "$dd" ] || {{ echo "redis data folder $dd is missing" >&2; exit 1; }}
[ "$(stat -c %U:%G "$dd")" = "$u:$u" ] && exit 0
# The tenant wrote what is in there: folders, links themselves, and files with no other name
# change owner; a hard link to a file elsewhere (its other name is outside) is left as it is.
find "$dd" -xdev \\( -type d -o -type l -o \\( -type f -links 1 \\) \\) -exec chown -h "$u:$u" {{}} +
"""


def _listener_is_ours(port: int) -> str:
    """A shell function: true when the socket listening on `port` belongs to the user running it
    (the environment's user): the password is never sent to a squatter on a port just freed."""
    return f"""ours() {{
  awk -v p=":{int(port):04X}" -v u="$(id -u)" '$4 == "0A" && substr($2, length($2) - 4) == p && $8 == u {{ f = 1 }}
    END {{ exit !f }}' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}}
"""


def redis_server_ready(host: str, port: int, deadline: float) -> str:
    """Run as the environment's user: wait until its dedicated Redis listens (a socket of that
    user's) and answers PING with its password (read on standard input, so it is in no argv);
    on failure say what it answered."""
    return _listener_is_ours(port) + f"""pw=$(cat); end=$(( $(date +%s) + {max(1, int(deadline))} )); r="nothing of its own listens on port {int(port)}"
while :; do
  if ours; then
    r=$(printf 'AUTH %s\nPING\n' "$pw" | redis-cli -h {_sh(host)} -p {int(port)} 2>&1 | tail -n 1)
    [ "$r" = PONG ] && exit 0
  fi
  if [ "$(date +%s)" -ge "$end" ]; then echo "redis on {host}:{port} did not answer PING: $r" >&2; exit 1; fi
  sleep 0.2
done
"""


def redis_server_settle(host: str, port: int, maxmemory: int) -> str:
    """Run as the environment's user: a running dedicated Redis takes the memory bound the spec
    has now (its file has it too)."""
    return _listener_is_ours(port) + (
        f'ours || {{ echo "nothing of its own listens on port {int(port)}" >&2; exit 1; }}\n'
        f"pw=$(cat); r=$(printf 'AUTH %s\\nCONFIG SET maxmemory {int(maxmemory)}\\n' \"$pw\" | "
        f"redis-cli -h {_sh(host)} -p {int(port)} 2>&1 | tail -n 1)\n"
        '[ "$r" = OK ] || { echo "redis did not take the new maxmemory: $r" >&2; exit 1; }\n')


# ---------------------------------------------------------------- MySQL snapshots

SNAPSHOT_ID = re.compile(r"\d{8}T\d{6}Z\Z")


def mysql_snapshot(dump: str, folder: str, database: str, snapshot: str, keep: int) -> str:
    """As root on the data host: a consistent dump of `database` (one transaction, tables and
    rows; no triggers or routines, whose definers are the old instance's user), compressed, in a
    root-only folder, named `snapshot`.sql.gz; the `keep` newest are kept. Prints its size."""
    b, f = _sh(folder), _sh(f"{folder}/{snapshot}.sql.gz")
    t = _sh(f"{folder}/.{snapshot}.partial")
    return f"""set -eu
umask 077
mkdir -p {b}; chmod 0700 {b} "$(dirname {b})"
( {dump} --single-transaction --quick --skip-triggers --no-tablespaces --skip-comments {_sh(database)}; echo $? > {t}.rc ) | gzip -c > {t}
if [ "$(cat {t}.rc)" != 0 ]; then rm -f {t} {t}.rc; echo "the dump of {database} failed" >&2; exit 1; fi
rm -f {t}.rc; mv {t} {f}
ls -1t {b}/*.sql.gz | tail -n +{int(keep) + 1} | while read -r old; do rm -f -- "$old"; done
stat -c %s {f}
"""


def mysql_snapshots(folder: str) -> str:
    """One line per snapshot in `folder`: ID SIZE MTIME."""
    return (f'for f in {_sh(folder)}/*.sql.gz; do [ -f "$f" ] || continue; '
            'printf "%s %s %s\\n" "$(basename "$f" .sql.gz)" "$(stat -c %s "$f")" "$(stat -c %Y "$f")"; done')


def mysql_load_snapshot(path: str, host: str, port: str, database: str, user: str) -> str:
    """Load a snapshot into a new database as that database's own user (its password on standard
    input, put in a root-only file for the client, never in an argv): the dump can do no more
    than that user may."""
    return f"""set -eu
umask 077
[ -f {_sh(path)} ] || {{ echo "snapshot {path} is missing" >&2; exit 1; }}
cnf=$(mktemp); trap 'rm -f "$cnf"' EXIT
printf '[client]\\nuser=%s\\npassword=%s\\n' {_sh(user)} "$(cat)" > "$cnf"
gzip -dc {_sh(path)} | mariadb --defaults-extra-file="$cnf" --protocol=tcp -h {_sh(host)} -P {_sh(port)} {_sh(database)}
"""


def env_file(values: dict[str, str]) -> bytes:
    """`.env` content: plain values as KEY=VALUE, others (multi-line ones too) double-quoted."""
    return envfile.render(values)


ACME_CHALLENGES = "/.well-known/acme-challenge/"   # RFC 8555 8.3: where HTTP-01 answers are asked for


@dataclass(frozen=True)
class RouteTls:
    """Where a router serves an environment's HTTPS: its TLS listen address and the certificate
    and key files written there (decision 035)."""

    listen: str
    certificate: str
    key: str


def nginx_config(env_key: str, domain: str, listen: str, routes: list[tuple[str, str, int]],
                 owner_line: str = "", probe: str = "", aliases: tuple[str, ...] = (),
                 tls: RouteTls | None = None, challenges: str = "") -> bytes:
    """The environment's nginx file: one location per web service (path, host, port).

    With `challenges` (a folder on the router, for `tls: auto`), plain HTTP also serves the ACME
    HTTP-01 answers written there, whether or not HTTPS is served yet.

    A service mounted at /api sees /api/x as /x (its health path is checked the same way, on
    its own port) and learns its mount point from X-Forwarded-Prefix.

    With `probe` (a switch's nonce), each route also gets the exact location the switch asks
    after its reload (probe_path): proxied like the route, and answered with the upstream nginx
    used. It is a location of its own because an `add_header` in the route's location would drop
    every `add_header` the router's http block gives its sites.
    """
    _check_route_values(domain, listen, routes, probe)
    for alias in aliases:
        _check_route_values(alias, listen, [])
    if tls is not None:
        if check_setting("nginx.listen", tls.listen):
            raise RouteValueError(f"TLS listen {tls.listen[:80]!r} is not PORT or HOST:PORT")
    for path in ((tls.certificate, tls.key) if tls else ()) + ((challenges,) if challenges else ()):
        if not re.fullmatch(r"/[A-Za-z0-9._/-]+", path) or ".." in path:
            raise RouteValueError(f"TLS file {path[:80]!r} is not a plain absolute path")
    names = " ".join((domain, *aliases))
    out = [f"# {env_key}: written by the deployer; edits are overwritten\n", owner_line, *_upstreams(env_key, routes),
           "server {\n", f"    listen {listen};\n", f"    server_name {names};\n"]
    if challenges:
        out.append(f"    location ^~ {ACME_CHALLENGES} {{ alias {challenges}/; default_type text/plain; }}\n")
    if tls is None:
        out += _locations(routes, probe, routed=True, env_key=env_key)
        out.append("}\n")
        return "".join(out).encode()
    # HTTPS: plain HTTP only redirects (308 keeps the method and body); the switch's probes stay
    # on it, so a switch checks what nginx runs without a certificate to trust.
    out += _locations(routes, probe, routed=False, env_key=env_key)
    out += ["    location / { return 308 https://$host$request_uri; }\n", "}\n",
            "server {\n", f"    listen {tls.listen} ssl;\n", f"    server_name {names};\n",
            f"    ssl_certificate {tls.certificate};\n", f"    ssl_certificate_key {tls.key};\n",
            "    ssl_protocols TLSv1.2 TLSv1.3;\n"]
    out += _locations(routes, "", routed=True, env_key=env_key)
    out.append("}\n")
    return "".join(out).encode()


def numbered(routes: list[tuple]) -> list[tuple]:
    """The routes in the order the nginx file has them, each with its rank among the replicas of
    its path first: (rank, path, host, port, ...)."""
    seen: dict[str, int] = {}
    out = []
    for route in sorted(routes):
        out.append((seen.get(route[0], 0), *route))
        seen[route[0]] = seen.get(route[0], 0) + 1
    return out


def upstream_name(env_key: str, path: str) -> str:
    """The nginx upstream of a replicated route: one name per environment and path, whatever
    characters they hold (upstream names share nginx's http block with every other site)."""
    return "auto_" + hashlib.sha256(f"{env_key}\0{path}".encode()).hexdigest()[:24]


def _upstreams(env_key: str, routes: list[tuple[str, str, int]]) -> list[str]:
    """An upstream block for each path served by more than one replica: least_conn, and a peer that
    fails once is left out for FAIL_TIMEOUT_S (nginx's passive health check)."""
    out = []
    by_path: dict[str, list[tuple[str, int]]] = {}
    for path, host, port in sorted(routes):
        by_path.setdefault(path, []).append((host, port))
    for path, servers in by_path.items():
        if len(servers) < 2:
            continue
        out += [f"upstream {upstream_name(env_key, path)} {{\n", "    least_conn;\n",
                *(f"    server {url_host(host)}:{port} max_fails=1 fail_timeout={FAIL_TIMEOUT_S}s;\n"
                  for host, port in servers), "}\n"]
    return out


FAIL_TIMEOUT_S = 10
REPLICA_CONNECT_S = 2   # a replica whose host is cut off is given up on this soon, and the next one tried


def _locations(routes: list[tuple[str, str, int]], probe: str, routed: bool, env_key: str = "") -> list[str]:
    out = []
    counts: dict[str, int] = {}
    for path, _, _ in routes:
        counts[path] = counts.get(path, 0) + 1
    for rank, path, host, port in numbered(routes):
        prefix = path.rstrip("/")
        if routed and rank == 0:
            if prefix:
                out.append(f"    location = {prefix} {{ return 301 {prefix}/$is_args$args; }}\n")
            if counts[path] > 1:
                out += [f"    location {prefix}/ {{\n", *_proxied(prefix, upstream_name(env_key, path)),
                        f"        proxy_connect_timeout {REPLICA_CONNECT_S}s;\n", "    }\n"]
            else:
                out += [f"    location {prefix}/ {{\n", *_proxied(prefix, f"{url_host(host)}:{port}"), "    }\n"]
        if probe:
            out += [f"    location = {probe_path(path, probe, rank)} {{\n", *_proxied(prefix, f"{url_host(host)}:{port}"),
                    f"        proxy_connect_timeout {PROBE_CONNECT_S}s;\n",
                    f"        proxy_read_timeout {PROBE_READ_S}s;\n",
                    f"        proxy_hide_header {PROBE_HEADER};\n",
                    f"        add_header {PROBE_HEADER} \"$upstream_addr; $upstream_header_time\" always;\n",
                    "    }\n"]
    return out


def _proxied(prefix: str, target: str) -> list[str]:
    return [
        f"        proxy_pass http://{target}/;\n",
        "        proxy_http_version 1.1;\n",
        "        proxy_set_header Connection \"\";\n",
        "        proxy_set_header Host $host;\n",
        "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n",
        f"        proxy_set_header X-Forwarded-Prefix {prefix or '/'};\n",
        "        proxy_next_upstream error timeout;\n",
    ]


PROBE_HEADER = "X-Deployer-Upstream"
# Together under NGINX_ANSWER_S: an instance that hangs still gets nginx's own answer (a 504
# naming it) within the check's bound, enough for a route the switch does not move.
PROBE_CONNECT_S, PROBE_READ_S = 2, 6
_PROBE = re.compile(r"location = /[A-Za-z0-9._~/-]*?\.deployer-probe-([0-9a-f]{32,64}) \{")


def probe_path(path: str, probe: str, rank: int = 0) -> str:
    """Where the switch asks nginx about the route at `path` (its replica of `rank`: each is
    asked); the nonce makes it a path no outside client can guess, and one only the new file has."""
    return f"{path.rstrip('/')}/.deployer-probe-{probe}" + (f"-{rank}" if rank else "")


def probe_of(conf: str | None) -> str:
    """The nonce of the switch that wrote this nginx file ("" if none): what the file is compared
    with is written with it, so a nonce drawn anew is never taken for drift."""
    found = _PROBE.search(conf or "")
    return found.group(1) if found else ""


class RouteValueError(errors.BadInput):
    """A value that would be written into an nginx file is not what its place allows."""


_ROUTE_PATH = re.compile(r"/[A-Za-z0-9._~/-]*\Z")


def _check_route_values(domain: str, listen: str, routes: list[tuple[str, str, int]], probe: str = "") -> None:
    """Checked here again, whatever checked them before: a value with a space, a brace or a `;`
    could add directives to a file nginx loads for every environment on the router."""
    if probe and not re.fullmatch(r"[0-9a-f]{32,64}", probe):
        raise RouteValueError(f"probe {probe[:80]!r} is not 32 to 64 hexadecimal digits")
    if not valid_host(domain) or ":" in domain:
        raise RouteValueError(f"server name {domain[:80]!r} is not a host name")
    if check_setting("nginx.listen", listen):
        raise RouteValueError(f"listen {listen[:80]!r} is not PORT or HOST:PORT")
    for path, host, port in routes:
        if not _ROUTE_PATH.match(path) or ".." in path or "//" in path:
            raise RouteValueError(f"route path {path[:80]!r} is not a plain absolute path")
        if not valid_host(host):
            raise RouteValueError(f"route host {host[:80]!r} is not an IP address or a host name")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise RouteValueError(f"route port {str(port)[:20]!r} is not a port number")


NGINX_TAKE_S = 10   # how long a reload may take before the switch counts as failed


def nginx_reload_function(reload: str, pid_file: str) -> str:
    """A shell function `reload_nginx`: reload, then wait until nginx really runs what it read.

    `nginx -s reload` only signals the master. The master then reads the files, starts new
    workers and, a moment later, asks the old ones to stop; until they have, an old worker still
    accepts connections and answers them from the old files: after a first deploy that means
    another environment's server block (nginx's default server) answers this one's host name.
    So the function waits until every worker from before the reload has exited or says it is
    shutting down (it has then closed its listening sockets), and a new one runs. A master that
    refused the new files keeps its old workers: that shows here as a failed reload, which the
    signal alone never tells."""
    return f"""pid_file={_sh(pid_file)}
ppid_of() {{  # the field after the last ")": a process name may hold spaces and parentheses
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${{s##*) }}; set -- $s; echo "$2"
}}
reload_nginx() {{
  master=$(cat "$pid_file" 2>/dev/null)
  case "$master" in ''|*[!0-9]*) echo "no nginx master process named in $pid_file (set nginx.pid if it is elsewhere)"; return 1;; esac
  [ -d "/proc/$master" ] || {{ echo "nginx is not running: $pid_file names process $master, which is gone"; return 1; }}
  old=$(pgrep -P "$master")
  {reload} 2>&1 || return 1
  tries=0
  while :; do
    taken=yes
    for p in $old; do
      [ "$(ppid_of "$p")" = "$master" ] || continue   # gone, or its number reused
      case "$(tr '\\0' ' ' 2>/dev/null < "/proc/$p/cmdline")" in *"shutting down"*) ;; *) taken=no;; esac
    done
    [ "$taken" = yes ] && pgrep -P "$master" >/dev/null && return 0
    tries=$((tries + 1))
    if [ "$tries" -ge {NGINX_TAKE_S * 20} ]; then
      echo "nginx did not take the new configuration within {NGINX_TAKE_S} s (its error log says why)"
      return 1
    fi
    sleep 0.05
  done
}}
"""


NGINX_ANSWER_S = 10   # how long nginx may take to answer a route from its new instance
NOT_ANSWERED = 4      # exit status of a switch whose check through nginx failed; its last line says why


def listen_address(listen: str) -> tuple[str, int]:
    """Where to connect to reach an nginx that has `listen` (PORT, HOST:PORT or [IPv6]:PORT):
    a bare port or a wildcard address is this host's loopback."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), int(port)


# Run on the router with its values as arguments, never in the code: router, the address and port
# nginx listens on, the host name, the bound in seconds, then per route its path, the path of its
# probe location, the upstream host and port, and "new" or "live".
_CHECK_ROUTES_PY = """import http.client, ipaddress, socket, sys, time
router, host, port, domain, bound = sys.argv[1:6]
routes = [sys.argv[i:i + 5] for i in range(6, len(sys.argv), 5)]


def shown(h, p):
    return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"


def addresses(h, p):
    try:
        return {shown(str(ipaddress.ip_address(h)), p)}
    except ValueError:
        pass
    try:  # nginx resolved the name when it read the file, with this host's resolver
        return {shown(a[4][0], p) for a in socket.getaddrinfo(h, int(p), type=socket.SOCK_STREAM)}
    except OSError:
        return set()


def last(value):  # nginx lists each server it tried: "a, b" (and "a : b" across redirects)
    return value.replace(" : ", ", ").split(", ")[-1].strip()


def ask(route, probe, up_host, up_port, kind, timeout):
    want = shown(up_host, up_port)
    whose = "the new instance" if kind == "new" else "its instance"
    expected = addresses(up_host, up_port)
    if expected != {want}:
        want += " (" + ", ".join(sorted(expected) or ["not resolved"]) + ")"
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", probe, headers={"Host": domain, "Connection": "close", "User-Agent": "deployer-switch"})
        response = conn.getresponse()
        status, mark = response.status, response.getheader("X-Deployer-Upstream", "")
    except (OSError, http.client.HTTPException) as exc:
        why = str(exc) or type(exc).__name__
        return f"nginx on {router} does not answer {route} of {domain} on {shown(host, port)} ({why})"
    finally:
        conn.close()
    if not mark:
        return (f"nginx on {router} still answers {route} of {domain} from an older file or another server "
                f"block (HTTP {status}), not from {whose} {want}")
    upstream, _, header_time = mark.partition(";")
    if last(upstream) not in expected:
        return f"nginx on {router} still answers {route} of {domain} from {last(upstream)}, not {whose} {want}"
    if kind == "new" and last(header_time) == "-":
        return (f"nginx on {router} routes {route} of {domain} to the new instance {want}, which did not "
                f"answer (HTTP {status} from nginx)")
    return ""


deadline = time.monotonic() + float(bound)
while routes:
    left = []
    for route in routes:
        failed = ask(*route, timeout=max(0.5, deadline - time.monotonic()))
        if failed:
            left.append((route, failed))
    routes = [route for route, _ in left]
    if routes and time.monotonic() >= deadline:
        print(left[0][1])
        sys.exit(1)
    if routes:
        time.sleep(0.05)
"""


def nginx_check_function(router: str, listen: str, domain: str, probe: str,
                         routes: list[tuple[str, str, int, bool]]) -> str:
    """A shell function `check_routes`: ask nginx, on its own listen address and with the
    environment's host name, about each route (path, host, port, new) at its probe location,
    until nginx names that route's instance as the upstream it used (and a new instance has
    answered, with any status), at most NGINX_ANSWER_S; else print one line saying what
    answered instead. This is what the wait in nginx_reload_function cannot see: an nginx on
    the listen address that is not the one reloaded, or another server block taking the name."""
    host, port = listen_address(listen)
    args = [router, host, str(port), domain, str(NGINX_ANSWER_S)]
    for rank, path, upstream, upstream_port, new in numbered(routes):
        args += [f"{path.rstrip('/')}/", probe_path(path, probe, rank), upstream, str(int(upstream_port)),
                 "new" if new else "live"]
    missing = f"python3 is missing on {router}: the switch checks its routes through nginx with it"
    return f"""check_routes() {{
  command -v python3 >/dev/null || {{ echo {_sh(missing)}; return 1; }}
  python3 - {' '.join(_sh(a) for a in args)} <<'EOF'
{_CHECK_ROUTES_PY}EOF
}}
"""


def nginx_switch_script(conf: str, staged: str, test: str, reload: str, pid_file: str, check: str = "") -> str:
    """Swap the staged file in, test the whole configuration, reload — or put the old one back
    (and reload it) and fail. Every step is checked: success means nginx runs the new file, its
    old workers included (see nginx_reload_function), and, with `check` (nginx_check_function),
    that nginx answers each route from its instance; a failed check exits NOT_ANSWERED."""
    checked = f"""if ! out=$(check_routes 2>&1); then
  restore
  reload_nginx >/dev/null 2>&1
  echo "$out; the previous configuration is back" >&2
  exit {NOT_ANSWERED}
fi
""" if check else ""
    return f"""set -u
conf={_sh(conf)}; staged={_sh(staged)}; backup="$conf.previous"
[ -f "$staged" ] || {{ echo "the staged file $staged is missing" >&2; exit 1; }}
{nginx_reload_function(reload, pid_file)}{check}if [ -f "$conf" ]; then cp -p "$conf" "$backup" || exit 1; else rm -f "$backup"; fi
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
if ! out=$(reload_nginx); then
  restore
  reload_nginx >/dev/null 2>&1
  echo "nginx could not reload; the previous configuration is back:" >&2
  echo "$out" >&2
  exit 1
fi
{checked}rm -f "$backup"
"""


def nginx_remove_script(conf: str, reload: str, pid_file: str) -> str:
    """Remove an environment's nginx file and reload until no worker serves it any more."""
    return f"""set -u
{nginx_reload_function(reload, pid_file)}rm -f -- {_sh(conf)}
if ! out=$(reload_nginx); then echo "$out" >&2; exit 1; fi
"""


# ---------------------------------------------------------------- builders for least privilege
# Each environment's services run as its own system user, `auto-<app>-<env>` (its group has the
# same name). The service folder and `releases/` are root's with the environment's group (0750):
# the user can enter and read them, other environments' users cannot, and only root rearranges
# them. What the user must write to is its own: its release folders, `shared/` and `.home/`.

def ensure_unix_user(user: str, comment: str = "") -> str:
    """Create the environment's system user and group, unless the user exists."""
    return f"""set -e
u={_sh(user)}; set -- --comment {_sh(comment)}
id -u "$u" >/dev/null 2>&1 && exit 0
if getent group "$u" >/dev/null; then set -- "$@" --gid "$u"; else set -- "$@" --user-group; fi
useradd --system "$@" --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$u" || id -u "$u" >/dev/null
"""


def service_layout(service_dir: str, release: str, user: str) -> str:
    """Owners and modes of a service folder and of the release about to run. A release that is
    not the user's yet (just checked out as root, or deployed before users existed) is given to it
    whole; `-h` changes links themselves, never what they point to. A sealed release (root's, in
    the user's group: decision 033) stays as it is."""
    return f"""set -e
u={_sh(user)}; d={_sh(service_dir)}; r={_sh(release)}
mkdir -p "$d/releases" "$d/shared" "$d/logs" "$d/.home"
chown root:"$u" "$d" "$d/releases" "$d/logs"
chmod 0750 "$d" "$d/releases" "$d/logs"
chown -h "$u:$u" "$d/shared" "$d/.home"
chmod 0750 "$d/shared"
chmod 0700 "$d/.home"
if [ -d "$r" ]; then
  case "$(stat -c %U:%G "$r")" in "$u:$u"|"root:$u") ;; *) chown -hR "$u:$u" "$r" ;; esac
  chmod 0750 "$r"
  if ! setpriv --reuid="$u" --regid="$u" --init-groups -- test -x "$r"; then
    echo "$u cannot reach $r: the folders above the services root must be open to other users (o+x)" >&2
    exit 1
  fi
fi
"""


def writable_script(shared: str, paths: tuple[str, ...]) -> str:
    """Run as the environment's user in the working folder: each writable path's place in the
    service's shared folder, made (from what the release holds there, if anything) the first time."""
    lines = ["set -e", f"s={_sh(shared)}"]
    for path in paths:
        name = _sh(path.rstrip("/"))
        if path.endswith("/"):
            lines.append(f'if [ ! -e "$s"/{name} ] && [ ! -L "$s"/{name} ]; then mkdir -p "$s"/{name}; '
                         f'if [ -d {name} ] && [ ! -L {name} ]; then cp -a {name}/. "$s"/{name}/; fi; fi')
        else:
            lines.append(f'if [ ! -e "$s"/{name} ] && [ ! -L "$s"/{name} ]; then mkdir -p "$(dirname "$s"/{name})"; '
                         f'if [ -f {name} ] && [ ! -L {name} ]; then cp -a {name} "$s"/{name}; else : > "$s"/{name}; fi; fi')
    return "\n".join(lines) + "\n"


def service_home(service_dir: str) -> str:
    """HOME of the commands and processes of a service: caches (npm, pip, git) stay its own."""
    return f"{service_dir}/.home"


def remove_unix_user(user: str, services_root: str) -> str:
    """Remove the environment's user once nothing of it is left on the host: no folder under the
    services root is its, and its processes (stragglers that left their service's process group)
    are ended first. Its group goes with it."""
    return f"""set -u
u={_sh(user)}; root={_sh(services_root)}
if id -u "$u" >/dev/null 2>&1; then
  left=$(find "$root" -mindepth 1 -maxdepth 1 \\( -user "$u" -o -group "$u" \\) -print -quit)
  if [ -n "$left" ]; then echo "$left still belongs to $u: the user is kept" >&2; exit 1; fi
  alive() {{ ps -o stat= -u "$u" | grep -qv '^Z'; }}
  i=0
  while alive && [ $i -lt 100 ]; do
    [ $i -eq 0 ] && pkill -TERM -u "$u"
    [ $i -eq 50 ] && pkill -KILL -u "$u"
    sleep 0.1; i=$((i + 1))
  done
  if alive; then echo "processes of $u do not end: the user is kept" >&2; exit 1; fi
  # Its limits (agent/limits.py) and its /tmp go with it; a group still in use stays, harmlessly.
  for g in /sys/fs/cgroup/*/deployer/"$u" /sys/fs/cgroup/deployer/"$u"; do
    [ -d "$g" ] && find "$g" -depth -mindepth 1 -type d -exec rmdir {{}} + 2>/dev/null; rmdir "$g" 2>/dev/null
  done
  rm -rf -- "$root/.tmp/$u"
  userdel "$u" || exit 1
fi
if getent group "$u" >/dev/null; then groupdel "$u"; fi
"""


# ---------------------------------------------------------------- builders for limits per environment

def limits(memory: int, cpu: float, processes: int, group: str, services_root: str) -> pb.Limits:
    """What bounds every process of the environment whose user (and group) is `group` on a host:
    the agent puts each one in that group before it executes, with `/tmp` of its own."""
    return pb.Limits(group=group, memory_bytes=memory, cpu=cpu, processes=processes,
                     tmp_dir=f"{services_root.rstrip('/')}/.tmp/{group}")


def _sh(value: str) -> str:
    import shlex
    return shlex.quote(value)


# ---------------------------------------------------------------- releases, ports, replies

def checkout_script(service_dir: str, release: str, source: str, commit: str) -> str:
    """A clone that shares nothing with its source. A local clone would hard-link the source's
    objects (or, before git 2.38.1, follow links in them), and the release is then given to the
    environment's user: those very files would become the tenant's, who could rewrite what every
    other environment deploys from. `--no-local` fetches through git's own transport instead."""
    q = _sh
    return (f"set -e; mkdir -p {q(service_dir)}/releases {q(service_dir)}/shared {q(service_dir)}/logs; "
            f"rm -rf {q(release)}; git clone --quiet --no-local --no-checkout {q(source)} {q(release)}; "
            f"git -C {q(release)} checkout --quiet --detach {q(commit)}")


def current_script(service_dir: str, release: str) -> str:
    """`current` points at the release, swapped in one rename."""
    q = _sh
    return f"ln -sfn {q(release)} {q(service_dir)}/current.tmp && mv -T {q(service_dir)}/current.tmp {q(service_dir)}/current"


def first_free_port_script(candidates: list[int]) -> str:
    """Print the first of `candidates` nothing listens on (exit 1 if none is free)."""
    return ("python3 - <<'EOF'\nimport socket, sys\n"
            f"for port in {[int(c) for c in candidates]!r}:\n"
            "    s = socket.socket()\n"
            "    try:\n"
            "        s.bind(('0.0.0.0', port))\n"
            "    except OSError:\n"
            "        continue\n"
            "    finally:\n"
            "        s.close()\n"
            "    print(port)\n"
            "    sys.exit(0)\n"
            "sys.exit(1)\nEOF")


def in_release(release: str, user: str, script: str) -> str:
    """Run `script` (which renames or removes `.env` files at the top of `release`) as root in a
    sealed release, whose folder is root's so no name in it can be the tenant's trap; as the
    user in an older release that is still the user's (root's `mv` there could be led by a link
    the tenant made). Run as root."""
    return (f"r={_sh(release)}; u={_sh(user)}\n"
            f'if [ ! -L "$r" ] && [ "$(stat -c %U:%G "$r")" = "root:$u" ]; then sh -c {_sh(script)}; '
            f'else setpriv --reuid="$u" --regid="$u" --init-groups -- sh -c {_sh(script)}; fi')


def move_staged_env(staged: str, env_path: str) -> str:
    """A reused release's staged `.env` in place (see in_release); -T: a `.env` the tenant made a
    link to a folder is replaced, never moved into."""
    return f"mv -fT {_sh(staged)} {_sh(env_path)}"


def settle_staged_env(staged: str, release: str) -> str:
    """After a restart: the staged `.env` in place if it is there, and no other staged one left."""
    return (f"if [ -f {_sh(staged)} ]; then {move_staged_env(staged, release + '/.env')}; fi; "
            f"rm -f {_sh(release)}/.env.deploy-*")


def drain_script(port: int, longest_s: float) -> str:
    """Wait until nothing is connected to `port` on this host any more (the old instance's
    requests have ended: nginx keeps no idle connection to an upstream), at most `longest_s`.
    Read from /proc/net/tcp as root: only a count of sockets, nothing of the tenant's."""
    tries = max(1, int(longest_s * 10))
    return f"""hex=$(printf '%04X' {int(port)})
i=0
while [ "$i" -lt {tries} ]; do
  n=$(awk -v p=":$hex" '$4 == "01" && substr($2, length($2) - 4) == p' /proc/net/tcp /proc/net/tcp6 2>/dev/null | wc -l)
  [ "$n" -eq 0 ] && {{ echo "drained after $((i / 10)).$((i % 10)) s"; exit 0; }}
  i=$((i + 1)); sleep 0.1
done
echo "still $n connection(s) after {longest_s:g} s: stopping it anyway"
"""


def health_command_script(command: str, interval_s: float, timeout_s: float, deadline_s: float) -> str:
    """Run a daemon's health command until it succeeds (each try at most `timeout_s`), every
    `interval_s`, for at most `deadline_s`; its output is kept for the failure's report."""
    tries = max(1, int(deadline_s / max(interval_s, 0.001)))
    return f"""i=0
while :; do
  if timeout --kill-after=1 {timeout_s:g} sh -c {_sh(command)}; then exit 0; fi
  i=$((i + 1))
  [ "$i" -ge {tries} ] && {{ echo "the health command did not succeed within {deadline_s:g} s" >&2; exit 1; }}
  sleep {interval_s:g}
done
"""


def env_mode_private(path: str) -> str:
    """Run as the file's owner: a root chmod would follow a link the user put in its place."""
    return f"chmod 600 {_sh(path)}"


def remove_paths(*paths: str) -> str:
    return "rm -rf " + " ".join(_sh(p) for p in paths)


def remove_file(path: str) -> str:
    return f"rm -f {_sh(path)}"


def redis_admin(redis_cli: str, expect: str = "OK") -> str:
    """redis-cli exits 0 even when Redis answers an error, so the reply is checked; it is not
    printed, since an ACL error can quote the rule it refused."""
    return (f'reply=$({redis_cli}) || exit 1; [ "$reply" = {expect} ] || '
            '{ echo "redis refused the change" >&2; exit 1; }')
