"""Where a new code instance goes: pure, so `deployctl plan` and the deploy give the same answer
for the same fleet (docs/decisions/034-placement.md).

A host's room is what its capacity (granted by the operator, lowered by what its facts measure)
has left once the limits of the environments already placed there are counted: an environment's
limits bound all its services on one host together, so it reserves them once per host. The host
of the role with the most room (the scarcer of memory and CPU, as a share) takes the instance;
fewer instances, then the id, break ties. A spec may pin a service to a host or to hosts with
given labels. A service with a live instance stays on its host unless that host is lost or no
longer fits the pin.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from common import errors


class PlacementError(errors.Failed):
    """No connected agent can take this work; `pin` is the spec's key ("host", "host_labels")
    when the pin itself names no agent that could."""

    def __init__(self, message: str, pin: str = "") -> None:
        super().__init__(message)
        self.pin = pin


@dataclass(frozen=True)
class Host:
    """One agent as placement sees it."""

    id: str
    roles: tuple[str, ...]
    state: str = "connected"                               # connected, disconnected, lost
    labels: dict[str, str] = field(default_factory=dict)
    memory: int = 0           # bytes it may hand out (0: not known)
    cpu: float = 0.0          # CPUs it may hand out (0: not known)
    reserved_memory: int = 0  # by the environments placed there
    reserved_cpu: float = 0.0
    instances: int = 0        # code instances placed there
    environments: frozenset[str] = frozenset()  # environments with an instance there


@dataclass(frozen=True)
class Want:
    """What one service's new instance needs."""

    env_key: str
    service: str
    role: str
    memory: int
    cpu: float
    host: str = ""                                       # pinned to this agent
    labels: dict[str, str] = field(default_factory=dict)  # pinned to agents with these labels
    stay_on: str = ""                                    # the host of its live instance


@dataclass(frozen=True)
class Choice:
    host: str
    why: str
    stays: bool = False   # where its live instance (or replica) runs
    moved: str = ""       # why it left the host of its live one, if it did


def capacity(granted_memory: int, granted_cpu: float, measured_memory: int, measured_cpu: int) -> tuple[int, float]:
    """What a host may hand out: the operator's grant, never more than the host measures."""
    def lower(granted, measured):
        return min(x for x in (granted, measured) if x) if granted or measured else 0
    return lower(granted_memory, measured_memory), lower(granted_cpu, float(measured_cpu))


def room(host: Host, want: Want) -> float:
    """The share of the scarcer resource left on `host` once `want`'s environment is counted
    there (1.0 when the host's capacity is not known; below 0 when it is over-committed)."""
    adds = want.env_key not in host.environments
    shares = []
    if host.memory:
        shares.append((host.memory - host.reserved_memory - (want.memory if adds else 0)) / host.memory)
    if host.cpu:
        shares.append((host.cpu - host.reserved_cpu - (want.cpu if adds else 0)) / host.cpu)
    return min(shares) if shares else 1.0


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def eligible(hosts: list[Host], want: Want) -> list[Host]:
    """The hosts the spec lets this service run on, whatever their state; an unknown pin is an error."""
    of_role = [h for h in hosts if want.role in h.roles]
    if want.host:
        named = [h for h in hosts if h.id == want.host]
        if not named:
            raise PlacementError(f"{want.service}: host {want.host} is not an agent of this controller "
                                 f"(agents of role {want.role}: {', '.join(sorted(h.id for h in of_role)) or 'none'})",
                                 "host")
        if want.role not in named[0].roles:
            raise PlacementError(f"{want.service}: host {want.host} does not have role {want.role} "
                                 f"(its roles: {', '.join(named[0].roles) or 'none'})", "host")
        of_role = named
    if want.labels:
        matching = [h for h in of_role if all(h.labels.get(k) == v for k, v in want.labels.items())]
        if not matching:
            known = sorted({_labels(h.labels) for h in of_role if h.labels})
            raise PlacementError(f"{want.service}: no agent of role {want.role} has labels {_labels(want.labels)} "
                                 f"(labels granted: {'; '.join(known) or 'none'}; deployctl agents grant ID "
                                 f"--label KEY=VALUE)", "host_labels")
        of_role = matching
    return of_role


def place(hosts: list[Host], want: Want) -> Choice:
    """The host for `want`'s new instance, and why, in one line."""
    candidates = eligible(hosts, want)
    connected = [h for h in candidates if h.state == "connected"]
    if want.stay_on:
        here = next((h for h in candidates if h.id == want.stay_on), None)
        if here is not None and here.state == "connected":
            return Choice(here.id, "stays on the host of its live instance", stays=True)
        if here is not None and here.state != "lost":
            raise PlacementError(f"{want.service}: agent {here.id} (which runs this service) is {here.state}; "
                                 "it moves only once that host is lost")
        moved = (f"its host {want.stay_on} is lost" if here is not None
                 else f"its host {want.stay_on} no longer fits the spec")
    else:
        moved = ""
    if not connected:
        pin = f"host {want.host}" if want.host else f"labels {_labels(want.labels)}" if want.labels else ""
        states = ", ".join(f"{h.id} {h.state}" for h in sorted(candidates, key=lambda h: h.id))
        raise PlacementError(f"{want.service}: no connected agent of role {want.role}"
                             + (f" with {pin}" if pin else "") + (f" ({states})" if states else ""))
    ranked = sorted(connected, key=lambda h: (-room(h, want), h.instances, h.id))
    best = ranked[0]
    left = room(best, want)
    if len(connected) == 1:
        why = "pinned" if want.host or want.labels else "the only connected agent of its role"
        why = f"{why}: host {best.id}" if want.host else why
    else:
        why = f"most room of {len(connected)} agents of role {want.role}"
    detail = []
    if best.memory or best.cpu:
        detail.append(f"{max(left, 0):.0%} left after it" if left >= 0
                      else f"over-committed by {-left:.0%}: every eligible host is full")
    detail.append(f"{best.instances} instance{'s' if best.instances != 1 else ''} there")
    why = f"{why} ({', '.join(detail)})"
    return Choice(best.id, f"{moved}; {why}" if moved else why, moved=moved)


def place_replicas(hosts: list[Host], want: Want, count: int, live: tuple[str, ...] = ()) -> tuple[list[Choice], str]:
    """The hosts of `count` replicas of one new instance, and a warning when they cannot all be
    on different hosts. The first is placed as any instance (`live[0]`, the host of the live
    first replica, as `stay_on`). Each replica whose live one runs on a connected host that fits
    stays there; the others go to the host with fewest replicas of it, then the most room. Fewer
    connected hosts than replicas is allowed: some share a host (on their own ports), and it is
    said."""
    first = place(hosts, dataclasses.replace(want, stay_on=live[0]) if live else want)
    if count <= 1:
        return [first], ""
    connected = [h for h in eligible(hosts, want) if h.state == "connected"]
    ranked = sorted(connected, key=lambda h: (-room(h, want), h.instances, h.id))
    chosen: list[Choice | None] = [None] * count
    if first.stays or not live:  # moved off its host: not onto another replica's, if it can
        chosen[0] = first
    for slot in range(1, count):
        stay = live[slot] if slot < len(live) else ""
        if any(h.id == stay for h in ranked) and all(c is None or c.host != stay for c in chosen):
            chosen[slot] = Choice(stay, f"replica {slot + 1} stays on the host of its live replica", stays=True)
    for slot in range(count):
        if chosen[slot] is not None:
            continue
        used = {h.id: sum(c is not None and c.host == h.id for c in chosen) for h in ranked}
        best = min(ranked, key=lambda h: used[h.id])  # min() keeps the first of equals: the most room
        why = ("most room of the hosts without a replica of it" if used[best.id] == 0 else
               f"shares {best.id} with another replica")
        if slot == 0:
            chosen[0] = Choice(best.id, f"{first.moved}; {why}" if first.moved else why, moved=first.moved)
        else:
            chosen[slot] = Choice(best.id, f"replica {slot + 1}: {why}")
    distinct = len({c.host for c in chosen})
    if distinct == count:
        return chosen, ""
    pin = f" with host {want.host}" if want.host else f" with labels {_labels(want.labels)}" if want.labels else ""
    shared = f"{count - distinct} replicas share a host" if count - distinct != 1 else "1 replica shares a host"
    return chosen, (f"{want.service}: replicas: {count}, but {distinct} connected agent"
                    f"{'s' if distinct != 1 else ''} of role {want.role}{pin}: {shared}")
