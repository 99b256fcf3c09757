"""The planner, a pure function: (desired spec, ledger state, resolved commits, options) → plan.

No I/O and no clock. Re-planning an unchanged spec gives an empty plan. The plan says, per service,
which components get a new instance and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from controller.state.ledger import ServiceState
from controller.environments.spec import Limits, Options, Spec, code_fingerprint

DATA_COMPONENTS = ("mysql", "redis")


@dataclass(frozen=True)
class Change:
    """One component of one service: a new instance, or the live one reused."""

    component: str
    new: bool
    number: int | None = None   # the reused instance (None when new: numbered when it is made)
    reason: str = ""


@dataclass(frozen=True)
class ServicePlan:
    service: str
    action: str                 # "deploy" or "destroy"
    changes: tuple[Change, ...] = ()
    commit: str = ""
    reasons: tuple[str, ...] = ()

    def change(self, component: str) -> Change | None:
        return next((c for c in self.changes if c.component == component), None)

    def to_dict(self) -> dict:
        return {"service": self.service, "action": self.action, "commit": self.commit,
                "reasons": list(self.reasons),
                "components": {c.component: {"new": c.new, "instance": c.number, "reason": c.reason}
                               for c in self.changes}}


@dataclass(frozen=True)
class Plan:
    env_key: str
    services: tuple[ServicePlan, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not self.services

    def to_dict(self) -> dict:
        return {"environment": self.env_key, "services": [s.to_dict() for s in self.services],
                "notes": list(self.notes)}


def plan(spec: Spec, state: Mapping[str, ServiceState], commits: Mapping[str, str],
         options: Options | None = None, prune: bool = False) -> Plan:
    options = options or Options()
    selected = set(options.services) if options.services else {s.name for s in spec.services}
    services: list[ServicePlan] = []
    for service in spec.services:
        if service.name not in selected:
            continue
        planned = _plan_service(service, state.get(service.name), commits[service.name],
                                set(options.renew.get(service.name, ())), spec.limits)
        if planned is not None:
            services.append(planned)
    notes = []
    wanted = {s.name for s in spec.services}
    deployed = {name for name, current in state.items() if current.code is not None}
    for name in sorted(deployed - wanted):
        if prune:
            services.append(ServicePlan(name, "destroy", reasons=("removed from the spec",)))
        else:
            notes.append(f"{name} is no longer in the spec; it is kept (apply with --prune to destroy it)")
    return Plan(spec.key, tuple(services), tuple(notes))


def _plan_service(service, current: ServiceState | None, commit: str, renew: set[str],
                  limits: Limits | None = None) -> ServicePlan | None:
    fingerprint = code_fingerprint(service, limits)
    if current is None or current.code is None:
        # No code is live (first deploy, or after a destroy that kept the data): data instances
        # still live are used again, not replaced.
        changes = [Change("code", True, reason="first deploy")]
        for c in DATA_COMPONENTS:
            if c in service.uses:
                kept = current.live(c) if current else None
                changes.append(Change(c, True, reason="first deploy") if kept is None or c in renew
                               else Change(c, False, kept.number))
        return ServicePlan(service.name, "deploy", tuple(changes), commit, ("first deploy",))

    reasons: list[str] = []
    live = current.code
    if live.commit != commit:
        reasons.append(f"ref {service.ref} is now {commit[:12]} (live: {live.commit[:12]})")
    if live.fingerprint != fingerprint:
        reasons.append("commands, env or settings changed")
    changes = [Change("code", bool(reasons), None if reasons else live.number, "; ".join(reasons))]
    for component in DATA_COMPONENTS:
        if component not in service.uses:
            continue
        existing = current.live(component)
        if component in renew:
            why = f"renew {component}"
        elif existing is None:
            why = f"now uses {component}"
        else:
            changes.append(Change(component, False, existing.number))
            continue
        reasons.append(why)
        changes.append(Change(component, True, reason=why))
    if not reasons:
        return None
    return ServicePlan(service.name, "deploy", tuple(changes), commit, tuple(reasons))
