"""The agent gateway: one bidirectional stream per agent.

The handler reads the agent's messages; a writer task drains the session's outbox so the
controller can push work to a quiet agent; an ack task confirms durable output.
"""

from __future__ import annotations

import asyncio
import re

import grpc
import structlog

from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc

from . import __version__
from .dispatcher import Dispatcher
from .registry import Registry, Session

log = structlog.get_logger("controller")
_AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
KNOWN_ROLES = ("computing", "daemons")


def check_hello(message: pb.AgentMessage | object) -> str:
    """Why a first message is not an acceptable hello, or '' if it is."""
    if not isinstance(message, pb.AgentMessage) or message.WhichOneof("msg") != "hello":
        return "the first message of a session must be a hello"
    hello = message.hello
    if not _AGENT_ID.match(hello.agent_id):
        return f"invalid agent id {hello.agent_id[:70]!r}"
    if not hello.roles:
        return "an agent must have at least one role"
    unknown = [r for r in hello.roles if r not in KNOWN_ROLES]
    if unknown:
        return f"unknown role {unknown[0][:40]!r} (known: {', '.join(KNOWN_ROLES)})"
    return ""


class AgentGateway(pb_grpc.AgentGatewayServicer):
    def __init__(self, registry: Registry, dispatcher: Dispatcher) -> None:
        self.registry = registry
        self.dispatcher = dispatcher

    async def Connect(self, request_iterator, context: grpc.aio.ServicerContext):
        first = await context.read()
        problem = check_hello(first)
        if problem:
            log.warning("agent.refused", peer=context.peer(), reason=problem)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        hello = first.hello
        session = self.registry.attach(hello, context.peer())
        tasks: list[asyncio.Task] = []
        try:
            await context.write(pb.ControllerMessage(welcome=pb.Welcome(
                controller_version=__version__, heartbeat_interval_s=hello.heartbeat_interval_s)))
            self.dispatcher.on_hello(session, hello)
            tasks = [
                asyncio.create_task(self._reader(session, context)),
                asyncio.create_task(self._writer(session, context)),
                asyncio.create_task(self.dispatcher.acknowledge(session)),
            ]
            await asyncio.wait([tasks[0], asyncio.create_task(session.closed.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if session.closed.is_set():
                await asyncio.wait_for(self._flush(session, context), 2.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.registry.detach(session)

    async def _reader(self, session: Session, context) -> None:
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                session.close("the agent closed the stream")
                return
            kind = message.WhichOneof("msg")
            if kind == "output":
                self.registry.heard(session)
                self.dispatcher.on_output(session, message.output)
            elif kind == "heartbeat":
                self.registry.heard(session, message.heartbeat.facts, message.heartbeat.running)
            elif kind == "accepted":
                self.registry.heard(session)
                self.dispatcher.on_accepted(session, message.accepted)
            elif kind == "result":
                self.registry.heard(session)
                await self.dispatcher.on_result(session, message.result)
            else:
                log.warning("agent.unexpected_message", agent_id=session.agent_id, kind=kind)

    async def _writer(self, session: Session, context) -> None:
        while True:
            message = await session.outbox.get()
            await context.write(message)

    async def _flush(self, session: Session, context) -> None:
        """Send what is still queued (a goodbye, say) before the stream ends."""
        while not session.outbox.empty():
            await context.write(session.outbox.get_nowait())
