"""The agent gateway: one bidirectional stream per agent.

The handler reads the agent's messages; a writer task drains the session's outbox so the
controller can push work to a quiet agent; an ack task confirms durable output.
"""

from __future__ import annotations

import asyncio
import re
import time

import grpc
import structlog
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError

from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc

from common import __version__
from controller.fleet.dispatcher import Dispatcher
from common.provides import CHECKS, check_setting
from common.tls import SERVER_NAME

from controller.fleet.door import CALLER
from controller.fleet.pki import EnrolmentRefused, Enrolment, RenewedTooSoon
from controller.fleet.registry import Registry, Session
from common import errors

log = structlog.get_logger("controller")
HELLO_TIMEOUT_S = 10.0
_AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")  # \Z: `$` would let a final newline through
KNOWN_ROLES = ("computing", "daemons", "routing")  # routing: it serves the routes (nginx), no code
# What an agent says about itself (its hello without held operations, its host facts) is kept and
# listed to operators; a few KiB in practice, bounded so one agent cannot swell every listing.
MAX_DESCRIPTION = 16 << 10


MAX_NAME = 300  # a unit or instance name an agent may report (ours are shorter)


def valid_agent_id(agent_id: str) -> bool:
    """Agent ids name hosts in logs and files; the controller's own TLS name is reserved."""
    return bool(_AGENT_ID.match(agent_id)) and agent_id.rstrip(".") != SERVER_NAME and not agent_id.endswith(".")


class ProtocolError(errors.BadInput):
    """The agent sent something that is not the protocol: its session ends with INVALID_ARGUMENT."""


async def read_message(context: grpc.aio.ServicerContext):
    """The agent's next message, or EOF; bytes that are not an AgentMessage raise ProtocolError."""
    try:
        return await context.read()
    except DecodeError:
        raise ProtocolError("a message that is not a valid AgentMessage (another protocol, or a corrupt "
                            "stream)") from None


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
    described = pb.Hello()
    described.CopyFrom(hello)
    del described.held[:]
    if described.ByteSize() > MAX_DESCRIPTION:
        return f"the hello describes the agent in {described.ByteSize()} bytes; at most {MAX_DESCRIPTION}"
    return check_settings(hello.settings)


# Settings under these names are ours to read, so they are checked; others mean nothing here.
_SECTIONS = {key.partition(".")[0] for key in CHECKS}


def check_settings(settings) -> str:
    """Why a hello's settings are not acceptable, or '': a malformed value is refused whether or
    not the agent may provide that service, so no text of it is ever kept."""
    for key in sorted(settings):
        if key.partition(".")[0] in _SECTIONS:
            problem = check_setting(key, settings[key])
            if problem:
                return f"setting {key[:40]!r} = {settings[key][:60]!r}: {problem}"
    return ""


def check_identity(hello: pb.Hello, caller) -> str:
    """Why a hello claims more than the caller's certificate grants, or '' if it does not."""
    if caller is None:
        return ""  # a plain loopback link (--insecure): nothing to compare with
    if hello.agent_id != caller.agent_id:
        return f"this certificate belongs to agent {caller.agent_id}, not {hello.agent_id}"
    extra = [r for r in hello.roles if r not in caller.roles]
    if extra:
        return f"agent {caller.agent_id} is not enrolled for role {extra[0]} (enrolled: {', '.join(caller.roles)})"
    return ""


def certificate_reply(cert, enrolment: Enrolment, roles) -> pb.Certificate:
    return pb.Certificate(certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
                          ca_pem=enrolment.authority.ca_pem, roles=list(roles),
                          not_after=cert.not_valid_after_utc.timestamp())


class EnrollmentService(pb_grpc.EnrollmentServicer):
    """A single-use token buys one certificate for one agent id."""

    def __init__(self, enrolment: Enrolment) -> None:
        self.enrolment = enrolment

    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext):
        if not valid_agent_id(request.agent_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid agent id {request.agent_id[:70]!r}")
        try:
            cert, issued = self.enrolment.enroll(request.token, request.agent_id, request.csr_pem)
        except EnrolmentRefused as exc:
            log.warning("agent.enrolment_refused", agent_id=request.agent_id, peer=context.peer(),
                        reason=str(exc)[:300])
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        log.info("agent.enrolled", agent_id=request.agent_id, roles=list(issued.roles),
                 peer=context.peer(), not_after=issued.not_after)
        return certificate_reply(cert, self.enrolment, issued.roles)


class AgentGateway(pb_grpc.AgentGatewayServicer):
    def __init__(self, registry: Registry, dispatcher: Dispatcher, enrolment: Enrolment | None = None) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self.enrolment = enrolment

    async def Renew(self, request: pb.RenewRequest, context: grpc.aio.ServicerContext):
        caller = CALLER.get()
        if caller is None or self.enrolment is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no certificate to renew on a plain link")
        try:
            cert, issued = self.enrolment.renew(caller, request.csr_pem)
        except RenewedTooSoon as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EnrolmentRefused as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        log.info("agent.renewed", agent_id=issued.agent_id, not_after=issued.not_after)
        return certificate_reply(cert, self.enrolment, issued.roles)

    async def Connect(self, request_iterator, context: grpc.aio.ServicerContext):
        caller_id = CALLER.get().agent_id if CALLER.get() else ""
        log.info("agent.stream_opened", peer=context.peer(), agent_id=caller_id)  # past the door, before hello
        hello = await self._receive_hello(context)
        caller = CALLER.get()
        problem = check_identity(hello, caller)
        if problem:
            log.warning("agent.refused", peer=context.peer(), reason=problem)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
        # Checked again, with no await before attaching: a revocation while the stream waited for
        # its hello must hold.
        refused = caller and self.enrolment and self.enrolment.accepted(caller)
        if refused:
            log.warning("rpc.unauthenticated", peer=context.peer(), reason=refused)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refused)
        session = self.registry.attach(hello, context.peer())
        tasks: list[asyncio.Task] = []
        failure: BaseException | None = None
        try:
            await context.write(pb.ControllerMessage(welcome=pb.Welcome(
                controller_version=__version__, heartbeat_interval_s=hello.heartbeat_interval_s)))
            self.dispatcher.on_hello(session, hello)
            for callback in self.registry.on_attached:
                callback(session.agent_id)
            tasks = [
                asyncio.create_task(self._reader(session, context)),
                asyncio.create_task(self._writer(session, context)),
                asyncio.create_task(self.dispatcher.acknowledge(session)),
            ]
            if caller is not None:
                tasks.append(asyncio.create_task(self._end_at_expiry(session, caller.not_after)))
            await asyncio.wait([tasks[0], asyncio.create_task(session.closed.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if tasks[0].done() and not tasks[0].cancelled() and tasks[0].exception() is not None:
                failure = tasks[0].exception()
                session.close(str(failure) or repr(failure))
            if session.closed.is_set():
                await asyncio.wait_for(self._flush(session, context), 2.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.registry.detach(session)
        if session.revoked:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, session.close_reason)
        if isinstance(failure, ProtocolError):
            log.warning("agent.protocol_error", agent_id=session.agent_id, reason=str(failure))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(failure))
        if failure is not None:
            log.error("agent.session_failed", agent_id=session.agent_id, error=repr(failure))
            await context.abort(grpc.StatusCode.INTERNAL, "the controller could not handle a message; see its log")

    @staticmethod
    async def _receive_hello(context: grpc.aio.ServicerContext) -> pb.Hello:
        """The session's first message, which must be an acceptable hello: anything else, or
        nothing in time, ends the stream with INVALID_ARGUMENT."""
        try:
            first = await asyncio.wait_for(read_message(context), HELLO_TIMEOUT_S)
            problem = check_hello(first)
        except ProtocolError as exc:
            problem = str(exc)
        except asyncio.TimeoutError:
            problem = f"no hello within {HELLO_TIMEOUT_S:g} s"
        if problem:
            log.warning("agent.refused", peer=context.peer(), reason=problem)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return first.hello

    @staticmethod
    async def _end_at_expiry(session: Session, not_after: float) -> None:
        """A link lives no longer than the certificate it was opened with: TLS checks it only at
        the handshake, so at its end the agent is told to dial again, with its renewed one (an
        agent that could not renew then stays out)."""
        # Against the wall clock, looked at least hourly: asyncio's clock stops while a machine
        # is suspended, the certificate's end does not.
        while (left := not_after - time.time()) > 0:
            await asyncio.sleep(min(left, 3600.0))
        reason = "the certificate this link was opened with has expired: dial again with the renewed one"
        log.info("agent.certificate_expired", agent_id=session.agent_id)
        session.send(pb.ControllerMessage(goodbye=pb.Goodbye(reason=reason)))
        session.close(reason)

    async def _reader(self, session: Session, context) -> None:
        while True:
            message = await read_message(context)
            if message is grpc.aio.EOF:
                session.close("the agent closed the stream")
                return
            kind = message.WhichOneof("msg")
            if kind == "output":
                self.registry.heard(session)
                self.dispatcher.on_output(session, message.output)
            elif kind == "heartbeat":
                if message.heartbeat.facts.ByteSize() > MAX_DESCRIPTION:
                    raise ProtocolError(f"host facts of {message.heartbeat.facts.ByteSize()} bytes; "
                                        f"at most {MAX_DESCRIPTION}")
                self.registry.heard(session, message.heartbeat.facts, message.heartbeat.running)
            elif kind == "accepted":
                self.registry.heard(session)
                self.dispatcher.on_accepted(session, message.accepted)
            elif kind == "result":
                self.registry.heard(session)
                await self.dispatcher.on_result(session, message.result)
            elif kind == "exited":
                self.registry.heard(session)
                exited = message.exited
                if len(exited.name) > MAX_NAME or len(exited.instance) > MAX_NAME:
                    raise ProtocolError(f"a service name of more than {MAX_NAME} characters")
                for callback in self.registry.on_exited:
                    callback(session.agent_id, exited)
            elif kind == "probe_report":
                self.registry.heard(session)
                for callback in self.registry.on_probed:
                    callback(session.agent_id, message.probe_report)
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
