"""The operator service: what `deployctl` calls, over the controller's Unix socket or its TCP
operator listener (the door has authenticated the caller before any method here runs).

One module, though long: it is the gRPC surface, one thin method per call of deployctl (each
hands over to the fleet or the environments), and reads best as the list of what operators can do."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time

import grpc
import structlog

from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc

from common import errors

import json

from controller.fleet import access
from controller.environments import backups, commands, hosts, naming, placement, spec as spec_mod
from controller.environments.facts import ServiceProcesses
from controller.fleet import operations
from controller.fleet.door import OPERATOR_CALLER
from controller.fleet.dispatcher import Dispatcher, UnknownOperation
from controller.environments.orders import Check, Environments, Order, Rollback, order_of
from controller.state.jobs import JobTable, read_events
from controller.environments.spec import Limits, spec_from_dict
from controller.state.knowledge import Scope
from controller.state.ledger import Status, diagram
from controller.fleet.gateway import KNOWN_ROLES, valid_agent_id
from common.provides import check_provides, url_host, valid_host
from controller.fleet.pki import Enrolment
from controller.fleet.registry import CONNECTED, LOST, Registry

log = structlog.get_logger("controller")
_STATES = {CONNECTED: pb.AGENT_CONNECTED, LOST: pb.AGENT_LOST}
FOLLOW_READ_BYTES = 1 << 20


def resolve_targets(registry: Registry, target: pb.Target) -> tuple[list[str], list[pb.SubmittedOperation]]:
    """Which connected agents a target names, and one error line for each that cannot be used."""
    chosen: list[str] = []
    errors: list[pb.SubmittedOperation] = []
    agents = registry.agents
    for agent_id in target.agent_ids:
        agent = agents.get(agent_id)
        if agent is None:
            errors.append(pb.SubmittedOperation(agent_id=agent_id, error=f"unknown agent {agent_id!r}"))
        elif agent.state != CONNECTED:
            errors.append(pb.SubmittedOperation(agent_id=agent_id, error=f"agent {agent_id} is {agent.state}"))
        elif agent_id not in chosen:
            chosen.append(agent_id)
    for role in target.roles:
        if role not in KNOWN_ROLES:
            errors.append(pb.SubmittedOperation(error=f"unknown role {role!r} (roles: {', '.join(KNOWN_ROLES)})"))
            continue
        with_role = [a.id for a in agents.values() if role in a.roles and a.state == CONNECTED]
        if not with_role:
            errors.append(pb.SubmittedOperation(error=f"no connected agent has role {role!r}"))
        chosen += [a for a in sorted(with_role) if a not in chosen]
    if target.all:
        connected = sorted(a.id for a in agents.values() if a.state == CONNECTED)
        if not connected:
            errors.append(pb.SubmittedOperation(error="no agent is connected"))
        chosen += [a for a in connected if a not in chosen]
    return chosen, errors


def _grant_problem(provides, address: str) -> str:
    """Why a grant cannot be made, in one line for the operator, or ''."""
    problem = check_provides(provides)
    if problem:
        return f"--provides: {problem}"
    if address and not valid_host(address):
        return f"--address {address[:80]!r}: expected an IP address or a host name (RFC 1123)"
    return ""


def _placement_problem(request: pb.GrantRequest) -> str:
    """Why a capacity or a label cannot be granted, in one line, or ''."""
    for key, value in request.labels.items():
        if not spec_mod.LABEL.fullmatch(key) or not spec_mod.LABEL.fullmatch(value):
            return (f"--label {key[:40]}={value[:40]}: a label is KEY=VALUE in lowercase letters, digits and "
                    ". _ - (like zone=eu-1)")
    if not 0 <= request.cpu <= 4096 or request.cpu != request.cpu:
        return f"--capacity cpu={request.cpu:g}: expected a number of CPUs between 0 and 4096"
    return ""


def _env_key(context, value: str) -> str:
    if value.count("/") != 1 or not all(value.split("/")):
        return ""
    return value


def errors_mapped(cls):
    """Every handler of `cls` ends a DeployerError by the status its kind names (common/errors.py),
    with its one line; anything else is a bug and reaches gRPC as such."""
    def unary(method):
        @functools.wraps(method)
        async def handler(self, request, context):
            try:
                return await method(self, request, context)
            except errors.DeployerError as exc:
                await context.abort(grpc.StatusCode[exc.status], str(exc))
        return handler

    def stream(method):
        @functools.wraps(method)
        async def handler(self, request, context):
            try:
                async for reply in method(self, request, context):
                    yield reply
            except errors.DeployerError as exc:
                await context.abort(grpc.StatusCode[exc.status], str(exc))
        return handler

    for name, method in list(vars(cls).items()):
        if name[:1].isupper() and inspect.isasyncgenfunction(method):
            setattr(cls, name, stream(method))
        elif name[:1].isupper() and inspect.iscoroutinefunction(method):
            setattr(cls, name, unary(method))
    return cls


def _data_in_use(live) -> dict:
    """The data instances a service uses: its own live ones, or those of the service it shares
    with (`mysql_of`: whose)."""
    out = {}
    for component in ("mysql", "redis"):
        if component in live.used:
            out[f"{component}_of"], out[component] = live.used[component]
        else:
            out[component] = live.live(component).number if live.live(component) else None
    return out


@errors_mapped
class OperatorService(pb_grpc.OperatorServicer):
    def __init__(self, registry: Registry, dispatcher: Dispatcher, environments: Environments,
                 enrolment: Enrolment | None = None, operator_tokens: access.OperatorTokens | None = None) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self.environments = environments
        self.ledger = environments.ledger
        self.enrolment = enrolment
        self.operator_tokens = operator_tokens

    # ---------------------------------------------------------------- operator credentials

    async def CreateOperatorToken(self, request: pb.OperatorTokenRequest, context):
        roles = [r.value for r in access.Role]
        if request.role not in roles:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"--role: one of {', '.join(roles)}" + (f" (not {request.role!r})" if request.role else ""))
        by = OPERATOR_CALLER.get() or access.SOCKET
        try:
            token, expires = self.operator_tokens.create(
                access.Role(request.role), request.ttl_s or access.DEFAULT_TTL_S, request.label, by)
        except access.NotPermitted as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("operator_token.created", token_id=token.token_id, role=request.role, label=request.label,
                 expires=expires, by=by.token_id or "socket")
        return pb.TokenReply(token=str(token), expires_at=expires, token_id=token.token_id)

    async def ListOperatorTokens(self, request: pb.ListTokensRequest, context):
        return pb.JsonReply(json=json.dumps(self.operator_tokens.listed(every=request.all)))

    async def RevokeOperatorToken(self, request: pb.TokenRef, context):
        try:
            revoked = self.operator_tokens.revoke(request.token_id)
        except LookupError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, exc.args[0])
        by = OPERATOR_CALLER.get() or access.SOCKET
        log.warning("operator_token.revoked", token_id=request.token_id, revoked=revoked,
                    by=by.token_id or "socket")
        return pb.OperatorTokenRevokeReply(revoked=revoked)

    # ---------------------------------------------------------------- enrolment

    async def CreateToken(self, request: pb.TokenRequest, context):
        roles = list(dict.fromkeys(request.roles))
        unknown = [r for r in roles if r not in KNOWN_ROLES]
        if not roles or unknown:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"--role: give one or more of {', '.join(KNOWN_ROLES)}"
                                + (f" (not {unknown[0]!r})" if unknown else ""))
        if request.agent_id and not valid_agent_id(request.agent_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"--agent: invalid agent id {request.agent_id!r}")
        problem = _grant_problem(request.provides, request.address)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            token, expires = self.enrolment.create_token(roles, request.ttl_s or 3600.0, request.agent_id,
                                                         list(request.provides), request.address)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("token.created", token_id=token.token_id, roles=roles, agent_id=request.agent_id or None,
                 expires=expires, provides=sorted(set(request.provides)), address=request.address or None)
        return pb.TokenReply(token=str(token), expires_at=expires, token_id=token.token_id)

    async def ListTokens(self, request: pb.ListTokensRequest, context):
        return pb.JsonReply(json=json.dumps(self.enrolment.tokens(every=request.all)))

    async def RevokeToken(self, request: pb.TokenRef, context):
        try:
            self.enrolment.revoke_token(request.token_id)
        except LookupError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, exc.args[0])
        except ValueError as exc:
            # a spent token: refused for good (exit 1), not "not now" (FAILED_PRECONDITION, exit 5)
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        log.warning("token.revoked", token_id=request.token_id)
        return pb.Empty()

    async def RevokeAgent(self, request: pb.RevokeRequest, context):
        agent_id = request.agent_id
        if agent_id not in self.registry.agents and not self.enrolment.expires(agent_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown agent {agent_id!r}")
        count = self.enrolment.revoke(agent_id)
        cut = self.registry.cut_off(agent_id, f"the certificate of agent {agent_id} was revoked")
        log.warning("agent.revoked", agent_id=agent_id, certificates=count, disconnected=cut)
        return pb.RevokeReply(certificates=count, disconnected=cut)

    async def GrantAgent(self, request: pb.GrantRequest, context):
        agent_id = request.agent_id
        known = agent_id in self.registry.agents or (self.enrolment and self.enrolment.expires(agent_id))
        if not known:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown agent {agent_id!r}")
        problem = _grant_problem(request.provides, "" if request.ungrant else request.address) \
            or _placement_problem(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        provides, address = self.registry.db.grant(agent_id)
        memory, cpu, labels = self.registry.placement_grant(agent_id)
        if request.ungrant:
            provides = [p for p in provides if p not in request.provides]
            address = "" if request.clear_address else address
            memory, cpu = (0, 0.0) if request.clear_capacity else (memory, cpu)
            labels = {k: v for k, v in labels.items() if k not in request.unlabel}
        else:
            provides = sorted({*provides, *request.provides})
            address = request.address or address
            memory, cpu = request.memory_bytes or memory, request.cpu or cpu
            labels = {**labels, **request.labels}
        self.registry.grant(agent_id, provides, address)
        self.registry.grant_placement(agent_id, memory, cpu, labels)
        log.warning("agent.granted", agent_id=agent_id, provides=provides, address=address or None,
                    memory=memory or None, cpu=cpu or None, labels=labels or None)
        agent = self.registry.agents.get(agent_id)
        if agent is not None:
            memory, cpu = placement.capacity(memory, cpu, agent.facts.mem_total_bytes, agent.facts.cpus)
        return pb.GrantReply(granted=provides, address=agent.address if agent else address,
                             address_granted=bool(address), not_granted=agent.ignored() if agent else [],
                             memory_bytes=memory, cpu=cpu, labels=labels)

    # ---------------------------------------------------------------- orders and jobs

    async def Plan(self, request, context):
        _spec, plan, _options = await self.environments.plan(order_of(Order, request))
        return pb.PlanReply(plan_json=json.dumps(plan.to_dict()))

    async def Apply(self, request, context):
        job, plan = await self.environments.apply(order_of(Order, request))
        return pb.ApplyReply(job_id=job.id if job else "", plan_json=json.dumps(plan.to_dict()))

    async def Rollback(self, request, context):
        job, plan = await self.environments.rollback(order_of(Rollback, request))
        return pb.ApplyReply(job_id=job.id, plan_json=json.dumps(plan.to_dict()))

    async def Check(self, request, context):
        job = await self.environments.check(order_of(Check, request))
        return pb.ApplyReply(job_id=job.id)

    async def ServiceLogs(self, request, context):
        """A service's output from its log files on the host of its live instance (or of the
        instance asked for); every code instance of the service there, so a follower goes on
        across restarts and redeploys. A new host (the service moved) gets a new reader."""
        env_key, service = request.environment, request.service
        app, _, env = env_key.partition("/")
        host: str | None = None
        op = None
        offset = 0
        wake = asyncio.Event()
        try:
            while True:
                target = await self._log_target(env_key, service, request.instance, context)
                if target[0] != host:
                    agent = self.registry.agents.get(target[0])
                    if agent is None or agent.state != "connected":
                        await context.abort(grpc.StatusCode.UNAVAILABLE, f"agent {target[0]} is not connected")
                    read = pb.LogReadSpec(
                        logs=f"{naming.service_dir(agent.services_root, app, env, service)}/logs",
                        instance=str(request.instance or ""), since=request.since, until=request.until,
                        tail=request.tail or (0 if request.since else 20), follow=request.follow,
                        timestamps=request.timestamps)
                    if op is not None:
                        self.dispatcher.cancel(op.id, "the service moved to another host")
                        op.listeners.discard(wake)
                        yield pb.FollowEvent(status=pb.OperationStatus(
                            agent_id=agent.id, note=f"now following code instance {target[1]} on {agent.id}"))
                        read.instance, read.tail, read.since = str(target[1]), 0, ""
                    op = self.dispatcher.submit(agent.id, pb.Operation(id=operations.new_op_id(), log_read=read),
                                                environment=env_key)
                    op.listeners.add(wake)
                    host, offset = target[0], 0
                wake.clear()
                for start, stream, data in op.output.read(offset):
                    yield pb.FollowEvent(output=pb.OutputChunk(op_id=op.id, offset=start, stream=stream, data=data))
                    offset = start + len(data)
                if op.finished and offset >= op.output.received:
                    if op.result and op.result.outcome != pb.EXITED:
                        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                            f"{env_key}/{service}: cannot read its logs on {host}: "
                                            f"{op.result.error or pb.Outcome.Name(op.result.outcome).lower()}")
                    return
                try:
                    await asyncio.wait_for(wake.wait(), 0.5)  # and look at the ledger twice a second
                except asyncio.TimeoutError:
                    pass
        finally:
            if op is not None:
                op.listeners.discard(wake)
                if not op.finished:
                    self.dispatcher.cancel(op.id, "the operator stopped following")
                self.dispatcher.release(op)

    async def _log_target(self, env_key: str, service: str, instance: int, context) -> tuple[str, int]:
        """(host, code instance) whose output to show: the one asked for, or the live one."""
        if instance:
            row = self.ledger.instance(env_key, service, "code", instance)
            if row is None or not row.host:
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"{env_key}/{service}: code instance {instance} never ran")
            return row.host, instance
        live = self.ledger.state(env_key).get(service)
        if live is not None and live.code is not None:
            return live.code.host, live.code.number
        ran = [r for r in self.ledger.instances(env_key, service) if r.component == "code" and r.host]
        hint = (f"; the last code instance is {ran[-1].number} ({ran[-1].status}): "
                f"deployctl logs {env_key}/{service} --instance {ran[-1].number}") if ran else ""
        await context.abort(grpc.StatusCode.NOT_FOUND, f"{env_key}/{service}: nothing is live{hint}")

    def _job_folder(self, job_id: str):
        if not job_id.startswith("job-") or "/" in job_id:
            return None
        folder = self.environments.store / "jobs" / job_id
        return folder if folder.is_dir() else None

    def _no_folder(self, job_id: str) -> str:
        row = JobTable(self.dispatcher.db).get(job_id) if job_id.startswith("job-") else None
        if row is None or not row.get("pruned"):
            return f"unknown job {job_id!r}"
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(row["pruned"]))
        return (f"job {job_id} ({row['kind']}, {row['state']}: {row['summary']}): its folder and outputs were removed "
                f"by the controller's job retention on {when} UTC")

    async def FollowJob(self, request, context):
        folder = self._job_folder(request.job_id)
        if folder is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, self._no_folder(request.job_id))
        job = self.environments.jobs.get(request.job_id)
        wake = asyncio.Event()
        if job is not None:
            job.listeners.add(wake)
        offset = 0
        try:
            while True:
                wake.clear()
                events, offset = read_events(folder, offset)
                for event in events:
                    yield pb.JobEvent(json=json.dumps(event))
                    if event["event"] == "job.finished":
                        return
                if not request.follow or job is None or job.finished:
                    if not events:
                        return
                    continue
                await wake.wait()
        finally:
            if job is not None:
                job.listeners.discard(wake)

    async def ListJobs(self, request, context):
        return pb.JsonReply(json=json.dumps(JobTable(self.dispatcher.db).recent(request.environment)))

    async def ShowJob(self, request, context):
        row = JobTable(self.dispatcher.db).get(request.job_id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown job {request.job_id!r}")
        folder = self._job_folder(request.job_id)
        events, _ = read_events(folder) if folder else ([], 0)
        return pb.JsonReply(json=json.dumps({**dict(row), "folder": str(folder), "events": events}))

    async def Ledger(self, request, context):
        env_key = request.environment
        services = [request.service] if request.service else self.ledger.services(env_key)
        if not services or not any(self.ledger.history(env_key, s) for s in services):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"nothing deployed for {env_key}" + (f"/{request.service}" if request.service else ""))
        out = {}
        for service in services:
            rows = self.ledger.history(env_key, service)
            out[service] = {"diagram": diagram(rows), "deploys": [r.__dict__ for r in rows],
                            "instances": [r.to_dict() for r in self.ledger.instances(env_key, service)]}
        return pb.JsonReply(json=json.dumps(out))

    async def Status(self, request, context):
        env_key = request.environment
        state = self.ledger.state(env_key)
        if not state:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"nothing deployed for {env_key}")
        app, env = env_key.split("/", 1)
        stored = self.environments.stored_spec(env_key)
        limits = spec_from_dict(stored).limits if stored else Limits()
        out = []
        spec = stored or {}
        for service, live in sorted(state.items()):
            entry = {"service": service, "code": live.code.number if live.code else None,
                     **_data_in_use(live),
                     "host": live.code.host if live.code else "", "port": live.code.port if live.code else 0,
                     "commit": live.code.commit if live.code else "", "process": "unknown"}
            health = spec.get("services", {}).get(service, {}).get("health", "/")
            health = health.get("path", "/") if isinstance(health, dict) else health
            row = self.ledger.instance(env_key, service, "code", live.code.number) if live.code else None
            if live.code:
                replicas = row.replicas if row else []
                seen = [await self._replica_status(app, env, service, r, health) for r in replicas]
                if seen:
                    entry.update(seen[0])
                if len(seen) > 1:  # every replica, the first one's figures being the entry's own
                    entry["replicas"] = [{"host": r.host, "port": r.port, **found} for r, found in zip(replicas, seen)]
            entry["limits"] = {"memory_bytes": limits.memory, "cpu": limits.cpu, "processes": limits.processes,
                               "mysql_connections": limits.mysql_connections}
            if self.environments.healer is not None and live.code:
                entry.update(self.environments.healer.status(env_key, service, row.names.get("process", "") if row else ""))
            out.append(entry)
        return pb.JsonReply(json=json.dumps(out))

    async def _replica_status(self, app: str, env: str, service: str, replica, health: str) -> dict:
        """What one replica's host says of its process (state, pid, memory, CPU, why it died) and
        its health path."""
        agent = self.registry.agents.get(replica.host)
        if agent is None:
            return {"process": "unknown"}
        if agent.state != "connected":
            return {"process": f"agent {agent.id} is {agent.state}"}
        found: dict = {"process": "unknown"}
        asked = ServiceProcesses.operation(naming.unit_base(app, env, service), group=naming.unix_user(app, env))
        asked.id = operations.new_op_id()
        op = await self.dispatcher.execute(agent.id, asked)
        for item in ServiceProcesses.parse(op.output.text()):
            if item.instance == replica.process:
                found.update(process="running" if item.alive else "dead", pid=item.pid or None,
                             rss_bytes=item.rss_bytes, cpu_s=item.cpu_s)
                if item.error:  # why it died: "killed by the kernel: out of memory …"
                    found["error"] = item.error
            if item.limits_use is not None:  # the environment's group on that host, the same for each
                found["use"] = item.limits_use
        if replica.port and found["process"] == "running":
            probe = await self.dispatcher.execute(agent.id, pb.Operation(
                id=operations.new_op_id(), http_probe=pb.HttpProbeSpec(
                    url=f"http://{url_host(agent.address)}:{replica.port}{health}", attempts=1, timeout_s=2.0)))
            found["health"] = "ok" if probe.result.exit_code == 0 else probe.result.error
        return found

    async def Backup(self, request, context):
        if request.restore_from:
            job, plan = self.environments.restore(request.environment, request.service, request.restore_from)
            return pb.ApplyReply(job_id=job.id, plan_json=json.dumps(plan.to_dict()))
        return pb.ApplyReply(job_id=self.environments.backup(request.environment, request.service).id)

    async def Backups(self, request, context):
        """The snapshots of the service's MySQL instances (live and kept), on their data hosts."""
        env_key, service = request.environment, request.service
        rows = [r for r in self.ledger.instances(env_key, service) if r.component == "mysql"
                and r.status in (Status.LIVE, Status.STANDBY)]
        if not rows:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{env_key}/{service}: no MySQL instance of its own")
        found = []
        for row in rows:
            agent = self.registry.agents.get(row.host)
            if agent is None or agent.state != "connected":
                continue
            asked = pb.Operation(id=operations.new_op_id(), exec=pb.ExecSpec(
                argv=["sh", "-c", commands.mysql_snapshots(backups.folder(agent, env_key, service, row.number))],
                timeout_s=60))
            op = await self.dispatcher.execute(agent.id, asked, scope=Scope.data(env_key))
            found += [{**b, "live": row.status == Status.LIVE} for b in backups.parse(op.output.text(), row.number)]
        return pb.JsonReply(json=json.dumps(sorted(found, key=lambda b: b["id"], reverse=True)))

    async def Events(self, request, context):
        """The environment's history besides its jobs, after event `after` (0: from the start)."""
        healer = self.environments.healer
        if healer is None:
            return pb.JsonReply(json="[]")
        if not self.environments.stored_spec(request.environment) and not self.ledger.services(request.environment):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{request.environment}: no such environment")
        return pb.JsonReply(json=json.dumps(healer.events.after(request.environment, request.after)))

    async def SetSecret(self, request, context):
        if not _env_key(context, request.environment):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.environment!r}: expected APP/ENVIRONMENT")
        if not request.name or not request.name.replace("_", "A").isalnum() or not request.name.isupper():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"secret name {request.name!r}: use A-Z, 0-9 and _")
        if "\0" in request.value:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"secret {request.name}: the value has a NUL byte, which .env cannot hold")
        self.ledger.set_secret(request.environment, request.name, request.value)
        log.info("secret.set", environment=request.environment, name=request.name)
        return pb.Empty()

    async def ListAgents(self, request, context):
        reply = pb.ListAgentsReply()
        seen = {h.id: h for h in hosts.view(self.registry, self.environments.ledger)}
        for agent in sorted(self.registry.agents.values(), key=lambda a: a.id):
            reply.agents.append(pb.AgentInfo(
                id=agent.id, roles=agent.roles, capabilities=agent.capabilities,
                state=_STATES.get(agent.state, pb.AGENT_DISCONNECTED), last_seen=agent.last_seen,
                version=agent.version, facts=agent.facts, peer=agent.peer, running=agent.running,
                certificate_expires=self.enrolment.expires(agent.id) if self.enrolment else 0.0,
                revoked=bool(self.enrolment and self.enrolment.revoked(agent.id)),
                granted=agent.granted, address=agent.address, address_granted=bool(agent.granted_address),
                claimed=agent.claimed, labels=agent.labels,
                capacity_memory_bytes=seen[agent.id].memory, capacity_cpu=seen[agent.id].cpu,
                reserved_memory_bytes=seen[agent.id].reserved_memory, reserved_cpu=seen[agent.id].reserved_cpu,
                instances=seen[agent.id].instances))
        return reply

    async def SubmitExec(self, request: pb.SubmitExecRequest, context):
        if not request.exec.argv:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no command given")
        if not (request.target.agent_ids or request.target.roles or request.target.all):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no target: give agent ids, roles or all")
        chosen, reply_errors = resolve_targets(self.registry, request.target)
        reply = pb.SubmitReply(operations=reply_errors)
        for agent_id in chosen:
            op_id = operations.new_op_id()
            operation = pb.Operation(id=op_id, exec=request.exec)
            self.dispatcher.submit(agent_id, operation)
            reply.operations.append(pb.SubmittedOperation(agent_id=agent_id, op_id=op_id))
        return reply

    async def CancelOperations(self, request, context):
        reply = pb.CancelReply()
        for op_id in request.op_ids:
            try:
                if self.dispatcher.cancel(op_id, request.reason):
                    reply.cancelled.append(op_id)
            except UnknownOperation:
                pass
        return reply

    async def GetOperation(self, request, context):
        row = self.dispatcher.db.operation(request.op_id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown operation {request.op_id!r}")
        record = pb.OperationRecord(
            op_id=row.id, agent_id=row.agent_id, kind=row.kind, argv=row.summary, state=row.state,
            created=row.created, finished=row.finished or 0)
        if row.result is not None:
            record.result.CopyFrom(row.result)
        op = self.dispatcher.get(row.id)
        record.output_bytes = op.output.received
        self.dispatcher.release(op)
        return record

    async def Follow(self, request: pb.FollowRequest, context):
        """Output and results of the given operations, resumable from any offsets."""
        try:
            ops = [self.dispatcher.get(op_id) for op_id in dict.fromkeys(request.op_ids)]
        except UnknownOperation as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown operation {exc.args[0]!r}")
        offsets = {op.id: request.from_offsets.get(op.id, 0) for op in ops}
        notes = {op.id: "" for op in ops}
        wake = asyncio.Event()
        for op in ops:
            op.listeners.add(wake)
        pending = list(ops)
        try:
            while pending:
                wake.clear()
                progressed = False
                for op in list(pending):
                    if op.note != notes[op.id]:
                        notes[op.id] = op.note
                        yield pb.FollowEvent(status=pb.OperationStatus(
                            op_id=op.id, agent_id=op.agent_id, state=op.state, note=op.note))
                    for offset, stream, data in op.output.read(offsets[op.id], FOLLOW_READ_BYTES):
                        yield pb.FollowEvent(output=pb.OutputChunk(
                            op_id=op.id, offset=offset, stream=stream, data=data))
                        offsets[op.id] = offset + len(data)
                        progressed = True
                    if op.finished and offsets[op.id] >= op.output.received:
                        yield pb.FollowEvent(result=op.result)
                        pending.remove(op)
                        progressed = True
                if not progressed:
                    await wake.wait()
        finally:
            for op in ops:
                op.listeners.discard(wake)
                self.dispatcher.release(op)
