"""An environment's route: its nginx file on the router, written whole from the ledger (with one
service's new instance for a switch) and swapped in as a transaction (see commands.py), which
ends once nginx answers every route from its instance."""

from __future__ import annotations

import asyncio
import copy
import secrets

from protos import deployer_pb2 as pb

from controller.environments import naming, commands as ops, ownership
from controller.environments.context import JobContext, PlacementError, StepFailed, output_of, pick_agent
from controller.environments.spec import spec_from_dict
from controller.fleet.registry import Agent
from controller.state.knowledge import Scope


def routes(ctx: JobContext, override: dict[str, tuple[str, int]] | None = None) -> list[tuple[str, str, int]]:
    """(path, host address, port) of every web service: the live ones from the ledger, with
    `override` for a service being switched."""
    override = override or {}
    state = ctx.ledger.state(ctx.env_key)
    out = []
    for service in ctx.spec.services:
        if not service.is_web:
            continue
        if service.name in override:
            out.append((service.path, *override[service.name]))
            continue
        live = state.get(service.name)
        if live and live.code and live.code.port:
            host = ctx.registry.agents.get(live.code.host)
            out.append((service.path, host.address if host else "127.0.0.1", live.code.port))
    return out


def router(ctx: JobContext, service: str) -> Agent:
    try:
        return pick_agent(ctx.registry, capability="nginx")
    except PlacementError as exc:
        raise StepFailed(service, "route", str(exc)) from None


def nginx_path(ctx: JobContext, on: Agent) -> str:
    conf_dir = on.settings.get("nginx.conf_dir", "/etc/nginx/conf.d")
    return f"{conf_dir}/{naming.nginx_file(ctx.spec.app, ctx.spec.environment)}"


def reload_settings(on: Agent) -> tuple[str, str]:
    """How this router reloads nginx, and where its master writes its pid (Debian's defaults)."""
    return on.settings.get("nginx.reload", "nginx -s reload"), on.settings.get("nginx.pid", "/run/nginx.pid")


def nginx_content(ctx: JobContext, on: Agent, override=None, probe: str = "") -> bytes:
    owner = ownership.route_owner_line(ctx.ledger.owner) if ctx.ledger.owner else ""
    try:
        return ops.nginx_config(ctx.env_key, ctx.spec.domain, on.settings.get("nginx.listen", "80"),
                                routes(ctx, override), owner, probe)
    except ops.RouteValueError as exc:
        raise StepFailed(ctx.env_key, "route", f"not written on {on.id}: {exc}") from None


def route_check(ctx: JobContext, on: Agent, override: dict[str, tuple[str, int]] | None, probe: str) -> str:
    """What the switch asks nginx after its reload: every route, and whether it goes to a new
    instance (which must then have answered) or stays with the one it had."""
    new = {ctx.spec.service(name).path for name in override or {}}
    checked = [(path, host, port, path in new) for path, host, port in routes(ctx, override)]
    if not checked:
        return ""
    return ops.nginx_check_function(on.id, on.settings.get("nginx.listen", "80"), ctx.spec.domain, probe, checked)


async def switch_route(ctx: JobContext, service: str, override=None) -> None:
    """The nginx transaction: stage, swap, `nginx -t`, reload, ask nginx for each route through
    its listen address — or put the old file back. The probe's nonce is new at every switch, so
    only the file just written can answer it. One at a time per router: `nginx -t` must test our
    file, not another job's."""
    on = router(ctx, service)
    async with ctx.route_locks.setdefault(on.id, asyncio.Lock()):
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


async def switch_to(ctx: JobContext, service: str, new: dict[str, tuple[str, int]]) -> None:
    """Route each service in `new` to its new instance (address, port), in one reload. A switch
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
    """Remove the environment's nginx file, if it is ours, and reload."""
    on = router(ctx, ctx.env_key)
    conf = nginx_path(ctx, on)
    op = await ctx.sh(on, ownership.route_guard(conf, ctx.ledger.owner, ctx.env_key, routed,
                                                ops.nginx_remove_script(conf, *reload_settings(on))),
                      ctx.env_key, "remove route", check=False, scope=Scope.route(ctx.env_key))
    if op.result.exit_code == ownership.TAKEN:
        ctx.note(f"nginx file {conf} is not this deployer's: left untouched")
    elif op.result.exit_code != 0:
        raise StepFailed(ctx.env_key, "remove route", f"exit {op.result.exit_code}", output_of(op)[-2000:])
