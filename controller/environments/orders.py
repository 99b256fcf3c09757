"""Orders in, jobs out: validate an order, resolve its refs, plan it, and run it as a job."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import structlog
import yaml

from controller.environments import planner, recovery, spec as spec_mod, sources
from controller.fleet.dispatcher import Dispatcher
from controller.state.jobs import EnvLock, Job, JobTable, Locked, Specs, new_job_id
from controller.state.ledger import Ledger, Status, replica_key
from controller.environments import backups, certificates, commands as ops, data, deploying, hosts, routing, tls
from controller.environments.notify import Notifier
from controller.environments.context import JobContext, PlacementError, StepFailed, pick_agent
from controller.environments.teardown import destroy
from controller.environments.verify import Checker, claimed_names
from controller.fleet.registry import Registry
from common import errors

log = structlog.get_logger("controller")


class OrderError(errors.BadInput):
    """The order cannot be accepted; one line naming the file, line and key where it can."""


@dataclass(frozen=True)
class Order:
    """A plan or apply: the spec as the operator sent it (or a diff to the stored one), options."""

    spec_text: str = ""
    spec_name: str = ""       # the file name, for error messages
    options_text: str = ""
    options_name: str = ""
    diff_text: str = ""
    diff_name: str = ""
    environment: str = ""     # app/environment, with a diff and no spec
    prune: bool = False
    base_dir: str = ""        # where relative local sources are resolved


@dataclass(frozen=True)
class Rollback:
    """Start an older code instance (`to`, 0: the newest older one), or the live one again."""

    environment: str
    service: str
    to: int = 0
    reload: bool = False


@dataclass(frozen=True)
class Check:
    """verify, repair, clean or destroy an environment."""

    environment: str
    action: str
    dry_run: bool = False
    purge_data: bool = False


def order_of(kind, message):
    """An order of `kind` with the same-named fields of a request (the gRPC boundary's message)."""
    return kind(**{f.name: getattr(message, f.name) for f in fields(kind)})


class Environments:
    def __init__(self, store: Path, dispatcher: Dispatcher, registry: Registry, ledger: Ledger,
                 notifier: Notifier | None = None) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.registry = registry
        self.ledger = ledger
        self.db = dispatcher.db
        self.specs, self.job_table = Specs(self.db), JobTable(self.db)
        self.jobs: dict[str, Job] = {}
        self.tasks: set[asyncio.Task] = set()
        self.healer = None  # controller/environments/healing.py, set by the daemon
        self.acme: certificates.AcmeSettings | None = None  # the controller's `acme:` settings, set by the daemon
        self.notifier = notifier or Notifier(None)
        self._recover()

    def _recover(self) -> None:
        """Jobs that were running when the controller died end as `interrupted`, saying where; a
        recovery job per environment then settles what they left in flight (recovery.py)."""
        for env_key in recovery.interrupt(self.store, self.job_table, self._interrupted):
            try:
                self.recover(env_key)
            except (OrderError, Locked, spec_mod.SpecError) as exc:  # a lock not ours to break, a bad stored spec
                log.warning("recovery.not_started", environment=env_key, error=str(exc))

    def _interrupted(self, row, summary: str) -> None:
        self.notifier.job_finished(row["id"], row["env_key"], row["kind"], "interrupted", summary,
                                   row["created"], time.time())

    def recover(self, env_key: str) -> Job | None:
        """Start the job that settles what interrupted jobs left in this environment."""
        stored = self.stored_spec(env_key)
        if stored is None:
            self.job_table.fail_without_spec(env_key)
            return None
        spec = spec_mod.spec_from_dict(self._as_deployed(env_key, stored))
        return self._launch(spec, "recover", None, {}, recovery.settle)

    # ---------------------------------------------------------------- orders

    def stored_spec(self, env_key: str) -> dict | None:
        stored = self.specs.get(env_key)
        return json.loads(stored) if stored is not None else None

    def read_order(self, request: Order) -> tuple[spec_mod.Spec, spec_mod.Options | None]:
        if request.diff_text:
            env_key = request.environment
            if request.spec_text:
                base = spec_mod.parse_spec(request.spec_text, request.spec_name).to_dict()
            else:
                base = self.stored_spec(env_key)
                if base is None:
                    raise OrderError(f"{request.diff_name}: no stored spec for {env_key!r} to apply a diff to")
            spec = spec_mod.merge_diff(base, request.diff_text, request.diff_name)
        else:
            spec = spec_mod.parse_spec(request.spec_text, request.spec_name)
        options = None
        if request.options_text:
            options = spec_mod.parse_options(request.options_text, request.options_name, spec)
        # a SpecError (bad input: file, line and key in one line) goes to the caller as it is
        return self._absolute_sources(spec, request.base_dir), options

    @staticmethod
    def _absolute_sources(spec: spec_mod.Spec, base_dir: str) -> spec_mod.Spec:
        """A relative local source is relative to the spec file's folder."""
        if not base_dir:
            return spec
        services = []
        for service in spec.services:
            source = service.source
            if "://" not in source and ":" not in source.split("/")[0] and not source.startswith("/"):
                source = str((Path(base_dir) / source).resolve())
            services.append(dataclasses.replace(service, source=source))
        return dataclasses.replace(spec, services=tuple(services))

    async def resolve(self, spec: spec_mod.Spec, options, request: Order) -> dict[str, str]:
        """Each service's ref → exact commit (git ls-remote), checked before any work starts."""
        refs = dict(options.refs) if options else {}
        selected = set(options.services) if options and options.services else {s.name for s in spec.services}
        # A service using another's instance may bring that one in (see planner.plan).
        selected |= {owner for s in spec.services if s.name in selected for _, owner in s.shared}

        async def one(service):
            ref = refs.get(service.name, service.ref)
            try:
                return service.name, await asyncio.to_thread(sources.resolve_ref, service.source, ref)
            except sources.SourceError as exc:
                if service.name in refs:
                    where = f"{request.options_name}:{spec_mod.key_line(request.options_text, ['refs', service.name]) or '?'}: refs.{service.name}"
                else:
                    text, name = (request.spec_text, request.spec_name) if request.spec_text else (request.diff_text, request.diff_name)
                    line = spec_mod.key_line(text, ["services", service.name, "ref"]) or spec_mod.key_line(text, ["services", service.name])
                    where = f"{name}:{line}: services.{service.name}.ref" if line else f"{name}: services.{service.name}.ref"
                raise OrderError(f"{where}: {exc}") from None

        pairs = await asyncio.gather(*(one(s) for s in spec.services if s.name in selected))
        return dict(pairs)

    async def plan(self, request: Order) -> tuple[spec_mod.Spec, planner.Plan, spec_mod.Options | None]:
        spec, options = self.read_order(request)
        commits = await self.resolve(spec, options, request)
        state = self.ledger.state(spec.key)
        made = planner.plan(spec, state, commits, options, request.prune)
        self._check_providers(spec, made)
        self._check_tls(spec)
        return spec, self._placed(spec, made, state), options

    def _check_tls(self, spec: spec_mod.Spec) -> None:
        """The operator's certificate and key are set, a pair, and cover every name, before any
        router is touched: else the spec's error at `tls`, in one line that never quotes them."""
        if spec.tls is None:
            return
        if spec.tls.auto:
            refused = certificates.refusal(self.acme, routing.routers_of(self.registry))
            if refused:
                raise spec.error(("tls",), refused)
            return
        try:
            tls.pair_of(spec.tls.certificate, spec.tls.key, self.ledger.secrets(spec.key), spec.key, spec.names)
        except tls.TlsError as exc:
            raise spec.error(("tls", exc.part) if exc.part else ("tls",), str(exc)) from None

    def _placed(self, spec: spec_mod.Spec, plan: planner.Plan, state) -> planner.Plan:
        """Where each new code instance would go and why (decision 034). A pin that names no
        agent or no label is the spec's error, at its line; a fleet that cannot take the instance
        now is said in the plan, and the deploy says it again when it places."""
        where, notes = [], []
        for sp in plan.services:
            code = sp.change("code") if sp.action == "deploy" else None
            if code is None or not code.new:
                continue
            service = spec.service(sp.service)
            live = state.get(service.name)
            try:
                chosen, warning = hosts.choose_replicas(self.registry, self.ledger, spec, service,
                                                        hosts.live_hosts(live))
            except PlacementError as exc:
                text = str(exc).removeprefix(f"{service.name}: ")
                if exc.pin:
                    raise spec.error(("services", service.name, exc.pin), text) from None
                where.append((service.name, "", f"cannot be placed now: {text}"))
                continue
            for slot, (_agent, choice) in enumerate(chosen):
                where.append((replica_key(service.name, slot), choice.host, choice.why))
            if warning:
                notes.append(warning)
        if notes:
            plan = dataclasses.replace(plan, notes=plan.notes + tuple(notes))
        return dataclasses.replace(plan, placement=tuple(where)) if where else plan

    def _check_providers(self, spec: spec_mod.Spec, plan: planner.Plan) -> None:
        """Each new data instance has a connected agent that can provide it, before any work
        starts: a mode no agent provides is the spec's error, at its line."""
        for sp in plan.services:
            service = spec.service(sp.service) if sp.action == "deploy" else None
            for change in (c for c in (sp.changes if service else ()) if c.new and c.component != "code"):
                if change.component == "redis" and service.redis.mode == "dedicated":
                    if not any(data.runs_dedicated(a) for a in self.registry.agents.values()):
                        raise spec.error(("services", sp.service, "redis", "mode"),
                                         f"dedicated: {data.DEDICATED_MISSING}")
                    continue
                try:
                    pick_agent(self.registry, capability=change.component)
                except PlacementError as exc:
                    raise spec.error(("services", sp.service, "uses"), f"{change.component}: {exc}") from None

    # ---------------------------------------------------------------- apply

    async def apply(self, request: Order) -> tuple[Job | None, planner.Plan]:
        spec, plan, options = await self.plan(request)
        for other, stored in self.specs.others(spec.key):
            theirs = json.loads(stored)
            taken = [n for n in spec.names if n in (theirs.get("domain"), *theirs.get("aliases", ()))]
            if taken:  # one name, one environment: nginx would route it to whichever it read first
                what = "domain" if taken[0] == spec.domain else "alias"
                raise OrderError(f"{request.spec_name or request.diff_name}: {what} {taken[0]} is already "
                                 f"used by {other}")
        missing = [f"{s.name}: secret {n} is not set (deployctl secret set {spec.key} {n})"
                   for s in spec.services for n in s.secrets if n not in self.ledger.secrets(spec.key)]
        if missing:
            raise OrderError(missing[0])
        if plan.empty:
            # "Nothing to do" is only true with nothing in flight: a job holding the environment,
            # or work an interrupted one left unsettled, could still change what is live.
            self._settle_first(spec.key)
            lock = EnvLock(self.store, spec.key)
            if lock.owner() is not None:
                raise Locked(f"{spec.key} is locked by {lock.describe()}: order again once it has finished")
            self._accept(spec)
            return None, plan
        files = {Path(request.spec_name).name or "environment.yml": request.spec_text or ""}
        if request.options_text:
            files[Path(request.options_name).name] = request.options_text
        if request.diff_text:
            files[Path(request.diff_name).name] = request.diff_text
        job = self._launch(spec, "apply", plan, files, lambda ctx: deploying.apply(ctx, plan), accept=True)
        return job, plan

    def _settle_first(self, env_key: str) -> None:
        """Refuse an order while an interrupted job's work is unsettled, and start settling it."""
        if self.job_table.pending(env_key):
            job = self.recover(env_key)
            if job is not None:
                raise Locked(f"{env_key}: {job.id} first settles what an interrupted job left in flight "
                                 f"(deployctl job show {job.id}); order again once it has finished")

    def _launch(self, spec: spec_mod.Spec, kind: str, plan: planner.Plan | None, files: dict[str, str],
                body, note: str = "", accept: bool = False) -> Job:
        """Lock the environment, open the job's folder, and run `body(ctx)` as the job.
        With `accept`, the spec becomes the environment's stored spec once the lock is held."""
        if kind != "recover":
            self._settle_first(spec.key)
        lock = EnvLock(self.store, spec.key)
        job_id = new_job_id()
        lock.acquire(job_id, kind)   # Locked (a Busy error) if another job holds it
        if accept:
            self._accept(spec)
        job = Job(self.store, self.db, job_id, spec.key, kind)
        self.jobs[job_id] = job
        for name, text in files.items():
            job.save("order/" + name, text)
        if plan is not None:
            job.save("plan.json", json.dumps(plan.to_dict(), indent=2) + "\n")
        job.event("job.started", environment=spec.key, kind=kind, plan=plan.to_dict() if plan else None)
        if note:
            job.event("job.note", note=note)
        task = asyncio.create_task(self._run(job, spec, body, lock))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return job

    # ---------------------------------------------------------------- rollback and reload

    def _code_plan(self, env_key: str, service: str, to: int, reload: bool) -> tuple[spec_mod.Spec, planner.Plan, str]:
        """The plan of a rollback (or reload): reuse a code instance, touch no data component."""
        stored = self.stored_spec(env_key)
        live = self.ledger.state(env_key).get(service)
        if stored is None or live is None or live.code is None:
            raise OrderError(f"{env_key}/{service}: nothing is live to roll back from")
        if reload:
            number = live.code.number
        elif to:
            number = to
        else:
            older = [r.number for r in self.ledger.instances(env_key, service, Status.STANDBY)
                     if r.component == "code" and r.number < live.code.number]
            if not older:
                raise OrderError(f"{env_key}/{service}: no older code instance is kept to roll back to")
            number = max(older)
        row = self.ledger.instance(env_key, service, "code", number)
        if row is None:
            raise OrderError(f"{env_key}/{service}: code instance {number} never existed")
        if not reload and number == live.code.number:
            raise OrderError(f"{env_key}/{service}: code instance {number} is already live")
        if row.status in (Status.REMOVED, Status.FAILED):
            why = "it was removed from disk" if row.status == Status.REMOVED else "it failed and never served"
            raise OrderError(f"{env_key}/{service}: cannot roll back to code instance {number}: {why}")
        names = row.names
        if "service" in names:
            stored = {**stored, "services": {**stored["services"], service: names["service"]}}
        try:
            spec = spec_mod.spec_from_dict(stored)
        except spec_mod.SpecError as exc:
            raise OrderError(f"{env_key}/{service}: the stored definition is invalid: {exc}") from None
        changes = [planner.Change("code", False, number, "reload" if reload else f"rollback to {number}")]
        changes += planner.kept_data(spec.service(service), self.ledger.state(env_key))
        why = f"reload of code instance {number}" if reload else f"rollback to code instance {number}"
        plan = planner.Plan(env_key, (planner.ServicePlan(service, "deploy", tuple(changes), row.commit_sha, (why,)),))
        kept = [c.label for c in changes[1:]]
        note = why + ("; data is not touched: " + ", ".join(kept) + " stay live" if kept else "")
        return spec, plan, note

    async def rollback(self, request: Rollback) -> tuple[Job, planner.Plan]:
        env_key, service = request.environment, request.service
        spec, plan, note = self._code_plan(env_key, service, request.to, request.reload)
        kind = "reload" if request.reload else "rollback"
        return self._launch(spec, kind, plan, {}, lambda ctx: deploying.apply(ctx, plan), note), plan

    def heal(self, env_key: str, services: list[str], sick: set[str] = frozenset(), lost: str = "") -> Job:
        """Restart the live code instances of `services` whose process ended (or, for those in
        `sick`, failed its health checks), as a `heal` job: each the same code instance,
        blue/green on a fresh port (like a reload), switched together."""
        spec = self.as_deployed_spec(env_key)
        if spec is None:
            raise OrderError(f"{env_key}: no such environment")
        plans = [self._code_plan(env_key, service, 0, reload=True)[1].services[0] for service in services]
        why = {s: f"its host {lost} is lost: started on another host" if lost else
               "it failed its health checks: restarted" if s in sick else "its process ended: restarted"
               for s in services}
        plan = planner.Plan(env_key, tuple(dataclasses.replace(sp, reasons=(why[sp.service],)) for sp in plans))
        note = (f"restarting {', '.join(services)}: the ledger holds them live and "
                + (f"their host {lost} is lost" if lost else
                   "they failed their health checks" if set(services) <= set(sick) else "their process ended"))
        return self._launch(spec, "heal", plan, {}, lambda ctx: deploying.apply(ctx, plan), note)

    def sync_route(self, env_key: str, router_id: str) -> Job:
        """A router back from being away gets the environment's route as the ledger holds it, if
        its file is not that already (a `route` job)."""
        spec = self.as_deployed_spec(env_key)
        if spec is None:
            raise OrderError(f"{env_key}: no such environment")

        async def body(ctx: JobContext) -> str:
            return await routing.sync(ctx, router_id)
        return self._launch(spec, "route", None, {}, body, f"router {router_id} is back: its route is checked")

    def _live_mysql(self, env_key: str, service: str) -> int:
        live = self.ledger.state(env_key).get(service)
        if live is None or live.mysql is None:
            raise OrderError(f"{env_key}/{service}: no MySQL instance of its own is live")
        return live.mysql.number

    def backup(self, env_key: str, service: str) -> Job:
        """A snapshot of the service's live MySQL instance now, as a job."""
        spec = self.as_deployed_spec(env_key)
        if spec is None:
            raise OrderError(f"{env_key}: no such environment (nothing was ever applied)")
        number = self._live_mysql(env_key, service)

        async def body(ctx: JobContext) -> str:
            return f"snapshot {await backups.snapshot(ctx, service, number, service, 'on demand')} of mysql {number}"
        return self._launch(spec, "backup", None, {}, body)

    def restore(self, env_key: str, service: str, snapshot_id: str) -> tuple[Job, planner.Plan]:
        """A new MySQL instance made from a snapshot of the service's live one, and every service
        using that instance switched to it (a renew from a snapshot); the replaced one is kept."""
        spec = self.as_deployed_spec(env_key)
        if spec is None:
            raise OrderError(f"{env_key}: no such environment (nothing was ever applied)")
        if not ops.SNAPSHOT_ID.match(snapshot_id):
            raise OrderError(f"{snapshot_id!r} is not a snapshot ID (like 20261202T193000Z): deployctl backups "
                             f"{env_key}/{service} lists them")
        number = self._live_mysql(env_key, service)
        state = self.ledger.state(env_key)
        users = [s for s in spec.services if s.name != service and s.owner_of("mysql") == service and s.name in state]
        why = f"restore of mysql {number} from snapshot {snapshot_id}"
        plans = []
        for name in [service, *(u.name for u in users)]:
            live = state[name]
            changes = [planner.Change("code", False, live.code.number, why)]
            for change in planner.kept_data(spec.service(name), state):
                if change.component != "mysql":
                    changes.append(change)
            changes.append(planner.Change("mysql", True, reason=why) if name == service
                           else planner.Change("mysql", False, None, why, service))
            plans.append(planner.ServicePlan(name, "deploy", tuple(changes), live.code.commit, (why,)))
        plan = planner.Plan(env_key, tuple(plans))
        note = (f"{why}: a new instance gets what the database held at {snapshot_id}; writes made since then are "
                f"not in it. Services switched to it: {', '.join(p.service for p in plans)}; mysql {number} is kept")

        async def body(ctx: JobContext) -> str:
            ctx.restoring[service] = ((service, number), snapshot_id)
            return await deploying.apply(ctx, plan)
        return self._launch(spec, "restore", plan, {}, body, note), plan

    def accepted_spec(self, env_key: str) -> spec_mod.Spec | None:
        """The spec the operator last applied (its `restart:` policies hold from then on)."""
        stored = self.stored_spec(env_key)
        return spec_mod.spec_from_dict(stored) if stored is not None else None

    def as_deployed_spec(self, env_key: str) -> spec_mod.Spec | None:
        """The environment as its live instances were deployed (None if it has no stored spec)."""
        stored = self.stored_spec(env_key)
        return spec_mod.spec_from_dict(self._as_deployed(env_key, stored)) if stored is not None else None

    def _as_deployed(self, env_key: str, stored: dict) -> dict:
        """The stored spec with each service's definition as its live code instance was deployed
        (after a failed apply the stored spec is ahead of what runs)."""
        return self.ledger.as_deployed(env_key, stored)

    async def check(self, request: Check) -> Job:
        """verify, repair or clean one environment, as a job."""
        stored = self.stored_spec(request.environment)
        if stored is None:
            raise OrderError(f"{request.environment}: no such environment (nothing was ever applied)")
        if request.action not in ("verify", "repair", "clean", "destroy", "certificate"):
            raise OrderError(f"unknown action {request.action!r}")
        spec = spec_mod.spec_from_dict(self._as_deployed(request.environment, stored))
        if request.action == "certificate":
            return self.renew_certificate(spec, "renewal asked by the operator", force=True)
        claimed = claimed_names(self.ledger)

        async def body(ctx: JobContext) -> str:
            if request.action == "destroy":
                summary = await destroy(ctx, request.purge_data)
                self.db.drop_certificate(spec.key)  # its routes are gone, and the routers' copies with them
                (self.store / "environments" / spec.app / f"{spec.environment}.yml").unlink(missing_ok=True)
                return summary
            checker = Checker(ctx, claimed)
            facts = await checker.gather()
            found = checker.findings(facts)
            for finding in found:
                ctx.job.event("finding", line=finding.line(), fix=finding.fix)
            for warning in checker.warnings(facts):
                ctx.job.event("warning", line=warning)
            for line in checker.foreign(facts):  # not drift: reported, never acted on
                ctx.job.event("job.note", note=line)
            if request.action == "verify":
                if found:
                    self.notifier.drift(spec.key, ctx.job.id, [f.line() for f in found])
                return f"{len(found)} finding(s)" if found else "no drift"
            if request.action == "clean":
                lines = await checker.clean(facts, dry_run=True)
                for line in lines:
                    ctx.job.event("clean.planned", line=line)
                if request.dry_run or not lines:
                    return f"{len(lines)} thing(s) to remove" + (" (dry run: nothing removed)" if request.dry_run else "")
                await checker.clean(facts, dry_run=False)
                return f"removed {len(lines)} thing(s)"
            done = await checker.repair([f for f in found if f.fix and f.fix != "orphan"])
            for line in done:
                ctx.job.event("repaired", line=line)
            left = [f for f in checker.findings(await checker.gather()) if f.fix != "orphan"]
            for finding in left:
                ctx.job.event("finding", line=finding.line(), fix=finding.fix, after_repair=True)
            return f"{len(done)} repair(s); " + (f"{len(left)} finding(s) left" if left else "no drift left")

        return self._launch(spec, request.action, None, {}, body)

    def renew_certificate(self, spec: spec_mod.Spec, why: str, force: bool = False) -> Job:
        """A new ACME certificate for a `tls: auto` environment, switched in on every router, as a
        `certificate` job."""
        if not spec.tls or not spec.tls.auto:
            raise OrderError(f"{spec.key}: its certificate is not obtained by ACME (tls: auto): "
                             + ("it has no tls" if not spec.tls else "the operator sets it with deployctl secret set"))
        refused = certificates.refusal(self.acme, routing.routers_of(self.registry))
        if refused:
            raise OrderError(f"{spec.key}: tls: {refused}")

        async def body(ctx: JobContext) -> str:
            return await certificates.ensure(ctx, self.acme, force=force)
        return self._launch(spec, "certificate", None, {}, body, f"certificate: {why}")

    def renew_due(self) -> list[str]:
        """Start a renewal for every `tls: auto` environment whose certificate is due (the
        controller's round); the ones busy with another job are tried at the next round."""
        if self.acme is None or not self.acme.directory:
            return []
        specs = {}
        for env_key in self.db.certificate_envs():
            try:
                spec = self.as_deployed_spec(env_key)
            except spec_mod.SpecError:
                continue
            if spec is not None:
                specs[env_key] = spec
        started = []
        for env_key, why in certificates.due_now(self.ledger, specs, self.acme):
            try:
                started.append(self.renew_certificate(specs[env_key], why).id)
            except (OrderError, Locked) as exc:
                log.info("certificate.renewal_deferred", environment=env_key, why=why, error=str(exc))
        return started

    def _accept(self, spec: spec_mod.Spec) -> None:
        folder = self.store / "environments" / spec.app
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{spec.environment}.yml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        self.specs.save(spec.key, json.dumps(spec.to_dict()))

    async def _run(self, job: Job, spec, body, lock: EnvLock) -> None:
        ctx = JobContext(job, spec, self.dispatcher, self.registry, self.ledger)
        ctx.acme = self.acme
        try:
            summary = await body(ctx)
        except StepFailed as exc:
            job.event("step.failed", service=exc.service, step=exc.step, error=str(exc), tail=exc.tail)
            job.finish("failed", str(exc))
        except PlacementError as exc:
            job.finish("failed", str(exc))
        except errors.DeployerError as exc:  # raised on purpose: its line names what and where
            log.exception("job.failed", job_id=job.id)
            job.finish("failed", str(exc))
        except Exception as exc:  # a bug must still end the job visibly
            log.exception("job.crashed", job_id=job.id)
            job.finish("failed", f"internal error: {type(exc).__name__}: {exc}")
        else:
            job.finish("succeeded", summary or job.kind)
        finally:
            lock.release()
            log.info("job.finished", job_id=job.id, environment=job.env_key)
            if job.finished:
                self.notifier.job_finished(job.id, job.env_key, job.kind, job.state, job.summary, job.created,
                                           time.time())
