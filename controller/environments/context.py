"""What every procedure of a job works with: the job, its spec, the fleet and the ledger, and the
one way to act — an operation sent to an agent, recorded as a step of the job.

Procedures (deploying, routing, data instances, teardown, recovery, verify) are functions of
their own modules that take a `JobContext`; none of them reaches into another's internals.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from protos import deployer_pb2 as pb

from controller.environments import naming, commands as ops, ownership
from controller.fleet.dispatcher import Dispatcher, Op
from controller.fleet.operations import new_op_id
from controller.fleet.registry import CONNECTED, Agent, Registry
from controller.state.jobs import Job
from controller.state.knowledge import Scope
from controller.state.ledger import RAN, Ledger
from controller.environments.placement import PlacementError
from controller.environments.spec import Spec
from common import errors

OUTPUT_TAIL_LINES = 15
PORT_RANGE = range(20000, 30000)

# Outcomes of an operation that was under way and did not end on its own.
CUT_OFF = (pb.SIGNALED, pb.TIMED_OUT, pb.CANCELLED, pb.INTERRUPTED, pb.LOST)


class StepFailed(errors.Failed):
    """A step of a procedure failed; the message is one line, the tail the operation's output."""

    def __init__(self, service: str, step: str, message: str, tail: str = "", cut: bool = False) -> None:
        super().__init__(f"{service}: {step} failed: {message}")
        self.service, self.step, self.tail = service, step, tail
        self.cut = cut  # its operation was under way and did not end on its own (killed, lost…)


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


def output_of(op: Op) -> str:
    """Everything an operation printed."""
    return op.output.text()


def tail_of(op: Op, lines: int = OUTPUT_TAIL_LINES) -> str:
    """The last lines an operation printed: what a failure shows."""
    return tail(op.output.folder / "output.log", lines)


def tail(path: Path, lines: int = OUTPUT_TAIL_LINES) -> str:
    try:
        data = path.read_bytes()[-8192:]
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def result_detail(result: pb.OperationResult) -> str:
    """How an operation ended, in a few words: its error, its exit code or its outcome."""
    return result.error or (f"exit {result.exit_code}" if result.outcome == pb.EXITED
                            else pb.Outcome.Name(result.outcome).lower())


class JobContext:
    """One job's work on one environment: sends operations, records events, keeps the ledger."""

    # Jobs of different environments run at once and share hosts and routers.
    port_locks: dict = {}
    route_locks: dict = {}

    def __init__(self, job: Job, spec: Spec, dispatcher: Dispatcher, registry: Registry,
                 ledger: Ledger) -> None:
        self.job, self.spec, self.dispatcher, self.registry, self.ledger = job, spec, dispatcher, registry, ledger
        self.env_key = spec.key
        self.deploying: dict[str, int] = {}  # service → its deploy in progress, whose step the ledger keeps
        self.restoring: dict[str, tuple[tuple[str, int], str]] = {}  # owner → (instance, snapshot) it is made from
        self.acme = None  # the controller's ACME settings (certificates.AcmeSettings), for `tls: auto`

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
            raise StepFailed(service, step, result_detail(result), tail_of(op), cut=result.outcome in CUT_OFF)
        return op

    async def sh(self, agent: Agent, script: str, service: str, step: str, *, cwd: str = "",
                 env_file: str = "", stdin: bytes = b"", timeout: float = 1800, check: bool = True,
                 user: str = "", env: dict[str, str] | None = None, scope: Scope | None = None) -> Op:
        operation = pb.Operation(exec=pb.ExecSpec(argv=["sh", "-c", script], cwd=cwd, env_file=env_file,
                                                  stdin=stdin, timeout_s=timeout, user=user, env=env or {},
                                                  limits=self.limits(agent) if user == self.unix_user else None))
        return await self.run_op(agent, operation, service, step, check, scope)

    async def guarded(self, agent: Agent, script: str, service: str, step: str, explained: int = 0, **kw) -> str:
        """Run a guarded create; "" when it did its work, the line naming what it found taken
        (and left untouched) when it exits TAKEN. Any other failure raises StepFailed; one that
        exits `explained` has its last line of output as the failure's message."""
        op = await self.sh(agent, script, service, step, check=False, **kw)
        result = op.result
        if result.outcome == pb.EXITED and result.exit_code == 0:
            return ""
        found = tail_of(op)
        if result.outcome == pb.EXITED and result.exit_code == ownership.TAKEN:
            taken = [line.strip() for line in found.splitlines() if "left untouched" in line]
            return "; ".join(taken) or f"{step}: the name is taken by something this deployer did not make"
        said = found.strip().splitlines()
        if explained and result.outcome == pb.EXITED and result.exit_code == explained and said:
            raise StepFailed(service, step, said[-1].strip())
        raise StepFailed(service, step, result_detail(result), found, cut=result.outcome in CUT_OFF)

    def note(self, text: str) -> None:
        """A line in the job's history, for the operator."""
        self.job.event("job.note", note=text)

    @property
    def unix_user(self) -> str:
        """The environment's own user on every host: its commands and processes run as it."""
        return naming.unix_user(self.spec.app, self.spec.environment)

    def limits(self, host: Agent) -> pb.Limits:
        """The environment's limits on `host`, for everything that runs there as its user."""
        lim = self.spec.limits
        return ops.limits(lim.memory, lim.cpu, lim.processes, self.unix_user, host.services_root)

    def log_files(self, service_dir: str, instance: str) -> dict:
        """Where a process of the environment writes its output: stamped, rotated files in the
        instance's folder of the service's `logs`, kept under the service's share of the
        environment's cap (a driver that cannot stamp appends to `log_path`)."""
        logs = self.spec.logs
        return {"log_path": f"{service_dir}/logs/{instance}.log", "log_dir": f"{service_dir}/logs/{instance}",
                "log_file_bytes": logs.file, "log_keep_bytes": logs.keep(len(self.spec.services))}

    async def log_tail(self, host: Agent, service_dir: str, instance: str, service: str,
                       lines: int = OUTPUT_TAIL_LINES) -> str:
        """The last lines an instance printed: why it failed is usually there."""
        read = await self.run_op(host, pb.Operation(log_read=pb.LogReadSpec(
            logs=f"{service_dir}/logs", instance=instance, tail=lines)), service, "read log", check=False)
        return tail_of(read, lines)

    def unit(self, service: str) -> str:
        return naming.unit_base(self.spec.app, self.spec.environment, service)

    def unit_of_redis(self, service: str) -> str:
        """The unit of the service's dedicated Redis servers (instance: the Redis instance number)."""
        return naming.redis_unit(self.spec.app, self.spec.environment, service)

    def deployed_on(self, host_id: str, service: str | None = None) -> bool:
        """The ledger holds a code instance (of `service`) that ran on that host: what is there
        under our names was made by us, if before objects carried a mark."""
        return any(r.component == "code" and r.host == host_id and r.status in RAN
                   for r in self.ledger.instances(self.env_key, service))


async def allocate_port(ctx: JobContext, host: Agent, service: str, instance: int, holder: str = "") -> int:
    """A port no instance on that host holds in the ledger, and that is free there now; held in
    the ledger for `holder` (the service, by default) until released."""
    async with ctx.port_locks.setdefault(host.id, asyncio.Lock()):
        taken = ctx.ledger.ports_in_use(host.id)
        # In random order, not the lowest first: a second controller on the same host (or any
        # program) picking at the same moment would otherwise pick the very same port.
        free = [p for p in PORT_RANGE if p not in taken]
        candidates = random.sample(free, min(200, len(free)))
        probe = await ctx.sh(host, ops.first_free_port_script(candidates), service, "port", check=False)
        chosen = output_of(probe).strip()
        if probe.result.exit_code == 1 and not chosen:
            raise StepFailed(service, "port", f"no free port on {host.id} among {len(candidates)} candidates")
        if probe.result.exit_code != 0 or not chosen.isdigit():
            # Not an answer from the probe itself: say what happened instead of guessing.
            raise StepFailed(service, "port", f"the port probe on {host.id} failed "
                             f"({result_detail(probe.result)})", chosen[-2000:])
        port = int(chosen)
        ctx.ledger.reserve_port(host.id, port, ctx.env_key, holder or service, instance)
        return port


async def claim_host(ctx: JobContext, host: Agent, service: str) -> None:
    """The service's folder on `host` (made with our mark, or checked to carry it) and the
    environment's user there. The folder first: refused, it leaves nothing behind, not even a
    new user."""
    owner = ctx.ledger.owner
    folder = naming.service_dir(host.services_root, ctx.spec.app, ctx.spec.environment, service)
    refused = await ctx.guarded(host, ownership.claim_service_folder(folder, owner, ctx.deployed_on(host.id, service)),
                                service, "folder")
    if refused:
        raise StepFailed(service, "folder", refused)
    refused = await ctx.guarded(host, ownership.unix_user_guard(ctx.unix_user, owner, ctx.deployed_on(host.id))
                                + ops.ensure_unix_user(ctx.unix_user, ownership.owner_mark(owner)), service, "user")
    if refused:
        raise StepFailed(service, "user", refused)
