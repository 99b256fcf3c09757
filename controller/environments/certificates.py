"""`tls: auto`: the environment's certificate, obtained and renewed by ACME (decision 036).

A certificate is ordered when the environment has none, when it does not cover every name, when
it has less than `renew_before` left (30 days), or when the operator asks (`deployctl certificate
renew`). The HTTP-01 answers are written on every connected router, in a folder of the
environment's that its nginx file serves on plain HTTP whatever else it serves; they are removed
when the order ends. The account key and each certificate's key are made here, sealed in the
controller's store, and written only to routers (root's, 0600), like an operator's pair; the
switch that writes them is an nginx reload, which drops no request. Renewal is a `certificate`
job, started by the controller's own round (`due_now`) or by the operator.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

from protos import deployer_pb2 as pb

from controller.environments import acme, commands as ops, routing, tls
from controller.environments.context import JobContext, StepFailed
from controller.state.knowledge import Scope

DAY = 86400.0
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")   # RFC 8555 8.1: base64url, never a path


@dataclass(frozen=True)
class AcmeSettings:
    """The controller's `acme:` settings (controller/settings.py)."""

    directory: str = ""            # the ACME server's directory URL; none: `tls: auto` is refused
    ca_file: str = ""              # the CAs to trust for that server (default: the system's)
    contact: str = ""              # an email for the account, if the operator gives one
    renew_before: float = 30 * DAY
    check_every: float = 12 * 3600.0


def due(issued, names: tuple[str, ...], renew_before: float, now: float | None = None) -> str:
    """Why a new certificate is needed (a few words), or "" if the one `issued` will do."""
    if issued is None:
        return "the environment has no certificate yet"
    covered, _chain, _key, not_after, obtained = issued
    missing = [n for n in names if n not in covered]
    if missing:
        return f"the certificate does not cover {', '.join(missing)}"
    left = not_after - (now if now is not None else time.time())
    # A CA that issues for less than renew_before (a short-lived profile) is renewed once a third
    # of the lifetime is left, not at every round.
    lifetime = not_after - obtained
    if left < (min(renew_before, lifetime / 3) if lifetime > 0 else renew_before):
        return f"the certificate has {max(left, 0) / DAY:.0f} days left"
    return ""


def refusal(settings: AcmeSettings | None, routers: list, connected: list | None = None) -> str:
    """Why `tls: auto` cannot be served now (one line), or "". `connected`: those of `routers`
    that are (by their state, if not given)."""
    connected = [r for r in routers if r.state == "connected"] if connected is None else connected
    if settings is None or not settings.directory:
        return ("auto needs an ACME server: set acme.directory in the controller's settings file (--config), "
                "or give the environment's secrets holding a certificate and its key: {certificate: SECRET, "
                "key: SECRET}")
    if not routers:
        return "auto needs a router to answer the ACME challenge, and no agent has the routing role"
    if not connected:
        states = ", ".join(f"{r.id} {r.state}" for r in routers)
        return f"auto needs a router to answer the ACME challenge, and none is connected ({states})"
    return ""


def _account(ctx: JobContext, settings: AcmeSettings) -> acme.Client:
    stored = ctx.ledger.db.acme_account(settings.directory)
    if stored is None:
        ctx.ledger.db.save_acme_account(settings.directory, acme.new_key())
        stored = ctx.ledger.db.acme_account(settings.directory)  # the first saved wins a race
    key, url = stored
    return acme.Client(settings.directory, key, settings.ca_file, url)


async def _publish(ctx: JobContext, routers: list, answers: dict[str, str]) -> None:
    """The HTTP-01 answers on every router (or, for {}, none any more)."""
    async def on_one(on) -> None:
        folder = routing.challenges_dir(ctx, on)
        await ctx.sh(on, ops.remove_paths(folder), ctx.env_key, "challenge", scope=Scope.route(ctx.env_key),
                     check=bool(answers))
        for token, answer in answers.items():
            await ctx.run_op(on, pb.Operation(write_file=pb.WriteFileSpec(
                path=f"{folder}/{token}", content=answer.encode(), mode=0o644)), ctx.env_key, "challenge",
                scope=Scope.route(ctx.env_key))
    for token in answers:
        if not TOKEN.fullmatch(token):
            raise acme.AcmeError(f"the ACME server gave a challenge token that is not base64url: {token[:40]!r}")
    results = await asyncio.gather(*(on_one(on) for on in routers), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed and answers:
        raise failed[0]


async def ensure(ctx: JobContext, settings: AcmeSettings | None, force: bool = False) -> str:
    """For `tls: auto`: a certificate that covers every name with time to spare, obtained now if
    need be and switched in on every router; what was done, in a few words."""
    if not ctx.spec.tls or not ctx.spec.tls.auto:
        return ""
    deployed = routing.as_deployed(ctx)
    if not routing.routes(deployed):
        return "no route yet: a certificate is ordered with the first one"
    issued = ctx.ledger.db.certificate(ctx.env_key)
    why = "renewal asked by the operator" if force else due(issued, ctx.spec.names, settings.renew_before
                                                            if settings else 30 * DAY)
    if not why:
        return "the certificate is current"
    refused = refusal(settings, routing.routers(ctx))
    if refused:
        raise StepFailed(ctx.env_key, "certificate", f"tls: {refused}")
    ons = routing.connected_routers(ctx, ctx.env_key)
    client = _account(ctx, settings)
    names = ctx.spec.names
    ctx.note(f"certificate: ordering one for {', '.join(names)} from {settings.directory} ({why}); the "
             f"challenge is answered by {', '.join(on.id for on in ons)}")
    key = acme.new_key()
    try:
        chain = await acme.obtain(client, names, key, lambda answers: _publish(ctx, ons, answers), settings.contact)
        not_after = tls.check_pair(chain, key, names)
    except acme.AcmeError as exc:
        raise StepFailed(ctx.env_key, "certificate", str(exc)) from None
    except tls.TlsError as exc:
        raise StepFailed(ctx.env_key, "certificate", f"the ACME server issued a certificate that cannot serve: {exc}") \
            from None
    ctx.ledger.db.set_acme_account_url(settings.directory, client.account)
    ctx.ledger.db.save_certificate(ctx.env_key, names, chain, key, not_after.timestamp())
    ctx.job.event("certificate.obtained", names=list(names), not_after=not_after.isoformat())
    await routing.switch_route(deployed, ctx.env_key)
    return f"certificate for {', '.join(names)} until {not_after:%Y-%m-%d}"


def due_now(ledger, specs: dict[str, object], settings: AcmeSettings, now: float | None = None) -> list[tuple[str, str]]:
    """(environment, why) of every `tls: auto` environment whose certificate needs renewing:
    `specs` are the environments' specs as deployed. One with no certificate yet is left to the
    job that routes it."""
    out = []
    for env_key, spec in sorted(specs.items()):
        if not spec.tls or not spec.tls.auto:
            continue
        issued = ledger.db.certificate(env_key)
        if issued is None:
            continue
        why = due(issued, spec.names, settings.renew_before, now)
        if why:
            out.append((env_key, why))
    return out


