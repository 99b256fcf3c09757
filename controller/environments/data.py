"""Data instances: a service's MySQL database and user, its Redis ACL user and key prefix.

A new instance is recorded in the ledger first (so a failure can drop it), then made by a guarded
create that touches nothing if a name is taken (a taken number is moved past); it is dropped only
where the server shows it is the one the ledger recorded (see ownership.py)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from controller.environments import backups, naming, commands as ops, ownership
from protos import deployer_pb2 as pb

from controller.environments.context import (JobContext, PlacementError, StepFailed, allocate_port, claim_host,
                                             output_of, pick_agent, tail_of)
from controller.environments.facts import ServiceProcesses
from controller.environments.spec import Service
from controller.fleet.registry import Agent
from controller.state.knowledge import Scope

# How many taken names (a leftover, another controller's) a deploy moves past before it gives up.
TAKEN_NAMES_MAX = 5


@dataclass
class Deployment:
    """The state of one service's deploy while it runs, for clean-up on failure."""

    service: Service
    host: Agent
    service_dir: str
    deploy: int = 0
    code: int = 0
    code_new: bool = False
    port: int = 0
    process: str = ""
    switched: bool = False  # the route (or, for a daemon, the health check) has passed: no way back
    staged_env: str = ""    # a reused release's next .env, until the switch
    created: list[tuple[str, int, dict, Agent]] = field(default_factory=list)  # new data instances
    shared: dict[str, tuple[str, int]] = field(default_factory=dict)  # component → another service's instance
    rebuilt: bool = False   # a reused release was missing and is checked out and installed again
    slot: int = 0           # which replica: 0 for the first (the deploy's own row), 1… for the others
    replicas: list["Deployment"] = field(default_factory=list)  # the other replicas (`replicas: N`)
    generated: dict[str, str] = field(default_factory=dict)     # the data values its `.env` got, for the replicas

    @property
    def every_replica(self) -> list["Deployment"]:
        return [self, *self.replicas]


def move_past(ctx: JobContext, d: Deployment, component: str, number: int, taken: str) -> int:
    """Number `number` is taken on the server: keep it used and go on with the next one."""
    following = ctx.ledger.move_past(ctx.env_key, d.service.name, d.deploy, component, number, taken)
    ctx.note(f"{d.service.name}: {taken}; {component} {number} stays used, {component} {following} is next")
    return following


def give_up(d: Deployment, component: str, first: int, last: int) -> StepFailed:
    return StepFailed(d.service.name, component,
                      f"the names of {component} {first} to {last} are all taken by things this deployer did "
                      f"not make (see the job's notes); they were left untouched: an operator decides what "
                      f"they are, then applies again")


def recorded_host(ctx: JobContext, row, component: str) -> Agent:
    """The agent the ledger recorded for a data instance: it is found there, never by asking who
    else provides the same thing (another server would not have it)."""
    agent = ctx.registry.agents.get(row.host) if row.host else None
    if agent is None:
        raise StepFailed(row.service, component, f"{component} {row.number} is on agent {row.host or '?'}, "
                                                 "which this controller does not know")
    if agent.state != "connected":
        raise StepFailed(row.service, component, f"{component} {row.number} is on agent {agent.id}, which is "
                                                 f"{agent.state}")
    return agent


async def _instance(ctx: JobContext, d: Deployment, component: str, numbers: dict[str, int], new: bool,
                    names_of, guard, create, provider: Agent | None = None) -> tuple[Agent, str, dict]:
    """The provider, password and names of a mysql or redis instance. A new one is recorded
    first (so a failure can drop it), then made by `guard(provider, names)`, which reads
    `create(names, password)` on its standard input and touches nothing if a name is taken;
    a taken number is moved past."""
    name = d.service.name
    owner, number = d.shared.get(component) or (name, numbers.get(component))
    if not new:  # the service's own, or the one of another service it shares: where the ledger has it
        row = ctx.ledger.instance(ctx.env_key, owner, component, number)
        names = row.names if row else names_of(number)
        if provider is None and row is not None:
            provider = recorded_host(ctx, row, component)
        if provider is None:  # no row: an instance older than the ledger's hosts
            try:
                provider = pick_agent(ctx.registry, capability=component)
            except PlacementError as exc:
                raise StepFailed(name, component, str(exc)) from None
        return provider, ctx.ledger.password(ctx.env_key, owner, component, number) or "", names
    try:
        provider = provider or pick_agent(ctx.registry, capability=component)
    except PlacementError as exc:
        raise StepFailed(name, component, str(exc)) from None
    first = number
    for _ in range(TAKEN_NAMES_MAX):
        names = names_of(number)
        password = secrets.token_urlsafe(24)
        ctx.ledger.add_instance(ctx.env_key, name, component, number, host=provider.id, names=names)
        ctx.ledger.save_password(ctx.env_key, name, component, number, password)
        d.created.append((component, number, names, provider))
        taken = await ctx.guarded(provider, guard(provider, names), name, component, stdin=create(names, password),
                                  scope=Scope.data(ctx.env_key, (name, component, number)))
        if not taken:
            return provider, password, names
        d.created.pop()
        number = numbers[component] = move_past(ctx, d, component, number, taken)
    raise give_up(d, component, first, number - 1)


async def mysql(ctx: JobContext, d: Deployment, numbers: dict[str, int], new: bool) -> dict[str, str]:
    """The service's MySQL instance, made if new; the variables its `.env` gets."""
    app, env, name = ctx.spec.app, ctx.spec.environment, d.service.name

    def names_of(n: int) -> dict:
        return {"database": naming.database_name(app, env, name, n), "user": naming.database_user(app, env, name, n),
                "mark": ownership.instance_mark(ctx.ledger.owner, secrets.token_hex(6))}

    provider, password, names = await _instance(
        ctx, d, "mysql", numbers, new, names_of,
        lambda p, names: ownership.mysql_create_guarded(p.mysql_admin(), names["database"], names["user"]),
        lambda names, pw: ops.mysql_create(names["database"], names["user"], pw,
                                           ctx.spec.limits.mysql_connections, names["mark"]))
    database, user = names["database"], names["user"]
    if not new and "mysql" not in d.shared:  # a reused user gets the limit the spec has now
        await ctx.sh(provider, provider.mysql_admin(), name, "mysql limits",
                     stdin=ops.mysql_limit(user, ctx.spec.limits.mysql_connections),
                     scope=Scope.data(ctx.env_key))  # it sets no password: it carries none
    host = provider.settings.get("mysql.host", "127.0.0.1")
    port = provider.settings.get("mysql.port", "3306")
    return {"DATABASE_URL": f"mysql://{user}:{password}@{ops.url_host(host)}:{port}/{database}",
            "DB_HOST": host, "DB_PORT": port, "DB_NAME": database, "DB_USER": user, "DB_PASSWORD": password}


def redis_mode(ctx: JobContext, d: Deployment, numbers: dict[str, int], new: bool) -> str:
    """The mode of the Redis instance a deploy uses: the spec's for a new one, the recorded one's
    for one that exists (one made before modes is a prefix one)."""
    owner, number = d.shared.get("redis") or (d.service.name, numbers.get("redis"))
    if new:
        return d.service.redis.mode
    row = ctx.ledger.instance(ctx.env_key, owner, "redis", number)
    return (row.names.get("mode") if row else "") or "prefix"


async def redis(ctx: JobContext, d: Deployment, numbers: dict[str, int], new: bool) -> dict[str, str]:
    """The service's Redis instance, made if new; the variables its `.env` gets."""
    if redis_mode(ctx, d, numbers, new) == "dedicated":
        return await dedicated_redis(ctx, d, numbers, new)
    app, env, name = ctx.spec.app, ctx.spec.environment, d.service.name

    def names_of(n: int) -> dict:
        return {"user": naming.redis_user(app, env, name, n), "prefix": naming.redis_prefix(app, env, name, n)}

    provider, password, names = await _instance(
        ctx, d, "redis", numbers, new, names_of,
        lambda p, names: ownership.redis_create_guard(p.redis_cli(), names["user"]) + ops.redis_admin(p.redis_cli()),
        lambda names, pw: ops.redis_create_user(names["user"], names["prefix"], pw))
    if not new and "redis" not in d.shared:  # a reused user gets what a new one would (made before pub/sub was allowed, say)
        await ctx.sh(provider, ops.redis_if_user_exists(provider.redis_cli(), names["user"],
                                                        ops.redis_admin(provider.redis_cli())), name,
                     "redis rules", stdin=ops.redis_widen_user(names["user"], names["prefix"]),
                     scope=Scope.data(ctx.env_key))  # it sets no password: it carries none
    host = provider.settings.get("redis.host", "127.0.0.1")
    port = provider.settings.get("redis.port", "6379")
    return {"REDIS_URL": f"redis://{names['user']}:{password}@{ops.url_host(host)}:{port}", "REDIS_HOST": host,
            "REDIS_PORT": port, "REDIS_USER": names["user"], "REDIS_PASSWORD": password, "REDIS_PREFIX": names["prefix"]}


# ---------------------------------------------------------------- dedicated Redis servers

def dedicated_provider(ctx: JobContext, service: str) -> Agent:
    """An agent that runs dedicated Redis servers: granted redis, with `redis.server` (the
    redis-server program) in its configuration."""
    found = sorted((a for a in ctx.registry.agents.values() if runs_dedicated(a)), key=lambda a: a.id)
    if not found:
        raise StepFailed(service, "redis", DEDICATED_MISSING)
    return found[0]


def runs_dedicated(agent: Agent) -> bool:
    return agent.state == "connected" and "redis" in agent.capabilities and bool(agent.settings.get("redis.server"))


DEDICATED_MISSING = ("no connected agent runs dedicated Redis servers (one granted redis, with redis.server set "
                     "in its configuration)")


async def dedicated_redis(ctx: JobContext, d: Deployment, numbers: dict[str, int], new: bool) -> dict[str, str]:
    """A redis-server of the instance's own, on a host that provides Redis: its own port and
    data folder, run as the environment's user within its limits, reached with a password alone."""
    app, env, name = ctx.spec.app, ctx.spec.environment, d.service.name
    owner, number = d.shared.get("redis") or (name, numbers.get("redis"))
    provider = None
    if new:
        provider = dedicated_provider(ctx, name)
        await claim_host(ctx, provider, owner)
    else:
        row = ctx.ledger.instance(ctx.env_key, owner, "redis", number)
        provider = ctx.registry.agents.get(row.host) if row else None
        if provider is None or provider.state != "connected":
            raise StepFailed(name, "redis", f"the agent of {owner}'s dedicated redis {number} "
                                            f"({row.host if row else '?'}) is not connected")
    service_dir = naming.service_dir(provider.services_root, app, env, owner)
    maxmemory = ctx.spec.service(owner).redis.maxmemory  # the owner's setting, for every service using it
    bind = provider.settings.get("redis.host", "127.0.0.1")
    port = await allocate_port(ctx, provider, name, number, holder=f"{owner}.redis") if new else 0

    def names_of(n: int) -> dict:
        return {"mode": "dedicated", "dir": naming.redis_data_dir(service_dir, n), "port": port, "bind": bind,
                "maxmemory": maxmemory}

    try:
        provider, password, names = await _instance(
            ctx, d, "redis", numbers, new, names_of,
            lambda p, names: ownership.absent(names["dir"], "redis data folder")
            + ops.redis_server_make(service_dir, names["dir"], ctx.unix_user),
            lambda names, pw: ops.redis_server_conf(bind, port, pw, names["dir"], maxmemory), provider)
    except BaseException:
        if new:
            ctx.ledger.release_port(provider.id, port)
        raise
    number = d.shared["redis"][1] if "redis" in d.shared else numbers["redis"]
    await ensure_redis_server(ctx, provider, owner, number, names, password, maxmemory,
                              settle="redis" not in d.shared, fresh=new)
    return {"REDIS_URL": f"redis://:{password}@{ops.url_host(names['bind'])}:{names['port']}",
            "REDIS_HOST": names["bind"], "REDIS_PORT": str(names["port"]), "REDIS_USER": "default",
            "REDIS_PASSWORD": password, "REDIS_PREFIX": ""}


async def ensure_redis_server(ctx: JobContext, provider: Agent, owner: str, number: int, names: dict,
                              password: str, maxmemory: int, settle: bool = True, fresh: bool = False) -> None:
    """The dedicated server runs and answers: started (its file written again first: the folder
    is the tenant's) if it does not run; given `maxmemory` if it runs and `settle`."""
    unit, scope = ctx.unit_of_redis(owner), Scope.data(ctx.env_key, (owner, "redis", number))
    service_dir = naming.service_dir(provider.services_root, ctx.spec.app, ctx.spec.environment, owner)
    running = False
    if not fresh:
        listing = await ctx.run_op(provider, ServiceProcesses.operation(unit), owner, "redis processes")
        running = any(p.instance == str(number) and p.alive for p in ServiceProcesses.parse(output_of(listing), unit))
    if running and settle and names.get("maxmemory") != maxmemory:
        await ctx.sh(provider, ops.redis_server_settle(names["bind"], names["port"], maxmemory), owner,
                     "redis maxmemory", stdin=password.encode(), scope=scope, user=ctx.unix_user)
        await _write_redis_conf(ctx, provider, owner, names, password, maxmemory, scope)
    if settle:
        ctx.ledger.set_names(ctx.env_key, owner, "redis", number, maxmemory=maxmemory)
    if running:
        return
    if not fresh:  # its user may be new (a destroy kept the data): the folder becomes its again
        await ctx.sh(provider, ops.redis_server_reown(service_dir, names["dir"], ctx.unix_user), owner, "redis folder")
        await _write_redis_conf(ctx, provider, owner, names, password, maxmemory, scope)
    await ctx.run_op(provider, pb.Operation(service_start=pb.ServiceStartSpec(
        name=unit, instance=str(number), argv=[provider.settings["redis.server"], f"{names['dir']}/redis.conf"],
        cwd=names["dir"], env={"HOME": names["dir"]}, user=ctx.unix_user, limits=ctx.limits(provider),
        **ctx.log_files(service_dir, f"redis-{number}"))), owner, "start redis")
    ready = await ctx.sh(provider, ops.redis_server_ready(names["bind"], names["port"], 30), owner, "redis ready",
                         stdin=password.encode(), scope=scope, check=False, user=ctx.unix_user)
    if ready.result.exit_code != 0:
        own = await ctx.log_tail(provider, service_dir, f"redis-{number}", owner)
        raise StepFailed(owner, "redis", tail_of(ready).strip().splitlines()[-1] if tail_of(ready).strip()
                         else "the dedicated Redis did not answer", own)


async def _write_redis_conf(ctx: JobContext, provider: Agent, owner: str, names: dict, password: str,
                            maxmemory: int, scope: Scope) -> None:
    """The server's file, written again whole (the folder is the tenant's; write_file follows no link)."""
    await ctx.run_op(provider, pb.Operation(write_file=pb.WriteFileSpec(
        path=f"{names['dir']}/redis.conf", mode=0o600, owner=ctx.unix_user,
        content=ops.redis_server_conf(names["bind"], names["port"], password, names["dir"], maxmemory))),
        owner, "redis.conf", scope=scope)


async def stop_redis_server(ctx: JobContext, provider: Agent, owner: str, number: int, step: str) -> None:
    await ctx.run_op(provider, pb.Operation(service_stop=pb.ServiceStopSpec(name=ctx.unit_of_redis(owner),
                                                                            instance=str(number))),
                     owner, step, check=False)


async def drop_owned(ctx: JobContext, provider: Agent, component: str, number: int, names: dict, service: str,
                     step: str, check: bool = False) -> None:
    """Drop a data instance's database and user, or ACL user, only where the server shows
    they are the ones the ledger recorded (mark, password); say what was left. A dedicated
    Redis is stopped and its folder removed: the ledger made it, in a folder only root can name."""
    password = ctx.ledger.password(ctx.env_key, service, component, number) or ""
    if names.get("mode") == "dedicated":
        await stop_redis_server(ctx, provider, service, number, "stop redis")
        await ctx.sh(provider, ops.remove_paths(names["dir"]), service, step, check=check)
        ctx.ledger.release_port(provider.id, names["port"])
        return
    if component == "mysql":
        op = await ctx.sh(provider, provider.mysql_admin(), service, step, check=check, scope=Scope.data(ctx.env_key),
                          stdin=ownership.mysql_drop_owned(names["database"], names.get("mark", ""), names["user"],
                                                           password))
    else:
        op = await ctx.sh(provider, ownership.redis_drop_owned(provider.redis_cli(), names["user"]), service,
                          step, check=check, stdin=ownership.redis_drop_stdin(password), scope=Scope.data(ctx.env_key))
    for line in tail_of(op).splitlines():
        if "left untouched" in line:
            ctx.note(f"{service}: {line.strip()}")


async def purge(ctx: JobContext, provider: Agent, component: str, number: int, names: dict, service: str) -> str:
    """Drop a data instance for good (its keys too, for Redis); the name of what went."""
    if names.get("mode") == "dedicated":
        await drop_owned(ctx, provider, component, number, names, service, "drop redis", check=True)
        return names["dir"]
    if component == "mysql":
        await drop_owned(ctx, provider, "mysql", number, names, service, "drop mysql", check=True)
        # its snapshots go with it
        await ctx.sh(provider, ops.remove_paths(backups.folder(provider, ctx.env_key, service, number)), service,
                     "drop snapshots", check=True, scope=Scope.data(ctx.env_key))
        return names["database"]
    await ctx.sh(provider, ops.redis_purge_script(provider.redis_cli(), names["prefix"]), service, "drop keys",
                 scope=Scope.data(ctx.env_key))
    await drop_owned(ctx, provider, "redis", number, names, service, "drop redis user", check=True)
    return names["prefix"]
