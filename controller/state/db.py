"""The controller's SQLite database (WAL, one writer): agents and operations; it migrates itself.

Secret values and the payloads of unfinished operations are sealed (see vault.py); the key lives
beside the database as `secrets.key`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from protos import deployer_pb2 as pb

from controller.state.vault import Vault

KEY_FILE = "secrets.key"


def _seal_at_rest(conn: sqlite3.Connection, vault: Vault) -> None:
    """Secrets, generated passwords and the payloads of unfinished operations are sealed; an
    operation remembers its environment, so a resent one carries the same redact list."""
    conn.execute("ALTER TABLE operations ADD COLUMN environment TEXT")
    for table, column in (("secrets", "value"), ("credentials", "password")):
        for rowid, value in conn.execute(f"SELECT rowid, {column} FROM {table}").fetchall():
            conn.execute(f"UPDATE {table} SET {column}=? WHERE rowid=?", (vault.seal_text(value), rowid))
    for rowid, spec in conn.execute("SELECT rowid, spec FROM operations WHERE spec IS NOT NULL").fetchall():
        conn.execute("UPDATE operations SET spec=? WHERE rowid=?", (vault.seal(spec), rowid))


# Each entry moves the schema one version up; never edit an entry that has shipped. An entry is
# SQL, or a function of (connection, vault) for what SQL alone cannot do.
MIGRATIONS = [
    """
    CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        roles TEXT NOT NULL,
        capabilities TEXT NOT NULL,
        version TEXT NOT NULL,
        facts BLOB,
        services_root TEXT,
        peer TEXT,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL
    );
    CREATE TABLE operations (
        id TEXT PRIMARY KEY,
        agent_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        summary TEXT NOT NULL,
        spec BLOB,              -- the operation as sent; dropped once it has a result
        state TEXT NOT NULL,    -- queued, sent, running, finished
        created REAL NOT NULL,
        finished REAL,
        result BLOB
    );
    CREATE INDEX operations_open ON operations (agent_id) WHERE state != 'finished';
    """,
    # 2: the instantiation ledger, jobs, credentials and secrets; agents report what they provide.
    """
    ALTER TABLE agents ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE operations ADD COLUMN folder TEXT;
    CREATE TABLE environments (
        key TEXT PRIMARY KEY,          -- app/environment
        spec TEXT NOT NULL,            -- the accepted spec, canonical JSON
        updated REAL NOT NULL
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        env_key TEXT NOT NULL,
        kind TEXT NOT NULL,            -- apply, rollback, verify, …
        state TEXT NOT NULL,           -- running, succeeded, failed, interrupted
        created REAL NOT NULL,
        finished REAL,
        summary TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE counters (            -- numbers only ever grow: deploys and instances
        env_key TEXT NOT NULL, service TEXT NOT NULL, component TEXT NOT NULL,
        last INTEGER NOT NULL,
        PRIMARY KEY (env_key, service, component)
    );
    CREATE TABLE deploys (
        env_key TEXT NOT NULL, service TEXT NOT NULL, number INTEGER NOT NULL,
        job_id TEXT NOT NULL,
        code INTEGER, code_new INTEGER NOT NULL DEFAULT 0,
        mysql INTEGER, mysql_new INTEGER NOT NULL DEFAULT 0,
        redis INTEGER, redis_new INTEGER NOT NULL DEFAULT 0,
        commit_sha TEXT, host TEXT, port INTEGER,
        outcome TEXT NOT NULL,         -- running, succeeded, failed
        reason TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL, finished REAL,
        PRIMARY KEY (env_key, service, number)
    );
    CREATE TABLE instances (
        env_key TEXT NOT NULL, service TEXT NOT NULL, component TEXT NOT NULL,
        number INTEGER NOT NULL,
        status TEXT NOT NULL,          -- building, live, standby, failed, removed
        host TEXT, port INTEGER, commit_sha TEXT, fingerprint TEXT,
        names TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL, updated REAL NOT NULL,
        PRIMARY KEY (env_key, service, component, number)
    );
    CREATE TABLE credentials (
        env_key TEXT NOT NULL, service TEXT NOT NULL, component TEXT NOT NULL,
        number INTEGER NOT NULL, password TEXT NOT NULL,
        PRIMARY KEY (env_key, service, component, number)
    );
    CREATE TABLE secrets (
        env_key TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
        PRIMARY KEY (env_key, name)
    );
    CREATE TABLE ports (
        host TEXT NOT NULL, port INTEGER NOT NULL,
        env_key TEXT NOT NULL, service TEXT NOT NULL, instance INTEGER NOT NULL,
        PRIMARY KEY (host, port)
    );
    """,
    # 3: enrolment tokens (only a hash of the secret part is kept) and issued agent certificates.
    """
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        roles TEXT NOT NULL,           -- JSON list
        agent_id TEXT NOT NULL DEFAULT '',  -- '' : any agent id
        created REAL NOT NULL,
        expires REAL NOT NULL,
        used REAL,
        used_by TEXT
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,       -- hex
        agent_id TEXT NOT NULL,
        roles TEXT NOT NULL,           -- JSON list
        issued REAL NOT NULL,
        not_after REAL NOT NULL,
        revoked REAL
    );
    CREATE INDEX certificates_agent ON certificates (agent_id);
    """,
    # 4: the step a deploy is in, written before each step acts, and the process it started, so
    # recovery after a crash knows whether its route switch may have happened and what to stop;
    # which job settled an interrupted one (NULL: not yet).
    """
    ALTER TABLE deploys ADD COLUMN step TEXT NOT NULL DEFAULT '';
    ALTER TABLE deploys ADD COLUMN process TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN recovered_by TEXT;
    UPDATE jobs SET recovered_by = '' WHERE state = 'interrupted';
    """,
    # 5: secret values and operation payloads sealed at rest; operations know their environment.
    _seal_at_rest,
    # 6: values a secret had before it was set again (sealed), still redacted: kept releases'
    # .env files and logs may hold them. Tokens spent by a revocation say so with a marker no
    # agent id can equal.
    """
    CREATE TABLE retired_secrets (
        env_key TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL, retired REAL NOT NULL
    );
    CREATE INDEX retired_secrets_env ON retired_secrets (env_key, name);
    UPDATE tokens SET used_by = '(revoked)' WHERE used_by = 'revoked';
    """,
    # 7: operator tokens for the TCP operator listener (only a hash of the secret is kept);
    # created_by: the token that made it ('' : the Unix socket), so a revocation takes its spares.
    """
    CREATE TABLE operator_tokens (
        id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        role TEXT NOT NULL,            -- read, operate
        label TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        expires REAL NOT NULL,
        revoked REAL,
        created_by TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX operator_tokens_made_by ON operator_tokens (created_by);
    """,
    # 8: what each agent may provide and the address other hosts reach it at, as the operator
    # granted them (a hello only says what the agent is configured for); a token carries the
    # grant it makes at enrolment. No row: nothing granted, the address is the link's peer.
    """
    CREATE TABLE grants (
        agent_id TEXT PRIMARY KEY,
        provides TEXT NOT NULL DEFAULT '[]',   -- JSON list: mysql, redis, nginx
        address TEXT NOT NULL DEFAULT '',      -- '' : the peer address of its link
        updated REAL NOT NULL
    );
    ALTER TABLE tokens ADD COLUMN provides TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE tokens ADD COLUMN address TEXT NOT NULL DEFAULT '';
    """,
    # 9: a deploy may use another service's data instance (`uses: [web.mysql]`): whose it is
    # ('' : the service's own).
    """
    ALTER TABLE deploys ADD COLUMN mysql_of TEXT NOT NULL DEFAULT '';
    ALTER TABLE deploys ADD COLUMN redis_of TEXT NOT NULL DEFAULT '';
    """,
    # 10: what happened to an environment besides its jobs: a process that ended unasked, the
    # restart the controller ordered, a crash loop, a lost agent (see environments/healing.py).
    """
    CREATE TABLE env_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        env_key TEXT NOT NULL, t REAL NOT NULL, kind TEXT NOT NULL, service TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX env_events_env ON env_events (env_key, id);
    """,
    # 11: notifications to the operator's webhooks, kept until delivered (or given up on), so a
    # receiver that is down or a controller restarted loses none (see state/outbox.py).
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        target TEXT NOT NULL, event TEXT NOT NULL, body TEXT NOT NULL,
        created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',   -- pending, delivered, dropped
        last_error TEXT NOT NULL DEFAULT '', done REAL
    );
    CREATE INDEX outbox_pending ON outbox (target, id) WHERE state = 'pending';
    ALTER TABLE jobs ADD COLUMN pruned REAL;    -- when retention removed its folder (the row stays)
    """,
    # 12: what placement may count on an agent, as the operator granted it (its facts may lower
    # it, never raise it), and its labels (docs/decisions/034-placement.md).
    """
    CREATE TABLE placement_grants (
        agent_id TEXT PRIMARY KEY,
        memory INTEGER NOT NULL DEFAULT 0,      -- bytes; 0: what its facts measure
        cpu REAL NOT NULL DEFAULT 0,            -- CPUs; 0: what its facts measure
        labels TEXT NOT NULL DEFAULT '{}',      -- JSON object
        updated REAL NOT NULL
    );
    """,
    # 13: routes a router missed (it was away during a switch): written when it is back.
    """
    CREATE TABLE route_debts (
        router_id TEXT NOT NULL, env_key TEXT NOT NULL, since REAL NOT NULL,
        PRIMARY KEY (router_id, env_key)
    );
    """,
    # 14: tls: auto (docs/decisions/036-acme.md): the ACME account of each directory and each
    # environment's certificate, their keys sealed.
    """
    CREATE TABLE acme_accounts (
        directory TEXT PRIMARY KEY, key TEXT NOT NULL, url TEXT NOT NULL DEFAULT '', created REAL NOT NULL
    );
    CREATE TABLE acme_certificates (
        env_key TEXT PRIMARY KEY,
        names TEXT NOT NULL,          -- JSON list: the domain, then the aliases
        chain TEXT NOT NULL,          -- PEM, leaf first
        key TEXT NOT NULL,            -- sealed
        not_after REAL NOT NULL, obtained REAL NOT NULL
    );
    """,
    # 15: processes a deploy could not stop because their host was away (a replica moved off a
    # lost host): stopped when it is back (docs/decisions/037-replicas.md).
    """
    CREATE TABLE stop_debts (
        host TEXT NOT NULL, env_key TEXT NOT NULL, service TEXT NOT NULL, process TEXT NOT NULL,
        port INTEGER NOT NULL DEFAULT 0, since REAL NOT NULL,
        PRIMARY KEY (host, env_key, service, process)
    );
    """,
    # 16: a deploy's other replicas as they start (host, port, process): what recovery stops or keeps.
    """
    ALTER TABLE deploys ADD COLUMN replicas TEXT NOT NULL DEFAULT '[]';
    """,
]
SEALED_VERSION = MIGRATIONS.index(_seal_at_rest) + 1


@dataclass
class OperationRow:
    id: str
    agent_id: str
    kind: str
    summary: list[str]
    spec: pb.Operation | None
    state: str
    created: float
    finished: float | None
    result: pb.OperationResult | None
    folder: str | None
    environment: str | None = None  # app/environment whose secrets its output is redacted of


def _row(r: sqlite3.Row, vault: Vault) -> OperationRow:
    return OperationRow(
        id=r["id"], agent_id=r["agent_id"], kind=r["kind"], summary=json.loads(r["summary"]),
        spec=pb.Operation.FromString(vault.open(r["spec"])) if r["spec"] else None,
        state=r["state"], created=r["created"], finished=r["finished"],
        result=pb.OperationResult.FromString(r["result"]) if r["result"] else None,
        folder=r["folder"], environment=r["environment"],
    )


def _placement(r: sqlite3.Row) -> tuple[int, float, dict[str, str]]:
    return r["memory"], r["cpu"], json.loads(r["labels"])


class Database:
    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a crash of the process (what kill -9 tests), and a power
        # loss can only drop the last commits, never corrupt; output is fsynced before any ack.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        # Deleted rows (a secret set again past the retired ones kept, a spent token) are zeroed
        # on disk, whatever the SQLite build's default: sealed or not, no old value lingers.
        self.conn.execute("PRAGMA secure_delete=ON")
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        self.vault = Vault.for_store(Path(path).parent / KEY_FILE, create=version < SEALED_VERSION)
        self._migrate(version)

    def _migrate(self, version: int) -> None:
        for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
            if not callable(step):
                self.conn.executescript(f"BEGIN; {step}; PRAGMA user_version = {number}; COMMIT;")
                continue
            self.conn.execute("BEGIN")
            try:
                step(self.conn, self.vault)
                self.conn.execute(f"PRAGMA user_version = {number}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        if 0 < version < SEALED_VERSION:
            # The plaintext the sealing replaced is still in free pages and WAL frames: rebuild
            # the file and empty the WAL so that no copy of it is left.
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.conn.execute("VACUUM")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.conn.close()

    # ---------------------------------------------------------------- agents

    def save_agent(self, hello: pb.Hello, peer: str) -> None:
        now = time.time()
        self.conn.execute(
            """INSERT INTO agents (id, roles, capabilities, version, facts, services_root, peer,
                                   first_seen, last_seen, settings)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (id) DO UPDATE SET roles=excluded.roles,
                 capabilities=excluded.capabilities, version=excluded.version,
                 facts=excluded.facts, services_root=excluded.services_root, peer=excluded.peer,
                 last_seen=excluded.last_seen, settings=excluded.settings""",
            (hello.agent_id, json.dumps(list(hello.roles)), json.dumps(list(hello.capabilities)),
             hello.version, hello.facts.SerializeToString(), hello.services_root, peer, now, now,
             json.dumps(dict(hello.settings))),
        )

    def touch_agent(self, agent_id: str, last_seen: float, facts: pb.HostFacts | None) -> None:
        if facts is None:
            self.conn.execute("UPDATE agents SET last_seen=? WHERE id=?", (last_seen, agent_id))
        else:
            self.conn.execute("UPDATE agents SET last_seen=?, facts=? WHERE id=?",
                              (last_seen, facts.SerializeToString(), agent_id))

    def agents(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM agents ORDER BY id").fetchall()

    def grants(self) -> dict[str, tuple[list[str], str]]:
        """agent id → (capabilities granted, address granted or '')."""
        return {row["agent_id"]: (json.loads(row["provides"]), row["address"])
                for row in self.conn.execute("SELECT * FROM grants")}

    def grant(self, agent_id: str) -> tuple[list[str], str]:
        row = self.conn.execute("SELECT * FROM grants WHERE agent_id = ?", (agent_id,)).fetchone()
        return (json.loads(row["provides"]), row["address"]) if row else ([], "")

    def save_grant(self, agent_id: str, provides: list[str], address: str) -> None:
        self.conn.execute(
            """INSERT INTO grants (agent_id, provides, address, updated) VALUES (?, ?, ?, ?)
               ON CONFLICT (agent_id) DO UPDATE SET provides=excluded.provides, address=excluded.address,
                 updated=excluded.updated""",
            (agent_id, json.dumps(sorted(set(provides))), address, time.time()))

    def placement_grants(self) -> dict[str, tuple[int, float, dict[str, str]]]:
        """agent id → (memory granted, CPUs granted, labels)."""
        return {row["agent_id"]: _placement(row)
                for row in self.conn.execute("SELECT * FROM placement_grants")}

    def placement_grant(self, agent_id: str) -> tuple[int, float, dict[str, str]] | None:
        row = self.conn.execute("SELECT * FROM placement_grants WHERE agent_id = ?", (agent_id,)).fetchone()
        return _placement(row) if row else None

    def save_placement_grant(self, agent_id: str, memory: int, cpu: float, labels: dict[str, str]) -> None:
        self.conn.execute(
            """INSERT INTO placement_grants (agent_id, memory, cpu, labels, updated) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (agent_id) DO UPDATE SET memory=excluded.memory, cpu=excluded.cpu,
                 labels=excluded.labels, updated=excluded.updated""",
            (agent_id, memory, cpu, json.dumps(dict(sorted(labels.items()))), time.time()))

    def owe_route(self, router_id: str, env_key: str) -> None:
        self.conn.execute("INSERT OR IGNORE INTO route_debts (router_id, env_key, since) VALUES (?, ?, ?)",
                          (router_id, env_key, time.time()))

    def paid_route(self, router_id: str, env_key: str) -> None:
        self.conn.execute("DELETE FROM route_debts WHERE router_id=? AND env_key=?", (router_id, env_key))

    def route_debts(self, router_id: str) -> list[str]:
        """The environments whose route changed while this router was away."""
        return [r[0] for r in self.conn.execute(
            "SELECT env_key FROM route_debts WHERE router_id=? ORDER BY since", (router_id,))]

    def owe_stop(self, host: str, env_key: str, service: str, process: str, port: int) -> None:
        self.conn.execute("INSERT OR IGNORE INTO stop_debts VALUES (?, ?, ?, ?, ?, ?)",
                          (host, env_key, service, process, port, time.time()))

    def paid_stop(self, host: str, env_key: str, service: str, process: str) -> None:
        self.conn.execute("DELETE FROM stop_debts WHERE host=? AND env_key=? AND service=? AND process=?",
                          (host, env_key, service, process))

    def stop_debts(self, host: str, env_key: str | None = None) -> list[tuple[str, str, str, int]]:
        """(environment, service, process, port) of what is to be stopped on `host` when it is back."""
        query, args = "SELECT env_key, service, process, port FROM stop_debts WHERE host=?", [host]
        if env_key is not None:
            query, args = query + " AND env_key=?", args + [env_key]
        return [tuple(r) for r in self.conn.execute(query + " ORDER BY since", args)]

    def acme_account(self, directory: str) -> tuple[str, str] | None:
        """(account key PEM, account URL) for an ACME directory."""
        row = self.conn.execute("SELECT key, url FROM acme_accounts WHERE directory=?", (directory,)).fetchone()
        return (self.vault.open_text(row[0]), row[1]) if row else None

    def save_acme_account(self, directory: str, key: str) -> None:
        """The first key saved for a directory is its account's: a second one made at the same
        time is not kept (INSERT OR IGNORE)."""
        self.conn.execute("INSERT OR IGNORE INTO acme_accounts VALUES (?, ?, '', ?)",
                          (directory, self.vault.seal_text(key), time.time()))

    def set_acme_account_url(self, directory: str, url: str) -> None:
        """The account's URL, once the server gives it."""
        self.conn.execute("UPDATE acme_accounts SET url=? WHERE directory=?", (url, directory))

    def certificate(self, env_key: str) -> tuple[tuple[str, ...], str, str, float, float] | None:
        """(names, chain PEM, key PEM, not after, obtained) of the environment's ACME certificate."""
        row = self.conn.execute("SELECT names, chain, key, not_after, obtained FROM acme_certificates WHERE env_key=?",
                                (env_key,)).fetchone()
        if row is None:
            return None
        return tuple(json.loads(row[0])), self.vault.open_text(row[1]), self.vault.open_text(row[2]), row[3], row[4]

    def save_certificate(self, env_key: str, names: tuple[str, ...], chain: str, key: str, not_after: float) -> None:
        self.conn.execute("INSERT OR REPLACE INTO acme_certificates VALUES (?, ?, ?, ?, ?, ?)",
                          (env_key, json.dumps(list(names)), self.vault.seal_text(chain), self.vault.seal_text(key),
                           not_after, time.time()))

    def drop_certificate(self, env_key: str) -> None:
        self.conn.execute("DELETE FROM acme_certificates WHERE env_key=?", (env_key,))

    def certificate_envs(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT env_key FROM acme_certificates ORDER BY env_key")]

    # ---------------------------------------------------------------- operations

    def insert_operation(self, op: pb.Operation, agent_id: str, summary: list[str], folder: str,
                         environment: str | None = None) -> float:
        """Record an operation, its payload sealed; a redact list is never stored (the dispatcher
        looks it up again whenever it sends the operation)."""
        created = time.time()
        stored = pb.Operation()
        stored.CopyFrom(op)
        stored.ClearField("redact")
        self.conn.execute(
            "INSERT INTO operations (id, agent_id, kind, summary, spec, state, created, folder, environment) "
            "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
            (op.id, agent_id, op.WhichOneof("kind"), json.dumps(summary),
             self.vault.seal(stored.SerializeToString()), created, folder, environment),
        )
        return created

    def set_state(self, op_id: str, state: str) -> None:
        self.conn.execute("UPDATE operations SET state=? WHERE id=? AND state != 'finished'",
                          (state, op_id))

    def finish(self, op_id: str, result: pb.OperationResult) -> float:
        finished = time.time()
        self.conn.execute(
            "UPDATE operations SET state='finished', finished=?, result=?, spec=NULL WHERE id=?",
            (finished, result.SerializeToString(), op_id),
        )
        return finished

    def operation(self, op_id: str) -> OperationRow | None:
        r = self.conn.execute("SELECT * FROM operations WHERE id=?", (op_id,)).fetchone()
        return _row(r, self.vault) if r else None

    def open_operations(self, agent_id: str | None = None) -> list[OperationRow]:
        if agent_id is None:
            rows = self.conn.execute("SELECT * FROM operations WHERE state != 'finished' ORDER BY created")
        else:
            rows = self.conn.execute(
                "SELECT * FROM operations WHERE state != 'finished' AND agent_id=? ORDER BY created",
                (agent_id,))
        return [_row(r, self.vault) for r in rows]
