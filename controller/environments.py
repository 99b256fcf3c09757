"""Orders in, jobs out: validate an order, resolve its refs, plan it, and run it as a job."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import structlog
import yaml

from . import planner, spec as spec_mod, sources
from .dispatcher import Dispatcher
from .jobs import EnvLock, Job, Locked, new_job_id
from .ledger import Ledger
from .procedures import PlacementError, Runner, StepFailed
from .registry import Registry

log = structlog.get_logger("controller")


class OrderError(ValueError):
    """The order cannot be accepted; one line naming the file, line and key where it can."""


class Environments:
    def __init__(self, store: Path, dispatcher: Dispatcher, registry: Registry, ledger: Ledger) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.registry = registry
        self.ledger = ledger
        self.db = dispatcher.db
        self.jobs: dict[str, Job] = {}
        self.tasks: set[asyncio.Task] = set()
        self._recover()

    def _recover(self) -> None:
        """Jobs that were running when the controller died end as `interrupted`, visibly."""
        rows = self.db.conn.execute("SELECT id, env_key FROM jobs WHERE state='running'").fetchall()
        for row in rows:
            self.db.conn.execute("UPDATE jobs SET state='interrupted', finished=?, summary=? WHERE id=?",
                                 (time.time(), "the controller stopped while the job ran", row["id"]))
            self.db.conn.execute("UPDATE deploys SET outcome='failed', reason='interrupted', finished=? "
                                 "WHERE job_id=? AND outcome='running'", (time.time(), row["id"]))
            EnvLock(self.store, row["env_key"]).release()

    # ---------------------------------------------------------------- orders

    def stored_spec(self, env_key: str) -> dict | None:
        row = self.db.conn.execute("SELECT spec FROM environments WHERE key=?", (env_key,)).fetchone()
        return json.loads(row[0]) if row else None

    def read_order(self, request) -> tuple[spec_mod.Spec, spec_mod.Options | None]:
        try:
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
        except spec_mod.SpecError as exc:
            raise OrderError(str(exc)) from None
        return self._absolute_sources(spec, request.base_dir), options

    @staticmethod
    def _absolute_sources(spec: spec_mod.Spec, base_dir: str) -> spec_mod.Spec:
        """A relative local source is relative to the spec file's folder."""
        if not base_dir:
            return spec
        import dataclasses
        services = []
        for service in spec.services:
            source = service.source
            if "://" not in source and ":" not in source.split("/")[0] and not source.startswith("/"):
                source = str((Path(base_dir) / source).resolve())
            services.append(dataclasses.replace(service, source=source))
        return dataclasses.replace(spec, services=tuple(services))

    async def resolve(self, spec: spec_mod.Spec, options, request) -> dict[str, str]:
        """Each service's ref → exact commit (git ls-remote), checked before any work starts."""
        refs = dict(options.refs) if options else {}
        selected = set(options.services) if options and options.services else {s.name for s in spec.services}

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

    async def plan(self, request) -> tuple[spec_mod.Spec, planner.Plan, spec_mod.Options | None]:
        spec, options = self.read_order(request)
        commits = await self.resolve(spec, options, request)
        state = self.ledger.state(spec.key)
        return spec, planner.plan(spec, state, commits, options, request.prune), options

    # ---------------------------------------------------------------- apply

    async def apply(self, request) -> tuple[Job | None, planner.Plan]:
        spec, plan, options = await self.plan(request)
        missing = [f"{s.name}: secret {n} is not set (deployctl secret set {spec.key} {n})"
                   for s in spec.services for n in s.secrets if n not in self.ledger.secrets(spec.key)]
        if missing:
            raise OrderError(missing[0])
        self._accept(spec)
        if plan.empty:
            return None, plan
        lock = EnvLock(self.store, spec.key)
        job_id = new_job_id()
        try:
            lock.acquire(job_id, "apply")
        except Locked as exc:
            raise OrderError(str(exc)) from None
        job = Job(self.store, self.db, job_id, spec.key, "apply")
        self.jobs[job_id] = job
        job.save("order/" + (Path(request.spec_name).name or "environment.yml"), request.spec_text or "")
        if request.options_text:
            job.save("order/" + Path(request.options_name).name, request.options_text)
        if request.diff_text:
            job.save("order/" + Path(request.diff_name).name, request.diff_text)
        job.save("plan.json", json.dumps(plan.to_dict(), indent=2) + "\n")
        job.event("job.started", environment=spec.key, kind="apply", plan=plan.to_dict())
        task = asyncio.create_task(self._run(job, spec, plan, lock))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return job, plan

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
            older = [r["number"] for r in self.ledger.instances(env_key, service)
                     if r["component"] == "code" and r["status"] == "standby" and r["number"] < live.code.number]
            if not older:
                raise OrderError(f"{env_key}/{service}: no older code instance is kept to roll back to")
            number = max(older)
        row = self.ledger.instance(env_key, service, "code", number)
        if row is None:
            raise OrderError(f"{env_key}/{service}: code instance {number} never existed")
        if not reload and number == live.code.number:
            raise OrderError(f"{env_key}/{service}: code instance {number} is already live")
        if row["status"] in ("removed", "failed"):
            why = "it was removed from disk" if row["status"] == "removed" else "it failed and never served"
            raise OrderError(f"{env_key}/{service}: cannot roll back to code instance {number}: {why}")
        names = json.loads(row["names"])
        if "service" in names:
            stored = {**stored, "services": {**stored["services"], service: names["service"]}}
        try:
            spec = spec_mod.spec_from_dict(stored)
        except spec_mod.SpecError as exc:
            raise OrderError(f"{env_key}/{service}: the stored definition is invalid: {exc}") from None
        changes = [planner.Change("code", False, number, "reload" if reload else f"rollback to {number}")]
        for component in ("mysql", "redis"):
            current = live.live(component)
            if current is not None:
                changes.append(planner.Change(component, False, current.number))
        why = f"reload of code instance {number}" if reload else f"rollback to code instance {number}"
        plan = planner.Plan(env_key, (planner.ServicePlan(service, "deploy", tuple(changes), row["commit_sha"], (why,)),))
        kept = [f"{c.component} {c.number}" for c in changes[1:]]
        note = why + ("; data is not touched: " + ", ".join(kept) + " stay live" if kept else "")
        return spec, plan, note

    async def rollback(self, request) -> tuple[Job, planner.Plan]:
        env_key, service = request.environment, request.service
        spec, plan, note = self._code_plan(env_key, service, request.to, request.reload)
        kind = "reload" if request.reload else "rollback"
        lock = EnvLock(self.store, env_key)
        job_id = new_job_id()
        try:
            lock.acquire(job_id, kind)
        except Locked as exc:
            raise OrderError(str(exc)) from None
        job = Job(self.store, self.db, job_id, env_key, kind)
        self.jobs[job_id] = job
        job.save("plan.json", json.dumps(plan.to_dict(), indent=2) + "\n")
        job.event("job.started", environment=env_key, kind=kind, plan=plan.to_dict())
        job.event("job.note", note=note)
        task = asyncio.create_task(self._run(job, spec, plan, lock))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return job, plan

    def _accept(self, spec: spec_mod.Spec) -> None:
        folder = self.store / "environments" / spec.app
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{spec.environment}.yml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        self.db.conn.execute(
            "INSERT INTO environments (key, spec, updated) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET spec=excluded.spec, updated=excluded.updated",
            (spec.key, json.dumps(spec.to_dict()), time.time()))

    async def _run(self, job: Job, spec, plan, lock: EnvLock) -> None:
        runner = Runner(job, spec, self.dispatcher, self.registry, self.ledger)
        try:
            await runner.apply(plan)
        except StepFailed as exc:
            job.event("step.failed", service=exc.service, step=exc.step, error=str(exc), tail=exc.tail)
            job.finish("failed", str(exc))
        except PlacementError as exc:
            job.finish("failed", str(exc))
        except Exception as exc:  # a bug must still end the job visibly
            log.exception("job.crashed", job_id=job.id)
            job.finish("failed", f"internal error: {type(exc).__name__}: {exc}")
        else:
            names = ", ".join(s.service for s in plan.services)
            verb = {"apply": "deployed"}.get(job.kind, job.kind + " of")
            job.finish("succeeded", f"{verb} {names}")
        finally:
            lock.release()
            log.info("job.finished", job_id=job.id, environment=job.env_key)
