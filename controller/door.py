"""One door: every RPC passes one interceptor that checks who calls against what they may call.

Each listener admits one kind of credential:
- `agent`: the mutual-TLS agent port; the client certificate must be one this controller issued
  and has not revoked (checked on every call, so a revocation holds at once);
- `enrollee`: the enrolment port (TLS, server-authenticated); the token is checked by Enroll;
- `operator`: the Unix socket, whose 0600 mode is the credential.
A method not on the kind's list is refused before any handler runs.
"""

from __future__ import annotations

import contextvars
import inspect
from functools import lru_cache
from typing import Callable

import grpc
import structlog
from cryptography import x509

from agent.tls import Identity, identity

log = structlog.get_logger("controller")

AGENT, ENROLLEE, OPERATOR = "agent", "enrollee", "operator"

ALLOWED: dict[str, frozenset[str]] = {
    AGENT: frozenset({
        "/deployer.v1.AgentGateway/Connect",
        "/deployer.v1.AgentGateway/Renew",
    }),
    ENROLLEE: frozenset({
        "/deployer.v1.Enrollment/Enroll",
    }),
    OPERATOR: frozenset(f"/deployer.v1.Operator/{name}" for name in (
        "ListAgents", "SubmitExec", "Follow", "CancelOperations", "GetOperation",
        "Plan", "Apply", "FollowJob", "ListJobs", "ShowJob", "Ledger", "Status", "SetSecret",
        "Rollback", "Check", "ServiceLogs", "CreateToken", "ListTokens", "RevokeToken", "RevokeAgent",
        "GrantAgent",
    )),
}

# The verified identity of the agent behind the current call (None on a plain loopback link).
CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("caller", default=None)


@lru_cache(maxsize=4096)
def _parse(pem: bytes) -> Identity:
    return identity(x509.load_pem_x509_certificate(pem))


def peer_identity(context: grpc.aio.ServicerContext) -> Identity | None:
    """The identity in the client certificate gRPC verified against our CA, if any."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    return _parse(bytes(pems[0])) if pems else None


class Door(grpc.aio.ServerInterceptor):
    """`accept(identity) -> reason` vets agent certificates ('' = accepted); `certificates`: False
    only for a plain loopback agent link (`--insecure`)."""

    def __init__(self, kind: str, accept: Callable[[Identity], str] | None = None,
                 certificates: bool = True) -> None:
        self.kind = kind
        self.allowed = ALLOWED[kind]
        self.accept = accept
        self.certificates = certificates

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        if method not in self.allowed:
            log.warning("rpc.refused", kind=self.kind, method=method, reason="not on the allowlist")
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"{method} is not open to {self.kind} credentials")
        if self.kind != AGENT:
            return handler
        return _guarded(handler, self._check)

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        if not self.certificates:
            CALLER.set(None)
            return
        ident = peer_identity(context)
        reason = "no client certificate" if ident is None else (self.accept(ident) if self.accept else "")
        if reason:
            log.warning("rpc.unauthenticated", peer=context.peer(), reason=reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        CALLER.set(ident)


def _wrap(behavior, before):
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            await before(context)
            async for item in behavior(request, context):
                yield item
        return stream

    async def call(request, context):
        await before(context)
        return await behavior(request, context)
    return call


def _guarded(handler: grpc.RpcMethodHandler, before) -> grpc.RpcMethodHandler:
    fields = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
    return handler._replace(**{f: _wrap(getattr(handler, f), before)
                               for f in fields if getattr(handler, f) is not None})


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def refuse(context):
        await context.abort(code, message)
    return _guarded(handler, refuse)
