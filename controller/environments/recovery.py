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
import shlex
import time
from pathlib import Path

import structlog

from protos import deployer_pb2 as pb

from controller.environments.facts import NginxFile, ServiceProcesses
from controller.environments import naming
from controller.state.db import Database
from controller.state.jobs import EnvLock, read_events
from controller.state.knowledge import Scope
from controller.environments.procedures import DRAIN_S, Deployment, Runner, StepFailed, _current_script, _output
from controller.fleet.registry import CONNECTED, DISCONNECTED
from controller.environments.spec import Service

log = structlog.get_logger("controller")
UNSETTLED = ("running", "interrupted")


# ---------------------------------------------------------------- at start, before any agent is back

def interrupt(store: Path, db: Database) -> list[str]:
    """End every job a dead controller was running as `interrupted`, saying where it was; return
    the environments with work to settle (some may be left from an earlier start)."""
    now = time.time()
    for row in db.conn.execute("SELECT id, env_key, kind FROM jobs WHERE state='running'").fetchall():
        folder = store / "jobs" / row["id"]
        lock = EnvLock(store, row["env_key"])
        ended = _ended(folder)
        if ended is not None:  # it had finished: only the database had not heard
            db.conn.execute("UPDATE jobs SET state=?, finished=?, summary=?, recovered_by='' WHERE id=?",
                            (ended["state"], ended["t"], ended.get("summary", ""), row["id"]))
            if (lock.owner() or {}).get("job") == row["id"]:
                lock.release()
            continue
        where = _where(folder)
        summary = f"the controller restarted {where or 'while the job ran'}"
        db.conn.execute("UPDATE jobs SET state='interrupted', finished=?, summary=?, recovered_by=NULL WHERE id=?",
                        (now, summary, row["id"]))
        db.conn.execute("UPDATE deploys SET outcome='interrupted', reason=? WHERE job_id=? AND outcome='running'",
                        (f"{summary}; not settled yet", row["id"]))
        _close_folder(folder, row, summary)
        if (lock.owner() or {}).get("job") == row["id"]:
            lock.release()
        log.warning("job.interrupted", job_id=row["id"], environment=row["env_key"], summary=summary)
    return [r[0] for r in db.conn.execute(
        "SELECT DISTINCT env_key FROM jobs WHERE state='interrupted' AND recovered_by IS NULL ORDER BY env_key")]


def pending(conn, env_key: str) -> list[str]:
    """Interrupted jobs of this environment whose work is not settled yet."""
    return [r[0] for r in conn.execute(
        "SELECT id FROM jobs WHERE env_key=? AND state='interrupted' AND recovered_by IS NULL ORDER BY created",
        (env_key,))]


def settle_without_spec(conn, env_key: str) -> None:
    """An environment whose spec is gone (a destroy was cut short) has no route or process to
    check: what it left in flight simply failed."""
    jobs = pending(conn, env_key)
    for job_id in jobs:
        conn.execute("UPDATE deploys SET outcome='failed', reason='interrupted; the environment has no spec' "
                     "WHERE job_id=? AND outcome IN ('running', 'interrupted')", (job_id,))
        conn.execute("UPDATE jobs SET recovered_by='-' WHERE id=?", (job_id,))
    conn.execute("UPDATE instances SET status='failed' WHERE env_key=? AND status='building'", (env_key,))


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

async def settle(runner: Runner) -> str:
    """Settle what this environment's interrupted jobs left in flight (see the module's doc)."""
    conn, env_key = runner.ledger.conn, runner.env_key
    jobs = pending(conn, env_key)
    if not jobs:
        return "nothing to settle"
    runner.job.event("job.note", note=f"settling what {', '.join(jobs)} left in flight")
    await _reattach(runner, jobs)
    marks = ",".join("?" * len(jobs))
    rows = conn.execute(f"SELECT * FROM deploys WHERE env_key=? AND job_id IN ({marks}) ORDER BY service, number",
                        (env_key, *jobs)).fetchall()
    unsettled = [r for r in rows if r["outcome"] in UNSETTLED]
    # A switch that did not end cleanly (its agent died in it) may have left nginx running
    # something other than its file, even if an earlier recovery settled its deploy and then
    # failed: nginx is reloaded from what the ledger says, whatever else is left to do.
    cut_services = _cut_switches(runner, jobs)
    cut = [r for r in rows if r["service"] in cut_services]
    await _agents_back(runner, _needed(runner, rows, unsettled, routers=bool(cut)))
    lines: list[str] = []
    route_read: str | None = None
    for row in unsettled:
        line, read = await _settle_deploy(runner, row)
        lines.append(line)
        runner.job.event("job.note", note=line)
        if read is not None:
            route_read = read
    if cut and route_read is None:
        route_read = await _read_route(runner, cut[0]["service"], cut[0]["number"])
    if route_read is not None:
        # Before converging: nginx must route to the live instances before the others stop.
        if await _reaffirm_route(runner, route_read, force=bool(cut)):
            lines.append("nginx: the route was written again from the ledger")
    rows = conn.execute(f"SELECT * FROM deploys WHERE env_key=? AND job_id IN ({marks}) ORDER BY service, number",
                        (env_key, *jobs)).fetchall()  # as settled
    for service in sorted({r["service"] for r in rows}):
        for line in await _converge(runner, service, rows):
            lines.append(line)
            runner.job.event("job.note", note=line)
    for r in conn.execute("SELECT service, component, number FROM instances WHERE env_key=? AND status='building'",
                          (env_key,)).fetchall():
        runner.ledger.set_status(env_key, r["service"], r["component"], r["number"], "failed")
        lines.append(f"{r['service']}: {r['component']} {r['number']} was still building: failed")
    for job_id in jobs:
        conn.execute("UPDATE jobs SET recovered_by=?, summary=summary || ? WHERE id=?",
                     (runner.job.id, f"; settled by {runner.job.id}", job_id))
    return f"settled {', '.join(jobs)}: " + ("; ".join(lines) if lines else "nothing was left in flight")


async def _reattach(runner: Runner, jobs: list[str]) -> None:
    """Wait for the operations the interrupted jobs had sent. They are sent again (same id) when
    their agent says hello, and the agent's journal runs each at most once: none is re-issued."""
    for job_id in jobs:
        folder = runner.job.folder.parent / job_id
        started = {e["op"]: e for e in read_events(folder)[0] if e["event"] == "step.started"}
        for row in runner.dispatcher.db.open_operations():
            if not (row.folder or "").startswith(f"{folder}/") or row.agent_id not in runner.registry.agents:
                continue
            e = started.get(row.id, {})
            service, step = e.get("service", runner.env_key), e.get("step", row.kind)
            runner.job.event("job.note", note=f"{service}: waiting for {step} ({row.id} on {row.agent_id}), "
                                              f"sent by {job_id} before the restart")
            op = await _wait(runner.dispatcher, row.id)
            result = op.result
            ok = result.outcome == pb.EXITED and result.exit_code == 0
            runner.job.event("step.finished", service=service, step=step, op=row.id, ok=ok, of_job=job_id,
                             duration_s=round(result.duration_s, 3), outcome=pb.Outcome.Name(result.outcome).lower(),
                             exit_code=result.exit_code)


def _cut_switches(runner: Runner, jobs: list[str]) -> set[str]:
    """The services whose route switch, sent by these jobs, did not end cleanly, as recorded (not
    as this recovery saw it: an earlier one that failed may have been the one to hear that its
    router was lost)."""
    cut = set()
    for job_id in jobs:
        for e in read_events(runner.job.folder.parent / job_id)[0]:
            if e["event"] == "step.started" and e.get("step") == "route":
                row = runner.dispatcher.db.operation(e["op"])
                if row is None or row.result is None or row.result.outcome != pb.EXITED:
                    cut.add(e["service"])
    return cut


async def _wait(dispatcher, op_id: str):
    return await dispatcher.wait(dispatcher.get(op_id))


def _needed(runner: Runner, rows, unsettled, routers: bool = False) -> set[str]:
    """The agents settling needs: hosts of the deploys and of what they made; routers if a route
    switch was cut (`routers`) or a deploy was in its route step."""
    ledger, env_key = runner.ledger, runner.env_key
    needed = {r["host"] for r in rows if r["host"]}
    for r in unsettled:
        for component in ("mysql", "redis"):
            if r[f"{component}_new"] and r[component] is not None:
                instance = ledger.instance(env_key, r["service"], component, r[component])
                if instance is not None and instance["host"]:
                    needed.add(instance["host"])
    for live in ledger.state(env_key).values():
        if live.code:
            needed.add(live.code.host)
    if routers or any(r["step"] == "route" for r in unsettled):
        needed |= {a.id for a in runner.registry.agents.values() if "nginx" in a.capabilities}
    return needed


async def _agents_back(runner: Runner, needed: set[str]) -> None:
    """Agents known before the restart are `disconnected` until they dial in again, and `lost`
    after the controller's --lost-after: wait until each one needed is one or the other."""
    agents = runner.registry.agents

    def away() -> list[str]:
        return sorted(a for a in needed if a in agents and agents[a].state == DISCONNECTED)

    if away():
        runner.job.event("job.note", note=f"waiting for agents {', '.join(away())} to come back")
    while away():
        await asyncio.sleep(0.2)


def _definition(runner: Runner, service: str, code: int | None) -> dict:
    """The service as its code instance was deployed (recorded with the instance)."""
    recorded = runner.ledger.definition(runner.env_key, service, code)
    if recorded is not None:
        return recorded
    try:
        return runner.spec.service(service).to_dict()
    except KeyError:
        return {}


async def _settle_deploy(runner: Runner, row) -> tuple[str, str | None]:
    """One deploy left in flight: live if nginx routes to it, undone otherwise. Returns a line
    for the operator, and the nginx file if it was read."""
    ledger, env_key, spec = runner.ledger, runner.env_key, runner.spec
    service, number, code, step = row["service"], row["number"], row["code"], row["step"] or "its first step"
    definition = _definition(runner, service, code)
    host = runner.registry.agents.get(row["host"] or "")
    # Only name and path matter to going live and to undoing.
    d = Deployment(Service(service, definition.get("path")), host,
                   naming.service_dir(host.services_root, spec.app, spec.environment, service) if host else "",
                   deploy=number, code=code, code_new=bool(row["code_new"]), port=row["port"] or 0,
                   process=row["process"] or "")
    numbers = {c: row[c] for c in ("mysql", "redis") if row[c] is not None}
    text = None
    if row["step"] == "route" and d.service.is_web:
        text = await _read_route(runner, service, number)
        where = routed_to(text, d.service.path)
        runner.job.event("route.read", service=service, deploy=number, routed_to=list(where) if where else None,
                         new=[host.address, d.port] if host else None)
        if host is not None and d.port and where == (host.address, d.port):
            runner._go_live(d, numbers)
            return (f"{service}: deploy {number} is live: its route switch had happened (nginx routes to "
                    f"code {code} on port {d.port})"), text
    if host is None or host.state != CONNECTED:
        d.process, d.port = "", 0  # nothing can be stopped there now; verify will show what is left
    elif not d.code_new:
        d.staged_env = f"{d.service_dir}/releases/{code}/.env.deploy-{number}"
    for component in ("mysql", "redis"):
        if row[f"{component}_new"] and row[component] is not None:
            instance = ledger.instance(env_key, service, component, row[component])
            if instance is None or instance["status"] != "building":
                continue
            provider = runner.registry.agents.get(instance["host"] or "")
            if provider is not None:
                d.created.append((component, row[component], json.loads(instance["names"]), provider))
            else:
                ledger.set_status(env_key, service, component, row[component], "failed")
    await runner._undo(d)
    ledger.finish_deploy(env_key, service, number, "failed",
                         f"interrupted during {step} by a controller restart; undone by {runner.job.id}")
    undone = ([f"stopped process {d.process}"] if d.process else []) + ([f"freed port {d.port}"] if d.port else [])
    undone += [f"dropped the new {c} {n}" for c, n, _, _ in d.created]
    return (f"{service}: deploy {number} failed (interrupted during {step})"
            + (f"; undone: {', '.join(undone)}" if undone else "; nothing to undo")), text


async def _read_route(runner: Runner, service: str, number: int) -> str:
    """The environment's nginx file, as the router has it."""
    try:
        router = runner.router(service)
    except StepFailed:
        router = None
    if router is not None:
        op = await runner.sh(router, NginxFile.command(runner.nginx_path(router)),
                             service, "read route", check=False, scope=Scope.route(runner.env_key))
        if op.result.outcome == pb.EXITED and op.result.exit_code == 0:
            return op.output.text()   # the file, or MISSING: routed_to() reads either
    raise StepFailed(service, "recover", f"deploy {number} was switching its route when the controller stopped, "
                                          "and no router could say where nginx routes; it stays unsettled, and "
                                          f"the next order on {runner.env_key} tries again")


def routed_to(conf: str, path: str) -> tuple[str, int] | None:
    """Where an nginx file written by the deployer sends a service's path: (host, port)."""
    prefix = re.escape(path.rstrip("/"))
    match = re.search(rf"location {prefix}/ \{{\s*proxy_pass http://(\S+):(\d+)/;", conf)
    return (match.group(1), int(match.group(2))) if match else None


async def _converge(runner: Runner, service: str, rows) -> list[str]:
    """Only the live process runs; only the live instance holds a port; the live release has its
    `.env` and `current` (steps a crash after the switch may have cut short)."""
    ledger, env_key, spec = runner.ledger, runner.env_key, runner.spec
    live = ledger.state(env_key).get(service)
    code = live.code if live else None
    row = ledger.instance(env_key, service, "code", code.number) if code else None
    keep = (code.host, json.loads(row["names"]).get("process", "")) if row else None
    unit = naming.unit_base(spec.app, spec.environment, service)
    lines = []
    drained = False
    hosts = {r["host"] for r in rows if r["service"] == service and r["host"]} | ({code.host} if code else set())
    for host_id in sorted(hosts):
        host = runner.registry.agents.get(host_id)
        if host is None or host.state != CONNECTED:
            state = host.state if host else "unknown"
            lines.append(f"{service}: agent {host_id} is {state}: its processes were not checked")
            continue
        listing = await runner.run_op(host, ServiceProcesses.operation(unit),
                                      service, "list processes", check=False)
        for process in ServiceProcesses.parse(_output(listing), unit):
            if (host_id, process.instance) == keep:
                continue
            if process.alive and not drained:
                await asyncio.sleep(DRAIN_S)  # it may have served until the switch: let its requests end
                drained = True
            stop = pb.ServiceStopSpec(name=unit, instance=process.instance)
            await runner.run_op(host, pb.Operation(service_stop=stop), service, "stop", check=False)
            lines.append(f"{service}: stopped {unit}@{process.instance} on {host_id}, "
                         "which the ledger does not hold live")
    ports = ledger.conn.execute("SELECT host, port FROM ports WHERE env_key=? AND service=?", (env_key, service))
    for r in ports.fetchall():
        if not code or (r["host"], r["port"]) != (code.host, code.port):
            ledger.release_port(r["host"], r["port"])
            lines.append(f"{service}: released port {r['port']} on {r['host']}")
    last = [r for r in rows if r["service"] == service and r["outcome"] == "succeeded"]
    host = runner.registry.agents.get(code.host) if code else None
    if last and code and host is not None and host.state == CONNECTED and last[-1]["code"] == code.number:
        service_dir = naming.service_dir(host.services_root, spec.app, spec.environment, service)
        release = f"{service_dir}/releases/{code.number}"
        q = shlex.quote
        staged = f"{release}/.env.deploy-{last[-1]['number']}"
        # The release is the tenant's: its .env is moved as its user, and with -T, so that a
        # `.env` it made a link to a folder is replaced, never moved into (as procedures do).
        await runner.sh(host, f"if [ -f {q(staged)} ]; then mv -fT {q(staged)} {q(release)}/.env; fi; "
                              f"rm -f {q(release)}/.env.deploy-*", service, ".env", check=False,
                        user=runner.unix_user)
        await runner.sh(host, _current_script(service_dir, release), service, "current", check=False)
    return lines


async def _reaffirm_route(runner: Runner, read: str, force: bool) -> bool:
    """Write the route again if the file is not what the ledger now says (or its switch was cut
    in the middle); True if it was written."""
    fresh = runner.as_deployed()
    router = fresh.router(runner.env_key)
    if not force and fresh.nginx_content(router).decode() == read:
        return False
    await fresh.switch_route(runner.env_key)
    return True
