"""The planner, a pure function: (desired spec, ledger state, resolved commits, options) → plan.

No I/O and no clock. Re-planning an unchanged spec gives an empty plan. The plan says, per service,
which components get a new instance and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from controller.state.ledger import ServiceState
from controller.environments.spec import Limits, Options, Spec, code_fingerprint, memory_text, shared_depth

DATA_COMPONENTS = ("mysql", "redis")


@dataclass(frozen=True)
class Change:
    """One component of one service: a new instance, or the live one reused."""

    component: str
    new: bool
    number: int | None = None   # the reused instance (None when new: numbered when it is made)
    reason: str = ""
    owner: str = ""             # the service whose instance it is, when another service's (shared)

    @property
    def label(self) -> str:
        """`mysql 2`, or `web's mysql 2` for another service's instance."""
        return (f"{self.owner}'s " if self.owner else "") + f"{self.component} {self.number}"


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
                               | ({"of": c.owner} if c.owner else {}) for c in self.changes}}


@dataclass(frozen=True)
class Plan:
    env_key: str
    services: tuple[ServicePlan, ...] = ()
    notes: tuple[str, ...] = field(default=())
    placement: tuple[tuple[str, str, str], ...] = ()  # (service, host, why) of each new code instance

    @property
    def empty(self) -> bool:
        return not self.services

    def to_dict(self) -> dict:
        out = {"environment": self.env_key, "services": [s.to_dict() for s in self.services],
               "notes": list(self.notes)}
        if self.placement:
            out["placement"] = {service: {"host": host, "why": why} for service, host, why in self.placement}
        return out


def plan(spec: Spec, state: Mapping[str, ServiceState], commits: Mapping[str, str],
         options: Options | None = None, prune: bool = False) -> Plan:
    """Services that own their data instances are planned first: a service using another's
    instance (`uses: [web.mysql]`) follows it, and is deployed too (with a note) when that
    instance is new. A service using an instance that does not exist yet brings its owner in."""
    options = options or Options()
    selected = set(options.services) if options.services else {s.name for s in spec.services}
    notes: list[str] = []
    for service in spec.services:
        for component, owner in service.shared if service.name in selected else ():
            kept = state.get(owner)
            if owner not in selected and (kept is None or kept.live(component) is None):
                selected.add(owner)
                notes.append(f"{owner} is deployed too: {service.name} uses its {component}, which is not made yet")
    planned: dict[str, ServicePlan] = {}
    depth = shared_depth(spec.services)
    for service in sorted(spec.services, key=lambda s: depth[s.name]):  # owners before their users
        new_shared = [(c, o) for c, o in service.shared
                      if o in planned and (change := planned[o].change(c)) is not None and change.new]
        if service.name not in selected and not new_shared:
            continue
        if service.name not in selected:
            notes.append(f"{service.name} is deployed too: it uses " + " and ".join(
                f"{o}'s {c}" for c, o in new_shared) + ", which is new")
        current = state.get(service.name)
        # Brought in for its data, a service keeps the code it runs (a new one only if it has none).
        commit = commits[service.name] if service.name in selected or not (current and current.code) \
            else current.code.commit
        result = _plan_service(service, current, commit,
                               set(options.renew.get(service.name, ())), spec.limits, state, planned)
        if result is not None:
            planned[service.name] = result
    services = [planned[s.name] for s in spec.services if s.name in planned]
    wanted = {s.name for s in spec.services}
    deployed = {name for name, current in state.items() if current.code is not None}
    for name in sorted(deployed - wanted):
        if prune:
            services.append(ServicePlan(name, "destroy", reasons=("removed from the spec",)))
        else:
            notes.append(f"{name} is no longer in the spec; it is kept (apply with --prune to destroy it)")
    return Plan(spec.key, tuple(services), tuple(notes))


def shared_change(service, component: str, state: Mapping[str, ServiceState],
                  planned: Mapping[str, ServicePlan]) -> tuple[Change, str]:
    """The instance of another service that `service` uses, and why its deploy must run for it
    ('' if it need not): the owner's new one in this plan, or its live one."""
    owner = service.owner_of(component)
    change = planned[owner].change(component) if owner in planned else None
    if change is not None and change.new:
        why = f"{owner}'s {component} is new"
        return Change(component, False, None, why, owner), why
    live = state.get(owner).live(component) if state.get(owner) else None
    number = live.number if live else None
    current = state.get(service.name)
    if current is not None and current.code is not None and current.used.get(component) == (owner, number):
        return Change(component, False, number, owner=owner), ""
    why = f"now uses {owner}'s {component} {number}"
    return Change(component, False, number, why, owner), why


def kept_data(service, state: Mapping[str, ServiceState]) -> list[Change]:
    """The data instances a service uses as they are (a rollback, a repair): its own live ones
    and the live ones of the services it shares with."""
    changes = []
    for component in DATA_COMPONENTS:
        owner = service.owner_of(component) if component in service.uses else service.name
        live = state[owner].live(component) if owner in state else None
        if live is not None:
            changes.append(Change(component, False, live.number, owner=owner if owner != service.name else ""))
    return changes


def _plan_service(service, current: ServiceState | None, commit: str, renew: set[str],
                  limits: Limits | None = None, state: Mapping[str, ServiceState] | None = None,
                  planned: Mapping[str, ServicePlan] | None = None) -> ServicePlan | None:
    fingerprint = code_fingerprint(service, limits)
    state, planned = state or {}, planned or {}
    if current is None or current.code is None:
        # No code is live (first deploy, or after a destroy that kept the data): data instances
        # still live are used again, not replaced.
        changes = [Change("code", True, reason="first deploy")]
        for c in DATA_COMPONENTS:
            if c in service.uses and service.owner_of(c) != service.name:
                changes.append(shared_change(service, c, state, planned)[0])
            elif c in service.uses:
                kept = current.live(c) if current else None
                changes.append(Change(c, True, reason="first deploy") if kept is None or c in renew
                               or not _same_mode(service, c, kept) else Change(c, False, kept.number))
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
        if service.owner_of(component) != service.name:
            change, why = shared_change(service, component, state, planned)
            changes.append(change)
            reasons += [why] if why else []
            continue
        existing = current.live(component)
        if component in renew:
            why = f"renew {component}"
        elif existing is None:
            why = f"now uses {component}"
        elif not _same_mode(service, component, existing):
            why = f"redis mode is now {service.redis.mode} (live: {existing.mode or 'prefix'})"
        elif component == "redis" and existing.maxmemory and existing.maxmemory != service.redis.maxmemory:
            # The same instance, given the new bound by the deploy (CONFIG SET and its file).
            reasons.append(f"redis maxmemory is now {memory_text(service.redis.maxmemory)} "
                           f"(live: {memory_text(existing.maxmemory)})")
            changes.append(Change(component, False, existing.number))
            continue
        else:
            changes.append(Change(component, False, existing.number))
            continue
        reasons.append(why)
        changes.append(Change(component, True, reason=why))
    if not reasons:
        return None
    return ServicePlan(service.name, "deploy", tuple(changes), commit, tuple(reasons))


def _same_mode(service, component: str, live) -> bool:
    """A Redis instance of another mode cannot be reused: the new mode is a new instance."""
    return component != "redis" or (live.mode or "prefix") == service.redis.mode

