"""Deploying a service, composed of operations sent to agents.

The order of a deploy (blue/green per code instance):
  checkout → new data instances (mysql, redis) → .env → install → build → migrate → start on a
  fresh port → health check → route switch (nginx transaction) → ledger → drain → stop the old
  process → `current` → prune old releases.
Any failure before the route switch stops the new process, drops the data instances this deploy
created, marks them failed in the ledger, and leaves the live instance serving (`undo`).
"""

from __future__ import annotations

import asyncio
import itertools

from protos import deployer_pb2 as pb

from controller.environments import (backups, certificates, commands as ops, data, hosts, naming, ownership, routing,
                                     teardown)
from controller.environments.context import (JobContext, PlacementError, StepFailed, allocate_port, claim_host,
                                             output_of)
from controller.fleet.registry import CONNECTED, Agent
from controller.environments.data import Deployment
from controller.environments.facts import ServiceProcesses
from controller.environments.planner import Plan, ServicePlan
from controller.environments.spec import code_fingerprint, shared_depth
from controller.state.ledger import RAN, Replica, Status, replica_key
from common import envfile

KEEP_RELEASES = 5


async def apply(ctx: JobContext, plan: Plan) -> str:
    deploys = [sp for sp in plan.services if sp.action == "deploy"]
    if deploys:
        await deploy_together(ctx, deploys)
    for service_plan in plan.services:
        if service_plan.action == "destroy":
            # The spec no longer has it, so the route written next leaves it out.
            await teardown.remove_code(ctx, service_plan.service)
            ctx.job.event("service.removed", service=service_plan.service)
            if any(s.is_web for s in ctx.spec.services):
                await routing.switch_route(ctx, service_plan.service)
    verb = {"apply": "deployed"}.get(ctx.job.kind, ctx.job.kind + " of")
    summary = f"{verb} {', '.join(s.service for s in plan.services)}"
    if ctx.spec.tls and ctx.spec.tls.auto and ctx.job.kind in ("apply", "restore"):
        done = await certificates.ensure(ctx, ctx.acme)
        if done.startswith("certificate for"):
            summary += f"; {done}"
    return summary


async def deploy(ctx: JobContext, sp: ServicePlan) -> None:
    await deploy_together(ctx, [sp])


async def deploy_together(ctx: JobContext, plans: list[ServicePlan]) -> None:
    """One switch for the environment: every new web instance is started and found healthy,
    then every new daemon; then all routes switch in one nginx reload, and only then do the old
    instances stop. If any service fails before the switch, nothing switches: every new instance
    is undone and the old ones keep running."""
    depth = shared_depth(ctx.spec.services)

    def order(sp: ServicePlan) -> tuple[int, bool]:  # owners before their users, then web before daemons
        return depth.get(sp.service, 0), not ctx.spec.service(sp.service).is_web
    plans = sorted(plans, key=order)
    started: list[tuple[Deployment, object, dict[str, int]]] = []

    async def one_host(items) -> None:  # one host's new instances, one after the other
        for (d, _, numbers), sp in items:
            await _up(ctx, d, sp, numbers)
    try:
        # Services of one rank (no one uses another's new instance) come up at the same time, one
        # host's after the other's on that host; a rank is healthy before the next one starts.
        for _, rank in itertools.groupby(plans, key=order):
            on: dict[str, list] = {}
            for sp in rank:
                started.append(await _begin(ctx, sp, {d.service.name: numbers for d, _, numbers in started}))
                on.setdefault(started[-1][0].host.id, []).append((started[-1], sp))
            results = await asyncio.gather(*(one_host(items) for items in on.values()), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:  # every one has ended: nothing is left half-way when they are undone
                raise failed[0]
        web = [d for d, _, _ in started if d.service.is_web]
        if len(started) > 1:
            ctx.note(f"all {len(started)} new instances are healthy ({', '.join(d.service.name for d, _, _ in started)}); "
                     + (f"switching the routes of {', '.join(d.service.name for d in web)} in one reload"
                        if web else "no route to switch"))
        if web:
            for d in web:  # durably, before the switch: recovery reads it after a crash
                ctx.ledger.set_step(ctx.env_key, d.service.name, d.deploy, "route")
            await routing.switch_to(ctx, web[0].service.name,
                                    {d.service.name: [(r.host.address, r.port) for r in d.every_replica] for d in web})
        for d, _, _ in started:
            d.switched = True
        for d, live, numbers in started:
            await _after_switch(ctx, d, live, numbers)
        for d, live, numbers in started:  # every user of a replaced server has moved off it
            await _stop_replaced_servers(ctx, d, live, numbers)
    except BaseException as exc:
        # Before the switch, put everything back; after it the new instances are the live ones,
        # and undoing would take down what serves (and drop data they now use).
        undone = [d for d, _, _ in started if not d.switched]
        failed = getattr(exc, "service", None)
        for d in undone:
            await asyncio.shield(undo(ctx, d))
            why = str(exc) if d.service.name == failed or failed is None else f"not switched: {exc}"
            ctx.ledger.finish_deploy(ctx.env_key, d.service.name, d.deploy, "failed", why)
        others = [d.service.name for d in undone if d.service.name != failed]
        if others:
            ctx.note(f"{failed or 'the job'} failed, so nothing switched: the new instances of {', '.join(others)} "
                     "were stopped, and the live ones keep serving")
        raise
    finally:
        for d, _, _ in started:
            ctx.deploying.pop(d.service.name, None)
        names = {sp.service for sp in plans}
        for key in [k for k in hosts.PENDING if k[0] == ctx.env_key and k[1].partition("#")[0] in names]:
            hosts.PENDING.pop(key, None)


async def _begin(ctx: JobContext, sp: ServicePlan, numbers_of: dict[str, dict[str, int]]
                 ) -> tuple[Deployment, object, dict[str, int]]:
    """Placement, numbers and the deploy's row in the ledger: (the deployment, the live state of
    the service, the numbers of its own data instances). An instance of another service comes
    from that service's deploy in this job (`numbers_of`), if it has one, or is its live one."""
    service = ctx.spec.service(sp.service)
    live = ctx.ledger.state(ctx.env_key).get(service.name)
    code = sp.change("code")
    host, *others = place(ctx, service, live, code)
    d = Deployment(service, host, naming.service_dir(host.services_root, ctx.spec.app, ctx.spec.environment,
                                                     service.name))
    d.replicas = [Deployment(service, other, naming.service_dir(other.services_root, ctx.spec.app,
                                                                ctx.spec.environment, service.name), slot=slot)
                  for slot, other in enumerate(others, start=1)]
    mysql, redis = sp.change("mysql"), sp.change("redis")
    d.code_new = code.new
    d.code = ctx.ledger.next_number(ctx.env_key, service.name, "code") if code.new else code.number
    numbers = {}
    for change in (mysql, redis):
        if change is not None and change.owner:
            number = numbers_of.get(change.owner, {}).get(change.component, change.number)
            if number is None:
                raise StepFailed(service.name, change.component, f"{change.owner}'s {change.component} instance "
                                 f"is not made: deploy {change.owner} first")
            d.shared[change.component] = (change.owner, number)
        elif change is not None:
            numbers[change.component] = (ctx.ledger.next_number(ctx.env_key, service.name, change.component)
                                         if change.new else change.number)
    used = {**numbers, **{c: n for c, (_, n) in d.shared.items()}}
    d.deploy = ctx.ledger.start_deploy(
        ctx.env_key, service.name, ctx.job.id, code=d.code, code_new=code.new,
        mysql=used.get("mysql"), mysql_new=bool(mysql and mysql.new),
        redis=used.get("redis"), redis_new=bool(redis and redis.new), commit=sp.commit, host=host.id,
        shared={c: owner for c, (owner, _) in d.shared.items()})
    for r in d.replicas:
        r.deploy, r.code, r.code_new, r.shared = d.deploy, d.code, d.code_new, d.shared
    ctx.job.event("deploy.started", service=service.name, deploy=d.deploy, code=d.code,
                  code_new=code.new, mysql=used.get("mysql"), redis=used.get("redis"),
                  shared={c: owner for c, (owner, _) in d.shared.items()}, host=host.id, reasons=list(sp.reasons),
                  **({"replicas": [r.host.id for r in d.every_replica]} if d.replicas else {}))
    ctx.deploying[service.name] = d.deploy
    return d, live, numbers


def place(ctx: JobContext, service, live, code) -> list[Agent]:
    """The hosts of the deploy, one per replica (decision 034): a new code instance where
    placement puts it, a reused one where its replicas are — or, for a replica whose host is
    lost, on another host of its role, where its release is checked out again. Held in
    `hosts.PENDING` until the deploy ends, so jobs placing at the same time see each other's
    choice."""
    if code.new:
        where = hosts.live_hosts(live)
    else:
        row = ctx.ledger.instance(ctx.env_key, service.name, "code", code.number)
        where = tuple(r.host for r in row.replicas) if row and row.host else hosts.live_hosts(live)
    try:
        chosen, warning = hosts.choose_replicas(ctx.registry, ctx.ledger, ctx.spec, service, where)
    except PlacementError as exc:
        raise StepFailed(service.name, "placement", str(exc)) from None
    if warning:
        ctx.note(warning)
    for slot, (agent, choice) in enumerate(chosen):
        hosts.PENDING[(ctx.env_key, replica_key(service.name, slot))] = agent.id
        ctx.job.event("placed", service=service.name, host=agent.id, why=choice.why,
                      **({"replica": slot + 1} if service.replicas > 1 else {}))
        if not choice.stays:
            ctx.note(f"{service.name}: on {agent.id}: {choice.why}")
    return [agent for agent, _ in chosen]


async def _up(ctx: JobContext, d: Deployment, sp: ServicePlan, numbers: dict[str, int]) -> None:
    """Everything up to a healthy new instance: folder, user, release, data, .env, build, start."""
    mysql, redis = sp.change("mysql"), sp.change("redis")
    await _prepare(ctx, d, sp)
    workdir, env_path = await _configure(ctx, d, numbers, mysql, redis)
    # A restore loads the snapshot into a new database and runs no migrate: the snapshot is from
    # before the one that failed, and would meet it again.
    migrate = (d.code_new or (mysql is not None and mysql.new)) and not ctx.restoring
    live_db = None if mysql is None or mysql.new else d.shared.get("mysql") or (d.service.name, numbers["mysql"])
    await _build(ctx, d, workdir, env_path, migrate, live_db)
    await start(ctx, d, workdir, env_path)
    if not d.replicas:
        return
    # The others once the first is healthy (and migrated): each host's at the same time as the
    # others', one after the other on a host, where the first to come builds the release the
    # next ones share (a replica on the first one's host shares its release).
    on: dict[str, list[Deployment]] = {}
    for r in d.replicas:
        on.setdefault(r.host.id, []).append(r)

    async def one_host(replicas: list[Deployment]) -> None:
        for index, r in enumerate(replicas):
            await _up_replica(ctx, d, r, sp, built=index > 0 or r.host.id == d.host.id)
    results = await asyncio.gather(*(one_host(rs) for rs in on.values()), return_exceptions=True)
    failed = [x for x in results if isinstance(x, BaseException)]
    if failed:
        raise failed[0]


async def _up_replica(ctx: JobContext, d: Deployment, r: Deployment, sp: ServicePlan, built: bool) -> None:
    """One more replica of the instance `d` has started: its release on its host (checked out
    and built there — no migrate, the first one ran it — unless another replica on that host
    has `built` it), its `.env` (the same data, its own PORT), its process, healthy."""
    r.code = d.code  # moved past a taken number on the first host, if it was
    if built:  # its own .env beside the other's, in the release they share
        workdir = _workdir(r)
        env_path = await _write_env(ctx, r, d.generated, path=f"{_release(r)}/.env.replica-{r.slot}")
    else:
        await _prepare(ctx, r, sp)
        workdir = await _layout(ctx, r)
        env_path = await _write_env(ctx, r, d.generated)
        await _build(ctx, r, workdir, env_path, migrate=False)
    await start(ctx, r, workdir, env_path)


async def _prepare(ctx: JobContext, d: Deployment, sp: ServicePlan) -> None:
    """The service folder, the environment's user and, for a new code instance, its release."""
    if d.code_new and not d.slot:  # one code instance for every replica
        _add_code_instance(ctx, d, sp)
    await claim_host(ctx, d.host, d.service.name)
    if not d.code_new:  # a reused release that is gone (a wiped or rebuilt server) comes back from its commit
        probe = await ctx.sh(d.host, ops.folder_exists(_release(d)), d.service.name, "release", check=False)
        d.rebuilt = output_of(probe).strip() == "missing"
        if d.rebuilt:
            ctx.note(f"{d.service.name}: release {d.code} is missing on {d.host.id}: checked out again from "
                     f"{sp.commit[:12]}, installed and built (its data is not touched)")
    if d.code_new or d.rebuilt:
        await _checkout(ctx, d, sp)


async def _configure(ctx: JobContext, d: Deployment, numbers: dict[str, int], mysql, redis) -> tuple[str, str]:
    """Owners and modes, the data instances and the `.env`: (working folder, `.env` path)."""
    workdir = await _layout(ctx, d)
    generated = {}
    if mysql is not None:
        generated.update(await data.mysql(ctx, d, numbers, mysql.new))
        if mysql.new and ctx.restoring and d.service.name in ctx.restoring:
            source, snapshot_id = ctx.restoring[d.service.name]
            provider, names = backups.provider_of(ctx, d.service.name, numbers["mysql"], d.service.name)
            await backups.load(ctx, provider, source, snapshot_id, numbers["mysql"], names,
                               ctx.ledger.password(ctx.env_key, d.service.name, "mysql", numbers["mysql"]) or "",
                               d.service.name)
    if redis is not None:
        generated.update(await data.redis(ctx, d, numbers, redis.new))
    d.generated = generated
    return workdir, await _write_env(ctx, d, generated)


async def _layout(ctx: JobContext, d: Deployment) -> str:
    """The release's owners and modes on the deploy's host; its working folder."""
    await ctx.sh(d.host, ops.service_layout(d.service_dir, _release(d), ctx.unix_user), d.service.name, "permissions")
    return _workdir(d)


def _workdir(d: Deployment) -> str:
    release = _release(d)
    return f"{release}/{d.service.root}" if d.service.root else release


async def _write_env(ctx: JobContext, d: Deployment, generated: dict[str, str], path: str = "") -> str:
    """The `.env` from the data values, the spec's env and secrets, and this replica's PORT."""
    service, name, release = d.service, d.service.name, _release(d)
    generated = dict(generated)
    if service.is_web and any("PORT" in envfile.references(v) for _, v in service.env):
        d.port = await _allocate_port(ctx, d)  # before the .env, which is built from it
    if d.port:
        generated["PORT"] = str(d.port)
    # An env value may be built from the generated ones (the spec checked every ${NAME}).
    values = {**{k: v for k, v in generated.items() if k != "PORT"},
              **{name: envfile.expand(template, generated) for name, template in service.env}}
    stored = ctx.ledger.secrets(ctx.env_key)
    values.update({secret: stored[secret] for secret in service.secrets})
    # A reused release keeps serving from its .env until the switch: stage the new one beside it.
    env_path = path or (f"{release}/.env" if d.code_new else f"{release}/.env.deploy-{d.deploy}")
    d.staged_env = "" if d.code_new or path else env_path
    try:
        content = ops.env_file(values)
    except ValueError as exc:
        raise StepFailed(name, ".env", str(exc)) from None
    await ctx.run_op(d.host, pb.Operation(write_file=pb.WriteFileSpec(
        path=env_path, content=content, mode=0o600, owner=ctx.unix_user)), name, ".env")
    return env_path


async def _build(ctx: JobContext, d: Deployment, workdir: str, env_path: str, migrate: bool,
                 live_db: tuple[str, int] | None = None) -> None:
    """install and build for a new release; migrate for a new release or a new database. A
    migrate against a live database (`live_db`: whose, which) runs after a snapshot of it."""
    service, name = d.service, d.service.name
    as_user = {"user": ctx.unix_user, "env": service_env(d)}
    if d.code_new or d.rebuilt:
        for step in ("install", "build"):
            command = getattr(service, step)
            if command:
                await ctx.sh(d.host, command, name, step, cwd=workdir, env_file=env_path, **as_user)
        shared = f"{d.service_dir}/shared"
        if service.writable:  # as the user: its shared folder, seeded from the release the first time
            await ctx.sh(d.host, ops.writable_script(shared, service.writable), name, "writable", cwd=workdir,
                         **as_user)
        # From here the release is root's and read-only to the tenant: a later install (or a
        # compromised process) can never change it, and its files are shared with the kept ones.
        prefix = f"{service.root}/" if service.root else ""
        await ctx.run_op(d.host, pb.Operation(release_seal=pb.ReleaseSealSpec(
            release=_release(d), store=f"{d.service_dir}/store", user=ctx.unix_user,
            writable=[pb.WritablePath(path=prefix + p.rstrip("/"), target=f"{shared}/{p.rstrip('/')}")
                      for p in service.writable])), name, "seal")
    if not (service.migrate and migrate):
        return
    taken = await backups.snapshot(ctx, *live_db, name, "before the migrate") if live_db else ""
    try:
        await ctx.sh(d.host, service.migrate, name, "migrate", cwd=workdir, env_file=env_path, **as_user)
    except StepFailed as failed:
        if taken:  # what the migrate changed before it failed is in the live database
            failed.args = (f"{failed.args[0]}; the database was saved just before it: deployctl restore "
                           f"{ctx.env_key}/{live_db[0]} --from {taken} puts that back (as a new instance)",)
        raise


async def _after_switch(ctx: JobContext, d: Deployment, live, numbers: dict[str, int]) -> None:
    """The new instance serves: the ledger says so, the old one drains and stops, and the
    release is tidied. A failure from here is reported, never undone."""
    name = d.service.name
    # Read before going live: restarting the same code instance rewrites its processes.
    previous = _replicas_of(ctx, live)
    go_live(ctx, d, numbers)
    if live and live.code:
        await _retire(ctx, d, previous)
    for r in d.every_replica:
        release = _release(r)
        if r.staged_env:
            await ctx.sh(r.host, ops.in_release(release, ctx.unix_user, ops.move_staged_env(r.staged_env, release + "/.env")),
                         name, ".env", check=False)
        await ctx.sh(r.host, ops.current_script(r.service_dir, release), name, "current", check=False)
    await _prune_releases(ctx, d)


async def _stop_replaced_servers(ctx: JobContext, d: Deployment, live, numbers: dict[str, int]) -> None:
    """A dedicated Redis this deploy replaced stops (its data is kept, as standby)."""
    old = live.live("redis") if live else None
    if old is None or numbers.get("redis") in (None, old.number):
        return
    row = ctx.ledger.instance(ctx.env_key, d.service.name, "redis", old.number)
    host = ctx.registry.agents.get(row.host) if row else None
    if not row or row.names.get("mode") != "dedicated" or host is None:
        return
    still = sorted(name for name, state in ctx.ledger.state(ctx.env_key).items()
                   if state.used.get("redis") == (d.service.name, old.number))
    if still:  # a user this job did not deploy (one no longer in the spec, say) is still on it
        ctx.note(f"{d.service.name}: its replaced redis {old.number} keeps running: {', '.join(still)} still use it")
        return
    await data.stop_redis_server(ctx, host, d.service.name, old.number, "stop replaced redis")


def _release(d: Deployment) -> str:
    return f"{d.service_dir}/releases/{d.code}"


def service_env(d: Deployment) -> dict[str, str]:
    """Variables of a service's commands and processes besides its `.env`: a HOME of its own."""
    return {} if "HOME" in dict(d.service.env) else {"HOME": ops.service_home(d.service_dir)}


def _add_code_instance(ctx: JobContext, d: Deployment, sp: ServicePlan) -> None:
    # The instance keeps its own definition, so a rollback restores its commands and env.
    ctx.ledger.add_instance(ctx.env_key, d.service.name, "code", d.code, host=d.host.id, commit=sp.commit,
                            fingerprint=code_fingerprint(d.service, ctx.spec.limits),
                            names={"release": _release(d), "service": d.service.to_dict()})


async def _checkout(ctx: JobContext, d: Deployment, sp: ServicePlan) -> None:
    """As root: the source may need root's credentials. The release is then the user's. A
    release folder that exists already is not ours to remove: its number is moved past."""
    first = d.code
    for _ in range(data.TAKEN_NAMES_MAX):
        script = ownership.absent(_release(d)) + ops.checkout_script(
            d.service_dir, _release(d), d.service.source, sp.commit)
        taken = await ctx.guarded(d.host, script, d.service.name, "checkout", timeout=600)
        if not taken:
            return
        if d.rebuilt or d.slot:  # the live instance's own folder, or a replica's: the number is not to change
            raise StepFailed(d.service.name, "checkout", f"{taken} on {d.host.id}" if d.slot else taken)
        d.code = data.move_past(ctx, d, "code", d.code, taken)
        _add_code_instance(ctx, d, sp)
    raise data.give_up(d, "code", first, d.code - 1)


# ---------------------------------------------------------------- processes

async def start(ctx: JobContext, d: Deployment, workdir: str, env_path: str) -> None:
    """Start the new instance (on a fresh port for a web service) and check it is healthy."""
    service, name = d.service, d.service.name
    env = {**service_env(d), "RELEASE": str(d.code)}
    if service.is_web:
        d.port = d.port or await _allocate_port(ctx, d)
        env["PORT"] = str(d.port)
        d.process = f"{d.code}-{d.port}"
    else:
        d.process = f"{d.code}-d{d.deploy}"
    if not d.slot:  # the deploy's row holds the first replica's: what recovery reads after a crash
        ctx.ledger.set_step(ctx.env_key, name, d.deploy, "start", port=d.port or None, process=d.process)
    else:
        ctx.ledger.add_deploy_replica(ctx.env_key, name, d.deploy, Replica(d.host.id, d.port, d.process))
    unit = ctx.unit(name)
    await ctx.run_op(d.host, pb.Operation(service_start=pb.ServiceStartSpec(
        name=unit, instance=d.process, argv=["sh", "-c", f"exec {service.start}"], cwd=workdir,
        env=env, env_file=env_path, user=ctx.unix_user, limits=ctx.limits(d.host),
        **ctx.log_files(d.service_dir, str(d.code)))), name, "start")
    check = service.check
    if service.is_web:
        try:
            await ctx.run_op(d.host, pb.Operation(http_probe=pb.HttpProbeSpec(
                url=f"http://{ops.url_host(d.host.address)}:{d.port}{service.health}", expect_statuses=check.statuses,
                interval_s=check.interval, timeout_s=check.timeout, deadline_s=check.deadline, service_name=unit,
                service_instance=d.process)), name, "health")
        except StepFailed as failed:
            if not failed.cut:  # the probe has nothing to say: the instance's own output has
                failed.tail = await _log_tail(ctx, d)
            raise
        return
    await asyncio.sleep(service.healthy_after)
    listing = await ctx.run_op(d.host, ServiceProcesses.operation(unit), name, "health")
    if not any(p.instance == d.process and p.alive for p in ServiceProcesses.parse(output_of(listing), unit)):
        raise StepFailed(name, "health", f"the daemon did not stay up for {service.healthy_after:g}s",
                         await _log_tail(ctx, d))
    if check.command:
        try:
            await ctx.sh(d.host, ops.health_command_script(check.command, check.interval, check.timeout,
                                                            check.deadline),
                         name, "health command", cwd=workdir, env_file=env_path, user=ctx.unix_user,
                         env=service_env(d), timeout=check.deadline + check.timeout + 30)
        except StepFailed as failed:
            own = "" if failed.cut else "\n--- the daemon's own output ---\n" + await _log_tail(ctx, d)
            raise StepFailed(name, "health", f"{check.command!r} did not succeed within {check.deadline:g}s",
                             failed.tail + own, cut=failed.cut) from None


async def _log_tail(ctx: JobContext, d: Deployment) -> str:
    return await ctx.log_tail(d.host, d.service_dir, str(d.code), d.service.name)


async def _allocate_port(ctx: JobContext, d: Deployment) -> int:
    return await allocate_port(ctx, d.host, d.service.name, d.code)


def go_live(ctx: JobContext, d: Deployment, numbers: dict[str, int]) -> None:
    """The ledger takes the new instance (every replica, and its data instances) as live, in one
    transaction."""
    name = d.service.name
    with ctx.ledger.transaction():  # all of it or none of it, whatever kills the controller
        ctx.ledger.set_status(ctx.env_key, name, "code", d.code, Status.LIVE, port=d.port or None)
        if d.host is not None:  # where the first replica runs now (it moves off a lost host)
            ctx.ledger.set_host(ctx.env_key, name, "code", d.code, d.host.id)
        ctx.ledger.set_names(ctx.env_key, name, "code", d.code, process=d.process,
                             replicas=[Replica(r.host.id, r.port, r.process).to_dict() for r in d.replicas
                                       if r.host is not None and r.process])
        ctx.ledger.make_live(ctx.env_key, name, "code", d.code)
        for component, number in numbers.items():
            ctx.ledger.make_live(ctx.env_key, name, component, number)
        ctx.ledger.finish_deploy(ctx.env_key, name, d.deploy, "succeeded", port=d.port or None)
    ctx.job.event("deploy.live", service=name, deploy=d.deploy, code=d.code, port=d.port,
                  host=d.host.id if d.host else "",
                  **({"replicas": [{"host": r.host.id, "port": r.port} for r in d.every_replica
                                    if r.host is not None]} if d.replicas else {}))


def _replicas_of(ctx: JobContext, live) -> list[Replica]:
    if not live or not live.code:
        return []
    row = ctx.ledger.instance(ctx.env_key, live.service, "code", live.code.number)
    return row.replicas if row else []


async def _retire(ctx: JobContext, d: Deployment, previous: list[Replica]) -> None:
    """Give in-flight requests to each old replica time to finish, then stop it, on its host
    (another host if the service moved); all of them at once."""
    new = {(r.host.id, r.process) for r in d.every_replica}
    await asyncio.gather(*(_retire_one(ctx, d, old) for old in previous
                           if old.process and (old.host, old.process) not in new))


async def _retire_one(ctx: JobContext, d: Deployment, old: Replica) -> None:
    host = ctx.registry.agents.get(old.host)
    if host is None or host.state != CONNECTED:
        # Its host is away (a move off a lost host): the controller stops it there when the host
        # is back (healing.py), and frees its port then.
        ctx.ledger.db.owe_stop(old.host, ctx.env_key, d.service.name, old.process, old.port)
        ctx.note(f"{d.service.name}: the previous instance on {old.host} "
                 f"({host.state if host else 'unknown'}) could not be stopped: it is stopped when that host is back")
        return
    if old.port and d.service.is_web:
        await ctx.sh(host, ops.drain_script(old.port, d.service.drain), d.service.name, "drain",
                     check=False, timeout=d.service.drain + 30)
    await ctx.run_op(host, pb.Operation(service_stop=pb.ServiceStopSpec(name=ctx.unit(d.service.name),
                                                                        instance=old.process)),
                     d.service.name, "stop previous", check=False)
    if old.port:
        ctx.ledger.release_port(old.host, old.port)


async def _prune_releases(ctx: JobContext, d: Deployment) -> None:
    """Releases beyond the newest KEEP_RELEASES go, on every host of the instance's replicas."""
    rows = [r for r in ctx.ledger.instances(ctx.env_key, d.service.name) if r.component == "code"]
    keep = {r.number for r in rows if r.status in (*RAN, Status.BUILDING)}
    keep = set(sorted(keep)[-KEEP_RELEASES:]) | {d.code}
    doomed = [r.number for r in rows if r.number not in keep and r.status not in (Status.REMOVED, Status.TAKEN)]
    if not doomed:
        return
    for r in {r.host.id: r for r in reversed(d.every_replica)}.values():  # each host once
        await ctx.sh(r.host, ops.remove_paths(*(f"{r.service_dir}/releases/{n}" for n in doomed)), d.service.name,
                     "prune releases", check=False)
        await ctx.run_op(r.host, pb.Operation(release_seal=pb.ReleaseSealSpec(store=f"{r.service_dir}/store",
                                                                              prune=True)),
                         d.service.name, "prune store", check=False)
    for number in doomed:
        ctx.ledger.set_status(ctx.env_key, d.service.name, "code", number, Status.REMOVED)


async def _undo_replica(ctx: JobContext, d: Deployment) -> None:
    name = d.service.name
    if d.process and d.slot and d.host.state != CONNECTED:  # cut off meanwhile: stopped when it is back
        ctx.ledger.db.owe_stop(d.host.id, ctx.env_key, name, d.process, d.port)
        return
    if d.process:
        await ctx.run_op(d.host, pb.Operation(service_stop=pb.ServiceStopSpec(name=ctx.unit(name), instance=d.process)),
                         name, "stop failed instance", check=False)
    if d.port:
        ctx.ledger.release_port(d.host.id, d.port)
    if d.staged_env:
        await ctx.sh(d.host, ops.in_release(_release(d), ctx.unix_user, ops.remove_file(d.staged_env)), name,
                     "drop staged .env", check=False)
    if d.rebuilt:  # this job checked it out (it was missing): half-built, it would be taken as whole next time
        await ctx.sh(d.host, ops.remove_paths(_release(d)), name, "drop rebuilt release", check=False)


async def undo(ctx: JobContext, d: Deployment) -> None:
    """Leave things as they were: the live instance keeps serving, new data goes away."""
    name = d.service.name
    for r in d.every_replica:
        await _undo_replica(ctx, r)
    if d.code_new:
        ctx.ledger.set_status(ctx.env_key, name, "code", d.code, Status.FAILED)
    for component, number, names, provider in d.created:
        await data.drop_owned(ctx, provider, component, number, names, name, f"drop new {component}")
        ctx.ledger.set_status(ctx.env_key, name, component, number, Status.FAILED)
