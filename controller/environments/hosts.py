"""The fleet as placement sees it (placement.py decides): each agent with what it may hand out,
its labels, and what the environments placed there reserve; and the choice for one service."""

from __future__ import annotations

import json
from functools import lru_cache

from controller.environments import placement
from controller.environments.placement import Choice, Host, PlacementError, Want
from controller.environments.spec import Limits, Service, Spec, spec_from_dict
from controller.fleet.registry import Agent, Registry
from controller.state.jobs import Specs
from controller.state.ledger import Ledger

# (environment, service) → host, placed by a job that has not yet recorded its instance: jobs of
# different environments place at once, and must each see the others' choices.
PENDING: dict[tuple[str, str], str] = {}


@lru_cache(maxsize=4096)
def _limits(stored: str) -> Limits:
    return spec_from_dict(json.loads(stored)).limits


def view(registry: Registry, ledger: Ledger, current: Spec | None = None) -> list[Host]:
    """Every agent, with the environments placed on it and what their limits reserve there
    (`current`'s limits for the environment being applied, the stored spec's for the others)."""
    specs = Specs(ledger.db)
    placed = {(env_key, service): host for env_key, service, host in ledger.placed()}
    placed.update(PENDING)
    on: dict[str, set[str]] = {}
    count: dict[str, int] = {}
    for (env_key, _service), host in placed.items():
        on.setdefault(host, set()).add(env_key)
        count[host] = count.get(host, 0) + 1

    def limits_of(env_key: str) -> Limits:
        if current is not None and env_key == current.key:
            return current.limits
        stored = specs.get(env_key)
        return _limits(stored) if stored else Limits()

    out = []
    for agent in registry.agents.values():
        memory, cpu = placement.capacity(agent.granted_memory, agent.granted_cpu,
                                         agent.facts.mem_total_bytes, agent.facts.cpus)
        envs = on.get(agent.id, set())
        out.append(Host(agent.id, tuple(agent.roles), agent.state, dict(agent.labels), memory, cpu,
                        sum(limits_of(e).memory for e in envs), sum(limits_of(e).cpu for e in envs),
                        count.get(agent.id, 0), frozenset(envs)))
    return sorted(out, key=lambda h: h.id)


def want(spec: Spec, service: Service, stay_on: str = "") -> Want:
    return Want(spec.key, service.name, service.role, spec.limits.memory, spec.limits.cpu, service.host,
                dict(service.host_labels), stay_on)


def live_hosts(live) -> tuple[str, ...]:
    """The hosts of a service's live replicas, in their order (`live`: its ledger state, or None)."""
    return tuple(r.host for r in live.code.replicas) if live and live.code else ()


def choose_replicas(registry: Registry, ledger: Ledger, spec: Spec, service: Service, live: tuple[str, ...] = ()
                    ) -> tuple[list[tuple[Agent, Choice]], str]:
    """The agents for every replica of a new instance of `service` (where its live replicas run,
    if they may stay), each with why; and a warning if some must share a host."""
    choices, warning = placement.place_replicas(view(registry, ledger, spec), want(spec, service),
                                                service.replicas, live)
    return [(_agent(registry, service, c), c) for c in choices], warning


def _agent(registry: Registry, service: Service, choice: Choice) -> Agent:
    agent = registry.agents.get(choice.host)
    if agent is None:  # placement only names agents of the registry
        raise PlacementError(f"{service.name}: agent {choice.host} is not known")
    return agent
