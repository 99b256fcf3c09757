"""Taking things down: a service's processes and folders (`remove_code`), and a whole
environment (`destroy`), touching only what the ledger and the servers' marks say is ours."""

from __future__ import annotations

from protos import deployer_pb2 as pb

from controller.environments import commands as ops, data, naming, ownership, routing
from controller.environments.context import JobContext, StepFailed, output_of
from controller.environments.facts import ServiceProcesses
from controller.fleet.registry import CONNECTED
from controller.state.jobs import Specs
from controller.state.ledger import RAN, Status


async def remove_code(ctx: JobContext, service: str) -> None:
    """Stop every process of a service and remove its folder; mark its code instances removed.
    Its data instances are left alone: a dedicated Redis is stopped, its data folder kept."""
    spec, ledger, env_key = ctx.spec, ctx.ledger, ctx.env_key
    rows = [r for r in ledger.instances(env_key, service) if r.component == "code"]
    ran = {r.host for r in rows if r.status in RAN}  # made before folders had marks
    unit = ctx.unit(service)
    for host_id in sorted({host for r in rows for host in r.hosts}):  # every replica's host
        host = ctx.registry.agents.get(host_id)
        if host is None or host.state != CONNECTED:
            raise StepFailed(service, "remove", f"agent {host_id} is not connected: nothing was removed there")
        listing = await ctx.run_op(host, ServiceProcesses.operation(unit), service, "list processes", check=False)
        for process in ServiceProcesses.parse(output_of(listing), unit):
            await ctx.run_op(host, pb.Operation(service_stop=pb.ServiceStopSpec(
                name=unit, instance=process.instance)), service, "stop", check=False)
        folder = naming.service_dir(host.services_root, spec.app, spec.environment, service)
        op = await ctx.sh(host, ownership.if_folder_ours(folder, ledger.owner, ops.remove_all_but_data(),
                                                         legacy=host_id in ran), service, "remove folder")
        for line in output_of(op).splitlines():
            ctx.note(f"{service}: {line}")
    for r in rows:
        ledger.set_status(env_key, service, "code", r.number, Status.REMOVED)
        for replica in r.replicas:
            if replica.port:
                ledger.release_port(replica.host, replica.port)
    data_hosts = set()
    for r in ledger.instances(env_key, service):
        if r.names.get("mode") == "dedicated" and r.status not in (Status.REMOVED, Status.TAKEN):
            host = ctx.registry.agents.get(r.host)
            if host is None or host.state != CONNECTED:
                raise StepFailed(service, "remove", f"agent {r.host} of its dedicated redis {r.number} is not "
                                                    "connected: the server was not stopped")
            await data.stop_redis_server(ctx, host, service, r.number, "stop redis")
            data_hosts.add(host.id)
    for host_id in sorted(data_hosts - {r.host for r in rows if r.host}):  # a host that holds only its data
        host = ctx.registry.agents[host_id]
        folder = naming.service_dir(host.services_root, spec.app, spec.environment, service)
        await ctx.sh(host, ownership.if_folder_ours(folder, ledger.owner, ops.remove_all_but_data()), service,
                     "remove folder")


async def destroy(ctx: JobContext, purge_data: bool) -> str:
    """Stop every process of the environment, remove its folders, its Unix user and its route;
    drop its databases, ACL users and keys only with `purge_data`. The ledger keeps the history;
    numbers stay used."""
    ledger, env_key = ctx.ledger, ctx.env_key
    rows = ledger.instances(env_key)
    # Made before users and route files had marks: where the ledger shows something ran.
    ran = {r.host for r in rows if r.component == "code" and r.status in RAN}
    routed = bool(ledger.state(env_key))
    for service in sorted({r.service for r in rows}):
        await remove_code(ctx, service)
    for host_id in sorted({host for r in rows if r.component == "code" for host in r.hosts} |
                          {r.host for r in rows if r.names.get("mode") == "dedicated" and r.host}):
        host = ctx.registry.agents[host_id]  # connected: remove_code has just used it
        op = await ctx.sh(host, ownership.if_unix_user_ours(
            ctx.unix_user, ledger.owner, ops.remove_unix_user(ctx.unix_user, host.services_root),
            legacy=host_id in ran), env_key, "remove user")
        for line in output_of(op).splitlines():
            ctx.note(f"{host_id}: {line}")
    await routing.remove_route(ctx, routed)
    purged = []
    if purge_data:
        for r in ledger.instances(env_key):
            provider = ctx.registry.agents.get(r.host)
            # A taken number's names belong to someone else: never ours to purge.
            if r.component not in ("mysql", "redis") or provider is None or r.status == Status.TAKEN:
                continue
            purged.append(await data.purge(ctx, provider, r.component, r.number, r.names, r.service))
            if r.names.get("mode") == "dedicated":  # the folder that kept its data goes once it is empty
                folder = naming.service_dir(provider.services_root, ctx.spec.app, ctx.spec.environment, r.service)
                await ctx.sh(provider, ownership.if_folder_ours(folder, ledger.owner, ops.remove_if_only_data()),
                             r.service, "remove folder", check=False)
        for r in ledger.instances(env_key):
            ledger.set_status(env_key, r.service, r.component, r.number, Status.REMOVED)
    Specs(ledger.db).forget(env_key)
    kept = "" if purge_data else "; databases and Redis keys are kept (--purge-data removes them)"
    return f"destroyed {env_key}" + (f", purged {len(purged)} data instance(s)" if purged else "") + kept
