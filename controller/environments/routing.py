"""An environment's route: its nginx file on the router, written whole from the ledger (with one
service's new instance for a switch) and swapped in as a transaction (see commands.py), which
ends once nginx answers every route from its instance."""

from __future__ import annotations

import asyncio
import copy
import secrets

from protos import deployer_pb2 as pb

from controller.environments import naming, commands as ops, ownership, tls
from controller.environments.context import JobContext, PlacementError, StepFailed, output_of, pick_agent
from controller.environments.facts import NginxFile
from controller.environments.spec import spec_from_dict
from controller.fleet.registry import CONNECTED, Agent
from controller.state.knowledge import Scope


def routes(ctx: JobContext, override: dict[str, list[tuple[str, int]]] | None = None) -> list[tuple[str, str, int]]:
    """(path, host address, port) of every web service's replicas: the live ones from the
    ledger, with `override` (service → its new replicas' addresses and ports) for those being
    switched. A path with more than one replica becomes an nginx upstream."""
    override = override or {}
    state = ctx.ledger.state(ctx.env_key)
    out = []
    for service in ctx.spec.services:
        if not service.is_web:
            continue
        if service.name in override:
            out += [(service.path, address, port) for address, port in override[service.name]]
            continue
        live = state.get(service.name)
        if live and live.code and live.code.port:
            for replica in live.code.replicas:
                if replica.port:
                    host = ctx.registry.agents.get(replica.host)
                    out.append((service.path, host.address if host else "127.0.0.1", replica.port))
    return out


def routers(ctx: JobContext) -> list[Agent]:
    """Every router the controller knows (granted nginx), whatever its state, by id: each serves
    every environment's routes."""
    return routers_of(ctx.registry)


def routers_of(registry) -> list[Agent]:
    return sorted((a for a in registry.agents.values() if "nginx" in a.capabilities), key=lambda a: a.id)


def router(ctx: JobContext, service: str) -> Agent:
    """The first connected router: the one whose file says where a route stands (recovery, verify)."""
    try:
        return pick_agent(ctx.registry, capability="nginx")
    except PlacementError as exc:
        raise StepFailed(service, "route", str(exc)) from None


def connected_routers(ctx: JobContext, service: str) -> list[Agent]:
    """The routers a switch is applied on now; the others are named in the job, and get the
    routes when they are back (healing.py)."""
    router(ctx, service)  # none connected: the one-line error of placement
    ons = [a for a in routers(ctx) if a.state == CONNECTED]
    for away in (a for a in routers(ctx) if a.state != CONNECTED):
        ctx.ledger.db.owe_route(away.id, ctx.env_key)  # durably: a controller restart keeps the debt
        ctx.note(f"route: router {away.id} is {away.state}: it gets this environment's routes when it is back")
    return ons


def conf_dir(on: Agent) -> str:
    """Where this router's nginx reads the deployer's files (Debian's default)."""
    return on.settings.get("nginx.conf_dir", "/etc/nginx/conf.d")


def nginx_path(ctx: JobContext, on: Agent) -> str:
    return f"{conf_dir(on)}/{naming.nginx_file(ctx.spec.app, ctx.spec.environment)}"


async def read_op(ctx: JobContext, on: Agent, path: str, service: str, step: str = "read route"):
    """Read one of the environment's files on a router (the operation, for its outcome)."""
    return await ctx.sh(on, NginxFile.command(path), service, step, check=False, scope=Scope.route(ctx.env_key))


async def read_file(ctx: JobContext, on: Agent, path: str, service: str, step: str = "read route") -> str | None:
    """One of the environment's files on a router, byte for byte, or None where there is none."""
    return NginxFile.parse(output_of(await read_op(ctx, on, path, service, step)))


def reload_settings(on: Agent) -> tuple[str, str]:
    """How this router reloads nginx, and where its master writes its pid (Debian's defaults)."""
    return on.settings.get("nginx.reload", "nginx -s reload"), on.settings.get("nginx.pid", "/run/nginx.pid")


def _base(ctx: JobContext) -> str:
    """The environment's name in a router's folders: auto-APP-ENV."""
    return naming.nginx_file(ctx.spec.app, ctx.spec.environment).removesuffix(".conf")


def tls_files(ctx: JobContext, on: Agent) -> tuple[str, str]:
    """Where a router keeps the environment's certificate and key (root's, 0600)."""
    return f"{conf_dir(on)}/auto-tls/{_base(ctx)}.crt", f"{conf_dir(on)}/auto-tls/{_base(ctx)}.key"


def certificate_pair(ctx: JobContext, service: str) -> tuple[str, str]:
    """The operator's certificate and key from the environment's secrets, checked again (a secret
    set since the plan) before any router gets them."""
    try:
        return tls.pair_of(ctx.spec.tls.certificate, ctx.spec.tls.key, ctx.ledger.secrets(ctx.env_key),
                           ctx.env_key, ctx.spec.names)
    except tls.TlsError as exc:
        raise StepFailed(service, "certificate", str(exc)) from None


def acme_certificate(ctx: JobContext) -> tuple[str, str] | None:
    """`tls: auto`: the certificate chain and key obtained for the environment, if any yet."""
    issued = ctx.ledger.db.certificate(ctx.env_key)
    return (issued[1], issued[2]) if issued else None


def challenges_dir(ctx: JobContext, on: Agent) -> str:
    """`tls: auto`: where a router keeps the environment's HTTP-01 answers (public, while an order lasts)."""
    return f"{conf_dir(on)}/auto-acme/{_base(ctx)}"


def serves_https(ctx: JobContext) -> bool:
    """HTTPS is served once there is a certificate: the operator's at once, ACME's once obtained."""
    return bool(ctx.spec.tls) and (not ctx.spec.tls.auto or acme_certificate(ctx) is not None)


def nginx_content(ctx: JobContext, on: Agent, override=None, probe: str = "") -> bytes:
    owner = ownership.route_owner_line(ctx.ledger.owner) if ctx.ledger.owner else ""
    https = ops.RouteTls(on.settings.get("nginx.tls_listen", "443"), *tls_files(ctx, on)) if serves_https(ctx) else None
    challenges = challenges_dir(ctx, on) if ctx.spec.tls and ctx.spec.tls.auto else ""
    try:
        return ops.nginx_config(ctx.env_key, ctx.spec.domain, on.settings.get("nginx.listen", "80"),
                                routes(ctx, override), owner, probe, ctx.spec.aliases, https, challenges)
    except ops.RouteValueError as exc:
        raise StepFailed(ctx.env_key, "route", f"not written on {on.id}: {exc}") from None


def route_check(ctx: JobContext, on: Agent, override: dict[str, list[tuple[str, int]]] | None, probe: str) -> str:
    """What the switch asks nginx after its reload: every route, and whether it goes to a new
    instance (which must then have answered) or stays with the one it had."""
    new = {ctx.spec.service(name).path for name in override or {}}
    checked = [(path, host, port, path in new) for path, host, port in routes(ctx, override)]
    if not checked:
        return ""
    return ops.nginx_check_function(on.id, on.settings.get("nginx.listen", "80"), ctx.spec.domain, probe, checked)


async def switch_route(ctx: JobContext, service: str, override=None, only: list[Agent] | None = None) -> None:
    """The switch on every connected router (or `only` those), at the same time. If one refuses,
    those that switched are put back to the route the ledger holds, so no two routers send a
    service to different instances for longer than the switch; the first refusal is raised."""
    ons = only if only is not None else connected_routers(ctx, service)
    # The pair first, once for all routers, so the file that names it never points at nothing.
    pair = _pair(ctx, service)
    results = await asyncio.gather(*(_switch_on(ctx, on, service, override, pair) for on in ons),
                                   return_exceptions=True)
    failed = [(on, r) for on, r in zip(ons, results) if isinstance(r, BaseException)]
    if not failed:
        for on in ons:
            ctx.job.event("route.switched", service=service, router=on.id)
            ctx.ledger.db.paid_route(on.id, ctx.env_key)
        return
    done = [on for on, r in zip(ons, results) if not isinstance(r, BaseException)]
    if done and override:
        back = await asyncio.gather(*(_put_back(ctx, on, service) for on in done), return_exceptions=True)
        for on, r in zip(done, back):
            if isinstance(r, BaseException):
                ctx.note(f"{service}: the route on {on.id} could not be put back ({r}); deployctl verify shows it")
    on, first = failed[0]
    if isinstance(first, StepFailed) and len(ons) > 1:
        first.args = (f"{first.args[0]} (router {on.id})",)
    raise first


def _pair(ctx: JobContext, service: str) -> tuple[str, str] | None:
    if not ctx.spec.tls:
        return None
    return acme_certificate(ctx) if ctx.spec.tls.auto else certificate_pair(ctx, service)


async def _put_back(ctx: JobContext, on: Agent, service: str) -> None:
    deployed = as_deployed(ctx)
    await _switch_on(deployed, on, service, None, _pair(deployed, service))


async def _switch_on(ctx: JobContext, on: Agent, service: str, override=None,
                     pair: tuple[str, str] | None = None) -> None:
    """The nginx transaction on one router: stage, swap, `nginx -t`, reload, ask nginx for each
    route through its listen address — or put the old file back. The probe's nonce is new at
    every switch, so only the file just written can answer it. One at a time per router: `nginx
    -t` must test our file, not another job's."""
    async with ctx.route_locks.setdefault(on.id, asyncio.Lock()):
        if pair:
            for path, content in zip(tls_files(ctx, on), pair):
                await ctx.run_op(on, pb.Operation(write_file=pb.WriteFileSpec(
                    path=path, content=content.encode(), mode=0o600)), service, "certificate",
                    scope=Scope.route(ctx.env_key))
        conf = nginx_path(ctx, on)
        staged = f"{conf}.staged-{ctx.job.id}"
        probe = secrets.token_hex(16)
        # Root's only (the nginx master reads it as root): a tenant on the router learns neither the
        # upstreams nor the probe's nonce, which a default server of its own could otherwise answer.
        await ctx.run_op(on, pb.Operation(write_file=pb.WriteFileSpec(
            path=staged, content=nginx_content(ctx, on, override, probe), mode=0o600)), service, "route",
            scope=Scope.route(ctx.env_key))
        switch = ops.nginx_switch_script(conf, staged, on.settings.get("nginx.test", "nginx -t"), *reload_settings(on),
                                         check=route_check(ctx, on, override, probe))
        refused = await ctx.guarded(on, ownership.route_guard(
            conf, ctx.ledger.owner, ctx.env_key, bool(ctx.ledger.state(ctx.env_key)), switch,
            refused=ops.remove_file(staged)), service, "route", scope=Scope.route(ctx.env_key),
            explained=ops.NOT_ANSWERED)
        if refused:
            raise StepFailed(service, "route", refused)


async def switch_to(ctx: JobContext, service: str, new: dict[str, list[tuple[str, int]]]) -> None:
    """Route each service in `new` to its new instance (each replica's address and port), in one reload. A switch
    cut in the middle (its agent killed) may leave the file naming new instances, which are about
    to be stopped, and the next reload of nginx, for any environment, would route there: the
    route the ledger holds is written back."""
    try:
        await switch_route(ctx, service, new)
    except StepFailed as failed:
        if not failed.cut:  # nginx said no, and the script has put the previous file back
            raise
        try:
            await switch_route(as_deployed(ctx), service)  # the route as it was
        except StepFailed as exc:
            ctx.note(f"{service}: the previous route could not be written back ({exc}); deployctl verify "
                     "shows it, repair writes it")
        raise


def as_deployed(ctx: JobContext) -> JobContext:
    """This context with the environment as its live instances were deployed, for writing the
    route the ledger holds (the spec being applied may be ahead of it, or behind)."""
    deployed = copy.copy(ctx)
    deployed.spec = spec_from_dict(ctx.ledger.as_deployed(ctx.env_key, ctx.spec.to_dict()))
    deployed.deploying = {}
    return deployed


async def remove_route(ctx: JobContext, routed: bool) -> None:
    """Remove the environment's nginx file, if it is ours, and reload, on every connected router."""
    for on in connected_routers(ctx, ctx.env_key):
        await _remove_on(ctx, on, routed)


async def _remove_on(ctx: JobContext, on: Agent, routed: bool) -> None:
    conf = nginx_path(ctx, on)
    op = await ctx.sh(on, ownership.route_guard(conf, ctx.ledger.owner, ctx.env_key, routed,
                                                ops.nginx_remove_script(conf, *reload_settings(on))),
                      ctx.env_key, "remove route", check=False, scope=Scope.route(ctx.env_key))
    if op.result.exit_code == ownership.TAKEN:
        ctx.note(f"nginx file {conf} is not this deployer's: left untouched")
        return
    if op.result.exit_code != 0:
        raise StepFailed(ctx.env_key, "remove route", f"exit {op.result.exit_code}", output_of(op)[-2000:])
    if ctx.spec.tls:  # its certificate and key (and any ACME answers), in our own folders
        await ctx.sh(on, ops.remove_paths(*tls_files(ctx, on), challenges_dir(ctx, on)), ctx.env_key,
                     "remove certificate", check=False, scope=Scope.route(ctx.env_key))


async def sync(ctx: JobContext, router_id: str) -> str:
    """Write the route the ledger holds on one router if its file is not that (it was away
    during a switch); what was done, in a few words."""
    on = ctx.registry.agents.get(router_id)
    if on is None or on.state != CONNECTED:
        return f"router {router_id} is away again: nothing written"
    deployed = as_deployed(ctx)
    if not routes(deployed):
        ctx.ledger.db.paid_route(router_id, ctx.env_key)
        return "no route to write"
    have = await read_file(ctx, on, nginx_path(ctx, on), ctx.env_key)
    if have is not None and have == nginx_content(deployed, on, probe=ops.probe_of(have)).decode():
        ctx.ledger.db.paid_route(router_id, ctx.env_key)
        return f"the route on {router_id} is current"
    await switch_route(deployed, ctx.env_key, only=[on])
    return f"wrote the route on {router_id}"
