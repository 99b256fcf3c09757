"""How long the controller keeps what jobs and operations leave on its disk (decision 031).

A finished job's folder (its order, plan, events and every operation's output) and its operation
rows go once the job is older than `keep` and is not among its environment's newest `keep_last`;
the job's row stays, since the ledger names the job of every deploy, and says when its folder went.
An operation run outside a job (`deployctl exec`) goes once it finished longer than `keep` ago.
Never removed: a job still running, an interrupted one not settled yet (recovery reads its
folder), a job with an operation not finished, anything someone is following."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog

from controller.state.db import Database

log = structlog.get_logger("retention")


@dataclass(frozen=True)
class Retention:
    keep_s: float = 30 * 86400.0
    keep_last: int = 20


@dataclass
class Plan:
    """What may go: (job id, its folder, its operation ids) and (operation id, its folder)."""
    jobs: list[tuple[str, Path, list[str]]] = field(default_factory=list)
    operations: list[tuple[str, Path]] = field(default_factory=list)


@dataclass
class Pruned:
    jobs: list[tuple[str, list[str]]] = field(default_factory=list)
    operations: list[str] = field(default_factory=list)
    bytes: int = 0


def plan(store: Path, db: Database, retention: Retention, followed: Callable[[str], bool] = lambda op_id: False,
         now: float | None = None) -> Plan:
    """What retention allows to remove now; `followed(op_id)` says whether someone still reads an
    operation. Reads only: the folders go in `remove` (off the event loop), the rows in `record`."""
    cutoff = (now if now is not None else time.time()) - retention.keep_s
    conn, out = db.conn, Plan()
    jobs_root, ops_root = store / "jobs", store / "operations"
    rows = conn.execute(
        "SELECT id FROM (SELECT id, state, recovered_by, finished, pruned, ROW_NUMBER() OVER "
        "(PARTITION BY env_key ORDER BY created DESC) AS newest FROM jobs) WHERE newest > ? AND pruned IS NULL "
        "AND finished IS NOT NULL AND finished < ? AND (state IN ('succeeded', 'failed') OR "
        "(state = 'interrupted' AND recovered_by IS NOT NULL))", (retention.keep_last, cutoff)).fetchall()
    for (job_id,) in rows:
        folder = jobs_root / job_id
        ops = conn.execute("SELECT id, state FROM operations WHERE folder LIKE ? ESCAPE '\\'",
                           (_like_prefix(str(folder) + "/"),)).fetchall()
        if not any(state != "finished" or followed(op_id) for op_id, state in ops):
            out.jobs.append((job_id, folder, [op_id for op_id, _ in ops]))
    for op_id, folder in conn.execute("SELECT id, folder FROM operations WHERE state='finished' AND finished < ? "
                                      "AND folder LIKE ? ESCAPE '\\'",
                                      (cutoff, _like_prefix(str(ops_root) + "/"))).fetchall():
        path = Path(folder)
        if path.parent == ops_root and path.name == op_id and not followed(op_id):  # its own folder, by its id
            out.operations.append((op_id, path))
    return out


def remove(planned: Plan) -> Pruned:
    """Remove the planned folders; what could not be removed stays planned for the next time."""
    done = Pruned()
    for job_id, folder, ops in planned.jobs:
        size = _size(folder) if folder.is_dir() else 0
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            log.warning("retention.not_removed", job_id=job_id, folder=str(folder))
            continue
        done.jobs.append((job_id, ops))
        done.bytes += size
    for op_id, folder in planned.operations:
        size = _size(folder) if folder.is_dir() else 0
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            done.operations.append(op_id)
            done.bytes += size
    return done


def record(db: Database, done: Pruned) -> None:
    conn = db.conn
    conn.execute("BEGIN")
    try:
        for job_id, ops in done.jobs:
            conn.executemany("DELETE FROM operations WHERE id=?", [(op_id,) for op_id in ops])
            conn.execute("UPDATE jobs SET pruned=? WHERE id=?", (time.time(), job_id))
        conn.executemany("DELETE FROM operations WHERE id=?", [(op_id,) for op_id in done.operations])
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.lstat().st_size
        except OSError:
            continue
    return total


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
