"""Least knowledge: which secret values an operation is sent with, decided by its kind.

An agent gets a value to redact only where the operation could reveal it (decision 019):

| kind   | the operation                                        | it carries                          |
|--------|------------------------------------------------------|-------------------------------------|
| tenant | runs the environment's code or reads its files       | the environment's declared secrets  |
|        |                                                      | (and former values) and every       |
|        |                                                      | generated MySQL and Redis password  |
| route  | writes or switches a route (nginx)                   | nothing                             |
| data   | an admin command on a data host (create, repair,     | only the passwords it sets          |
|        | drop, inspect)                                       |                                     |
| agent  | an operator's `exec` on an agent, a status check     | for each environment with code      |
|        |                                                      | there, as `tenant`; with only data  |
|        |                                                      | there, the passwords of that data   |

`values` is pure: the scope of an operation and facts read from the ledger give the list. A scope
is kept with the operation (as text, in `operations.environment`), so a resent operation carries
the same list; the list itself is never stored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

Instance = tuple[str, str, int]  # (service, component, number)


class Kind(enum.Enum):
    TENANT = "tenant"
    ROUTE = "route"
    DATA = "data"
    AGENT = "agent"


@dataclass(frozen=True)
class Scope:
    kind: Kind
    environment: str = ""          # app/environment; "" for an operation of no environment
    sets: tuple[Instance, ...] = ()  # data: the instances whose passwords it sets

    @classmethod
    def tenant(cls, environment: str) -> "Scope":
        return cls(Kind.TENANT, environment)

    @classmethod
    def route(cls, environment: str) -> "Scope":
        return cls(Kind.ROUTE, environment)

    @classmethod
    def data(cls, environment: str, *sets: Instance) -> "Scope":
        return cls(Kind.DATA, environment, tuple(sets))

    @classmethod
    def agent(cls) -> "Scope":
        return cls(Kind.AGENT)

    def encode(self) -> str | None:
        """As kept with the operation: a bare app/environment is a tenant operation (as rows
        written before kinds existed are), nothing an agent one."""
        if self.kind is Kind.AGENT:
            return None
        if self.kind is Kind.TENANT:
            return self.environment
        sets = ",".join(f"{s}/{c}/{n}" for s, c, n in self.sets)
        return f"{self.kind.value}:{self.environment}" + (f":{sets}" if sets else "")

    @classmethod
    def decode(cls, text: str | None) -> "Scope":
        if not text:
            return cls.agent()
        kind, sep, rest = text.partition(":")
        if not sep:
            return cls.tenant(text)
        environment, _, sets = rest.partition(":")
        instances = []
        for item in filter(None, sets.split(",")):
            service, component, number = item.split("/")
            instances.append((service, component, int(number)))
        return cls(Kind(kind), environment, tuple(instances))


@dataclass(frozen=True)
class EnvFacts:
    """What the ledger knows of one environment's secrets and where its instances are."""

    secrets: frozenset[str] = frozenset()   # declared secrets, current and former values
    passwords: Mapping[Instance, str] = field(default_factory=dict)
    hosts: Mapping[Instance, str] = field(default_factory=dict)  # instances not removed → agent


def values(scope: Scope, agent_id: str, facts: Mapping[str, EnvFacts]) -> list[str]:
    """The values the operation is sent with, for its agent to replace in its output."""
    out: set[str] = set()
    if scope.kind is Kind.TENANT:
        env = facts.get(scope.environment, EnvFacts())
        out |= env.secrets | set(env.passwords.values())
    elif scope.kind is Kind.DATA:
        env = facts.get(scope.environment, EnvFacts())
        out |= {env.passwords[i] for i in scope.sets if i in env.passwords}
    elif scope.kind is Kind.AGENT:
        for env in facts.values():
            here = [i for i, host in env.hosts.items() if host == agent_id]
            if any(component == "code" for _, component, _ in here):
                out |= env.secrets | set(env.passwords.values())
            else:
                out |= {env.passwords[i] for i in here if i in env.passwords}
    return sorted(out)


def environments_needed(scope: Scope) -> list[str] | None:
    """Whose facts `values` reads: a list of environments, or None for every one on the agent."""
    if scope.kind is Kind.AGENT:
        return None
    if scope.kind is Kind.ROUTE:
        return []
    return [scope.environment]
