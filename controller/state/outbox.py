"""Notifications waiting for their webhook: one row per (event, target), kept until the target
took it or the controller gave up on it. The sender (environments/notify.py) reads what is due;
nothing here speaks HTTP."""

from __future__ import annotations

import time
from dataclasses import dataclass

from controller.state.db import Database

KEPT_DONE = 5_000  # delivered or dropped rows kept for `deployctl`-side inspection; the oldest go


@dataclass(frozen=True)
class Pending:
    id: int
    target: str
    event: str
    body: str
    created: float
    attempts: int
    next_at: float


class Outbox:
    def __init__(self, db: Database) -> None:
        self.conn = db.conn

    def add(self, targets: list[str], event: str, body: str) -> None:
        now = time.time()
        self.conn.executemany("INSERT INTO outbox (target, event, body, created, next_at) VALUES (?, ?, ?, ?, ?)",
                              [(target, event, body, now, now) for target in targets])

    def head(self, target: str) -> Pending | None:
        """The target's oldest pending notification: one target's are sent in order, so a later
        one never overtakes one being retried."""
        row = self.conn.execute("SELECT * FROM outbox WHERE target=? AND state='pending' ORDER BY id LIMIT 1",
                                (target,)).fetchone()
        if row is None:
            return None
        return Pending(row["id"], row["target"], row["event"], row["body"], row["created"], row["attempts"],
                       row["next_at"])

    def delivered(self, row_id: int) -> None:
        self.conn.execute("UPDATE outbox SET state='delivered', attempts=attempts+1, done=?, last_error='' "
                          "WHERE id=?", (time.time(), row_id))
        self._trim()

    def failed(self, row_id: int, error: str, next_at: float) -> None:
        self.conn.execute("UPDATE outbox SET attempts=attempts+1, last_error=?, next_at=? WHERE id=?",
                          (error[:500], next_at, row_id))

    def dropped(self, row_id: int, error: str) -> None:
        self.conn.execute("UPDATE outbox SET state='dropped', attempts=attempts+1, last_error=?, done=? WHERE id=?",
                          (error[:500], time.time(), row_id))
        self._trim()

    def forget_targets_except(self, targets: list[str]) -> int:
        """Pending rows of targets no longer configured are dropped (said once, at start)."""
        marks = ",".join("?" * len(targets)) or "''"
        cur = self.conn.execute(f"UPDATE outbox SET state='dropped', last_error='target no longer configured', "
                                f"done=? WHERE state='pending' AND target NOT IN ({marks})", (time.time(), *targets))
        return cur.rowcount

    def summary(self) -> dict[str, dict[str, int]]:
        """target → {state: count}."""
        out: dict[str, dict[str, int]] = {}
        for r in self.conn.execute("SELECT target, state, COUNT(*) FROM outbox GROUP BY target, state"):
            out.setdefault(r[0], {})[r[1]] = r[2]
        return out

    def _trim(self) -> None:
        self.conn.execute("DELETE FROM outbox WHERE state != 'pending' AND id <= (SELECT id FROM outbox WHERE "
                          "state != 'pending' ORDER BY id DESC LIMIT 1 OFFSET ?)", (KEPT_DONE,))
