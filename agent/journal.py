"""The agent's on-disk journal of operations: what it accepted, what ran, what it still owes.

An operation id is written (and fsynced) here before the operation runs, so a re-delivered
operation is recognised and never run twice, and one that was running when the agent died is
reported `interrupted` at the next start instead of being silently run again.

Layout, one folder per operation under `<state_dir>/operations/<op id>/`:
  accepted      the operation as received (protobuf), written before anything runs
  process.json  pid, process group and start time of the running command
  result        the OperationResult (protobuf), once it has ended
  acked         the output offset the controller has confirmed (a hint; resending more is harmless)
  done          the controller has the result: only `result` is kept, as a tombstone
  spool/        the output not yet confirmed (see spool.py)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from protos import deployer_pb2 as pb
from common import errors

_OP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TOMBSTONE_DAYS = 7


class JournalError(errors.Broken, OSError):
    """The journal could not record an operation (most often: the disk is full)."""


def valid_op_id(op_id: str) -> bool:
    return bool(_OP_ID.match(op_id))


def _write_atomic(path: Path, data: bytes, sync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@dataclass
class Entry:
    """What the journal knows about one operation."""

    op_id: str
    folder: Path
    operation: pb.Operation
    result: pb.OperationResult | None
    acked_offset: int
    done: bool
    process: dict | None


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "operations"
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)

    def folder(self, op_id: str) -> Path:
        return self.root / op_id

    def accept(self, operation: pb.Operation) -> bool:
        """Record the operation durably; False if it was already known (never run it again).

        Raises JournalError, leaving nothing behind, if it cannot be recorded: then it must not run.
        """
        folder = self.folder(operation.id)
        try:
            folder.mkdir()
        except FileExistsError:
            if (folder / "accepted").exists():
                return False
        except OSError as exc:
            raise JournalError(exc.errno, f"cannot record the operation in the journal "
                                          f"({self.root}): {exc.strerror}") from exc
        try:
            (folder / "spool").mkdir(exist_ok=True)
            _write_atomic(folder / "accepted", operation.SerializeToString(), sync=True)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise JournalError(exc.errno, f"cannot record the operation in the journal "
                                          f"({self.root}): {exc.strerror}") from exc
        return True

    def record_process(self, op_id: str, pid: int, create_time: float) -> None:
        info = {"pid": pid, "pgid": pid, "create_time": create_time}
        _write_atomic(self.folder(op_id) / "process.json", json.dumps(info).encode(), sync=False)

    def record_result(self, result: pb.OperationResult) -> None:
        # Not fsynced: if a power cut loses it, the restarted agent reports the operation
        # `interrupted`, and the controller keeps the result it already acknowledged.
        _write_atomic(self.folder(result.op_id) / "result", result.SerializeToString(), sync=False)

    def record_ack(self, op_id: str, offset: int) -> None:
        folder = self.folder(op_id)
        if folder.exists():
            _write_atomic(folder / "acked", str(offset).encode(), sync=False)

    def mark_done(self, op_id: str) -> None:
        """The controller has everything: keep only the result as a tombstone."""
        folder = self.folder(op_id)
        if not folder.exists():
            return
        shutil.rmtree(folder / "spool", ignore_errors=True)
        # Keep the id (duplicates are still recognised) but not the payload: file contents,
        # stdin and env can hold credentials, and the redact list holds nothing but secrets.
        _write_atomic(folder / "accepted", pb.Operation(id=op_id).SerializeToString(), sync=False)
        (folder / "process.json").unlink(missing_ok=True)
        (folder / "done").touch()

    def load(self, op_id: str) -> Entry | None:
        folder = self.folder(op_id)
        try:
            operation = pb.Operation.FromString((folder / "accepted").read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return None
        result = None
        if (folder / "result").exists():
            result = pb.OperationResult.FromString((folder / "result").read_bytes())
        try:
            acked = int((folder / "acked").read_text() or 0)
        except (FileNotFoundError, ValueError):
            acked = 0
        try:
            process = json.loads((folder / "process.json").read_text())
        except (FileNotFoundError, ValueError):
            process = None
        return Entry(op_id, folder, operation, result, acked, (folder / "done").exists(), process)

    def entries(self) -> list[Entry]:
        """Every operation the agent still holds (running, or finished and not yet acked)."""
        held = []
        for folder in sorted(self.root.iterdir()):
            if (folder / "done").exists():
                continue
            entry = self.load(folder.name)
            if entry is not None:
                held.append(entry)
        return held

    def prune(self, now: float | None = None) -> int:
        """Forget tombstones older than TOMBSTONE_DAYS; returns how many were removed."""
        limit = (now or time.time()) - TOMBSTONE_DAYS * 86400
        removed = 0
        for folder in self.root.iterdir():
            done = folder / "done"
            if done.exists() and done.stat().st_mtime < limit:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed
