"""The instantiation ledger: for every deploy of every service, which instance of each component
it created or reused. Backed by the controller's SQLite database (see db.py for the schema)."""

from __future__ import annotations

import contextlib
import enum
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping

from controller.state import knowledge
from controller.state.db import Database
from controller.state.knowledge import EnvFacts, Scope

COMPONENTS = ("code", "mysql", "redis")
# A secret set again keeps being redacted in its former values: the last this many of them
# (kept releases' .env files, and logs, may still hold them).
RETIRED_KEPT = 10


class Status(str, enum.Enum):
    """Where an instance is in its life. A str, so rows and JSON carry the plain word."""

    BUILDING = "building"  # a deploy is making it
    LIVE = "live"          # what serves now (one per service and component)
    STANDBY = "standby"    # ran before; a rollback can bring it back
    FAILED = "failed"      # its deploy failed: undone
    REMOVED = "removed"    # its files or data are gone; the number stays used
    TAKEN = "taken"        # the name was found made by someone else: never ours to touch

    def __str__(self) -> str:
        return self.value


RAN = (Status.LIVE, Status.STANDBY)  # instances that ran: what is under their names is ours


@dataclass(frozen=True)
class InstanceRow:
    """One instance of one component of one service, as the ledger holds it."""

    env_key: str
    service: str
    component: str
    number: int
    status: Status
    host: str = ""
    port: int = 0
    commit_sha: str = ""
    fingerprint: str = ""
    created: float = 0.0
    updated: float = 0.0
    names: dict = field(default_factory=dict)  # database, user, release, process… (never a password)

    @classmethod
    def of(cls, r) -> "InstanceRow":
        return cls(r["env_key"], r["service"], r["component"], r["number"], Status(r["status"]), r["host"] or "",
                   r["port"] or 0, r["commit_sha"] or "", r["fingerprint"] or "", r["created"], r["updated"],
                   json.loads(r["names"] or "{}"))

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status.value}

    @property
    def replicas(self) -> list["Replica"]:
        """A code instance's processes: its own row's (the first replica), then the others a web
        service with `replicas:` runs (recorded in `names`) — one code instance for all of them."""
        return replicas_of(self.host, self.port, self.names)

    @property
    def hosts(self) -> list[str]:
        """The hosts its replicas run on, each once, the first replica's first."""
        return hosts_of(self.replicas)


@dataclass(frozen=True)
class Replica:
    """One process of a code instance: where it runs, on which port, as which instance name."""

    host: str
    port: int = 0
    process: str = ""

    def to_dict(self) -> dict:
        return {"host": self.host, "port": self.port, "process": self.process}


def hosts_of(replicas) -> list[str]:
    return list(dict.fromkeys(r.host for r in replicas if r.host))


def replica_key(service: str, slot: int) -> str:
    """How placement names a replica: the service for the first, SERVICE#N for the others."""
    return f"{service}#{slot}" if slot else service


def replicas_of(host: str, port: int, names: dict) -> list[Replica]:
    return [Replica(host, port or 0, names.get("process", "")),
            *(Replica(r.get("host", ""), r.get("port") or 0, r.get("process", "")) for r in names.get("replicas", ()))]


@dataclass(frozen=True)
class LiveInstance:
    number: int
    commit: str = ""
    fingerprint: str = ""
    host: str = ""
    port: int = 0
    mode: str = ""      # a Redis instance's: prefix or dedicated ('' for one made before modes: prefix)
    maxmemory: int = 0  # a dedicated Redis's memory bound, as it runs
    replicas: tuple[Replica, ...] = ()  # a code instance's processes, the first at (host, port)

    @property
    def hosts(self) -> list[str]:
        return hosts_of(self.replicas)


@dataclass(frozen=True)
class ServiceState:
    """What the ledger knows of one service: its live instance of each component (if any), and
    the instances of other services its last successful deploy used (component → (service, number))."""

    service: str
    code: LiveInstance | None = None
    mysql: LiveInstance | None = None
    redis: LiveInstance | None = None
    used: Mapping[str, tuple[str, int]] = field(default_factory=dict)

    def live(self, component: str) -> LiveInstance | None:
        return getattr(self, component)


@dataclass(frozen=True)
class DeployRow:
    number: int
    code: int | None
    code_new: bool
    mysql: int | None
    mysql_new: bool
    redis: int | None
    redis_new: bool
    commit: str
    host: str
    port: int
    outcome: str
    reason: str
    job_id: str
    created: float
    mysql_of: str = ""   # the service whose instance it used, when another's
    redis_of: str = ""


class Ledger:
    def __init__(self, db: Database, owner: str = "") -> None:
        self.db, self.conn = db, db.conn
        self.vault = db.vault  # secrets and passwords are sealed at rest
        self.owner = owner     # this controller's mark on what it creates (see ownership.py)

    # ---------------------------------------------------------------- reading

    def state(self, env_key: str) -> dict[str, ServiceState]:
        rows = self.conn.execute(
            "SELECT * FROM instances WHERE env_key=? AND status='live'", (env_key,)).fetchall()
        found: dict[str, dict] = {}
        for r in rows:
            found.setdefault(r["service"], {})[r["component"]] = LiveInstance(
                r["number"], r["commit_sha"] or "", r["fingerprint"] or "", r["host"] or "", r["port"] or 0,
                *_redis_settings(r), replicas=tuple(replicas_of(r["host"] or "", r["port"] or 0,
                                                                json.loads(r["names"] or "{}")))
                if r["component"] == "code" else ())
        # What each service's last successful deploy used of other services' instances.
        for r in self.conn.execute(
                "SELECT d.* FROM deploys d WHERE env_key=? AND outcome='succeeded' AND (mysql_of != '' OR "
                "redis_of != '') AND number = (SELECT MAX(number) FROM deploys WHERE env_key=d.env_key AND "
                "service=d.service AND outcome='succeeded')", (env_key,)):
            used = {c: (r[f"{c}_of"], r[c]) for c in ("mysql", "redis") if r[f"{c}_of"]}
            found.setdefault(r["service"], {})["used"] = used
        return {service: ServiceState(service, **parts) for service, parts in found.items()}

    def history(self, env_key: str, service: str) -> list[DeployRow]:
        rows = self.conn.execute(
            "SELECT * FROM deploys WHERE env_key=? AND service=? ORDER BY number", (env_key, service))
        return [DeployRow(r["number"], r["code"], bool(r["code_new"]), r["mysql"], bool(r["mysql_new"]),
                          r["redis"], bool(r["redis_new"]), r["commit_sha"] or "", r["host"] or "",
                          r["port"] or 0, r["outcome"], r["reason"], r["job_id"], r["created"], r["mysql_of"],
                          r["redis_of"])
                for r in rows]

    def services(self, env_key: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT DISTINCT service FROM instances WHERE env_key=? AND status != 'removed' ORDER BY service",
            (env_key,))
        return [r[0] for r in rows]

    def instance(self, env_key: str, service: str, component: str, number: int) -> InstanceRow | None:
        r = self.conn.execute(
            "SELECT * FROM instances WHERE env_key=? AND service=? AND component=? AND number=?",
            (env_key, service, component, number)).fetchone()
        return InstanceRow.of(r) if r else None

    def instances(self, env_key: str, service: str | None = None, status: Status | None = None) -> list[InstanceRow]:
        query, args = "SELECT * FROM instances WHERE env_key=?", [env_key]
        if service is not None:
            query, args = query + " AND service=?", args + [service]
        if status is not None:
            query, args = query + " AND status=?", args + [status.value]
        return [InstanceRow.of(r) for r in self.conn.execute(query + " ORDER BY service, component, number", args)]

    def live_code(self) -> list[InstanceRow]:
        """The live code instances of every environment, on every host."""
        return [InstanceRow.of(r) for r in self.conn.execute(
            "SELECT * FROM instances WHERE component='code' AND status='live'")]

    def live_code_on(self, host: str) -> list[tuple[InstanceRow, Replica]]:
        """The live code instances of every environment with a replica on one host, and that replica
        (each, if several are there)."""
        return [(row, replica) for row in self.live_code() for replica in row.replicas if replica.host == host]

    def placed(self) -> list[tuple[str, str, str]]:
        """(environment, service, host) of every code instance that runs or is being made, once
        per replica (the replicas after the first as SERVICE#N): what placement counts as placed
        on each host."""
        out = []
        for r in self.conn.execute("SELECT env_key, service, host, port, names FROM instances WHERE component='code' "
                                   "AND status IN ('live', 'building') AND host != ''"):
            for slot, replica in enumerate(replicas_of(r["host"], r["port"], json.loads(r["names"] or "{}"))):
                out.append((r["env_key"], replica_key(r["service"], slot), replica.host))
        return out

    def every_instance(self) -> list[InstanceRow]:
        """Every environment's instances: what a check across environments reads."""
        return [InstanceRow.of(r) for r in self.conn.execute("SELECT * FROM instances ORDER BY env_key, service")]

    def password(self, env_key: str, service: str, component: str, number: int) -> str | None:
        r = self.conn.execute(
            "SELECT password FROM credentials WHERE env_key=? AND service=? AND component=? AND number=?",
            (env_key, service, component, number)).fetchone()
        return self.vault.open_text(r[0]) if r else None

    def secrets(self, env_key: str) -> dict[str, str]:
        return {r[0]: self.vault.open_text(r[1]) for r in self.conn.execute(
            "SELECT name, value FROM secrets WHERE env_key=?", (env_key,))}

    def as_deployed(self, env_key: str, spec: dict) -> dict:
        """`spec` (a spec as a dict) with each service's definition as its live code instance was
        deployed, services that are live but no longer in it included: the environment as it
        runs, which is ahead of or behind a spec being applied."""
        services = dict(spec["services"])
        for service, live in self.state(env_key).items():
            if live.code is not None and (recorded := self.definition(env_key, service, live.code.number)):
                services[service] = recorded
        return {**spec, "services": services}

    def definition(self, env_key: str, service: str, code: int | None) -> dict | None:
        """The service as code instance `code` was deployed (recorded with the instance)."""
        row = self.instance(env_key, service, "code", code) if code is not None else None
        return row.names.get("service") if row else None

    def redact_values(self, scope: Scope | str | None, agent_id: str) -> list[str]:
        """The secret values an operation could reveal, for its agent to replace in its output:
        decided by the operation's kind (controller/state/knowledge.py), from what the ledger holds.
        A bare app/environment is a tenant operation, None one of no environment."""
        if not isinstance(scope, Scope):
            scope = Scope.decode(scope)
        keys = knowledge.environments_needed(scope)
        if keys is None:
            keys = [r[0] for r in self.conn.execute(
                "SELECT DISTINCT env_key FROM instances WHERE host=? AND status != 'removed'", (agent_id,))]
        return knowledge.values(scope, agent_id, {key: self._knowledge_facts(key) for key in keys})

    def _knowledge_facts(self, key: str) -> EnvFacts:
        secrets = set(self.secrets(key).values())
        secrets.update(self.vault.open_text(r[0]) for r in self.conn.execute(
            "SELECT value FROM retired_secrets WHERE env_key=?", (key,)))
        passwords = {(r[0], r[1], r[2]): self.vault.open_text(r[3]) for r in self.conn.execute(
            "SELECT service, component, number, password FROM credentials WHERE env_key=?", (key,))}
        hosts = {(r[0], r[1], r[2]): r[3] for r in self.conn.execute(
            "SELECT service, component, number, host FROM instances WHERE env_key=? AND status != 'removed'",
            (key,))}
        return EnvFacts(frozenset(secrets), passwords, hosts)

    def ports_in_use(self, host: str) -> set[int]:
        return {r[0] for r in self.conn.execute("SELECT port FROM ports WHERE host=?", (host,))}

    def ports_of(self, env_key: str, service: str) -> list[tuple[str, int]]:
        """(host, port) of every port the ledger holds for a service."""
        return [(r[0], r[1]) for r in self.conn.execute("SELECT host, port FROM ports WHERE env_key=? AND service=?",
                                                        (env_key, service))]

    # ---------------------------------------------------------------- writing

    def next_number(self, env_key: str, service: str, counter: str) -> int:
        """The next deploy or instance number: numbers only ever grow, never reused."""
        self.conn.execute(
            "INSERT INTO counters (env_key, service, component, last) VALUES (?, ?, ?, 1) "
            "ON CONFLICT DO UPDATE SET last = last + 1", (env_key, service, counter))
        return self.conn.execute(
            "SELECT last FROM counters WHERE env_key=? AND service=? AND component=?",
            (env_key, service, counter)).fetchone()[0]

    def move_past(self, env_key: str, service: str, deploy: int, component: str, number: int,
                  reason: str) -> int:
        """Instance `number` found its name taken on the server by something this deployer did not
        make: the number stays used (status `taken`, with the reason), and the deploy goes on with
        the next one. Returns it."""
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}")
        with self.transaction():
            self.set_status(env_key, service, component, number, Status.TAKEN)
            self.set_names(env_key, service, component, number, taken=reason)
            self.conn.execute("DELETE FROM credentials WHERE env_key=? AND service=? AND component=? AND number=?",
                              (env_key, service, component, number))
            following = self.next_number(env_key, service, component)
            self.conn.execute(f"UPDATE deploys SET {component}=? WHERE env_key=? AND service=? AND number=?",
                              (following, env_key, service, deploy))
        return following

    def add_instance(self, env_key: str, service: str, component: str, number: int, *,
                     host: str = "", port: int = 0, commit: str = "", fingerprint: str = "",
                     names: dict | None = None, status: Status = Status.BUILDING) -> None:
        now = time.time()
        self.conn.execute(
            "INSERT INTO instances (env_key, service, component, number, status, host, port, commit_sha, "
            "fingerprint, names, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (env_key, service, component, number, Status(status).value, host, port, commit, fingerprint,
             json.dumps(names or {}), now, now))

    def set_status(self, env_key: str, service: str, component: str, number: int, status: Status,
                   port: int | None = None) -> None:
        status = Status(status).value
        if port is None:
            self.conn.execute(
                "UPDATE instances SET status=?, updated=? WHERE env_key=? AND service=? AND component=? AND number=?",
                (status, time.time(), env_key, service, component, number))
        else:
            self.conn.execute(
                "UPDATE instances SET status=?, port=?, updated=? WHERE env_key=? AND service=? "
                "AND component=? AND number=?",
                (status, port, time.time(), env_key, service, component, number))

    def set_host(self, env_key: str, service: str, component: str, number: int, host: str) -> None:
        self.conn.execute("UPDATE instances SET host=?, updated=? WHERE env_key=? AND service=? AND component=? "
                          "AND number=?", (host, time.time(), env_key, service, component, number))

    def set_names(self, env_key: str, service: str, component: str, number: int, **names) -> None:
        row = self.instance(env_key, service, component, number)
        merged = {**row.names, **names} if row else names
        self.conn.execute(
            "UPDATE instances SET names=?, updated=? WHERE env_key=? AND service=? AND component=? AND number=?",
            (json.dumps(merged), time.time(), env_key, service, component, number))

    def make_live(self, env_key: str, service: str, component: str, number: int) -> None:
        """`number` becomes the live instance; the one it replaces is kept as standby."""
        self.conn.execute(
            "UPDATE instances SET status='standby', updated=? WHERE env_key=? AND service=? "
            "AND component=? AND status='live' AND number != ?",
            (time.time(), env_key, service, component, number))
        self.set_status(env_key, service, component, number, Status.LIVE)

    def save_password(self, env_key: str, service: str, component: str, number: int, password: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO credentials VALUES (?, ?, ?, ?, ?)",
                          (env_key, service, component, number, self.vault.seal_text(password)))

    def set_secret(self, env_key: str, name: str, value: str) -> None:
        """Set a secret; the value it replaces stays redacted (its last RETIRED_KEPT values do)."""
        with self.transaction():
            old = self.conn.execute("SELECT value FROM secrets WHERE env_key=? AND name=?",
                                    (env_key, name)).fetchone()
            if old is not None and self.vault.open_text(old[0]) != value:
                self.conn.execute("INSERT INTO retired_secrets VALUES (?, ?, ?, ?)",
                                  (env_key, name, old[0], time.time()))
                self.conn.execute(
                    "DELETE FROM retired_secrets WHERE env_key=? AND name=? AND rowid NOT IN (SELECT rowid FROM "
                    "retired_secrets WHERE env_key=? AND name=? ORDER BY retired DESC, rowid DESC LIMIT ?)",
                    (env_key, name, env_key, name, RETIRED_KEPT))
            self.conn.execute("INSERT OR REPLACE INTO secrets VALUES (?, ?, ?)",
                              (env_key, name, self.vault.seal_text(value)))

    def reserve_port(self, host: str, port: int, env_key: str, service: str, instance: int) -> None:
        self.conn.execute("INSERT INTO ports VALUES (?, ?, ?, ?, ?)", (host, port, env_key, service, instance))

    def release_port(self, host: str, port: int) -> None:
        self.conn.execute("DELETE FROM ports WHERE host=? AND port=?", (host, port))

    def start_deploy(self, env_key: str, service: str, job_id: str, *, code: int | None, code_new: bool,
                     mysql: int | None, mysql_new: bool, redis: int | None, redis_new: bool,
                     commit: str, host: str, shared: Mapping[str, str] | None = None) -> int:
        """`shared`: component → the service whose instance this deploy uses, when another's."""
        shared = shared or {}
        number = self.next_number(env_key, service, "deploy")
        self.conn.execute(
            "INSERT INTO deploys (env_key, service, number, job_id, code, code_new, mysql, mysql_new, "
            "redis, redis_new, commit_sha, host, outcome, created, mysql_of, redis_of) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)",
            (env_key, service, number, job_id, code, int(code_new), mysql, int(mysql_new), redis,
             int(redis_new), commit, host, time.time(), shared.get("mysql", ""), shared.get("redis", "")))
        return number

    def finish_deploy(self, env_key: str, service: str, number: int, outcome: str, reason: str = "",
                      port: int | None = None) -> None:
        self.conn.execute(
            "UPDATE deploys SET outcome=?, reason=?, port=COALESCE(?, port), finished=? "
            "WHERE env_key=? AND service=? AND number=?",
            (outcome, reason, port, time.time(), env_key, service, number))

    def set_step(self, env_key: str, service: str, number: int, step: str, *, port: int | None = None,
                 process: str | None = None) -> None:
        """Where a deploy is, written before the step acts: after a crash, recovery reads it to
        know what may have happened (see recovery.py)."""
        self.conn.execute(
            "UPDATE deploys SET step=?, port=COALESCE(?, port), process=COALESCE(?, process) "
            "WHERE env_key=? AND service=? AND number=?",
            (step, port, process, env_key, service, number))

    def add_deploy_replica(self, env_key: str, service: str, number: int, replica: "Replica") -> None:
        """Another replica of a deploy is about to start: recorded first, as its first one is by set_step."""
        row = self.conn.execute("SELECT replicas FROM deploys WHERE env_key=? AND service=? AND number=?",
                                (env_key, service, number)).fetchone()
        replicas = [r for r in json.loads(row[0] if row else "[]") if r.get("process") != replica.process
                    or r.get("host") != replica.host]
        self.conn.execute("UPDATE deploys SET replicas=? WHERE env_key=? AND service=? AND number=?",
                          (json.dumps([*replicas, replica.to_dict()]), env_key, service, number))

    @contextlib.contextmanager
    def transaction(self):
        """Several ledger writes that a crash must not split (a deploy going live). Inside
        another transaction it is a savepoint of it."""
        nested = self.conn.in_transaction
        self.conn.execute("SAVEPOINT ledger" if nested else "BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK TO ledger" if nested else "ROLLBACK")
            if nested:
                self.conn.execute("RELEASE ledger")
            raise
        self.conn.execute("RELEASE ledger" if nested else "COMMIT")


def _redis_settings(r) -> tuple[str, int]:
    names = json.loads(r["names"] or "{}") if r["component"] == "redis" else {}
    return names.get("mode", ""), names.get("maxmemory", 0)


def diagram(rows: list[DeployRow]) -> str:
    """The ledger in the shape of the original notes: `(n)` where a deploy made instance n, `|`
    where it kept the one above, and a bare `n` where it went back to an older one (a rollback);
    `web:n` is instance n of service web's, which this service shares. A deploy that did not
    succeed is marked."""
    table = [("deploy", "code", "mysql", "redis")]
    above: dict[str, tuple[str, int] | None] = {"code": None, "mysql": None, "redis": None}
    owners: set[str] = set()
    for row in rows:
        cells = [str(row.number)]
        for component, number, new, owner in (("code", row.code, row.code_new, ""),
                                              ("mysql", row.mysql, row.mysql_new, row.mysql_of),
                                              ("redis", row.redis, row.redis_new, row.redis_of)):
            owners |= {owner} if owner and number is not None else set()
            if number is None:
                cells.append("")
            elif new:
                cells.append(f"({number})")
            elif (owner, number) == above[component]:
                cells.append(" |")
            else:
                cells.append(f" {owner}:{number}" if owner else f" {number}")
            if row.outcome == "succeeded" and number is not None:
                above[component] = (owner, number)
        table.append(tuple(cells) + ((row.outcome + (f": {row.reason}" if row.reason else "")
                                      if row.outcome != "succeeded" else ""),))
    widths = [max([len(r[i]) + 1 for r in table] + [least]) for i, least in enumerate((8, 6, 7, 0))]
    lines = []
    for r in table:
        line = "".join(cell.ljust(width) for cell, width in zip(r[:4], widths)).rstrip()
        lines.append(f"{line:<28} {r[4]}" if len(r) > 4 and r[4] else line)
    lines += [f"{owner}:n is instance n of service {owner}'s, which this service uses" for owner in sorted(owners)]
    return "\n".join(lines) + "\n"
