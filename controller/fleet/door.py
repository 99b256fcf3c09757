"""One door: every RPC passes one interceptor that checks who calls against what they may call.

Each listener admits one kind of credential:
- `agent`: the mutual-TLS agent port; the client certificate must be one this controller issued
  and has not revoked (checked on every call, so a revocation holds at once);
- `enrollee`: the enrolment port (TLS, server-authenticated); the token is checked by Enroll;
- `operator`: the Unix socket, whose 0600 mode is the credential, or the TCP operator listener
  (TLS), where every call carries an operator token whose role must cover the method
  (`controller/fleet/access.py` says which role each method needs).
A method not on the kind's list is refused before any handler runs.
"""

from __future__ import annotations

import contextvars
import inspect
import time
from functools import lru_cache
from typing import Callable

import grpc
import structlog
from cryptography import x509

from common.tls import Identity, identity

from controller.fleet import access

log = structlog.get_logger("controller")

AGENT, ENROLLEE, OPERATOR = "agent", "enrollee", "operator"
OPERATOR_SERVICE = "/deployer.v1.Operator/"
RECHECK_S = 1.0

ALLOWED: dict[str, frozenset[str]] = {
    AGENT: frozenset({
        "/deployer.v1.AgentGateway/Connect",
        "/deployer.v1.AgentGateway/Renew",
    }),
    ENROLLEE: frozenset({
        "/deployer.v1.Enrollment/Enroll",
    }),
    OPERATOR: frozenset(f"{OPERATOR_SERVICE}{name}" for name in access.METHODS),
}

# The verified identity of the agent behind the current call (None on a plain loopback link).
CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("caller", default=None)
# The operator behind the current call on an operator listener.
OPERATOR_CALLER: contextvars.ContextVar[access.Principal | None] = contextvars.ContextVar(
    "operator_caller", default=None)


@lru_cache(maxsize=4096)
def _parse(pem: bytes) -> Identity:
    return identity(x509.load_pem_x509_certificate(pem))


def peer_identity(context: grpc.aio.ServicerContext) -> Identity | None:
    """The identity in the client certificate gRPC verified against our CA, if any."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    return _parse(bytes(pems[0])) if pems else None


class Door(grpc.aio.ServerInterceptor):
    """`accept(identity) -> reason` vets agent certificates ('' = accepted); `certificates`: False
    only for a plain loopback agent link (`--insecure`). `tokens`: on an operator listener, the
    store every call's token is checked against; without it the listener is the Unix socket."""

    def __init__(self, kind: str, accept: Callable[[Identity], str] | None = None,
                 certificates: bool = True, tokens: access.OperatorTokens | None = None) -> None:
        self.kind = kind
        self.allowed = ALLOWED[kind]
        self.accept = accept
        self.certificates = certificates
        self.tokens = tokens

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        if method not in self.allowed:
            log.warning("rpc.refused", kind=self.kind, method=method, reason="not on the allowlist")
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"{method} is not open to {self.kind} credentials")
        if self.kind == OPERATOR:
            name = method.removeprefix(OPERATOR_SERVICE)
            guarded = _guarded(handler, lambda context: self._check_operator(context, name))
            if self.tokens is not None and guarded.unary_stream is not None:
                guarded = guarded._replace(unary_stream=self._rechecked(guarded.unary_stream, name))
            return guarded
        if self.kind != AGENT:
            return handler
        return _guarded(handler, self._check)

    async def _check_operator(self, context: grpc.aio.ServicerContext, method: str, again: bool = False) -> None:
        if self.tokens is None:
            OPERATOR_CALLER.set(access.SOCKET)
            return
        header = dict(context.invocation_metadata() or ()).get("authorization")
        try:
            principal = self.tokens.authenticate(access.bearer(header))
        except access.CredentialRefused as exc:
            log.warning("rpc.unauthenticated", kind=self.kind, method=method, peer=context.peer(), reason=str(exc))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        try:
            access.authorize(principal, method)
        except access.NotPermitted as exc:
            log.warning("rpc.refused", kind=self.kind, method=method, token_id=principal.token_id,
                        reason=str(exc))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        if method in access.NEEDS_OPERATE and not again:
            log.info("operator.call", method=method, token_id=principal.token_id, label=principal.label,
                     peer=context.peer())
        OPERATOR_CALLER.set(principal)

    def _rechecked(self, behavior, method: str):
        """A stream (following output, a job, a service's log) may outlive its token: before
        each item, at most once a second, the token is checked again, so a revoked or expired
        one gets nothing more."""
        async def stream(request, context):
            checked = time.monotonic()
            async for item in behavior(request, context):
                if time.monotonic() - checked >= RECHECK_S:
                    await self._check_operator(context, method, again=True)
                    checked = time.monotonic()
                yield item
        return stream

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
