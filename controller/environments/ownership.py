"""Ownership before destruction: the marks the deployer leaves on what it creates, builders that
create only what is absent, and builders that destroy only what carries the identity the ledger
recorded. Pure: they return SQL and shell scripts; secrets and hashes travel on standard input.

What proves an object is ours, per kind:
  MariaDB database   its COMMENT, `deployer <owner> <nonce>`, recorded with the instance
  MariaDB user       its password hash, against the password the ledger keeps
  Redis ACL user     the SHA-256 of its password in `ACL GETUSER`, against the ledger's password
  Unix user          its GECOS comment, `deployer <owner>`
  service folder     a root-owned file `.deployer-owner` in it, `deployer <owner>`
  nginx file         its second line, `# owner: deployer <owner>`
A create that finds the name taken touches nothing and exits TAKEN with one line naming it.
"""

from __future__ import annotations

import hashlib
import shlex

TAKEN = 3  # exit status of a guarded create that found its name taken; nothing was changed
FOLDER_MARK = ".deployer-owner"
OWNER_LENGTH = 22


def owner_id(ca_fingerprint: str) -> str:
    """This controller's identity on the servers: its CA's fingerprint (stable for ten years,
    distinct for every store), shortened to what a comment carries comfortably."""
    return ca_fingerprint[:OWNER_LENGTH]


def owner_mark(owner: str) -> str:
    return f"deployer {owner}"


def instance_mark(owner: str, nonce: str) -> str:
    """A database's comment: whose it is, and which creation (a store restored from a backup has
    the same owner, but never the nonce of an instance made after the backup)."""
    return f"{owner_mark(owner)} {nonce}"


def marked_by(mark: str) -> str | None:
    """The owner a mark names, None if it is no deployer's mark."""
    parts = (mark or "").split()
    return parts[1] if len(parts) >= 2 and parts[0] == "deployer" else None


def native_password_hash(password: str) -> str:
    """What MariaDB keeps for `IDENTIFIED BY` (mysql_native_password)."""
    return "*" + hashlib.sha1(hashlib.sha1(password.encode()).digest()).hexdigest().upper()


def redis_password_hash(password: str) -> str:
    """What `ACL GETUSER` lists under passwords."""
    return hashlib.sha256(password.encode()).hexdigest()


def _sql(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _sh(value: str) -> str:
    return shlex.quote(value)


# ---------------------------------------------------------------- MariaDB

def mysql_create_guarded(admin: str, database: str, user: str) -> str:
    """Run the creating SQL (on standard input) only if neither the database nor the user exists;
    otherwise name what exists and exit TAKEN. The SQL itself creates without IF NOT EXISTS, so
    one made in between makes it fail instead of being taken over."""
    query = (f"SELECT CONCAT('database ', SCHEMA_NAME) FROM information_schema.SCHEMATA "
             f"WHERE SCHEMA_NAME={_sql(database)} UNION ALL "
             f"SELECT DISTINCT CONCAT('MariaDB user ', User) FROM mysql.user WHERE User={_sql(user)}")
    return f"""set -u
taken=$({admin} --skip-column-names -e {_sh(query)} </dev/null) || exit 1
if [ -n "$taken" ]; then
  printf '%s\\n' "$taken" | while read -r what; do echo "$what exists and is not this deployer's: left untouched" >&2; done
  exit {TAKEN}
fi
exec {admin}
"""


def mysql_drop_owned(database: str, mark: str, user: str, password: str) -> bytes:
    """Drop the database only if its comment is the mark recorded at its creation, and the user
    only if its password is the recorded one; print what happened to each."""
    user_host = f"{_sql(user)}@'%'"
    return (
        f"SET @mark = (SELECT SCHEMA_COMMENT FROM information_schema.SCHEMATA WHERE SCHEMA_NAME={_sql(database)});\n"
        f"SET @ours = @mark <=> {_sql(mark)} AND {_sql(mark)} != '';\n"
        f"SET @s = IF(@ours, {_sql('DROP DATABASE ' + _ident(database))}, 'DO 0');\n"
        "PREPARE s FROM @s; EXECUTE s; DEALLOCATE PREPARE s;\n"
        f"SET @users = (SELECT COUNT(*) FROM mysql.user WHERE User={_sql(user)});\n"
        f"SET @mine = (SELECT COUNT(*) FROM mysql.user WHERE User={_sql(user)} AND Host='%' "
        f"AND authentication_string={_sql(native_password_hash(password))});\n"
        f"SET @s = IF(@mine = 1 AND @users = 1, {_sql('DROP USER ' + user_host)}, 'DO 0');\n"
        "PREPARE s FROM @s; EXECUTE s; DEALLOCATE PREPARE s;\n"
        f"SELECT CONCAT('database {database}: ', IF(@ours, 'dropped', IF(@mark IS NULL, 'absent', "
        "'not this deployer''s: left untouched'))) AS '';\n"
        f"SELECT CONCAT('MariaDB user {user}: ', IF(@mine = 1 AND @users = 1, 'dropped', IF(@users = 0, 'absent', "
        "'not this deployer''s: left untouched'))) AS '';\n"
    ).encode()


# ---------------------------------------------------------------- Redis

def redis_create_guard(cli: str, user: str) -> str:
    """A prefix for the script that sends `ACL SETUSER … reset`: stop with TAKEN if the user
    exists. ACL commands cannot run in a script or transaction with a condition, so this is a
    check then a set, a few milliseconds apart on the same host."""
    return f"""set -u
existing=$({cli} ACL GETUSER {_sh(user)} </dev/null) || exit 1
if [ -n "$existing" ]; then echo "Redis ACL user {user} exists and is not this deployer's: left untouched" >&2; exit {TAKEN}; fi
"""


def redis_reset_owned(cli: str, user: str) -> str:
    """A prefix for the script that sends `ACL SETUSER … reset` to repair a user the ledger holds:
    its standard input starts with the SHA-256 of the recorded password; an existing user without
    it is someone else's, and is left untouched (TAKEN)."""
    return f"""set -u
read -r want || exit 1
existing=$({cli} ACL GETUSER {_sh(user)} </dev/null) || exit 1
if [ -n "$existing" ] && ! printf '%s\\n' "$existing" | grep -qxF -- "$want"; then
  echo "Redis ACL user {user} exists with another password: not this deployer's, left untouched" >&2; exit {TAKEN}
fi
"""


def redis_drop_owned(cli: str, user: str) -> str:
    """Delete the ACL user only if one of its passwords is the recorded one, whose SHA-256 comes
    on standard input (never in argv, where every user of the host can read it)."""
    return f"""set -u
read -r want || exit 1
hashes=$({cli} ACL GETUSER {_sh(user)} </dev/null) || exit 1
if [ -z "$hashes" ]; then echo "Redis ACL user {user}: absent"; exit 0; fi
if ! printf '%s\\n' "$hashes" | grep -qxF -- "$want"; then
  echo "Redis ACL user {user}: not this deployer's: left untouched"; exit 0
fi
[ "$({cli} ACL DELUSER {_sh(user)} </dev/null)" = 1 ] || {{ echo "redis refused to delete {user}" >&2; exit 1; }}
echo "Redis ACL user {user}: dropped"
"""


def redis_drop_stdin(password: str) -> bytes:
    return (redis_password_hash(password) + "\n").encode()


# ---------------------------------------------------------------- folders

def claim_service_folder(service_dir: str, owner: str, legacy: bool) -> str:
    """Make the service folder with our mark, or check the mark of one that exists. A folder the
    ledger says we deployed into before marks existed (`legacy`) is given the mark."""
    want = owner_mark(owner)
    adopt = (f'if [ ! -e "$m" ] && [ ! -L "$m" ]; then printf "%s\\n" "$want" > "$m"; exit 0; fi'
             if legacy else "")
    return f"""set -u
d={_sh(service_dir)}; m="$d/{FOLDER_MARK}"; want={_sh(want)}
if [ -e "$d" ] || [ -L "$d" ]; then
  if [ -d "$d" ] && [ ! -L "$d" ] && [ -f "$m" ] && [ ! -L "$m" ] && [ "$(cat "$m")" = "$want" ]; then exit 0; fi
  {adopt}
  echo "folder $d exists and is not this deployer's (no {FOLDER_MARK} of ours): left untouched" >&2
  exit {TAKEN}
fi
mkdir -p "$(dirname "$d")" && mkdir -m 0750 "$d" || exit 1
printf '%s\\n' "$want" > "$m"
"""


def if_folder_ours(service_dir: str, owner: str, then: str, legacy: bool = False) -> str:
    """Run `then` only if the service folder carries our mark (or, `legacy`, no mark at all: made
    before folders had one); say so when it does not."""
    unmarked = ' && ! { [ ! -e "$m" ] && [ ! -L "$m" ]; }' if legacy else ""
    return f"""d={_sh(service_dir)}; m="$d/{FOLDER_MARK}"
if [ ! -e "$d" ] && [ ! -L "$d" ]; then exit 0; fi
if [ -L "$d" ] || {{ {{ [ -L "$m" ] || [ ! -f "$m" ] || [ "$(cat "$m")" != {_sh(owner_mark(owner))} ]; }}{unmarked}; }}; then
  echo "folder $d is not this deployer's (no {FOLDER_MARK} of ours): left untouched"; exit 0
fi
{then}
"""


def folder_marks_script(services_root: str) -> str:
    """One line per auto-* folder under the root: `folder PATH MARK…` (MARK empty when none)."""
    return (f"for d in {_sh(services_root)}/auto-*; do [ -d \"$d\" ] && [ ! -L \"$d\" ] || continue; "
            f"m=''; [ -f \"$d/{FOLDER_MARK}\" ] && [ ! -L \"$d/{FOLDER_MARK}\" ] && m=$(head -c 200 \"$d/{FOLDER_MARK}\" | head -n 1); "
            "echo \"folder $d $m\"; done")


def absent(path: str, what: str = "release folder") -> str:
    """A prefix for making a numbered folder (a release, a Redis data folder): one that exists is
    never removed or reused (TAKEN: its number is moved past)."""
    return (f"if [ -e {_sh(path)} ] || [ -L {_sh(path)} ]; then "
            f"echo \"{what} {path} exists and is not this deployer's: left untouched\" >&2; "
            f"exit {TAKEN}; fi\n")


# ---------------------------------------------------------------- Unix users

def unix_user_guard(user: str, owner: str, legacy: bool) -> str:
    """A prefix for making the environment's user: go on if it is absent (it is then made with
    our mark) or ours; give a legacy user of ours the mark; refuse any other with TAKEN."""
    want = owner_mark(owner)
    adopt = 'if [ -z "$gecos" ]; then usermod -c "$want" "$u" || exit 1; exit 0; fi' if legacy else ""
    return f"""u={_sh(user)}; want={_sh(want)}
if entry=$(getent passwd "$u"); then
  gecos=$(printf '%s' "$entry" | cut -d: -f5)
  [ "$gecos" = "$want" ] && exit 0
  {adopt}
  echo "Unix user $u exists and is not this deployer's (comment '$gecos'): left untouched" >&2
  exit {TAKEN}
fi
"""


def if_unix_user_ours(user: str, owner: str, then: str, legacy: bool = False) -> str:
    """Run `then` (which removes the user) only if the user is absent or ours (or, `legacy`, has
    no comment at all: made before users had one)."""
    unmarked = ' && [ -n "$gecos" ]' if legacy else ""
    return f"""u={_sh(user)}
if entry=$(getent passwd "$u"); then
  gecos=$(printf '%s' "$entry" | cut -d: -f5)
  if [ "$gecos" != {_sh(owner_mark(owner))} ]{unmarked}; then
    echo "Unix user $u is not this deployer's: left untouched"; exit 0
  fi
fi
{then}
"""


# ---------------------------------------------------------------- nginx files

def route_owner_line(owner: str) -> str:
    return f"# owner: {owner_mark(owner)}\n"


def route_guard(conf: str, owner: str, env_key: str, legacy: bool, then: str, refused: str = "") -> str:
    """Run `then` (which writes or removes the route file) only if the file is absent or ours: its
    second line names us, or (`legacy`) it is the file the deployer wrote for this environment
    before files carried an owner."""
    legacy_test = (f' || {{ [ "$(head -n 1 "$conf")" = {_sh(f"# {env_key}: written by the deployer; edits are overwritten")} ]'
                   ' && ! grep -q "^# owner: " "$conf"; }') if legacy else ""
    return f"""conf={_sh(conf)}
if [ -e "$conf" ] || [ -L "$conf" ]; then
  if [ -L "$conf" ] || ! {{ [ "$(sed -n 2p "$conf")" = {_sh(route_owner_line(owner).rstrip())} ]{legacy_test}; }}; then
    echo "nginx file $conf is not this deployer's: left untouched" >&2
    {refused}
    exit {TAKEN}
  fi
fi
{then}"""
