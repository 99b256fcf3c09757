"""Recovery after the controller died mid-job: every deploy it left in flight gets an outcome
from facts, and nothing that already ran is run again.

At start, jobs that were running end `interrupted`, saying which step they were in. A recovery
job per environment (holding its lock, with a folder like any job) then:
1. waits for the operations those jobs had sent: agents re-attach them when they say hello,
   under their own ids (the journal never runs one twice), so a step that was running finishes
   once and is never sent again;
2. settles each deploy left in flight. A deploy whose recorded step was the route switch may have
   switched: the router's nginx file says whether it did, and if it routes to the new instance,
   that instance goes live. Any other deploy is undone as a failed one is: its process stopped,
   its port freed, the database and ACL user it created (never live) dropped, its new instances
   marked failed;
3. converges each service those jobs touched: only the live process keeps running (a previous one
   whose retirement the crash cut short is stopped after a drain), only the live instance holds a
   port, and the live release gets its staged `.env` and `current`.
An environment with work left to settle takes no other order until a recovery job has settled it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import structlog

from protos import deployer_pb2 as pb

from controller.environments.facts import ServiceProcesses
from controller.environments import commands as ops, deploying, naming, routing
from controller.environments.context import JobContext, StepFailed, output_of
from controller.environments.data import Deployment
from controller.environments.spec import DEFAULT_DRAIN
from controller.state.jobs import EnvLock, JobTable, read_events
from controller.state.ledger import Status
from controller.fleet.registry import CONNECTED, DISCONNECTED
from controller.environments.spec import Service

log = structlog.get_logger("controller")
UNSETTLED = ("running", "interrupted")


# ---------------------------------------------------------------- at start, before any agent is back

def interrupt(store: Path, jobs: JobTable, told=lambda row, summary: None) -> list[str]:
    """End every job a dead controller was running as `interrupted`, saying where it was (and to
    `told`); return the environments with work to settle (some may be left from an earlier start)."""
    for row in jobs.running():
        folder = store / "jobs" / row["id"]
        lock = EnvLock(store, row["env_key"])
        ended = _ended(folder)
        if ended is not None:  # it had finished: only the database had not heard
            jobs.record_end(row["id"], ended["state"], ended["t"], ended.get("summary", ""))
            if (lock.owner() or {}).get("job") == row["id"]:
                lock.release()
            continue
        where = _where(folder)
        summary = f"the controller restarted {where or 'while the job ran'}"
        jobs.interrupt(row["id"], summary)
        _close_folder(folder, row, summary)
        if (lock.owner() or {}).get("job") == row["id"]:
            lock.release()
        log.warning("job.interrupted", job_id=row["id"], environment=row["env_key"], summary=summary)
        told(row, summary)
    return jobs.unsettled_environments()


def _ended(folder: Path) -> dict | None:
    """The job's `job.finished` event, if it got that far."""
    try:
        events, _ = read_events(folder)
    except ValueError:
        return None
    return next((e for e in reversed(events) if e["event"] == "job.finished"), None)


def _where(folder: Path) -> str:
    """Where a job was, from its events: during the last step started and not finished, or after
    the last one finished."""
    try:
        events, _ = read_events(folder)
    except ValueError:
        return ""
    running: dict[str, dict] = {}
    deploys: dict[str, int] = {}
    last = None
    for e in events:
        if e["event"] == "step.started":
            running[e["op"]] = e
        elif e["event"] == "step.finished":
            last = running.pop(e["op"], None) or last
        elif e["event"] == "deploy.started":
            deploys[e["service"]] = e["deploy"]
    current, when = (list(running.values())[-1], "during") if running else (last, "after")
    if current is None:
        return ""
    service = current["service"]
    if "/" in service:  # a job of the whole environment (verify, destroy…)
        return f"{when} step {current['step']} of {service}"
    deploy = f" (deploy {deploys[service]})" if service in deploys else ""
    return f"{when} step {current['step']} of service {service}{deploy}"


def _close_folder(folder: Path, row, summary: str) -> None:
    """The job's own folder says how it ended, like any finished job's."""
    if not folder.is_dir():
        return
    events = folder / "events.jsonl"
    torn = events.exists() and events.stat().st_size and not events.read_bytes().endswith(b"\n")
    record = {"t": round(time.time(), 3), "event": "job.finished", "state": "interrupted", "summary": summary}
    with open(events, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(record) + "\n")
    (folder / "job.json").write_text(json.dumps(
        {"id": row["id"], "environment": row["env_key"], "kind": row["kind"], "state": "interrupted",
         "summary": summary}, indent=2) + "\n")


# ---------------------------------------------------------------- the recovery job

async def settle(ctx: JobContext) -> str:
    """Settle what this environment's interrupted jobs left in flight (see the module's doc)."""
    table, env_key = JobTable(ctx.ledger.db), ctx.env_key
    jobs = table.pending(env_key)
    if not jobs:
        return "nothing to settle"
    ctx.note(f"settling what {', '.join(jobs)} left in flight")
    await _reattach(ctx, jobs)
    rows = table.deploys_of(env_key, jobs)
    unsettled = [r for r in rows if r["outcome"] in UNSETTLED]
    # A switch that did not end cleanly (its agent died in it) may have left nginx running
    # something other than its file, even if an earlier recovery settled its deploy and then
    # failed: nginx is reloaded from what the ledger says, whatever else is left to do.
    cut_services = _cut_switches(ctx, jobs)
    cut = [r for r in rows if r["service"] in cut_services]
    await _agents_back(ctx, _needed(ctx, rows, unsettled, routers=bool(cut)))
    lines: list[str] = []
    route_read: str | None = None
    for row in unsettled:
        line, read = await _settle_deploy(ctx, row)
        lines.append(line)
        ctx.note(line)
        if read is not None:
            route_read = read
    if cut and route_read is None:
        route_read = await _read_route(ctx, cut[0]["service"], cut[0]["number"])
    if route_read is not None:
        # Before converging: nginx must route to the live instances before the others stop.
        if await _reaffirm_route(ctx, route_read, force=bool(cut)):
            lines.append("nginx: the route was written again from the ledger")
    rows = table.deploys_of(env_key, jobs)  # as settled
    for service in sorted({r["service"] for r in rows}):
        for line in await _converge(ctx, service, rows):
            lines.append(line)
            ctx.note(line)
    for r in ctx.ledger.instances(env_key, status=Status.BUILDING):
        ctx.ledger.set_status(env_key, r.service, r.component, r.number, Status.FAILED)
        lines.append(f"{r.service}: {r.component} {r.number} was still building: failed")
    table.settled(jobs, ctx.job.id)
    return f"settled {', '.join(jobs)}: " + ("; ".join(lines) if lines else "nothing was left in flight")


async def _reattach(ctx: JobContext, jobs: list[str]) -> None:
    """Wait for the operations the interrupted jobs had sent. They are sent again (same id) when
    their agent says hello, and the agent's journal runs each at most once: none is re-issued."""
    for job_id in jobs:
        folder = ctx.job.folder.parent / job_id
        started = {e["op"]: e for e in read_events(folder)[0] if e["event"] == "step.started"}
        for row in ctx.dispatcher.db.open_operations():
            if not (row.folder or "").startswith(f"{folder}/") or row.agent_id not in ctx.registry.agents:
                continue
            e = started.get(row.id, {})
            service, step = e.get("service", ctx.env_key), e.get("step", row.kind)
            ctx.note(f"{service}: waiting for {step} ({row.id} on {row.agent_id}), "
                                              f"sent by {job_id} before the restart")
            op = await _wait(ctx.dispatcher, row.id)
            result = op.result
            ok = result.outcome == pb.EXITED and result.exit_code == 0
            ctx.job.event("step.finished", service=service, step=step, op=row.id, ok=ok, of_job=job_id,
                             duration_s=round(result.duration_s, 3), outcome=pb.Outcome.Name(result.outcome).lower(),
                             exit_code=result.exit_code)


def _cut_switches(ctx: JobContext, jobs: list[str]) -> set[str]:
    """The services whose route switch, sent by these jobs, did not end cleanly, as recorded (not
    as this recovery saw it: an earlier one that failed may have been the one to hear that its
    router was lost)."""
    cut = set()
    for job_id in jobs:
        for e in read_events(ctx.job.folder.parent / job_id)[0]:
            if e["event"] == "step.started" and e.get("step") == "route":
                row = ctx.dispatcher.db.operation(e["op"])
                if row is None or row.result is None or row.result.outcome != pb.EXITED:
                    cut.add(e["service"])
    return cut


async def _wait(dispatcher, op_id: str):
    return await dispatcher.wait(dispatcher.get(op_id))


def _needed(ctx: JobContext, rows, unsettled, routers: bool = False) -> set[str]:
    """The agents settling needs: hosts of the deploys and of what they made; routers if a route
    switch was cut (`routers`) or a deploy was in its route step."""
    ledger, env_key = ctx.ledger, ctx.env_key
    needed = {r["host"] for r in rows if r["host"]}
    for r in unsettled:
        needed.update(replica["host"] for replica in json.loads(r["replicas"] or "[]"))
        for component in ("mysql", "redis"):
            if r[f"{component}_new"] and r[component] is not None:
                instance = ledger.instance(env_key, r["service"], component, r[component])
                if instance is not None and instance.host:
                    needed.add(instance.host)
    for live in ledger.state(env_key).values():
        if live.code:
            needed.update(live.code.hosts)
    if routers or any(r["step"] == "route" for r in unsettled):
        needed |= {a.id for a in ctx.registry.agents.values() if "nginx" in a.capabilities}
    return needed


async def _agents_back(ctx: JobContext, needed: set[str]) -> None:
    """Agents known before the restart are `disconnected` until they dial in again, and `lost`
    after the controller's --lost-after: wait until each one needed is one or the other."""
    agents = ctx.registry.agents

    def away() -> list[str]:
        return sorted(a for a in needed if a in agents and agents[a].state == DISCONNECTED)

    if away():
        ctx.note(f"waiting for agents {', '.join(away())} to come back")
    while away():
        await asyncio.sleep(0.2)


def _definition(ctx: JobContext, service: str, code: int | None) -> dict:
    """The service as its code instance was deployed (recorded with the instance)."""
    recorded = ctx.ledger.definition(ctx.env_key, service, code)
    if recorded is not None:
        return recorded
    try:
        return ctx.spec.service(service).to_dict()
    except KeyError:
        return {}


async def _settle_deploy(ctx: JobContext, row) -> tuple[str, str | None]:
    """One deploy left in flight: live if nginx routes to it, undone otherwise. Returns a line
    for the operator, and the nginx file if it was read."""
    ledger, env_key, spec = ctx.ledger, ctx.env_key, ctx.spec
    service, number, code, step = row["service"], row["number"], row["code"], row["step"] or "its first step"
    definition = _definition(ctx, service, code)
    host = ctx.registry.agents.get(row["host"] or "")
    # Only name and path matter to going live and to undoing.
    d = Deployment(Service(service, definition.get("path")), host,
                   naming.service_dir(host.services_root, spec.app, spec.environment, service) if host else "",
                   deploy=number, code=code, code_new=bool(row["code_new"]), port=row["port"] or 0,
                   process=row["process"] or "")
    for slot, replica in enumerate(json.loads(row["replicas"] or "[]"), start=1):  # the others, as recorded
        agent = ctx.registry.agents.get(replica["host"])
        d.replicas.append(Deployment(d.service, agent, naming.service_dir(agent.services_root, spec.app,
                                                                          spec.environment, service) if agent else "",
                                     deploy=number, code=code, code_new=d.code_new, port=replica["port"],
                                     process=replica["process"], slot=slot))
    # Its own instances only: one of another service's (`mysql_of`) is that service's to make live.
    numbers = {c: row[c] for c in ("mysql", "redis") if row[c] is not None and not row[f"{c}_of"]}
    text = None
    if row["step"] == "route" and d.service.is_web:
        text = await _read_route(ctx, service, number)
        where = routed_to(text, d.service.path)
        ctx.job.event("route.read", service=service, deploy=number, routed_to=[list(w) for w in where] or None,
                         new=[host.address, d.port] if host else None)
        if host is not None and d.port and (host.address, d.port) in where:
            deploying.go_live(ctx, d, numbers)
            return (f"{service}: deploy {number} is live: its route switch had happened (nginx routes to "
                    f"code {code} on port {d.port})"), text
    for r in d.every_replica:
        if r.host is None or r.host.state != CONNECTED:
            if r.slot and r.host is not None and r.process:  # another replica: stopped there when it is back
                ledger.db.owe_stop(r.host.id, env_key, service, r.process, r.port)
            r.process, r.port = "", 0  # nothing can be stopped there now
    if host is not None and host.state == CONNECTED and not d.code_new:
        d.staged_env = f"{d.service_dir}/releases/{code}/.env.deploy-{number}"
    for component in ("mysql", "redis"):
        if row[f"{component}_new"] and row[component] is not None:
            instance = ledger.instance(env_key, service, component, row[component])
            if instance is None or instance.status != Status.BUILDING:
                continue
            provider = ctx.registry.agents.get(instance.host)
            if provider is not None:
                d.created.append((component, row[component], instance.names, provider))
            else:
                ledger.set_status(env_key, service, component, row[component], Status.FAILED)
    await deploying.undo(ctx, d)
    ledger.finish_deploy(env_key, service, number, "failed",
                         f"interrupted during {step} by a controller restart; undone by {ctx.job.id}")
    undone = ([f"stopped process {d.process}"] if d.process else []) + ([f"freed port {d.port}"] if d.port else [])
    undone += [f"dropped the new {c} {n}" for c, n, _, _ in d.created]
    return (f"{service}: deploy {number} failed (interrupted during {step})"
            + (f"; undone: {', '.join(undone)}" if undone else "; nothing to undo")), text


async def _read_route(ctx: JobContext, service: str, number: int) -> str:
    """The environment's nginx file, as the router has it."""
    try:
        router = routing.router(ctx, service)
    except StepFailed:
        router = None
    if router is not None:
        op = await routing.read_op(ctx, router, routing.nginx_path(ctx, router), service)
        if op.result.outcome == pb.EXITED and op.result.exit_code == 0:
            return op.output.text()   # the file, or MISSING: routed_to() reads either
    raise StepFailed(service, "recover", f"deploy {number} was switching its route when the controller stopped, "
                                          "and no router could say where nginx routes; it stays unsettled, and "
                                          f"the next order on {ctx.env_key} tries again")


def routed_to(conf: str, path: str) -> list[tuple[str, int]]:
    """Where an nginx file written by the deployer sends a service's path: (host, port) of each
    replica (the servers of its upstream, when it has several)."""
    prefix = re.escape(path.rstrip("/"))
    match = re.search(rf"location {prefix}/ \{{\s*proxy_pass http://(\S+?)/;", conf)
    if match is None:
        return []
    target = match.group(1)
    if not target.startswith("auto_"):
        host, _, port = target.rpartition(":")
        return [(host, int(port))] if port.isdigit() else []
    block = re.search(rf"upstream {re.escape(target)} \{{(.*?)\}}", conf, re.S)
    return [(h, int(p)) for h, p in re.findall(r"server (\S+):(\d+) ", block.group(1))] if block else []


async def _converge(ctx: JobContext, service: str, rows) -> list[str]:
    """Only the live process runs; only the live instance holds a port; the live release has its
    `.env` and `current` (steps a crash after the switch may have cut short)."""
    ledger, env_key, spec = ctx.ledger, ctx.env_key, ctx.spec
    live = ledger.state(env_key).get(service)
    code = live.code if live else None
    row = ledger.instance(env_key, service, "code", code.number) if code else None
    keep = {(r.host, r.process) for r in row.replicas} if row else set()   # every replica of the live one
    unit = ctx.unit(service)
    lines = []
    hosts = {r["host"] for r in rows if r["service"] == service and r["host"]} | (set(code.hosts) if code else set())
    for host_id in sorted(hosts):
        host = ctx.registry.agents.get(host_id)
        if host is None or host.state != CONNECTED:
            state = host.state if host else "unknown"
            lines.append(f"{service}: agent {host_id} is {state}: its processes were not checked")
            continue
        listing = await ctx.run_op(host, ServiceProcesses.operation(unit),
                                      service, "list processes", check=False)
        for process in ServiceProcesses.parse(output_of(listing), unit):
            if (host_id, process.instance) in keep:
                continue
            if process.alive:  # it may have served until the switch: let its requests end
                await _drain(ctx, host, service, process.instance)
            stop = pb.ServiceStopSpec(name=unit, instance=process.instance)
            await ctx.run_op(host, pb.Operation(service_stop=stop), service, "stop", check=False)
            lines.append(f"{service}: stopped {unit}@{process.instance} on {host_id}, "
                         "which the ledger does not hold live")
    held = {(r.host, r.port) for r in row.replicas} if row else set()
    for port_host, port in ledger.ports_of(env_key, service):
        if not code or (port_host, port) not in held:
            ledger.release_port(port_host, port)
            lines.append(f"{service}: released port {port} on {port_host}")
    last = [r for r in rows if r["service"] == service and r["outcome"] == "succeeded"]
    host = ctx.registry.agents.get(code.host) if code else None
    if last and code and host is not None and host.state == CONNECTED and last[-1]["code"] == code.number:
        service_dir = naming.service_dir(host.services_root, spec.app, spec.environment, service)
        release = f"{service_dir}/releases/{code.number}"
        staged = f"{release}/.env.deploy-{last[-1]['number']}"
        # As root in a sealed release, as its user in one still the user's (see ops.in_release).
        await ctx.sh(host, ops.in_release(release, ctx.unix_user, ops.settle_staged_env(staged, release)), service,
                     ".env", check=False)
        await ctx.sh(host, ops.current_script(service_dir, release), service, "current", check=False)
    return lines


async def _drain(ctx: JobContext, host, service: str, instance: str) -> None:
    """As after a switch: wait until nothing is connected to a web instance's port (at most the
    service's drain), before it is stopped."""
    number = int(instance.split("-", 1)[0]) if instance.split("-", 1)[0].isdigit() else 0
    row = ctx.ledger.instance(ctx.env_key, service, "code", number) if number else None
    if row is None or not row.port:
        return  # a daemon, or an instance the ledger never gave a port: stopped at once
    try:
        longest = ctx.spec.service(service).drain
    except KeyError:
        longest = DEFAULT_DRAIN
    await ctx.sh(host, ops.drain_script(row.port, longest), service, "drain", check=False, timeout=longest + 30)


async def _reaffirm_route(ctx: JobContext, read: str, force: bool) -> bool:
    """Write the route again if the file is not what the ledger now says (or its switch was cut
    in the middle); True if it was written."""
    fresh = routing.as_deployed(ctx)
    router = routing.router(fresh, ctx.env_key)
    if not force and routing.nginx_content(fresh, router, probe=ops.probe_of(read)).decode() == read:
        return False
    await routing.switch_route(fresh, ctx.env_key)
    return True
