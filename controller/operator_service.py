"""The operator service: what `deployctl` calls, over the controller's Unix socket."""

from __future__ import annotations

import asyncio

import grpc
import structlog

from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc

from . import operations
from .dispatcher import Dispatcher, UnknownOperation
from .gateway import KNOWN_ROLES
from .registry import CONNECTED, LOST, Registry

log = structlog.get_logger("controller")
_STATES = {CONNECTED: pb.AGENT_CONNECTED, LOST: pb.AGENT_LOST}
FOLLOW_READ_BYTES = 1 << 20


def resolve_targets(registry: Registry, target: pb.Target) -> tuple[list[str], list[pb.SubmittedOperation]]:
    """Which connected agents a target names, and one error line for each that cannot be used."""
    chosen: list[str] = []
    errors: list[pb.SubmittedOperation] = []
    agents = registry.agents
    for agent_id in target.agent_ids:
        agent = agents.get(agent_id)
        if agent is None:
            errors.append(pb.SubmittedOperation(agent_id=agent_id, error=f"unknown agent {agent_id!r}"))
        elif agent.state != CONNECTED:
            errors.append(pb.SubmittedOperation(agent_id=agent_id, error=f"agent {agent_id} is {agent.state}"))
        elif agent_id not in chosen:
            chosen.append(agent_id)
    for role in target.roles:
        if role not in KNOWN_ROLES:
            errors.append(pb.SubmittedOperation(error=f"unknown role {role!r} (roles: {', '.join(KNOWN_ROLES)})"))
            continue
        with_role = [a.id for a in agents.values() if role in a.roles and a.state == CONNECTED]
        if not with_role:
            errors.append(pb.SubmittedOperation(error=f"no connected agent has role {role!r}"))
        chosen += [a for a in sorted(with_role) if a not in chosen]
    if target.all:
        connected = sorted(a.id for a in agents.values() if a.state == CONNECTED)
        if not connected:
            errors.append(pb.SubmittedOperation(error="no agent is connected"))
        chosen += [a for a in connected if a not in chosen]
    return chosen, errors


class OperatorService(pb_grpc.OperatorServicer):
    def __init__(self, registry: Registry, dispatcher: Dispatcher) -> None:
        self.registry = registry
        self.dispatcher = dispatcher

    async def ListAgents(self, request, context):
        reply = pb.ListAgentsReply()
        for agent in sorted(self.registry.agents.values(), key=lambda a: a.id):
            reply.agents.append(pb.AgentInfo(
                id=agent.id, roles=agent.roles, capabilities=agent.capabilities,
                state=_STATES.get(agent.state, pb.AGENT_DISCONNECTED), last_seen=agent.last_seen,
                version=agent.version, facts=agent.facts, peer=agent.peer, running=agent.running))
        return reply

    async def SubmitExec(self, request: pb.SubmitExecRequest, context):
        if not request.exec.argv:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no command given")
        if not (request.target.agent_ids or request.target.roles or request.target.all):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no target: give agent ids, roles or all")
        chosen, reply_errors = resolve_targets(self.registry, request.target)
        reply = pb.SubmitReply(operations=reply_errors)
        for agent_id in chosen:
            op_id = operations.new_op_id()
            operation = pb.Operation(id=op_id, exec=request.exec)
            self.dispatcher.submit(agent_id, operation)
            reply.operations.append(pb.SubmittedOperation(agent_id=agent_id, op_id=op_id))
        return reply

    async def CancelOperations(self, request, context):
        reply = pb.CancelReply()
        for op_id in request.op_ids:
            try:
                if self.dispatcher.cancel(op_id, request.reason):
                    reply.cancelled.append(op_id)
            except UnknownOperation:
                pass
        return reply

    async def GetOperation(self, request, context):
        row = self.dispatcher.db.operation(request.op_id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown operation {request.op_id!r}")
        record = pb.OperationRecord(
            op_id=row.id, agent_id=row.agent_id, kind=row.kind, argv=row.summary, state=row.state,
            created=row.created, finished=row.finished or 0)
        if row.result is not None:
            record.result.CopyFrom(row.result)
        op = self.dispatcher.get(row.id)
        record.output_bytes = op.output.received
        self.dispatcher.release(op)
        return record

    async def Follow(self, request: pb.FollowRequest, context):
        """Output and results of the given operations, resumable from any offsets."""
        try:
            ops = [self.dispatcher.get(op_id) for op_id in dict.fromkeys(request.op_ids)]
        except UnknownOperation as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown operation {exc.args[0]!r}")
        offsets = {op.id: request.from_offsets.get(op.id, 0) for op in ops}
        notes = {op.id: "" for op in ops}
        wake = asyncio.Event()
        for op in ops:
            op.listeners.add(wake)
        pending = list(ops)
        try:
            while pending:
                wake.clear()
                progressed = False
                for op in list(pending):
                    if op.note != notes[op.id]:
                        notes[op.id] = op.note
                        yield pb.FollowEvent(status=pb.OperationStatus(
                            op_id=op.id, agent_id=op.agent_id, state=op.state, note=op.note))
                    for offset, stream, data in op.output.read(offsets[op.id], FOLLOW_READ_BYTES):
                        yield pb.FollowEvent(output=pb.OutputChunk(
                            op_id=op.id, offset=offset, stream=stream, data=data))
                        offsets[op.id] = offset + len(data)
                        progressed = True
                    if op.finished and offsets[op.id] >= op.output.received:
                        yield pb.FollowEvent(result=op.result)
                        pending.remove(op)
                        progressed = True
                if not progressed:
                    await wake.wait()
        finally:
            for op in ops:
                op.listeners.discard(wake)
                self.dispatcher.release(op)
