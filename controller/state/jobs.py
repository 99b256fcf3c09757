"""Jobs: the controller's execution of an order, each with its own folder a human can read.

store/jobs/<id>/  order/ (the files as received), plan.json, events.jsonl (append-only),
                  ops/<op id>/output.log (the full output of every operation), job.json.
One job at a time per environment, guarded by a lock folder that says who holds it and why.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from pathlib import Path

from controller.state.db import Database
from common import errors


class Locked(errors.Busy):
    """Another job holds the environment's lock; the message says which, since when and why."""


def new_job_id(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"job-{stamp}-{secrets.token_hex(3)}"


class EnvLock:
    """`mkdir` is atomic: the folder exists for exactly one holder. A stale lock (its controller
    died) stays visible until an operator breaks it on purpose."""

    def __init__(self, store: Path, env_key: str) -> None:
        self.path = store / "locks" / env_key.replace("/", "--")
        self.env_key = env_key

    def acquire(self, job_id: str, reason: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.mkdir()
        except FileExistsError:
            raise Locked(f"{self.env_key} is locked by {self.describe()}") from None
        (self.path / "owner.json").write_text(json.dumps(
            {"job": job_id, "pid": os.getpid(), "since": time.time(), "reason": reason}))

    def owner(self) -> dict | None:
        try:
            return json.loads((self.path / "owner.json").read_text())
        except (FileNotFoundError, ValueError):
            return {"job": "?", "since": 0, "reason": "unknown"} if self.path.exists() else None

    def describe(self) -> str:
        owner = self.owner() or {}
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
        return f"job {owner.get('job')} since {since} ({owner.get('reason')})"

    def release(self) -> None:
        (self.path / "owner.json").unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass


class Job:
    def __init__(self, store: Path, db: Database, job_id: str, env_key: str, kind: str) -> None:
        self.id = job_id
        self.env_key = env_key
        self.kind = kind
        self.db = db
        self.folder = store / "jobs" / job_id
        self.folder.mkdir(parents=True)
        self._events = open(self.folder / "events.jsonl", "a", buffering=1)
        self.listeners: set[asyncio.Event] = set()
        self.finished, self.state, self.summary = False, "running", ""
        self.created = time.time()
        db.conn.execute("INSERT INTO jobs (id, env_key, kind, state, created) VALUES (?, ?, ?, 'running', ?)",
                        (job_id, env_key, kind, self.created))

    def save(self, name: str, content: bytes | str) -> None:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    def ops_folder(self, op_id: str) -> Path:
        return self.folder / "ops" / op_id

    def event(self, name: str, **fields) -> None:
        record = {"t": round(time.time(), 3), "event": name, **fields}
        self._events.write(json.dumps(record) + "\n")
        for listener in self.listeners:
            listener.set()

    async def wait(self) -> str:
        """Until the job has finished: its state."""
        ended = asyncio.Event()
        self.listeners.add(ended)
        try:
            while not self.finished:
                await ended.wait()
                ended.clear()
        finally:
            self.listeners.discard(ended)
        return self.state

    def finish(self, state: str, summary: str) -> None:
        self.event("job.finished", state=state, summary=summary)
        self.db.conn.execute("UPDATE jobs SET state=?, finished=?, summary=? WHERE id=?",
                             (state, time.time(), summary, self.id))
        (self.folder / "job.json").write_text(json.dumps(
            {"id": self.id, "environment": self.env_key, "kind": self.kind, "state": state,
             "summary": summary}, indent=2) + "\n")
        self.finished, self.state, self.summary = True, state, summary
        self._events.close()
        for listener in self.listeners:
            listener.set()


def read_events(folder: Path, start: int = 0) -> tuple[list[dict], int]:
    """Events from byte `start` of events.jsonl; returns them and where to continue."""
    path = folder / "events.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return [], start
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, start + end


class JobTable:
    """The jobs table and what recovery and the operator read of it (see recovery.py for the
    life of an interrupted job: `running` → `interrupted` → settled by a later job)."""

    def __init__(self, db: Database) -> None:
        self.conn = db.conn

    def recent(self, env_key: str = "", limit: int = 200) -> list[dict]:
        query, args = "SELECT * FROM jobs", ()
        if env_key:
            query, args = query + " WHERE env_key=?", (env_key,)
        return [dict(r) for r in self.conn.execute(query + " ORDER BY created DESC LIMIT ?", (*args, limit))]

    def get(self, job_id: str) -> dict | None:
        row = self.conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return dict(row) if row else None

    def running(self) -> list[dict]:
        return [dict(r) for r in self.conn.execute("SELECT id, env_key, kind, created FROM jobs WHERE state='running'")]

    def record_end(self, job_id: str, state: str, finished: float, summary: str) -> None:
        """A job that had finished, though the database had not heard: nothing to settle."""
        self.conn.execute("UPDATE jobs SET state=?, finished=?, summary=?, recovered_by='' WHERE id=?",
                          (state, finished, summary, job_id))

    def interrupt(self, job_id: str, summary: str) -> None:
        """The job and its running deploys end `interrupted`, to be settled by a later job."""
        self.conn.execute("UPDATE jobs SET state='interrupted', finished=?, summary=?, recovered_by=NULL WHERE id=?",
                          (time.time(), summary, job_id))
        self.conn.execute("UPDATE deploys SET outcome='interrupted', reason=? WHERE job_id=? AND outcome='running'",
                          (f"{summary}; not settled yet", job_id))

    def unsettled_environments(self) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT env_key FROM jobs WHERE state='interrupted' AND recovered_by IS NULL ORDER BY env_key")]

    def pending(self, env_key: str) -> list[str]:
        """Interrupted jobs of this environment whose work is not settled yet."""
        return [r[0] for r in self.conn.execute(
            "SELECT id FROM jobs WHERE env_key=? AND state='interrupted' AND recovered_by IS NULL ORDER BY created",
            (env_key,))]

    def deploys_of(self, env_key: str, jobs: list[str]) -> list:
        marks = ",".join("?" * len(jobs))
        return self.conn.execute(f"SELECT * FROM deploys WHERE env_key=? AND job_id IN ({marks}) "
                                 "ORDER BY service, number", (env_key, *jobs)).fetchall()

    def fail_without_spec(self, env_key: str) -> None:
        """What an environment without a spec left in flight simply failed."""
        for job_id in self.pending(env_key):
            self.conn.execute("UPDATE deploys SET outcome='failed', reason='interrupted; the environment has no "
                              "spec' WHERE job_id=? AND outcome IN ('running', 'interrupted')", (job_id,))
            self.conn.execute("UPDATE jobs SET recovered_by='-' WHERE id=?", (job_id,))
        self.conn.execute("UPDATE instances SET status='failed' WHERE env_key=? AND status='building'", (env_key,))

    def settled(self, jobs: list[str], by: str) -> None:
        for job_id in jobs:
            self.conn.execute("UPDATE jobs SET recovered_by=?, summary=summary || ? WHERE id=?",
                              (by, f"; settled by {by}", job_id))


class Specs:
    """The last accepted spec of every environment, as the operator sent it."""

    def __init__(self, db: Database) -> None:
        self.conn = db.conn

    def get(self, env_key: str) -> str | None:
        row = self.conn.execute("SELECT spec FROM environments WHERE key=?", (env_key,)).fetchone()
        return row[0] if row else None

    def others(self, env_key: str) -> list[tuple[str, str]]:
        """(key, spec) of every other environment."""
        return [(r[0], r[1]) for r in self.conn.execute("SELECT key, spec FROM environments WHERE key != ?",
                                                        (env_key,))]

    def save(self, env_key: str, spec: str) -> None:
        self.conn.execute(
            "INSERT INTO environments (key, spec, updated) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET spec=excluded.spec, updated=excluded.updated",
            (env_key, spec, time.time()))

    def forget(self, env_key: str) -> None:
        self.conn.execute("DELETE FROM environments WHERE key=?", (env_key,))
