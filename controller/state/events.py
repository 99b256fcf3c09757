"""An environment's history besides its jobs: a process that ended unasked, the restart the
controller ordered for it, a crash loop, an agent lost with live instances. Kept in the
controller's database; `deployctl events APP/ENV` reads it."""

from __future__ import annotations

import json
import time

from controller.state.db import Database

KEPT_PER_ENV = 10_000  # the oldest go first


class EnvEvents:
    def __init__(self, db: Database) -> None:
        self.conn = db.conn

    def add(self, env_key: str, kind: str, service: str = "", **detail) -> int:
        cur = self.conn.execute("INSERT INTO env_events (env_key, t, kind, service, detail) VALUES (?, ?, ?, ?, ?)",
                                (env_key, time.time(), kind, service, json.dumps(detail)))
        # The newest KEPT_PER_ENV of this environment (ids are shared by all environments).
        self.conn.execute("DELETE FROM env_events WHERE env_key=? AND id <= (SELECT id FROM env_events WHERE "
                          "env_key=? ORDER BY id DESC LIMIT 1 OFFSET ?)", (env_key, env_key, KEPT_PER_ENV))
        return cur.lastrowid

    def after(self, env_key: str, after: int = 0, limit: int = 1000) -> list[dict]:
        rows = self.conn.execute("SELECT * FROM env_events WHERE env_key=? AND id > ? ORDER BY id LIMIT ?",
                                 (env_key, after, limit))
        return [{"id": r["id"], "t": r["t"], "kind": r["kind"], "service": r["service"], **json.loads(r["detail"])}
                for r in rows]

    def of_service(self, env_key: str, service: str, kinds: tuple[str, ...]) -> list[dict]:
        marks = ",".join("?" * len(kinds))
        rows = self.conn.execute(f"SELECT * FROM env_events WHERE env_key=? AND service=? AND kind IN ({marks}) "
                                 "ORDER BY id", (env_key, service, *kinds))
        return [{"id": r["id"], "t": r["t"], "kind": r["kind"], **json.loads(r["detail"])} for r in rows]
