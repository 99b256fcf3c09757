"""Periodic health checks of live web instances, ordered by the controller (decision 032).

Every `every` seconds, one Probe message per connected agent names all the live web instances
it runs (their port and health path); the agent checks them at once and answers with one report.
An instance that fails `failures` rounds in a row is recorded as `unhealthy` in its
environment's history and handed to the healer, which restarts it as it restarts a dead one
(blue/green, with the same backoff and crash-loop rule). The cost per round is one message each
way per agent: it grows with agents, not with instances. Nothing of a round is written to disk.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from protos import deployer_pb2 as pb

from controller.environments import commands as ops
from controller.fleet.registry import CONNECTED

log = structlog.get_logger("controller")


@dataclass(frozen=True)
class HealthSettings:
    every: float = 10.0
    failures: int = 3
    timeout: float = 2.0
    replace_after: float = 300.0   # a web replica whose host is lost this long is started on another host


@dataclass(frozen=True)
class Watched:
    env_key: str
    service: str
    process: str
    since: float   # when the instance went live


class Watcher:
    def __init__(self, environments, healer, settings: HealthSettings = HealthSettings()) -> None:
        self.environments, self.healer, self.settings = environments, healer, settings
        self.ledger, self.registry = environments.ledger, environments.registry
        self.round = 0
        self.sent: dict[str, tuple[int, dict[str, Watched]]] = {}   # agent → (round, key → instance)
        self.failing: dict[str, int] = {}                           # key → rounds failed in a row
        self._paths: dict[str, tuple[tuple, dict[str, tuple[str, tuple[int, ...]]]]] = {}
        self.registry.on_probed.append(self.reported)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.every)
            try:
                self.tick()
            except Exception as exc:  # a round that could not be sent: the next one tries again
                log.error("health.round_failed", error=f"{type(exc).__name__}: {exc}")

    def _web_services(self, env_key: str, rows: list) -> dict[str, tuple[str, tuple[int, ...]]]:
        """service → (health path, statuses) of the environment's web services as their live
        instances were deployed (after a failed apply the stored spec is ahead of what runs),
        worked out again only when the stored spec or the live instances changed."""
        stored = self.environments.specs.get(env_key)
        key = (stored, tuple(sorted((r.service, r.number, r.fingerprint) for r in rows)))
        cached = self._paths.get(env_key)
        if cached is not None and cached[0] == key:
            return cached[1]
        spec = self.environments.as_deployed_spec(env_key)
        web = {s.name: (s.health, tuple(s.check.statuses)) for s in spec.services
               if s.is_web and s.restart.enabled} if spec else {}
        self._paths[env_key] = (key, web)
        return web

    def tick(self) -> None:
        self.round += 1
        by_host: dict[str, list] = {}
        by_env: dict[str, list] = {}
        for row in self.ledger.live_code():
            for replica in row.replicas:  # each replica is checked by the agent of its host
                if replica.port and replica.process:
                    by_host.setdefault(replica.host, []).append((row, replica))
            by_env.setdefault(row.env_key, []).append(row)
        web_of = {env_key: self._web_services(env_key, rows) for env_key, rows in by_env.items()}
        for host, rows in by_host.items():
            agent, session = self.registry.agents.get(host), self.registry.session(host)
            if agent is None or session is None or agent.state != CONNECTED:
                continue
            targets, watched = [], {}
            for row, replica in rows:
                web = web_of[row.env_key].get(row.service)
                if web is None or self.healer.busy(row.env_key, row.service):
                    continue
                key = f"{row.env_key}|{row.service}|{replica.process}"
                watched[key] = Watched(row.env_key, row.service, replica.process, row.updated)
                targets.append(pb.ProbeTarget(key=key, host=ops.url_host(agent.address).strip("[]"), port=replica.port,
                                              path=web[0], expect_statuses=web[1]))
            if targets:
                self.sent[host] = (self.round, watched)
                session.send(pb.ControllerMessage(probe=pb.Probe(round=self.round, targets=targets,
                                                                 timeout_s=self.settings.timeout)))
        for key in [k for k in self.failing if not any(k in w for _, w in self.sent.values())]:
            del self.failing[key]  # no longer live, or no longer watched

    def reported(self, agent_id: str, report: pb.ProbeReport) -> None:
        sent = self.sent.get(agent_id)
        if sent is None or sent[0] != report.round:
            return  # a late answer to an older round: the current one will say
        watched = sent[1]
        for result in report.results:
            instance = watched.get(result.key)
            if instance is None:
                continue
            if result.ok:
                self.failing.pop(result.key, None)
                continue
            failed = self.failing[result.key] = self.failing.get(result.key, 0) + 1
            if failed == self.settings.failures:
                why = f"failed {failed} health checks in a row (last: {result.problem})"
                log.warning("health.unhealthy", environment=instance.env_key, service=instance.service,
                            process=instance.process, problem=result.problem)
                self.healer.unhealthy(instance.env_key, instance.service, instance.process, instance.since, why)

