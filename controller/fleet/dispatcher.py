"""The dispatcher: sends operations to agents and records what comes back, exactly once.

Delivery is at-least-once and execution exactly-once: every operation without a result is sent
again each time its agent says hello, and the agent's journal recognises what it already has.
Output is written to disk before it is acknowledged, so the agent can forget only what is safe.
Output the disk does not take (it is full) is never acknowledged: the agent is asked to send it
again from the last durable offset, once a second until the disk has room, and the operation's
result is taken only once its output is whole.

Every operation leaves with the secret values it could reveal (`redact`, looked up here at each
send from its scope, never stored; see knowledge.py): the agent replaces them in its output before
anything is spooled or sent.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from common.redact import MAX_ERROR_CHARS, bounded, patterns
from protos import deployer_pb2 as pb

from controller.fleet import operations
from controller.state.db import Database
from controller.state.knowledge import Scope
from controller.state.ledger import Ledger
from controller.fleet.oplog import OutputGap, OutputLog, OutputRefused
from controller.fleet.registry import Registry, Session
from common import errors

log = structlog.get_logger("controller")
ACK_EVERY_S = 0.2


class UnknownOperation(errors.NotFound, KeyError):
    """No operation has this id."""


@dataclass
class Op:
    """An operation the controller is following (open, or finished and still being read)."""

    id: str
    agent_id: str
    state: str
    output: OutputLog
    result: pb.OperationResult | None = None
    cancel_reason: str = ""
    note: str = ""
    acked: int = 0
    refused: str = ""  # why the disk did not take its output, while the agent is to send it again
    scope: Scope = field(default_factory=Scope.agent)  # which secrets it is sent with
    listeners: set[asyncio.Event] = field(default_factory=set)

    def fire(self) -> None:
        for event in self.listeners:
            event.set()

    @property
    def finished(self) -> bool:
        return self.result is not None


class Dispatcher:
    def __init__(self, db: Database, registry: Registry, store: Path, ledger: Ledger) -> None:
        self.db = db
        self.ledger = ledger  # what each operation must redact, for whom (see knowledge.py)
        self.registry = registry
        self.root = store / "operations"
        self.root.mkdir(parents=True, exist_ok=True)
        self.ops: dict[str, Op] = {}
        registry.on_disconnected.append(self._agent_disconnected)
        registry.on_lost.append(self._agent_lost)

    # ---------------------------------------------------------------- lookup

    def get(self, op_id: str) -> Op:
        op = self.ops.get(op_id)
        if op is not None:
            return op
        row = self.db.operation(op_id)
        if row is None:
            raise UnknownOperation(op_id)
        op = Op(row.id, row.agent_id, row.state, OutputLog(Path(row.folder) if row.folder else self.root / row.id),
                row.result, scope=Scope.decode(row.environment))
        op.acked = op.output.received
        self.ops[op_id] = op
        return op

    def followed(self, op_id: str) -> bool:
        """Someone reads the operation now (its output must stay)."""
        op = self.ops.get(op_id)
        return op is not None and (not op.finished or bool(op.listeners))

    def forget(self, op_ids: list[str]) -> None:
        """Operations whose rows and folders retention removed."""
        for op_id in op_ids:
            op = self.ops.pop(op_id, None)
            if op is not None:
                op.output.close()

    def release(self, op: Op) -> None:
        """Forget a finished operation nobody follows (its files stay on disk)."""
        if op.finished and not op.listeners and self.ops.get(op.id) is op:
            op.output.close()
            del self.ops[op.id]

    # ---------------------------------------------------------------- sending

    def submit(self, agent_id: str, operation: pb.Operation, folder: Path | None = None,
               environment: str | None = None, scope: Scope | None = None) -> Op:
        """Record the operation and send it if its agent is connected; `folder` keeps its output
        (a job's own folder, or store/operations/<id>). Its `scope` says which secrets it is sent
        with; without one, those of `environment` (app/environment) as a tenant operation, or
        without that an operator's on its agent."""
        folder = folder or self.root / operation.id
        scope = scope or (Scope.tenant(environment) if environment else Scope.agent())
        redact = patterns(self.ledger.redact_values(scope, agent_id))
        summary = [redact.redact_text(part) for part in operations.summary(operation)]
        self.db.insert_operation(operation, agent_id, summary, str(folder), scope.encode())
        op = Op(operation.id, agent_id, "queued", OutputLog(folder), scope=scope)
        self.ops[operation.id] = op
        log.info("op.submitted", op_id=operation.id, agent_id=agent_id,
                 kind=operation.WhichOneof("kind"))
        session = self.registry.session(agent_id)
        agent = self.registry.agents.get(agent_id)
        if session is not None:
            self._send(session, op, operation)
        elif agent is not None and agent.state == "lost":
            # Lost agents are not waited for: the operation ends at once, like those it held.
            self._record(op, pb.OperationResult(op_id=op.id, outcome=pb.LOST,
                                                 error=f"agent {agent_id} is lost"))
        else:
            op.note = f"agent {agent_id} is not connected; waiting for it"
        return op

    async def execute(self, agent_id: str, operation: pb.Operation, folder: Path | None = None,
                      environment: str | None = None, scope: Scope | None = None) -> Op:
        """Submit and wait for the result (a lost agent ends it with LOST)."""
        return await self.wait(self.submit(agent_id, operation, folder, environment, scope))

    async def wait(self, op: Op) -> Op:
        """Until the operation has its result; the result stays at hand, the open files do not."""
        wake = asyncio.Event()
        op.listeners.add(wake)
        try:
            while not op.finished:
                wake.clear()
                await wake.wait()
        finally:
            op.listeners.discard(wake)
        self.release(op)
        return op

    def _send(self, session: Session, op: Op, operation: pb.Operation) -> None:
        wire = pb.Operation()
        wire.CopyFrom(operation)
        wire.redact[:] = self.ledger.redact_values(op.scope, op.agent_id)
        session.send(pb.ControllerMessage(operation=wire))
        if op.state == "queued":
            op.state = "sent"
            self.db.set_state(op.id, "sent")
        if op.cancel_reason:
            session.send(pb.ControllerMessage(cancel=pb.Cancel(op_id=op.id, reason=op.cancel_reason)))

    def on_hello(self, session: Session, hello: pb.Hello) -> None:
        """Send again everything this agent has no result for; its journal drops duplicates."""
        for row in self.db.open_operations(session.agent_id):
            op = self.get(row.id)
            op.note = ""
            op.fire()
            if row.spec is not None:
                self._send(session, op, row.spec)

    def cancel(self, op_id: str, reason: str) -> bool:
        op = self.get(op_id)
        if op.finished:
            return False
        op.cancel_reason = reason or "cancelled by an operator"
        log.info("op.cancel_requested", op_id=op_id, reason=op.cancel_reason)
        session = self.registry.session(op.agent_id)
        if session is not None:
            session.send(pb.ControllerMessage(cancel=pb.Cancel(op_id=op_id, reason=op.cancel_reason)))
        return True

    # ---------------------------------------------------------------- receiving

    def _own(self, session: Session, op_id: str, message: str) -> Op | None:
        """The operation if it was given to this session's agent; None (logged) if unknown or another's."""
        try:
            op = self.get(op_id)
        except UnknownOperation:
            log.warning(f"op.unknown_{message}", op_id=op_id, agent_id=session.agent_id)
            return None
        if op.agent_id != session.agent_id:
            # An agent can only speak for its own operations, never finish or fill another's.
            log.warning(f"op.foreign_{message}", op_id=op_id, agent_id=session.agent_id, owner=op.agent_id)
            self.release(op)
            return None
        return op

    def on_accepted(self, session: Session, accepted: pb.Accepted) -> None:
        op = self._own(session, accepted.op_id, "accepted")
        if op is None:
            return
        if accepted.duplicate:
            log.info("op.duplicate", op_id=op.id, agent_id=session.agent_id)
        if op.state in ("queued", "sent"):
            op.state = "running"
            self.db.set_state(op.id, "running")
            op.fire()
        self.release(op)  # a finished one was opened from disk just for this

    def on_output(self, session: Session, chunk: pb.OutputChunk) -> None:
        op = self._own(session, chunk.op_id, "output")
        if op is None:
            return
        try:
            if op.output.write(chunk):
                if op.refused:
                    self._kept_again(op)
                op.fire()
        except OutputRefused as exc:
            self._refused(session, op, exc.strerror)
        except OutputGap as exc:
            if not op.refused:  # if it is, this was sent before the agent heard it: expected
                log.error("op.output_gap", op_id=op.id, error=str(exc))
        self.release(op)

    def _refused(self, session: Session, op: Op, error: str) -> None:
        """The disk did not take the output: ask the agent, which still has it, to send it again."""
        if not op.refused:
            op.refused = f"the controller cannot write the output in {op.output.folder}: {error}"
            log.error("op.output_refused", op_id=op.id, agent_id=op.agent_id, error=error,
                      kept_bytes=op.output.received,
                      then="the agent keeps the rest and sends it again until the disk takes it")
            op.note = f"{op.refused}; the agent keeps the output and sends it again once there is room"
            op.fire()
        session.send(pb.ControllerMessage(ack=pb.Ack(op_id=op.id, offset=op.output.synced, resend=True)))

    def _kept_again(self, op: Op) -> None:
        log.warning("op.output_kept_again", op_id=op.id, agent_id=op.agent_id, kept_bytes=op.output.received)
        op.refused, op.note = "", ""

    async def on_result(self, session: Session, result: pb.OperationResult) -> None:
        op = self._own(session, result.op_id, "result")
        if op is None:
            # Not its own (a store restored from an old backup?): let the agent forget it.
            session.send(pb.ControllerMessage(ack=pb.Ack(op_id=result.op_id, offset=result.output_bytes, result=True)))
            return
        if result.outcome not in pb.Outcome.values():
            # A newer or broken agent: record a failure we can name rather than a number nobody reads.
            log.warning("op.unknown_outcome", op_id=op.id, agent_id=session.agent_id, outcome=result.outcome)
            known = pb.OperationResult()
            known.CopyFrom(result)
            known.outcome = pb.OUTCOME_UNSPECIFIED
            known.error = "; ".join(part for part in (f"unknown outcome {result.outcome}", result.error) if part)
            result = known
        if len(result.error) > 2 * MAX_ERROR_CHARS:
            # The agent keeps errors short; one that does not is not let swell the store.
            result.error = bounded(result.error, 2 * MAX_ERROR_CHARS)
        if op.refused and op.output.received < result.output_bytes:
            return  # the agent sends it again after the output it is resending
        if op.output.received < result.output_bytes:
            log.error("op.output_incomplete", op_id=op.id, received=op.output.received,
                      expected=result.output_bytes)
        try:
            synced = await asyncio.to_thread(op.output.sync)
        except OutputRefused as exc:
            self._refused(session, op, exc.strerror)
            return
        try:
            self._record(op, result)
        except (sqlite3.OperationalError, OSError) as exc:
            # The disk is full for the result too: the agent keeps it and sends it again, as it
            # does output, rather than the session ending over it.
            self._refused(session, op, getattr(exc, "strerror", None) or str(exc))
            return
        session.send(pb.ControllerMessage(ack=pb.Ack(op_id=op.id, offset=synced, result=True)))

    def _record(self, op: Op, result: pb.OperationResult) -> None:
        if op.finished and op.result.outcome != pb.LOST:
            self.release(op)
            return  # a result resent after a reconnect: we have it already
        if op.finished:
            log.warning("op.result_after_lost", op_id=op.id)
        self.db.finish(op.id, result)
        (op.output.folder / "result.json").write_text(json.dumps(_result_dict(result), indent=2) + "\n")
        op.state, op.result, op.note = "finished", result, ""
        log.info("op.finished", op_id=op.id, agent_id=op.agent_id,
                 outcome=pb.Outcome.Name(result.outcome), exit_code=result.exit_code,
                 signal=result.signal, duration_s=round(result.duration_s, 3),
                 output_bytes=op.output.received)
        op.fire()
        self.release(op)

    async def acknowledge(self, session: Session) -> None:
        """Periodically confirm durable output so the agent can free its spool."""
        while True:
            await asyncio.sleep(ACK_EVERY_S)
            pending = [op for op in list(self.ops.values())
                       if op.agent_id == session.agent_id and op.output.received > op.acked
                       and not op.finished]
            for op in pending:
                try:
                    synced = await asyncio.to_thread(op.output.sync)
                except OutputRefused as exc:
                    self._refused(session, op, exc.strerror)
                    continue
                except (OSError, ValueError):
                    continue  # finished and closed meanwhile: its result carried the last ack
                op.acked = synced
                session.send(pb.ControllerMessage(ack=pb.Ack(op_id=op.id, offset=synced)))

    # ---------------------------------------------------------------- agent state

    def _agent_disconnected(self, agent_id: str) -> None:
        for op in self.ops.values():
            if op.agent_id == agent_id and not op.finished:
                op.note = f"agent {agent_id} disconnected; waiting for it to come back"
                op.fire()

    def _agent_lost(self, agent_id: str) -> None:
        lost_after = self.registry.lost_after
        for row in self.db.open_operations(agent_id):
            op = self.get(row.id)
            self._record(op, pb.OperationResult(
                op_id=op.id, outcome=pb.LOST, output_bytes=op.output.received,
                error=f"agent {agent_id} lost: no contact for {lost_after:g}s"))

    def close(self) -> None:
        for op in self.ops.values():
            op.output.close()
        self.ops.clear()


def _result_dict(result: pb.OperationResult) -> dict:
    return {
        "outcome": pb.Outcome.Name(result.outcome).lower(),
        "exit_code": result.exit_code, "signal": result.signal,
        "duration_s": round(result.duration_s, 6), "peak_rss_bytes": result.peak_rss_bytes,
        "cpu_s": round(result.cpu_s, 6), "error": result.error,
        "output_bytes": result.output_bytes, "recorded_at": time.time(),
    }
