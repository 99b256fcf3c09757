"""Snapshots of MySQL instances: taken before a migrate runs against a live database (and on
demand), kept on the data host in a root-only folder per instance, and restored into a **new**
instance that every service using the old one is switched to (a renew from a snapshot).

A snapshot is a `mariadb-dump --single-transaction` of the tables and their rows, compressed;
its content never leaves the data host (no job folder, no output holds it). Restoring loads it as
the new database's own user, so a dump can do no more there than that user may.
"""

from __future__ import annotations

import time

from controller.environments import commands as ops, naming
from controller.environments.context import JobContext, StepFailed, output_of
from controller.fleet.registry import Agent
from controller.state.knowledge import Scope

KEEP = 5                                   # per instance: the oldest go first
DEFAULT_FOLDER = "/var/backups/deployer"   # the data host's `mysql.backups` setting


def new_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def folder(provider: Agent, env_key: str, owner: str, number: int) -> str:
    root = provider.settings.get("mysql.backups", DEFAULT_FOLDER)
    app, env = env_key.split("/", 1)
    return f"{root}/{naming.database_name(app, env, owner, number)}"


def parse(output: str, number: int) -> list[dict]:
    """The snapshots `mysql_snapshots` printed: id, bytes, taken (unix time), newest first."""
    out = []
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 and ops.SNAPSHOT_ID.match(parts[0]) and parts[1].isdigit() and parts[2].isdigit():
            out.append({"id": parts[0], "bytes": int(parts[1]), "taken": int(parts[2]), "mysql": number})
    return sorted(out, key=lambda s: s["id"], reverse=True)


def provider_of(ctx: JobContext, owner: str, number: int, service: str) -> tuple[Agent, dict]:
    """The host the ledger recorded for the instance, and its names."""
    row = ctx.ledger.instance(ctx.env_key, owner, "mysql", number)
    agent = ctx.registry.agents.get(row.host) if row else None
    if row is None or agent is None or agent.state != "connected":
        raise StepFailed(service, "snapshot", f"the data host of {owner}'s mysql {number} "
                                              f"({row.host if row else '?'}) is not connected")
    return agent, row.names


async def snapshot(ctx: JobContext, owner: str, number: int, service: str, why: str) -> str:
    """Take one; its ID."""
    provider, names = provider_of(ctx, owner, number, service)
    snapshot_id = new_id()
    dump = provider.settings.get("mysql.dump", "mariadb-dump")
    op = await ctx.sh(provider, ops.mysql_snapshot(dump, folder(provider, ctx.env_key, owner, number), names["database"],
                                                   snapshot_id, KEEP), service, "snapshot",
                      scope=Scope.data(ctx.env_key), timeout=3600)
    size = output_of(op).strip().splitlines()[-1:] or ["?"]
    ctx.note(f"{service}: snapshot {snapshot_id} of {owner}'s mysql {number} ({size[0]} bytes compressed) {why}")
    ctx.job.event("snapshot.taken", service=owner, mysql=number, snapshot=snapshot_id, bytes=size[0])
    return snapshot_id


async def load(ctx: JobContext, provider: Agent, source: tuple[str, int], snapshot_id: str, target: int,
               names: dict, password: str, service: str) -> None:
    """Fill the new instance `target` (`names`, on `provider`) from the snapshot of `source`
    (owner, number)."""
    path = f"{folder(provider, ctx.env_key, *source)}/{snapshot_id}.sql.gz"
    await ctx.sh(provider, ops.mysql_load_snapshot(path, provider.settings.get("mysql.host", "127.0.0.1"),
                                                   provider.settings.get("mysql.port", "3306"), names["database"],
                                                   names["user"]), service, "restore",
                 stdin=password.encode(), scope=Scope.data(ctx.env_key, (source[0], "mysql", target)), timeout=3600)
    ctx.note(f"{service}: the new database {names['database']} holds snapshot {snapshot_id} of "
             f"{source[0]}'s mysql {source[1]}")
