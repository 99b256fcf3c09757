"""Procedures: deploying a service, composed of operations sent to agents.

The order of a deploy (blue/green per code instance):
  checkout → new data instances (mysql, redis) → .env → install → build → migrate → start on a
  fresh port → health check → route switch (nginx transaction) → ledger → drain → stop the old
  process → `current` → prune old releases.
Any failure before the route switch stops the new process, drops the data instances this deploy
created, marks them failed in the ledger, and leaves the live instance serving.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from protos import deployer_pb2 as pb

from controller.environments.facts import ServiceProcesses
from controller.environments import naming, commands as ops, ownership
from controller.fleet.operations import new_op_id
from controller.fleet.dispatcher import Dispatcher, Op
from controller.state.jobs import Job
from controller.state.knowledge import Scope
from controller.state.ledger import Ledger
from controller.environments.planner import Plan, ServicePlan
from controller.fleet.registry import CONNECTED, Agent, Registry
from controller.environments.spec import Service, Spec, code_fingerprint, spec_from_dict
from common import errors

log = structlog.get_logger("controller")
KEEP_RELEASES = 5
DRAIN_S = 2.0
PORT_RANGE = range(20000, 30000)
HEALTH_ATTEMPTS = 60
# How many taken names (a leftover, another controller's) a deploy moves past before it gives up.
TAKEN_NAMES_MAX = 5
OUTPUT_TAIL_LINES = 15


# Outcomes of an operation that was under way and did not end on its own.
CUT_OFF = (pb.SIGNALED, pb.TIMED_OUT, pb.CANCELLED, pb.INTERRUPTED, pb.LOST)


class StepFailed(errors.Failed):
    """A step of a procedure failed; the message is one line, the tail the operation's output."""

    def __init__(self, service: str, step: str, message: str, tail: str = "", cut: bool = False) -> None:
        super().__init__(f"{service}: {step} failed: {message}")
        self.service, self.step, self.tail = service, step, tail
        self.cut = cut  # its operation was under way and did not end on its own (killed, lost…)


class PlacementError(errors.Failed):
    """No connected agent can take this work."""


def pick_agent(registry: Registry, *, role: str | None = None, capability: str | None = None,
               prefer: str = "") -> Agent:
    connected = [a for a in registry.agents.values() if a.state == CONNECTED
                 and (role is None or role in a.roles)
                 and (capability is None or capability in a.capabilities)]
    for agent in connected:
        if agent.id == prefer:
            return agent
    if prefer and registry.agents.get(prefer):
        raise PlacementError(f"agent {prefer} (which runs this service) is {registry.agents[prefer].state}")
    if not connected:
        what = " and ".join(x for x in (f"role {role}" if role else "", f"capability {capability}" if capability else "") if x)
        asking = sorted(a.id for a in registry.agents.values() if capability in a.ignored()) if capability else []
        hint = (f" ({asking[0]} is configured for it but not granted it: deployctl agents grant {asking[0]} "
                f"--provides {capability})") if asking else ""
        raise PlacementError(f"no connected agent has {what}{hint}")
    return sorted(connected, key=lambda a: a.id)[0]


def _output(op) -> str:
    return op.output.text()


def result_detail(result: pb.OperationResult) -> str:
    """How an operation ended, in a few words: its error, its exit code or its outcome."""
    return result.error or (f"exit {result.exit_code}" if result.outcome == pb.EXITED
                            else pb.Outcome.Name(result.outcome).lower())


def nginx_reload_settings(router: Agent) -> tuple[str, str]:
    """How this router reloads nginx, and where its master writes its pid (Debian's defaults)."""
    return (router.settings.get("nginx.reload", "nginx -s reload"),
            router.settings.get("nginx.pid", "/run/nginx.pid"))


def _tail(path: Path, lines: int = OUTPUT_TAIL_LINES) -> str:
    try:
        data = path.read_bytes()[-8192:]
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


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


class Runner:
    """Runs one job's procedures: sends operations, records events, keeps the ledger."""

    # Jobs of different environments run at once and share hosts and routers.
    _port_locks: dict[str, asyncio.Lock] = {}
    _route_locks: dict[str, asyncio.Lock] = {}

    def __init__(self, job: Job, spec: Spec, dispatcher: Dispatcher, registry: Registry,
                 ledger: Ledger) -> None:
        self.job, self.spec, self.dispatcher, self.registry, self.ledger = job, spec, dispatcher, registry, ledger
        self.env_key = spec.key
        self.deploying: dict[str, int] = {}  # service → its deploy in progress, whose step the ledger keeps

    # ---------------------------------------------------------------- operations

    async def run_op(self, agent: Agent, operation: pb.Operation, service: str, step: str,
                     check: bool = True, scope: Scope | None = None) -> Op:
        operation.id = new_op_id()
        if service in self.deploying:  # durably, before the step acts: recovery reads it after a crash
            self.ledger.set_step(self.env_key, service, self.deploying[service], step)
        self.job.event("step.started", service=service, step=step, agent=agent.id, op=operation.id)
        op = await self.dispatcher.execute(agent.id, operation, self.job.ops_folder(operation.id),
                                           scope=scope or Scope.tenant(self.env_key))
        result = op.result
        ok = result.outcome == pb.EXITED and result.exit_code == 0
        self.job.event("step.finished", service=service, step=step, op=operation.id, ok=ok,
                       duration_s=round(result.duration_s, 3),
                       outcome=pb.Outcome.Name(result.outcome).lower(), exit_code=result.exit_code,
                       **({"error": result.error} if result.error else {}))  # e.g. output incomplete
        if check and not ok:
            raise StepFailed(service, step, result_detail(result), _tail(op.output.folder / "output.log"),
                             cut=result.outcome in CUT_OFF)
        return op

    async def sh(self, agent: Agent, script: str, service: str, step: str, *, cwd: str = "",
                 env_file: str = "", stdin: bytes = b"", timeout: float = 1800, check: bool = True,
                 user: str = "", env: dict[str, str] | None = None, scope: Scope | None = None) -> Op:
        operation = pb.Operation(exec=pb.ExecSpec(argv=["sh", "-c", script], cwd=cwd, env_file=env_file,
                                                  stdin=stdin, timeout_s=timeout, user=user, env=env or {},
                                                  limits=self.limits(agent) if user == self.unix_user else None))
        return await self.run_op(agent, operation, service, step, check, scope)

    @property
    def unix_user(self) -> str:
        """The environment's own user on every host: its commands and processes run as it."""
        return naming.unix_user(self.spec.app, self.spec.environment)

    def limits(self, host: Agent) -> pb.Limits:
        """The environment's limits on `host`, for everything that runs there as its user."""
        lim = self.spec.limits
        return ops.limits(lim.memory, lim.cpu, lim.processes, self.unix_user, host.services_root)

    def service_env(self, d: Deployment) -> dict[str, str]:
        """Variables of a service's commands and processes besides its `.env`: a HOME of its own."""
        return {} if "HOME" in dict(d.service.env) else {"HOME": ops.service_home(d.service_dir)}

    # ---------------------------------------------------------------- the plan

    async def apply(self, plan: Plan) -> str:
        for service_plan in plan.services:
            if service_plan.action == "deploy":
                await self.deploy(service_plan)
            elif service_plan.action == "destroy":
                # The spec no longer has it, so the route written next leaves it out.
                await remove_code(self, service_plan.service)
                self.job.event("service.removed", service=service_plan.service)
                if any(s.is_web for s in self.spec.services):
                    await self.switch_route(service_plan.service)
        verb = {"apply": "deployed"}.get(self.job.kind, self.job.kind + " of")
        return f"{verb} {', '.join(s.service for s in plan.services)}"

    async def deploy(self, sp: ServicePlan) -> None:
        service = self.spec.service(sp.service)
        live = self.ledger.state(self.env_key).get(service.name)
        try:
            host = pick_agent(self.registry, role=service.role,
                              prefer=live.code.host if live and live.code else "")
        except PlacementError as exc:
            raise StepFailed(service.name, "placement", str(exc)) from None
        d = Deployment(service, host, naming.service_dir(host.services_root, self.spec.app,
                                                         self.spec.environment, service.name))
        code, mysql, redis = sp.change("code"), sp.change("mysql"), sp.change("redis")
        d.code_new = code.new
        d.code = self.ledger.next_number(self.env_key, service.name, "code") if code.new else code.number
        numbers = {}
        for change in (mysql, redis):
            if change is not None:
                numbers[change.component] = (self.ledger.next_number(self.env_key, service.name, change.component)
                                             if change.new else change.number)
        d.deploy = self.ledger.start_deploy(
            self.env_key, service.name, self.job.id, code=d.code, code_new=code.new,
            mysql=numbers.get("mysql"), mysql_new=bool(mysql and mysql.new),
            redis=numbers.get("redis"), redis_new=bool(redis and redis.new), commit=sp.commit, host=host.id)
        self.job.event("deploy.started", service=service.name, deploy=d.deploy, code=d.code,
                       code_new=code.new, mysql=numbers.get("mysql"), redis=numbers.get("redis"),
                       host=host.id, reasons=list(sp.reasons))
        self.deploying[service.name] = d.deploy
        try:
            await self._deploy(d, sp, live, numbers, mysql, redis)
        except BaseException as exc:
            # Before the switch, put everything back; after it the new instance is the live one,
            # and undoing would take down what serves (and drop data it now uses).
            if not d.switched:
                await asyncio.shield(self._undo(d))
                self.ledger.finish_deploy(self.env_key, service.name, d.deploy, "failed", str(exc))
            raise
        finally:
            self.deploying.pop(service.name, None)

    async def _deploy(self, d: Deployment, sp: ServicePlan, live, numbers, mysql, redis) -> None:
        service, name = d.service, d.service.name
        if d.code_new:
            self._add_code_instance(d, sp)
        owner = self.ledger.owner
        # The folder first: refused, it leaves nothing behind, not even a new user.
        refused = await self._guarded(d.host, ownership.claim_service_folder(
            d.service_dir, owner, self._deployed_on(d.host.id, name)), name, "folder")
        if refused:
            raise StepFailed(name, "folder", refused)
        refused = await self._guarded(d.host, ownership.unix_user_guard(self.unix_user, owner, self._deployed_on(d.host.id))
                                      + ops.ensure_unix_user(self.unix_user, ownership.owner_mark(owner)), name, "user")
        if refused:
            raise StepFailed(name, "user", refused)
        if d.code_new:
            await self._checkout(d, sp)
        release = f"{d.service_dir}/releases/{d.code}"
        workdir = f"{release}/{service.root}" if service.root else release
        await self.sh(d.host, ops.service_layout(d.service_dir, release, self.unix_user), name, "permissions")
        values = {}
        if mysql is not None:
            values.update(await self._mysql(d, numbers, mysql.new))
        if redis is not None:
            values.update(await self._redis(d, numbers, redis.new))
        values.update(dict(service.env))
        stored = self.ledger.secrets(self.env_key)
        values.update({secret: stored[secret] for secret in service.secrets})
        # A reused release keeps serving from its .env until the switch: stage the new one beside it.
        env_path = f"{release}/.env" if d.code_new else f"{release}/.env.deploy-{d.deploy}"
        d.staged_env = "" if d.code_new else env_path
        try:
            content = ops.env_file(values)
        except ValueError as exc:
            raise StepFailed(name, ".env", str(exc)) from None
        await self.run_op(d.host, pb.Operation(write_file=pb.WriteFileSpec(
            path=env_path, content=content, mode=0o600, owner=self.unix_user)), name, ".env")
        as_user = {"user": self.unix_user, "env": self.service_env(d)}
        if d.code_new:
            for step in ("install", "build"):
                command = getattr(service, step)
                if command:
                    await self.sh(d.host, command, name, step, cwd=workdir, env_file=env_path, **as_user)
        if service.migrate and (d.code_new or (mysql is not None and mysql.new)):
            await self.sh(d.host, service.migrate, name, "migrate", cwd=workdir, env_file=env_path, **as_user)
        await self._start(d, workdir, env_path)
        if service.is_web:
            await self._route(d)
        d.switched = True
        # Read before going live: restarting the same code instance rewrites its process key.
        previous = self._process_of(live)
        self._go_live(d, numbers)
        if live and live.code:
            await self._retire(d, live, previous)
        # After the switch: a failure here is reported, never undone.
        if d.staged_env:
            # As its user, in its own folder; -T: a `.env` the tenant made a link to a folder is
            # replaced, never moved into.
            await self.sh(d.host, f"mv -fT {shlex.quote(d.staged_env)} {shlex.quote(release + '/.env')}", name,
                          ".env", check=False, **as_user)
        await self.sh(d.host, _current_script(d.service_dir, release), name, "current", check=False)
        await self._prune_releases(d)

    # ---------------------------------------------------------------- ownership

    def _deployed_on(self, host_id: str, service: str | None = None) -> bool:
        """The ledger holds a code instance (of `service`) that ran on that host: what is there
        under our names was made by us, if before objects carried a mark."""
        return any(r["component"] == "code" and r["host"] == host_id and r["status"] in ("live", "standby")
                   for r in self.ledger.instances(self.env_key, service))

    async def _guarded(self, agent: Agent, script: str, service: str, step: str, **kw) -> str:
        """Run a guarded create; "" when it did its work, the line naming what it found taken
        (and left untouched) when it exits TAKEN. Any other failure raises StepFailed."""
        op = await self.sh(agent, script, service, step, check=False, **kw)
        result = op.result
        if result.outcome == pb.EXITED and result.exit_code == 0:
            return ""
        tail = _tail(op.output.folder / "output.log")
        if result.outcome == pb.EXITED and result.exit_code == ownership.TAKEN:
            found = [line.strip() for line in tail.splitlines() if "left untouched" in line]
            return "; ".join(found) or f"{step}: the name is taken by something this deployer did not make"
        detail = result.error or (f"exit {result.exit_code}" if result.outcome == pb.EXITED
                                  else pb.Outcome.Name(result.outcome).lower())
        raise StepFailed(service, step, detail, tail, cut=result.outcome in CUT_OFF)

    def _move_past(self, d: Deployment, component: str, number: int, taken: str) -> int:
        """Number `number` is taken on the server: keep it used and go on with the next one."""
        following = self.ledger.move_past(self.env_key, d.service.name, d.deploy, component, number, taken)
        self.job.event("job.note", note=f"{d.service.name}: {taken}; {component} {number} stays used, "
                                        f"{component} {following} is next")
        return following

    def _give_up(self, d: Deployment, component: str, first: int, last: int) -> StepFailed:
        return StepFailed(d.service.name, component,
                          f"the names of {component} {first} to {last} are all taken by things this deployer did "
                          f"not make (see the job's notes); they were left untouched: an operator decides what "
                          f"they are, then applies again")

    def _add_code_instance(self, d: Deployment, sp: ServicePlan) -> None:
        # The instance keeps its own definition, so a rollback restores its commands and env.
        self.ledger.add_instance(self.env_key, d.service.name, "code", d.code, host=d.host.id, commit=sp.commit,
                                 fingerprint=code_fingerprint(d.service, self.spec.limits),
                                 names={"release": f"{d.service_dir}/releases/{d.code}",
                                        "service": d.service.to_dict()})

    async def _checkout(self, d: Deployment, sp: ServicePlan) -> None:
        """As root: the source may need root's credentials. The release is then the user's. A
        release folder that exists already is not ours to remove: its number is moved past."""
        first = d.code
        for _ in range(TAKEN_NAMES_MAX):
            release = f"{d.service_dir}/releases/{d.code}"
            script = ownership.release_absent(release) + _checkout_script(
                d.service_dir, release, d.service.source, sp.commit)
            taken = await self._guarded(d.host, script, d.service.name, "checkout", timeout=600)
            if not taken:
                return
            d.code = self._move_past(d, "code", d.code, taken)
            self._add_code_instance(d, sp)
        raise self._give_up(d, "code", first, d.code - 1)

    # ---------------------------------------------------------------- data components

    async def _data_instance(self, d: Deployment, component: str, numbers: dict[str, int], new: bool,
                             names_of, guard, create) -> tuple[Agent, str, dict]:
        """The provider, password and names of a mysql or redis instance. A new one is recorded
        first (so a failure can drop it), then made by `guard(provider, names)`, which reads
        `create(names, password)` on its standard input and touches nothing if a name is taken;
        a taken number is moved past."""
        name = d.service.name
        try:
            provider = pick_agent(self.registry, capability=component)
        except PlacementError as exc:
            raise StepFailed(name, component, str(exc)) from None
        number = numbers[component]
        if not new:
            row = self.ledger.instance(self.env_key, name, component, number)
            names = json.loads(row["names"]) if row else names_of(number)
            return provider, self.ledger.password(self.env_key, name, component, number) or "", names
        first = number
        for _ in range(TAKEN_NAMES_MAX):
            names = names_of(number)
            password = secrets.token_urlsafe(24)
            self.ledger.add_instance(self.env_key, name, component, number, host=provider.id, names=names)
            self.ledger.save_password(self.env_key, name, component, number, password)
            d.created.append((component, number, names, provider))
            taken = await self._guarded(provider, guard(provider, names), name, component,
                                        stdin=create(names, password),
                                        scope=Scope.data(self.env_key, (name, component, number)))
            if not taken:
                return provider, password, names
            d.created.pop()
            number = numbers[component] = self._move_past(d, component, number, taken)
        raise self._give_up(d, component, first, number - 1)

    async def _mysql(self, d: Deployment, numbers: dict[str, int], new: bool) -> dict[str, str]:
        app, env, name = self.spec.app, self.spec.environment, d.service.name

        def names_of(n: int) -> dict:
            return {"database": naming.database_name(app, env, name, n), "user": naming.database_user(app, env, name, n),
                    "mark": ownership.instance_mark(self.ledger.owner, secrets.token_hex(6))}

        provider, password, names = await self._data_instance(
            d, "mysql", numbers, new, names_of,
            lambda p, names: ownership.mysql_create_guarded(p.mysql_admin(), names["database"], names["user"]),
            lambda names, pw: ops.mysql_create(names["database"], names["user"], pw,
                                               self.spec.limits.mysql_connections, names["mark"]))
        database, user = names["database"], names["user"]
        if not new:  # a reused user gets the limit the spec has now
            await self.sh(provider, provider.mysql_admin(), name, "mysql limits",
                          stdin=ops.mysql_limit(user, self.spec.limits.mysql_connections),
                          scope=Scope.data(self.env_key))  # it sets no password: it carries none
        host = provider.settings.get("mysql.host", "127.0.0.1")
        port = provider.settings.get("mysql.port", "3306")
        return {"DATABASE_URL": f"mysql://{user}:{password}@{ops.url_host(host)}:{port}/{database}",
                "DB_HOST": host, "DB_PORT": port, "DB_NAME": database, "DB_USER": user,
                "DB_PASSWORD": password}

    async def _redis(self, d: Deployment, numbers: dict[str, int], new: bool) -> dict[str, str]:
        app, env, name = self.spec.app, self.spec.environment, d.service.name

        def names_of(n: int) -> dict:
            return {"user": naming.redis_user(app, env, name, n), "prefix": naming.redis_prefix(app, env, name, n)}

        provider, password, names = await self._data_instance(
            d, "redis", numbers, new, names_of,
            lambda p, names: ownership.redis_create_guard(p.redis_cli(), names["user"]) + redis_admin(p),
            lambda names, pw: ops.redis_create_user(names["user"], names["prefix"], pw))
        host = provider.settings.get("redis.host", "127.0.0.1")
        port = provider.settings.get("redis.port", "6379")
        return {"REDIS_URL": f"redis://{names['user']}:{password}@{ops.url_host(host)}:{port}", "REDIS_PREFIX": names["prefix"]}

    # ---------------------------------------------------------------- processes and routes

    async def _start(self, d: Deployment, workdir: str, env_path: str) -> None:
        service, name = d.service, d.service.name
        env = {**self.service_env(d), "RELEASE": str(d.code)}
        if service.is_web:
            d.port = await self._allocate_port(d)
            env["PORT"] = str(d.port)
            d.process = f"{d.code}-{d.port}"
        else:
            d.process = f"{d.code}-d{d.deploy}"
        self.ledger.set_step(self.env_key, name, d.deploy, "start", port=d.port or None, process=d.process)
        unit = naming.unit_base(self.spec.app, self.spec.environment, name)
        await self.run_op(d.host, pb.Operation(service_start=pb.ServiceStartSpec(
            name=unit, instance=d.process, argv=["sh", "-c", f"exec {service.start}"], cwd=workdir,
            env=env, env_file=env_path, user=self.unix_user,
            log_path=f"{d.service_dir}/logs/{d.code}.log", limits=self.limits(d.host))), name, "start")
        if service.is_web:
            address = d.host.address
            await self.run_op(d.host, pb.Operation(http_probe=pb.HttpProbeSpec(
                url=f"http://{ops.url_host(address)}:{d.port}{service.health}", attempts=HEALTH_ATTEMPTS,
                interval_s=0.5, timeout_s=2.0, service_name=unit, service_instance=d.process)), name, "health")
        else:
            await asyncio.sleep(service.healthy_after)
            listing = await self.run_op(d.host, ServiceProcesses.operation(unit), name, "health")
            if not any(p.instance == d.process and p.alive for p in ServiceProcesses.parse(_output(listing), unit)):
                log_path = shlex.quote(f"{d.service_dir}/logs/{d.code}.log")
                tail = await self.sh(d.host, f"tail -n {OUTPUT_TAIL_LINES} {log_path}", name, "read log",
                                     check=False)
                raise StepFailed(name, "health", f"the daemon did not stay up for {service.healthy_after:g}s",
                                 _tail(tail.output.folder / "output.log"))

    async def _allocate_port(self, d: Deployment) -> int:
        """A port no instance on that host holds in the ledger, and that is free there now."""
        async with self._port_locks.setdefault(d.host.id, asyncio.Lock()):
            return await self._pick_port(d)

    async def _pick_port(self, d: Deployment) -> int:
        taken = self.ledger.ports_in_use(d.host.id)
        # In random order, not the lowest first: a second controller on the same host (or any
        # program) picking at the same moment would otherwise pick the very same port.
        free = [p for p in PORT_RANGE if p not in taken]
        candidates = random.sample(free, min(200, len(free)))
        probe = await self.sh(d.host, _first_free_port_script(candidates), d.service.name, "port", check=False)
        chosen = _output(probe).strip()
        if probe.result.exit_code == 1 and not chosen:
            raise StepFailed(d.service.name, "port", f"no free port on {d.host.id} among {len(candidates)} candidates")
        if probe.result.exit_code != 0 or not chosen.isdigit():
            # Not an answer from the probe itself: say what happened instead of guessing.
            raise StepFailed(d.service.name, "port", f"the port probe on {d.host.id} failed "
                             f"({result_detail(probe.result)})", chosen[-2000:])
        port = int(chosen)
        self.ledger.reserve_port(d.host.id, port, self.env_key, d.service.name, d.code)
        return port

    async def _route(self, d: Deployment) -> None:
        address = d.host.address
        try:
            await self.switch_route(d.service.name, {d.service.name: (address, d.port)})
        except StepFailed as failed:
            # The switch script puts the previous file back itself when nginx refuses, but not
            # if it died in the middle (its agent was killed): the file would name the new
            # instance, which is about to be stopped, and the next reload of nginx, for any
            # environment, would route there. Write the route the ledger holds, then fail.
            if not failed.cut:  # nginx said no, and the script has put the previous file back
                raise
            try:
                await self.as_deployed().switch_route(d.service.name)  # the route as it was
            except StepFailed as exc:
                self.job.event("job.note", note=f"{d.service.name}: the previous route could not be written "
                                                f"back ({exc}); deployctl verify shows it, repair writes it")
            raise

    def as_deployed(self) -> "Runner":
        """This runner with the environment as its live instances were deployed, for writing the
        route the ledger holds (the spec being applied may be ahead of it, or behind)."""
        runner = copy.copy(self)
        runner.spec = spec_from_dict(self.ledger.as_deployed(self.env_key, self.spec.to_dict()))
        runner.deploying = {}
        return runner

    def routes(self, override: dict[str, tuple[str, int]] | None = None) -> list[tuple[str, str, int]]:
        """(path, host address, port) of every web service: the live ones from the ledger, with
        `override` for a service being switched."""
        override = override or {}
        state = self.ledger.state(self.env_key)
        out = []
        for service in self.spec.services:
            if not service.is_web:
                continue
            if service.name in override:
                out.append((service.path, *override[service.name]))
                continue
            live = state.get(service.name)
            if live and live.code and live.code.port:
                host = self.registry.agents.get(live.code.host)
                out.append((service.path, host.address if host else "127.0.0.1",
                            live.code.port))
        return out

    def router(self, service: str) -> Agent:
        try:
            return pick_agent(self.registry, capability="nginx")
        except PlacementError as exc:
            raise StepFailed(service, "route", str(exc)) from None

    def nginx_path(self, router: Agent) -> str:
        conf_dir = router.settings.get("nginx.conf_dir", "/etc/nginx/conf.d")
        return f"{conf_dir}/{naming.nginx_file(self.spec.app, self.spec.environment)}"

    def nginx_content(self, router: Agent, override=None) -> bytes:
        owner = ownership.route_owner_line(self.ledger.owner) if self.ledger.owner else ""
        try:
            return ops.nginx_config(self.env_key, self.spec.domain, router.settings.get("nginx.listen", "80"),
                                    self.routes(override), owner)
        except ops.RouteValueError as exc:
            raise StepFailed(self.env_key, "route", f"not written on {router.id}: {exc}") from None

    async def switch_route(self, service: str, override=None) -> None:
        """The nginx transaction: stage, swap, `nginx -t`, reload — or put the old file back.
        One at a time per router: `nginx -t` must test our file, not another job's."""
        router = self.router(service)
        async with self._route_locks.setdefault(router.id, asyncio.Lock()):
            await self._switch_route(router, service, override)

    async def _switch_route(self, router: Agent, service: str, override) -> None:
        conf = self.nginx_path(router)
        staged = f"{conf}.staged-{self.job.id}"
        await self.run_op(router, pb.Operation(write_file=pb.WriteFileSpec(
            path=staged, content=self.nginx_content(router, override), mode=0o644)), service, "route",
            scope=Scope.route(self.env_key))
        switch = ops.nginx_switch_script(conf, staged, router.settings.get("nginx.test", "nginx -t"),
                                         *nginx_reload_settings(router))
        refused = await self._guarded(router, ownership.route_guard(
            conf, self.ledger.owner, self.env_key, bool(self.ledger.state(self.env_key)), switch,
            refused=f"rm -f {shlex.quote(staged)}"), service, "route",
            scope=Scope.route(self.env_key))
        if refused:
            raise StepFailed(service, "route", refused)

    def _go_live(self, d: Deployment, numbers: dict[str, int]) -> None:
        name = d.service.name
        with self.ledger.transaction():  # all of it or none of it, whatever kills the controller
            self.ledger.set_status(self.env_key, name, "code", d.code, "live", port=d.port or None)
            self.ledger.set_names(self.env_key, name, "code", d.code, process=d.process)
            self.ledger.make_live(self.env_key, name, "code", d.code)
            for component, number in numbers.items():
                self.ledger.make_live(self.env_key, name, component, number)
            self.ledger.finish_deploy(self.env_key, name, d.deploy, "succeeded", port=d.port or None)
        self.job.event("deploy.live", service=name, deploy=d.deploy, code=d.code, port=d.port, host=d.host.id)

    def _process_of(self, live) -> str:
        if not live or not live.code:
            return ""
        row = self.ledger.instance(self.env_key, live.service, "code", live.code.number)
        return json.loads(row["names"]).get("process", "") if row else ""

    async def _retire(self, d: Deployment, live, process: str) -> None:
        """Give in-flight requests to the old process time to finish, then stop it."""
        if not process or process == d.process:
            return
        await asyncio.sleep(DRAIN_S)
        unit = naming.unit_base(self.spec.app, self.spec.environment, d.service.name)
        await self.run_op(d.host, pb.Operation(service_stop=pb.ServiceStopSpec(name=unit, instance=process)),
                          d.service.name, "stop previous", check=False)
        if live.code.port:
            self.ledger.release_port(live.code.host, live.code.port)

    async def _prune_releases(self, d: Deployment) -> None:
        keep = {r["number"] for r in self.ledger.instances(self.env_key, d.service.name)
                if r["component"] == "code" and r["status"] in ("live", "standby", "building")}
        keep = set(sorted(keep)[-KEEP_RELEASES:]) | {d.code}
        doomed = [r["number"] for r in self.ledger.instances(self.env_key, d.service.name)
                  if r["component"] == "code" and r["number"] not in keep and r["status"] not in ("removed", "taken")]
        if not doomed:
            return
        paths = " ".join(shlex.quote(f"{d.service_dir}/releases/{n}") for n in doomed)
        await self.sh(d.host, f"rm -rf {paths}", d.service.name, "prune releases", check=False)
        for number in doomed:
            self.ledger.set_status(self.env_key, d.service.name, "code", number, "removed")

    # ---------------------------------------------------------------- failure

    async def _undo(self, d: Deployment) -> None:
        """Leave things as they were: the live instance keeps serving, new data goes away."""
        name = d.service.name
        if d.process:
            unit = naming.unit_base(self.spec.app, self.spec.environment, name)
            await self.run_op(d.host, pb.Operation(service_stop=pb.ServiceStopSpec(name=unit, instance=d.process)),
                              name, "stop failed instance", check=False)
        if d.port:
            self.ledger.release_port(d.host.id, d.port)
        if d.staged_env:
            await self.sh(d.host, f"rm -f {shlex.quote(d.staged_env)}", name, "drop staged .env", check=False,
                          user=self.unix_user)
        if d.code_new:
            self.ledger.set_status(self.env_key, name, "code", d.code, "failed")
        for component, number, names, provider in d.created:
            await self.drop_owned(provider, component, number, names, name, f"drop new {component}")
            self.ledger.set_status(self.env_key, name, component, number, "failed")

    async def drop_owned(self, provider: Agent, component: str, number: int, names: dict, service: str,
                         step: str, check: bool = False) -> None:
        """Drop a data instance's database and user, or ACL user, only where the server shows
        they are the ones the ledger recorded (mark, password); say what was left."""
        password = self.ledger.password(self.env_key, service, component, number) or ""
        if component == "mysql":
            op = await self.sh(provider, provider.mysql_admin(), service, step, check=check,
                               scope=Scope.data(self.env_key), stdin=ownership.mysql_drop_owned(names["database"], names.get("mark", ""),
                                                                names["user"], password))
        else:
            op = await self.sh(provider, ownership.redis_drop_owned(provider.redis_cli(), names["user"]), service,
                               step, check=check, stdin=ownership.redis_drop_stdin(password),
                               scope=Scope.data(self.env_key))
        for line in _tail(op.output.folder / "output.log").splitlines():
            if "left untouched" in line:
                self.job.event("job.note", note=f"{service}: {line.strip()}")


# ---------------------------------------------------------------- removing a service

async def remove_code(runner: "Runner", service: str) -> None:
    """Stop every process of a service and remove its folder; mark its code instances removed.
    Its data instances are left alone."""
    spec, ledger, env_key = runner.spec, runner.ledger, runner.env_key
    rows = [r for r in ledger.instances(env_key, service) if r["component"] == "code"]
    ran = {r["host"] for r in rows if r["status"] in ("live", "standby")}  # made before folders had marks
    unit = naming.unit_base(spec.app, spec.environment, service)
    for host_id in sorted({r["host"] for r in rows if r["host"]}):
        host = runner.registry.agents.get(host_id)
        if host is None or host.state != "connected":
            raise StepFailed(service, "remove", f"agent {host_id} is not connected: nothing was removed there")
        listing = await runner.run_op(host, ServiceProcesses.operation(unit), service, "list processes", check=False)
        for process in ServiceProcesses.parse(_output(listing), unit):
            await runner.run_op(host, pb.Operation(service_stop=pb.ServiceStopSpec(
                name=unit, instance=process.instance)), service, "stop", check=False)
        folder = naming.service_dir(host.services_root, spec.app, spec.environment, service)
        op = await runner.sh(host, ownership.if_folder_ours(folder, ledger.owner, 'rm -rf -- "$d"', legacy=host_id in ran),
                             service, "remove folder")
        for line in _output(op).splitlines():
            runner.job.event("job.note", note=f"{service}: {line}")
    for r in rows:
        ledger.set_status(env_key, service, "code", r["number"], "removed")
        if r["port"]:
            ledger.release_port(r["host"], r["port"])


# ---------------------------------------------------------------- scripts (pure)

def _checkout_script(service_dir: str, release: str, source: str, commit: str) -> str:
    """A clone that shares nothing with its source. A local clone would hard-link the source's
    objects (or, before git 2.38.1, follow links in them), and the release is then given to the
    environment's user: those very files would become the tenant's, who could rewrite what every
    other environment deploys from. `--no-local` fetches through git's own transport instead."""
    q = shlex.quote
    return (f"set -e; mkdir -p {q(service_dir)}/releases {q(service_dir)}/shared {q(service_dir)}/logs; "
            f"rm -rf {q(release)}; git clone --quiet --no-local --no-checkout {q(source)} {q(release)}; "
            f"git -C {q(release)} checkout --quiet --detach {q(commit)}")


def _current_script(service_dir: str, release: str) -> str:
    q = shlex.quote
    return f"ln -sfn {q(release)} {q(service_dir)}/current.tmp && mv -T {q(service_dir)}/current.tmp {q(service_dir)}/current"


def _first_free_port_script(candidates: list[int]) -> str:
    return ("python3 - <<'EOF'\nimport socket, sys\n"
            f"for port in {candidates!r}:\n"
            "    s = socket.socket()\n"
            "    try:\n"
            "        s.bind(('0.0.0.0', port))\n"
            "    except OSError:\n"
            "        continue\n"
            "    finally:\n"
            "        s.close()\n"
            "    print(port)\n"
            "    sys.exit(0)\n"
            "sys.exit(1)\nEOF")


def redis_admin(provider: Agent, expect: str = "OK") -> str:
    """redis-cli exits 0 even when Redis answers an error, so the reply is checked; it is not
    printed, since an ACL error can quote the rule it refused."""
    return (f'reply=$({provider.redis_cli()}) || exit 1; [ "$reply" = {expect} ] || '
            '{ echo "redis refused the change" >&2; exit 1; }')
