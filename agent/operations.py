"""The operations an agent holds: accepted, running or finished-but-unacknowledged.

This outlives connections: a session comes and goes, the operations and their spooled output stay
until the controller confirms it has them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import structlog

from protos import deployer_pb2 as pb

from agent import executor, logfiles, probe, releases
from agent.journal import Entry, Journal, JournalError, valid_op_id
from common.redact import Patterns, bounded, patterns
from agent.services import Supervisor
from agent.spool import Spool

log = structlog.get_logger("agent")


@dataclass
class Held:
    op_id: str
    operation: pb.Operation
    spool: Spool
    result: pb.OperationResult | None = None
    acked_offset: int = 0
    run: executor.Run | None = None
    task: asyncio.Task | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.wake.set()


class Operations:
    def __init__(self, journal: Journal, services_root: Path, driver: Supervisor,
                 write_roots: tuple[Path, ...] = ()) -> None:
        self.journal = journal
        self.services_root = services_root
        self.write_roots = tuple(write_roots) or (services_root,)
        self.driver = driver
        self.held: dict[str, Held] = {}
        self.on_new: list = []  # callbacks(held) of the live session, to start a pump

    def recover(self) -> None:
        """At start: take back what the journal holds; what was running was interrupted."""
        self.journal.prune()
        for entry in self.journal.entries():
            held = Held(entry.op_id, entry.operation, Spool(entry.folder / "spool"),
                        entry.result, entry.acked_offset)
            if held.result is None:
                _kill_leftovers(entry)
                held.result = pb.OperationResult(
                    op_id=entry.op_id, outcome=pb.INTERRUPTED, output_bytes=held.spool.end,
                    error="the agent stopped while the operation ran; it was not run again",
                )
                log.warning("op.interrupted", op_id=entry.op_id)
                self._record_result(held.result)
            held.spool.close()
            self.held[entry.op_id] = held

    def summary(self) -> list[pb.HeldOperation]:
        return [
            pb.HeldOperation(op_id=h.op_id, acked_offset=h.acked_offset,
                             state=pb.HELD_FINISHED if h.result else pb.HELD_RUNNING)
            for h in self.held.values()
        ]

    @property
    def running(self) -> int:
        return sum(1 for h in self.held.values() if h.result is None)

    def receive(self, operation: pb.Operation) -> tuple[Held | None, bool, str]:
        """Take an operation from the controller: (held, duplicate, rejection reason)."""
        if not valid_op_id(operation.id):
            return None, False, f"invalid operation id {operation.id[:80]!r}"
        if operation.id in self.held:
            return self.held[operation.id], True, ""
        entry = self.journal.load(operation.id)
        if entry is not None:
            # Known and finished long ago (a tombstone): answer with its result, never rerun.
            held = Held(entry.op_id, entry.operation, Spool(entry.folder / "spool"), entry.result,
                        entry.result.output_bytes if entry.result else 0)
            self.held[entry.op_id] = held
            return held, True, ""
        try:
            self.journal.accept(operation)
        except JournalError as exc:
            # Not recorded, so not run: the controller gets a clear refusal and may send it again.
            log.error("op.rejected", op_id=operation.id, error=exc.strerror)
            return None, False, exc.strerror
        held = Held(operation.id, operation, Spool(self.journal.folder(operation.id) / "spool"))
        self.held[operation.id] = held
        held.task = asyncio.create_task(self._execute(held), name=f"op-{operation.id}")
        return held, False, ""

    async def _execute(self, held: Held) -> None:
        op = held.operation
        kind = op.WhichOneof("kind")
        started = time.monotonic()
        log.info("op.started", op_id=op.id, kind=kind)
        redact = patterns(op.redact)
        try:
            result = await self._run(held, op, kind, redact)
        except Exception as exc:  # whatever happens, the controller must get a result
            log.exception("op.crashed", op_id=op.id)
            result = pb.OperationResult(op_id=op.id, outcome=pb.FAILED_TO_START,
                                        error=f"the agent could not run it: {type(exc).__name__}: {exc}")
        result.error = bounded(redact.redact_text(result.error))  # cut only once redacted
        held.spool.seal()
        if note := held.spool.loss_note():
            result.error = f"{result.error}; {note}" if result.error else note
        result.output_bytes = held.spool.end
        result.duration_s = result.duration_s or time.monotonic() - started
        self._record_result(result)
        held.result, held.run = result, None
        log.info("op.finished", op_id=op.id, outcome=pb.Outcome.Name(result.outcome),
                 exit_code=result.exit_code, signal=result.signal,
                 duration_s=round(result.duration_s, 3),
                 **({"output_lost_bytes": held.spool.lost_bytes} if held.spool.lost_bytes else {}))
        held.notify()

    def _record_result(self, result: pb.OperationResult) -> None:
        try:
            self.journal.record_result(result)
        except OSError as exc:
            # The result is still reported from memory; only an agent restart before the
            # controller has it would turn it into `interrupted`.
            log.error("op.result_not_journaled", op_id=result.op_id, error=exc.strerror)

    async def _run(self, held: Held, op: pb.Operation, kind: str | None,
                   redact: Patterns) -> pb.OperationResult:
        # service_list prints only names, pids and paths the controller chose (and redacting its
        # JSON could break it); every result's error is redacted by the caller.
        if kind in ("exec", "log_read", "release_seal"):
            try:
                spec = op.exec if kind == "exec" else logfiles.read_exec(op.log_read, self.services_root) \
                    if kind == "log_read" else releases.seal_exec(op.release_seal, self.services_root)
                run = executor.spawn(op.id, spec, str(self.services_root), held.spool, held.notify,
                                     redact)
            except executor.StartError as exc:
                return pb.OperationResult(op_id=op.id, outcome=pb.FAILED_TO_START, error=str(exc))
            held.run = run
            try:
                created = psutil.Process(run.proc.pid).create_time()
            except psutil.Error:
                created = time.time()
            try:
                self.journal.record_process(op.id, run.proc.pid, created)
            except OSError as exc:
                # It runs regardless; only a crashed agent could not end its leftovers.
                log.warning("op.process_not_journaled", op_id=op.id, error=exc.strerror)
            return await executor.supervise(run, spec)
        if kind == "write_file":
            return await asyncio.to_thread(executor.write_file, op.id, op.write_file, self.write_roots)
        if kind in ("service_start", "service_stop"):
            try:
                if kind == "service_start":
                    return await self.driver.start(op.id, op.service_start)
                return await self.driver.stop(op.id, op.service_stop)
            except executor.StartError as exc:
                return pb.OperationResult(op_id=op.id, outcome=pb.FAILED_TO_START, error=str(exc))
        if kind == "service_list":
            entries = await asyncio.to_thread(self.driver.list, op.service_list.name_prefix,
                                              op.service_list.group)
            lines = [json.dumps(e) + "\n" for e in entries]
            if lines:
                held.spool.append(pb.STDOUT, "".join(lines).encode())
            return pb.OperationResult(op_id=op.id, outcome=pb.EXITED)
        if kind == "http_probe":
            spec = op.http_probe
            owner = (lambda: self.main_pid(spec.service_name, spec.service_instance)) if spec.service_name else None
            return await probe.probe(op.id, spec, owner)
        return pb.OperationResult(op_id=op.id, outcome=pb.REJECTED, error="unknown operation kind")

    def main_pid(self, name: str, instance: str) -> int:
        """The main process of a running service instance, 0 if it does not run."""
        for entry in self.driver.list(name):
            if entry.get("name") == name and entry.get("instance") == instance and entry.get("alive"):
                return int(entry.get("pid") or 0)
        return 0

    def cancel(self, op_id: str, reason: str) -> bool:
        held = self.held.get(op_id)
        if held is None or held.run is None:
            return False
        log.info("op.cancel", op_id=op_id, reason=reason)
        executor.request_stop(held.run, "cancel", f"cancelled: {reason or 'by the controller'}")
        return True

    def ack(self, op_id: str, offset: int, has_result: bool) -> None:
        held = self.held.get(op_id)
        if held is None:
            return
        if offset > held.acked_offset:
            held.acked_offset = offset
            held.spool.release_below(offset)
            try:
                self.journal.record_ack(op_id, offset)
            except OSError:
                pass  # a hint: without it, more output is resent after a restart, and dropped
        if has_result and held.result is not None:
            try:
                self.journal.mark_done(op_id)
            except OSError as exc:
                # Not marked done: after a restart its result is sent again, and acked again.
                log.warning("op.done_not_journaled", op_id=op_id, error=exc.strerror)
            held.spool.discard()
            del self.held[op_id]

    async def stop_all(self, reason: str, wait_s: float) -> None:
        """Agent shutdown: cancel what runs and give it a moment to record its result."""
        tasks = [h.task for h in self.held.values() if h.run is not None and h.task]
        for held in list(self.held.values()):
            if held.run is not None:
                executor.request_stop(held.run, "cancel", f"cancelled: {reason}")
        if tasks:
            await asyncio.wait(tasks, timeout=wait_s)


def _kill_leftovers(entry: Entry) -> None:
    """Commands of a crashed agent may still run: end every member of the operation's group.

    A member must have been created after the recorded leader, so a group id reused by an
    unrelated process since then is left alone.
    """
    info = entry.process
    if not info:
        return
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.pid) == info["pgid"] and proc.info["create_time"] >= info["create_time"] - 0.05:
                proc.kill()
        except (psutil.Error, ProcessLookupError, KeyError):
            continue
