"""Self-healing, level-triggered, and the controller's decision like everything else.

An agent says at once when a service process ends without an order (`ServiceExited`), and every
hello is a reason to look again. Either way the controller asks the agent what runs (one process
listing per host) and compares it with the ledger: a live code instance whose process is gone is
restarted — the same code instance, blue/green on a fresh port, as `deployctl reload` does — as a
`heal` job. A process that ran `stable_after` seconds (30) before it ended is restarted at once;
one that did not, or a restart that failed, is unstable, and each unstable one in a row waits
longer (1, 2, 4, 8… s, at most BACKOFF_MAX_S). After `attempts` (5) of them the service is in a
crash loop: the controller stops trying and says so, until it is deployed again. A service with
`restart: never` is only reported. Each of these is an event in the environment's history
(`deployctl events`); no instance number changes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from protos import deployer_pb2 as pb

from common import errors
from controller.environments import naming
from controller.environments.facts import ServiceProcesses
from controller.fleet.operations import new_op_id
from controller.fleet.registry import CONNECTED, LOST
from controller.state.events import EnvEvents
from controller.state.jobs import Locked
from controller.state.ledger import Status

log = structlog.get_logger("controller")

BACKOFF_MAX_S = 60.0
LISTING_S = 30.0           # a listing an agent does not answer in this long ends the check
RETRY_BUSY_S = 2.0         # the environment is held by another job: look again after this
# A failed restart counts against the service when one of these of its own steps failed.
OWN_STEPS = {f"{step} failed" for step in ("checkout", "install", "build", "start", "health", "health command")}


@dataclass
class Track:
    """One service's restarts, as the controller keeps them."""

    unstable: int = 0         # ends (or failed restarts) in a row that did not stay up stable_after
    counted: str = ""         # the process whose end was counted
    last_attempt: float = 0.0
    looping: str = ""         # the process it gave up on (a crash loop), until a deploy replaces it


def exit_text(code: int, signal: int) -> str:
    return f"killed by signal {signal}" if signal else "exit code unknown" if code < 0 else f"exit code {code}"


class Healer:
    def __init__(self, environments, events: EnvEvents, clock=time.monotonic, replace_after: float = 300.0) -> None:
        self.environments = environments
        self.ledger, self.registry, self.dispatcher = environments.ledger, environments.registry, environments.dispatcher
        self.events = events
        self.clock = clock
        self.tracks: dict[tuple[str, str], Track] = {}
        self.scheduled: dict[str, asyncio.TimerHandle] = {}
        self.running: set[str] = set()    # environments with a check or heal job under way
        self.again: set[str] = set()      # ... asked to look once more when it ends
        self.heard: set[tuple[str, str]] = set()
        self.sick: dict[tuple[str, str], tuple[str, float]] = {}  # (env, process) → (service, live since)
        self.tasks: set[asyncio.Task] = set()
        self.replace_after = replace_after
        self.replacing: dict[str, asyncio.TimerHandle] = {}   # lost agent → when its web replicas move
        self.registry.on_exited.append(self.exited)
        self.registry.on_attached.append(self.attached)
        self.registry.on_lost.append(self.lost)

    # ---------------------------------------------------------------- what the agents say

    def _live_on(self, agent_id: str) -> list[tuple[str, str, str]]:
        """(environment, service, process) of every live code instance's replica on that agent."""
        return [(r.env_key, r.service, replica.process) for r, replica in self.ledger.live_code_on(agent_id)]

    def exited(self, agent_id: str, exited) -> None:
        for env_key, service, process in self._live_on(agent_id):
            app, env = env_key.split("/", 1)
            if exited.name == naming.unit_base(app, env, service) and exited.instance == process:
                if (env_key, process) not in self.heard:  # said once per process, however often the agent says it
                    self.heard.add((env_key, process))
                    self.events.add(env_key, "exited", service, host=agent_id, process=process,
                                    exit_code=exited.exit_code, signal=exited.signal,
                                    why=exit_text(exited.exit_code, exited.signal))
                self.schedule(env_key, 0.0)

    def attached(self, agent_id: str) -> None:
        timer = self.replacing.pop(agent_id, None)
        if timer is not None:  # back in time: its replicas stay where they are
            timer.cancel()
        for env_key in sorted({env_key for env_key, _, _ in self._live_on(agent_id)}):
            self.schedule(env_key, 0.5)  # its other sessions' messages come first
        if self.ledger.db.stop_debts(agent_id):  # back from being lost: what moved off it is stopped there
            task = asyncio.get_running_loop().create_task(self._settle_stops(agent_id))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        agent = self.registry.agents.get(agent_id)
        if agent is not None and "nginx" in agent.capabilities:
            # A router back: the routes that changed while it was away are written on it.
            task = asyncio.get_running_loop().create_task(self._sync_routes(agent_id))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _settle_stops(self, agent_id: str) -> None:
        """A host back from being lost: each process a deploy could not stop there (its replica
        had moved) is stopped now and its port freed, unless it is live again; the environment's
        history says so. No job: nothing else of the environment is touched, and it holds even for
        one destroyed meanwhile. One the agent does not confirm stays owed for its next return."""
        for env_key, service, process, port in self.ledger.db.stop_debts(agent_id):
            live = [r for row in self.ledger.instances(env_key, status=Status.LIVE) if row.component == "code"
                    for r in row.replicas if r.host == agent_id]
            if process not in {r.process for r in live}:
                app, env = env_key.split("/", 1)
                stop = pb.Operation(id=new_op_id(), service_stop=pb.ServiceStopSpec(
                    name=naming.unit_base(app, env, service), instance=process))
                try:
                    op = await asyncio.wait_for(self.dispatcher.execute(agent_id, stop, environment=env_key),
                                                LISTING_S)
                except (asyncio.TimeoutError, errors.DeployerError) as exc:
                    log.warning("heal.stop_failed", environment=env_key, host=agent_id, process=process, error=str(exc))
                    continue
                if op.result.outcome != pb.EXITED or op.result.exit_code != 0:
                    log.warning("heal.stop_failed", environment=env_key, host=agent_id, process=process,
                                error=op.result.error or f"exit {op.result.exit_code}")
                    continue
                if port and port not in {r.port for r in live}:
                    self.ledger.release_port(agent_id, port)
                self.events.add(env_key, "stopped", service, host=agent_id, process=process,
                                why="it kept running while its host was lost, and its replica had moved")
            self.ledger.db.paid_stop(agent_id, env_key, service, process)

    async def _sync_routes(self, router_id: str) -> None:
        pending = self.ledger.db.route_debts(router_id)
        tries: dict[str, int] = {}
        while pending:
            env_key = pending.pop(0)
            try:
                job = self.environments.sync_route(env_key, router_id)
            except Locked:  # its own job is under way (it may have begun before the router was back)
                tries[env_key] = tries.get(env_key, 0) + 1
                if tries[env_key] < 20:
                    pending.append(env_key)
                    await asyncio.sleep(RETRY_BUSY_S / max(1, len(pending)))
                continue
            except errors.BadInput:  # destroyed meanwhile: a route file left there is verify's orphan
                self.ledger.db.paid_route(router_id, env_key)
                continue
            except Exception as exc:
                log.warning("route.sync_failed", environment=env_key, router=router_id, error=str(exc))
                continue
            state = await job.wait()
            if state != "succeeded":
                log.warning("route.sync_failed", environment=env_key, router=router_id, why=job.summary)

    def lost(self, agent_id: str) -> None:
        """Reported, not moved (moving comes with several servers). An agent this controller has
        not seen since it started may still be in its reconnect backoff: it is reported once that
        has passed, if it is still away."""
        agent = self.registry.agents.get(agent_id)
        if agent is not None and agent.grace:
            asyncio.get_running_loop().call_later(agent.grace, self._still_lost, agent_id)
            return
        self._report_lost(agent_id)

    def _still_lost(self, agent_id: str) -> None:
        agent = self.registry.agents.get(agent_id)
        if agent is not None and agent.state == LOST:
            self._report_lost(agent_id)

    def _report_lost(self, agent_id: str) -> None:
        live = self._live_on(agent_id)
        for env_key, service, process in live:
            self.events.add(env_key, "agent-lost", service, host=agent_id, process=process)
        self.environments.notifier.agent_lost(agent_id, live)
        if live and agent_id not in self.replacing:
            self.replacing[agent_id] = asyncio.get_running_loop().call_later(
                self.replace_after, self._launch_replace, agent_id)

    # ---------------------------------------------------------------- a host that stays lost

    def _launch_replace(self, agent_id: str) -> None:
        self.replacing.pop(agent_id, None)
        task = asyncio.get_running_loop().create_task(self.replace(agent_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def replace(self, agent_id: str) -> None:
        """The web replicas of a host lost for `replace_after` start on other hosts of their role:
        each service's live code instance again (a `heal` job), placed off the lost host, its
        release checked out there. Daemons and data instances never move on their own."""
        agent = self.registry.agents.get(agent_id)
        if agent is None or agent.state != LOST:
            return
        by_env: dict[str, set[str]] = {}
        for env_key, service, _ in self._live_on(agent_id):
            spec = self.environments.accepted_spec(env_key)
            definition = next((s for s in spec.services if s.name == service), None) if spec else None
            if definition is not None and definition.is_web:
                by_env.setdefault(env_key, set()).add(service)
        for env_key, services in sorted(by_env.items()):
            job = None
            while getattr(self.registry.agents.get(agent_id), "state", "") == LOST:  # back: they stay
                try:
                    job = self.environments.heal(env_key, sorted(services), lost=agent_id)
                    break
                except Locked:  # another job holds it: once it ends
                    await asyncio.sleep(RETRY_BUSY_S)
                except errors.BadInput as exc:  # destroyed meanwhile
                    log.warning("heal.replace_skipped", environment=env_key, host=agent_id, error=str(exc))
                    break
            if job is None:
                continue
            for service in sorted(services):
                self.events.add(env_key, "replacing", service, host=agent_id, job=job.id,
                                why=f"host {agent_id} is lost for more than {self.replace_after:g}s")
            state = await job.wait()
            live = self.ledger.state(env_key)
            for service in sorted(services):
                hosts = live[service].code.hosts if service in live and live[service].code else []
                if state == "succeeded":
                    self.events.add(env_key, "moved", service, job=job.id, host=agent_id, to=hosts)
                else:
                    self.events.add(env_key, "move-failed", service, job=job.id, host=agent_id, why=job.summary)

    # ---------------------------------------------------------------- deciding

    def schedule(self, env_key: str, delay: float) -> None:
        if env_key in self.scheduled:
            return
        self.scheduled[env_key] = asyncio.get_running_loop().call_later(delay, self._launch_check, env_key)

    def _launch_check(self, env_key: str) -> None:
        self.scheduled.pop(env_key, None)
        if env_key in self.running:  # one at a time per environment: the one under way looks again after
            self.again.add(env_key)
            return
        self.running.add(env_key)
        task = asyncio.create_task(self._checked(env_key))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _checked(self, env_key: str) -> None:
        try:
            await self.check(env_key)
        except Exception as exc:  # a listing that failed (agent gone meanwhile): the next hello looks again
            log.warning("heal.check_failed", environment=env_key, error=str(exc) or type(exc).__name__)
        finally:
            self.running.discard(env_key)
            if env_key in self.again:
                self.again.discard(env_key)
                self.schedule(env_key, 0.0)

    async def check(self, env_key: str) -> None:
        """Ask each host what runs; restart, wait or give up for each live instance that is gone."""
        dead = await self._dead(env_key) + self._sick(env_key)
        now, due, later = self.clock(), [], []
        spec = self.environments.accepted_spec(env_key)  # `restart:` as the operator last set it
        for service, process, started_at in dead:
            definition = next((s for s in spec.services if s.name == service), None) if spec else None
            policy = definition.restart if definition is not None else None
            track = self.tracks.get((env_key, service)) or self._recall(env_key, service, process)
            if track.looping == process:
                continue
            if track.looping:  # deployed again since it looped: a fresh start
                track.looping, track.unstable = "", 0
            if policy is not None and not policy.enabled:
                if track.counted != process:
                    track.counted = process
                    self.events.add(env_key, "left", service, process=process, why="restart: never")
                continue
            attempts, stable_after = (policy.attempts, policy.stable_after) if policy else (5, 30.0)
            if track.counted != process:  # a new end: stable if it had run long enough
                track.counted = process
                track.unstable = 0 if started_at and time.time() - started_at >= stable_after else track.unstable + 1
            if track.unstable >= attempts:
                track.looping = process
                why = (f"{track.unstable} restarts in a row did not stay up {stable_after:g}s: "
                       "no more are ordered until it is deployed again")
                self.events.add(env_key, "crash-loop", service, process=process, restarts=track.unstable, why=why)
                log.warning("heal.crash_loop", environment=env_key, service=service)
                self.environments.notifier.crash_loop(env_key, service, track.unstable, why)
                continue
            delay = min(BACKOFF_MAX_S, 2.0 ** (track.unstable - 1)) if track.unstable else 0.0
            wait = track.last_attempt + delay - now if track.last_attempt else 0.0
            (due if wait <= 0 else later).append((service, wait))
        if later:
            self.schedule(env_key, min(w for _, w in later))
        if due:
            sick = {service for (env, _), (service, _) in self.sick.items() if env == env_key}
            await self._restart(env_key, list(dict.fromkeys(s for s, _ in due)), sick)

    def busy(self, env_key: str, service: str) -> bool:
        """Being looked at or healed, or given up on: not worth a health check now."""
        track = self.tracks.get((env_key, service))
        return env_key in self.running or env_key in self.scheduled or bool(track and track.looping)

    def unhealthy(self, env_key: str, service: str, process: str, since: float, why: str) -> None:
        """A live instance that runs but failed its health checks (watch.py): restarted like a dead one."""
        if (env_key, process) in self.sick:
            return
        self.sick[(env_key, process)] = (service, since)
        self.events.add(env_key, "unhealthy", service, process=process, why=why)
        self.schedule(env_key, 0.0)

    def _sick(self, env_key: str) -> list[tuple[str, str, float]]:
        """The unhealthy ones still live (a heal or deploy since replaced the others)."""
        live = {replica.process for r in self.ledger.instances(env_key, status=Status.LIVE)
                if r.component == "code" for replica in r.replicas}
        out = []
        for (env, process), (service, since) in list(self.sick.items()):
            if env != env_key:
                continue
            if process in live:
                out.append((service, process, since))
            else:
                del self.sick[(env, process)]
        return out

    async def _dead(self, env_key: str) -> list[tuple[str, str, float]]:
        """(service, process, when it started) of the live code instances whose process is not
        running (0: not said, as for a process the agent no longer lists)."""
        app, env = env_key.split("/", 1)
        live = [(r.service, replica.host, replica.process) for r in self.ledger.instances(env_key, status=Status.LIVE)
                if r.component == "code" for replica in r.replicas if replica.process]
        dead = []
        for host_id in sorted({host for _, host, _ in live}):
            agent = self.registry.agents.get(host_id)
            if agent is None or agent.state != CONNECTED:
                continue
            # Every unit of ours on that host, then only this environment's exact unit names: a prefix
            # of them would miss hashed names and take in another environment's.
            asked = ServiceProcesses.operation(naming.PREFIX, group=naming.unix_user(app, env))
            asked.id = new_op_id()
            op = await asyncio.wait_for(self.dispatcher.execute(host_id, asked, environment=env_key), LISTING_S)
            if op.result.outcome != pb.EXITED or op.result.exit_code != 0:  # no answer is not "all dead"
                raise RuntimeError(f"the process listing on {host_id} did not complete")
            listed = {(p.name, p.instance): p for p in ServiceProcesses.parse(op.output.text())}
            for service, host, process in live:
                found = listed.get((naming.unit_base(app, env, service), process))
                if host == host_id and (found is None or not found.alive):
                    dead.append((service, process, found.started_at if found else 0.0))
        return dead

    async def _restart(self, env_key: str, services: list[str], sick: set[str] = frozenset()) -> None:
        now = self.clock()
        try:
            job = self.environments.heal(env_key, services, sick)
        except Locked as exc:  # held by another job (a deploy, a repair): look again soon
            log.info("heal.deferred", environment=env_key, reason=str(exc))
            self.schedule(env_key, RETRY_BUSY_S)
            return
        for service in services:
            self.tracks[(env_key, service)].last_attempt = now
            self.events.add(env_key, "restarting", service, job=job.id)
        state = await job.wait()
        live = self.ledger.state(env_key)
        retry = 0.0
        for service in services:
            if state == "succeeded" and service in live and live[service].code:
                self.events.add(env_key, "restarted", service, job=job.id, code=live[service].code.number,
                                **({"port": live[service].code.port} if live[service].code.port else {}))
                continue
            # Only a failure of the service's own steps counts against it: a router or agent that
            # failed the job is tried again later, and the service that did fail is the one named.
            own = job.summary.startswith(f"{service}: ") and job.summary.split(": ", 2)[1] in OWN_STEPS
            if own:
                self.tracks[(env_key, service)].unstable += 1
            else:
                retry = RETRY_BUSY_S
            self.events.add(env_key, "restart-failed", service, job=job.id, why=job.summary)
        self.schedule(env_key, retry)  # what failed (or died again meanwhile) is looked at once more

    def _recall(self, env_key: str, service: str, process: str) -> Track:
        """A service first looked at since this controller started: a crash loop it was left in is
        remembered from the history (the same process given up on), not tried `attempts` times more."""
        track = self.tracks[(env_key, service)] = Track()
        loops = self.events.of_service(env_key, service, ("crash-loop",))
        if loops and loops[-1].get("process") == process:
            track.looping = track.counted = process
            track.unstable = loops[-1].get("restarts", 0)
        return track

    def status(self, env_key: str, service: str, process: str) -> dict:
        """What `deployctl status` shows of a service's healing."""
        events = self.events.of_service(env_key, service, ("exited", "restarted", "crash-loop"))
        restarted = [e for e in events if e["kind"] == "restarted"]
        exits = [e for e in events if e["kind"] == "exited"]
        out = {"restarts": len(restarted)}
        if exits:
            out["last_exit"] = exits[-1]["why"]
            out["last_exit_at"] = exits[-1]["t"]
        if restarted:
            out["restarted_at"] = restarted[-1]["t"]
        track = self.tracks.get((env_key, service))
        loops = [e for e in events if e["kind"] == "crash-loop"]
        looping = track.looping if track is not None else loops[-1].get("process", "") if loops else ""
        if looping and looping == process:
            out["crash_loop"] = True
        return out
