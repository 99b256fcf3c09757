"""Readings of the world, each a fact: the operation that asks an agent, and a pure `parse` of its
output. Procedures, verify, recovery and status compose them; tests feed `parse` captured
outputs (tests/data/facts.json).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from common import errors
from protos import deployer_pb2 as pb

MISSING = "<missing>"


class Unreadable(errors.Broken):
    """An agent's answer that is not in the form its operation prints (a broken agent or store)."""


@dataclass(frozen=True)
class Process:
    """One service process as the agent's driver reports it."""

    name: str
    instance: str
    alive: bool
    pid: int = 0
    rss_bytes: int | None = None
    cpu_s: float | None = None
    error: str = ""
    limits_use: dict | None = None   # the environment's group on that host (asked with a group)
    started_at: float = 0.0          # unix time the agent started it (0: not said)


class ServiceProcesses:
    """The service processes whose unit name starts with `prefix` (dead ones too, until stopped)."""

    @staticmethod
    def operation(prefix: str, group: str = "") -> pb.Operation:
        return pb.Operation(service_list=pb.ServiceListSpec(name_prefix=prefix, group=group))

    @staticmethod
    def parse(output: str, unit: str = "") -> list[Process]:
        """One JSON object per line; with `unit`, only that unit's processes."""
        found = []
        for number, line in enumerate(output.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise Unreadable(f"the process list is not readable at line {number}: {line[:120]!r}") from None
            if unit and item.get("name") != unit:
                continue
            found.append(Process(name=item["name"], instance=item["instance"], alive=bool(item["alive"]),
                                 pid=int(item.get("pid") or 0), rss_bytes=item.get("rss_bytes"),
                                 cpu_s=item.get("cpu_s"), error=item.get("error") or "",
                                 limits_use=item.get("limits_use"), started_at=float(item.get("started_at") or 0)))
        return found


class NginxFile:
    """An environment's nginx file on a router, byte for byte, or None where there is none."""

    @staticmethod
    def command(path: str) -> str:
        return f"cat {shlex.quote(path)} 2>/dev/null || echo '{MISSING}'"

    @staticmethod
    def parse(output: str) -> str | None:
        return None if output == f"{MISSING}\n" else output


class RouteFiles:
    """The deployer's route files on a router (`auto-*.conf`), each with its owner line."""

    @staticmethod
    def command(conf_dir: str) -> str:
        return (f"cd {shlex.quote(conf_dir)} && for f in auto-*.conf; do [ -f \"$f\" ] && "
                "echo \"$f $(sed -n 2p \"$f\" | head -c 200)\"; done; true")

    @staticmethod
    def parse(output: str) -> dict[str, str]:
        """File name → its owner mark ("" when it has none)."""
        found = {}
        for line in output.splitlines():
            name, _, mark = line.partition(" ")
            if name:
                found[name] = mark.removeprefix("# owner: ")
        return found


class HostFolders:
    """On a host: every `auto-*` folder under the services root with its mark, and whether the
    environment's Unix user exists."""

    @staticmethod
    def command(folder_marks_script: str, user: str) -> str:
        return (folder_marks_script + "\n"
                f"id -u {shlex.quote(user)} >/dev/null 2>&1 && echo user yes || echo user no")

    @staticmethod
    def parse(output: str) -> tuple[dict[str, str], bool | None]:
        """(folder → its mark, whether the user exists — None if the output did not say)."""
        folders: dict[str, str] = {}
        user = None
        for line in output.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "folder":
                path, _, mark = rest.partition(" ")
                folders[path] = mark
            elif kind == "user":
                user = rest == "yes"
        return folders, user


@dataclass(frozen=True)
class ReleaseState:
    commit: str        # the checked-out commit, or "missing"
    env_mode: str      # the `.env`'s mode ("600"), or "missing"
    env_owner: str = ""


class Releases:
    """Each live release's commit and its `.env`'s mode and owner, read as the environment's user
    (root never runs git in a repository its user owns)."""

    @staticmethod
    def command(releases: dict[str, str]) -> str:
        lines = []
        for service, release in sorted(releases.items()):
            q = shlex.quote(release)
            # git refuses a repository of another owner; reading HEAD of a root-owned one is safe
            lines.append(f"echo release {service} $(git -c safe.directory='*' -C {q} rev-parse HEAD 2>/dev/null"
                         " || echo missing)")
            lines.append(f"echo env {service} $(stat -c '%a %U' {q}/.env 2>/dev/null || echo missing)")
        return "\n".join(lines)

    @staticmethod
    def parse(output: str) -> dict[str, ReleaseState]:
        commits: dict[str, str] = {}
        envs: dict[str, tuple[str, str]] = {}
        for line in output.splitlines():
            kind, _, rest = line.partition(" ")
            service, _, value = rest.partition(" ")
            if kind == "release":
                commits[service] = value
            elif kind == "env":
                mode, _, owner = value.partition(" ")
                envs[service] = (mode, owner)
        return {s: ReleaseState(commits.get(s, ""), *envs.get(s, ("", ""))) for s in sorted({*commits, *envs})}


class MysqlNames:
    """The `auto-*` databases (with their comment, the owner mark) and users of a MariaDB server."""

    QUERY = ("SELECT CONCAT('db ', SCHEMA_NAME, ' ', SCHEMA_COMMENT) FROM information_schema.SCHEMATA "
             "WHERE SCHEMA_NAME LIKE 'auto-%'; "
             "SELECT CONCAT('user ', User) FROM mysql.user WHERE User LIKE 'auto-%';")

    @classmethod
    def command(cls, admin: str) -> str:
        return f"{admin} --skip-column-names -e {shlex.quote(cls.QUERY)}"

    @staticmethod
    def parse(output: str) -> tuple[dict[str, str], set[str]]:
        """(database → its comment, user names)."""
        databases: dict[str, str] = {}
        users: set[str] = set()
        for line in output.splitlines():
            kind, _, rest = line.partition(" ")
            name, _, comment = rest.partition(" ")
            if kind == "db":
                databases[name] = comment
            elif kind == "user":
                users.add(name)
        return databases, users


class RedisAcl:
    """`ACL LIST` of a Redis server, password hashes cut on the host: they never reach the job
    folder. Read by verify.read_acl_list."""

    @staticmethod
    def command(redis_cli: str) -> str:
        return f"{redis_cli} ACL LIST | sed -E 's/ [#>][^ ]*//g'"
