"""Data instances: a service's MySQL database and user, its Redis ACL user and key prefix.

A new instance is recorded in the ledger first (so a failure can drop it), then made by a guarded
create that touches nothing if a name is taken (a taken number is moved past); it is dropped only
where the server shows it is the one the ledger recorded (see ownership.py)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from controller.environments import naming, commands as ops, ownership
from controller.environments.context import JobContext, PlacementError, StepFailed, pick_agent, tail_of
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


async def _instance(ctx: JobContext, d: Deployment, component: str, numbers: dict[str, int], new: bool,
                    names_of, guard, create) -> tuple[Agent, str, dict]:
    """The provider, password and names of a mysql or redis instance. A new one is recorded
    first (so a failure can drop it), then made by `guard(provider, names)`, which reads
    `create(names, password)` on its standard input and touches nothing if a name is taken;
    a taken number is moved past."""
    name = d.service.name
    try:
        provider = pick_agent(ctx.registry, capability=component)
    except PlacementError as exc:
        raise StepFailed(name, component, str(exc)) from None
    number = numbers[component]
    if not new:
        row = ctx.ledger.instance(ctx.env_key, name, component, number)
        names = row.names if row else names_of(number)
        return provider, ctx.ledger.password(ctx.env_key, name, component, number) or "", names
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
    if not new:  # a reused user gets the limit the spec has now
        await ctx.sh(provider, provider.mysql_admin(), name, "mysql limits",
                     stdin=ops.mysql_limit(user, ctx.spec.limits.mysql_connections),
                     scope=Scope.data(ctx.env_key))  # it sets no password: it carries none
    host = provider.settings.get("mysql.host", "127.0.0.1")
    port = provider.settings.get("mysql.port", "3306")
    return {"DATABASE_URL": f"mysql://{user}:{password}@{ops.url_host(host)}:{port}/{database}",
            "DB_HOST": host, "DB_PORT": port, "DB_NAME": database, "DB_USER": user, "DB_PASSWORD": password}


async def redis(ctx: JobContext, d: Deployment, numbers: dict[str, int], new: bool) -> dict[str, str]:
    """The service's Redis ACL user and key prefix, made if new; the variables its `.env` gets."""
    app, env, name = ctx.spec.app, ctx.spec.environment, d.service.name

    def names_of(n: int) -> dict:
        return {"user": naming.redis_user(app, env, name, n), "prefix": naming.redis_prefix(app, env, name, n)}

    provider, password, names = await _instance(
        ctx, d, "redis", numbers, new, names_of,
        lambda p, names: ownership.redis_create_guard(p.redis_cli(), names["user"]) + ops.redis_admin(p.redis_cli()),
        lambda names, pw: ops.redis_create_user(names["user"], names["prefix"], pw))
    if not new:  # a reused user gets what a new one would (made before pub/sub was allowed, say)
        await ctx.sh(provider, ops.redis_if_user_exists(provider.redis_cli(), names["user"],
                                                        ops.redis_admin(provider.redis_cli())), name,
                     "redis rules", stdin=ops.redis_widen_user(names["user"], names["prefix"]),
                     scope=Scope.data(ctx.env_key))  # it sets no password: it carries none
    host = provider.settings.get("redis.host", "127.0.0.1")
    port = provider.settings.get("redis.port", "6379")
    return {"REDIS_URL": f"redis://{names['user']}:{password}@{ops.url_host(host)}:{port}", "REDIS_HOST": host,
            "REDIS_PORT": port, "REDIS_USER": names["user"], "REDIS_PASSWORD": password, "REDIS_PREFIX": names["prefix"]}


async def drop_owned(ctx: JobContext, provider: Agent, component: str, number: int, names: dict, service: str,
                     step: str, check: bool = False) -> None:
    """Drop a data instance's database and user, or ACL user, only where the server shows
    they are the ones the ledger recorded (mark, password); say what was left."""
    password = ctx.ledger.password(ctx.env_key, service, component, number) or ""
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
    if component == "mysql":
        await drop_owned(ctx, provider, "mysql", number, names, service, "drop mysql", check=True)
        return names["database"]
    await ctx.sh(provider, ops.redis_purge_script(provider.redis_cli(), names["prefix"]), service, "drop keys",
                 scope=Scope.data(ctx.env_key))
    await drop_owned(ctx, provider, "redis", number, names, service, "drop redis user", check=True)
    return names["prefix"]
