"""Agent registry: who is connected, disconnected or lost, driven by sessions and heartbeats.

Disconnected is not lost: an agent whose link dropped keeps its operations and is expected back.
It becomes lost only after `lost_after` seconds without contact.

What an agent provides is what it claims in its hello *and* the operator granted; its address is
the granted one, else the peer address of its link, never what its hello says.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass, field

import structlog

from common.provides import CHECKS, PROVIDES, check_setting, valid_host
from protos import deployer_pb2 as pb

from controller.state.db import Database

log = structlog.get_logger("controller")
CONNECTED, DISCONNECTED, LOST = "connected", "disconnected", "lost"
# The widest reconnect window of an agent's backoff (1, 2, 4, 8, 16 s: agent/link.py).
RECONNECT_WINDOW_S = 16.0
HEARTBEAT_MISSES = 3  # a connected agent silent for 3 heartbeat intervals is cut off


@dataclass
class Session:
    """One live stream with an agent; `outbox` is drained by the gateway's writer task."""

    agent_id: str
    peer: str
    heartbeat_interval: float
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    last_message: float = field(default_factory=time.monotonic)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""
    revoked: bool = False      # closed because the agent's certificate was revoked

    def send(self, message: pb.ControllerMessage) -> None:
        self.outbox.put_nowait(message)

    def close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()


@dataclass
class Agent:
    id: str
    roles: list[str]
    capabilities: list[str]
    version: str
    facts: pb.HostFacts
    last_seen: float
    peer: str = ""
    state: str = DISCONNECTED
    session: Session | None = None
    since: float = field(default_factory=time.monotonic)  # when the state last changed
    grace: float = 0.0   # known from before a restart, not back yet: how much longer it may take to dial
    running: int = 0
    settings: dict[str, str] = field(default_factory=dict)   # its well-formed settings, no address
    services_root: str = ""
    facts_unsaved: bool = False  # the last facts could not be written (said once in the log)
    claimed: list[str] = field(default_factory=list)          # capabilities its hello names
    stated: dict[str, str] = field(default_factory=dict)      # settings as its hello gave them
    granted: list[str] = field(default_factory=list)          # what the operator granted
    granted_address: str = ""
    labels: dict[str, str] = field(default_factory=dict)      # granted, for placement pins
    granted_memory: int = 0                                   # bytes placement may count on (0: measured)
    granted_cpu: float = 0.0

    @property
    def address(self) -> str:
        """How nginx (and probes) reach the services this agent runs: granted, else the address
        its link comes from."""
        return self.granted_address or peer_host(self.peer)

    def ignored(self) -> list[str]:
        """What it claims to provide and was not granted."""
        return [c for c in self.claimed if c in PROVIDES and c not in self.granted]

    def regrant(self, provides: list[str], address: str) -> None:
        self.granted, self.granted_address = sorted(provides), address
        self.capabilities = [c for c in self.claimed if c in PROVIDES and c in self.granted]
        # Only well-formed settings (checked again: a row saved before the gateway checked them
        # may be read back), and never an address of its own choosing. Not narrowed to what is
        # granted: a grant decides what new work the agent is chosen for, and what it already
        # holds (a database placed there before an ungrant) is still reached the way it says.
        self.settings = {k: v for k, v in self.stated.items()
                         if k != "address" and k in CHECKS and not check_setting(k, v)}

    def mysql_admin(self) -> str:
        """The MariaDB client command with admin rights on the server this agent provides."""
        return self.settings.get("mysql.admin", "mariadb --batch")

    def redis_cli(self) -> str:
        """redis-cli with admin rights on the Redis this agent provides."""
        host = self.settings.get("redis.host", "127.0.0.1")
        port = self.settings.get("redis.port", "6379")
        return self.settings.get("redis.admin", f"redis-cli -h {host} -p {port}")


class Registry:
    def __init__(self, db: Database, lost_after: float) -> None:
        self.db = db
        self.lost_after = lost_after
        self.agents: dict[str, Agent] = {}
        self.on_disconnected: list = []   # callbacks(agent_id)
        self.on_lost: list = []           # callbacks(agent_id)
        self.on_attached: list = []       # callbacks(agent_id): a hello was welcomed
        self.on_exited: list = []         # callbacks(agent_id, pb.ServiceExited): a service ended unasked
        self.on_probed: list = []         # callbacks(agent_id, pb.ProbeReport): a round of health checks
        grants = db.grants()
        placed = db.placement_grants()
        for row in db.agents():
            # Known from before a restart: expected back, lost if they don't come.
            agent = self.agents[row["id"]] = Agent(
                id=row["id"], roles=json.loads(row["roles"]), capabilities=[], version=row["version"],
                facts=pb.HostFacts.FromString(row["facts"] or b""), last_seen=row["last_seen"],
                peer=row["peer"] or "", services_root=row["services_root"] or "",
                claimed=json.loads(row["capabilities"]), stated=json.loads(row["settings"] or "{}"))
            agent.regrant(*grants.get(agent.id, ([], "")))
            agent.granted_memory, agent.granted_cpu, agent.labels = placed.get(agent.id, (0, 0.0, {}))
            # While this controller was away its agents backed off; each dials again within the
            # longest window: one lost before that is told to operators only if it is still away
            # then (healing.py), not for a reconnect that was merely slow.
            agent.grace = RECONNECT_WINDOW_S

    def grant_placement(self, agent_id: str, memory: int, cpu: float, labels: dict[str, str]) -> None:
        """Record what placement may count on an agent and its labels; the next plan sees it."""
        self.db.save_placement_grant(agent_id, memory, cpu, labels)
        agent = self.agents.get(agent_id)
        if agent is not None:
            agent.granted_memory, agent.granted_cpu, agent.labels = memory, cpu, dict(labels)

    def placement_grant(self, agent_id: str) -> tuple[int, float, dict[str, str]]:
        return self.db.placement_grant(agent_id) or (0, 0.0, {})

    def grant(self, agent_id: str, provides: list[str], address: str) -> None:
        """Record what an agent may provide and its address, and apply it at once, connected or
        not: the next placement sees it, no reconnect needed."""
        self.db.save_grant(agent_id, provides, address)
        agent = self.agents.get(agent_id)
        if agent is not None:
            agent.regrant(provides, address)

    def attach(self, hello: pb.Hello, peer: str) -> Session:
        agent = self.agents.get(hello.agent_id)
        if agent is not None and agent.session is not None:
            # The same agent dialled again (its old link may be half-open): the newest wins.
            log.warning("agent.session_replaced", agent_id=hello.agent_id, old_peer=agent.peer, peer=peer)
            agent.session.close("replaced by a newer session of the same agent")
        session = Session(hello.agent_id, peer, float(hello.heartbeat_interval_s or 5))
        agent = self.agents[hello.agent_id] = Agent(
            id=hello.agent_id, roles=list(hello.roles), capabilities=[],
            version=hello.version, facts=hello.facts, last_seen=time.time(), peer=peer,
            state=CONNECTED, session=session,
            running=sum(1 for h in hello.held if h.state == pb.HELD_RUNNING),
            services_root=hello.services_root, claimed=list(dict.fromkeys(hello.capabilities)),
            stated=dict(hello.settings))
        agent.regrant(*self.db.grant(agent.id))
        agent.granted_memory, agent.granted_cpu, agent.labels = self.placement_grant(agent.id)
        self.db.save_agent(hello, peer)
        log.info("agent.connected", agent_id=hello.agent_id, peer=peer, roles=list(hello.roles),
                 version=hello.version, held=len(hello.held), provides=agent.capabilities,
                 address=agent.address)
        if agent.ignored() or "address" in hello.settings:
            # Not refused: the operator may grant it later (`deployctl agents grant`), and the
            # agent serves its roles meanwhile; but none of it is used until then.
            log.warning("agent.claims_ignored", agent_id=agent.id, not_granted=agent.ignored(),
                        address_claimed="address" in hello.settings, address=agent.address)
        return session

    def detach(self, session: Session) -> None:
        agent = self.agents.get(session.agent_id)
        session.close(session.close_reason or "stream ended")
        if agent is None or agent.session is not session:
            return  # already replaced by a newer session
        agent.session, agent.state, agent.since, agent.grace = None, DISCONNECTED, time.monotonic(), 0.0
        self.db.touch_agent(agent.id, agent.last_seen, None)
        log.info("agent.disconnected", agent_id=agent.id, reason=session.close_reason)
        for callback in self.on_disconnected:
            callback(agent.id)

    def heard(self, session: Session, facts: pb.HostFacts | None = None, running: int | None = None) -> None:
        session.last_message = time.monotonic()
        agent = self.agents.get(session.agent_id)
        if agent is None or agent.session is not session:
            return
        agent.last_seen = time.time()
        if facts is not None:
            agent.facts = facts
            try:
                self.db.touch_agent(agent.id, agent.last_seen, facts)
                agent.facts_unsaved = False
            except sqlite3.OperationalError as exc:
                # A full disk: the facts are kept in memory; ending the session over them would
                # only stop the output that is waiting for room.
                if not agent.facts_unsaved:
                    log.warning("agent.facts_not_saved", agent_id=agent.id, error=str(exc))
                agent.facts_unsaved = True
        if running is not None:
            agent.running = running

    def session(self, agent_id: str) -> Session | None:
        agent = self.agents.get(agent_id)
        return agent.session if agent else None

    def sweep(self) -> None:
        """Cut off silent sessions; declare agents lost after `lost_after` without contact."""
        now = time.monotonic()
        for agent in list(self.agents.values()):
            session = agent.session
            if session and now - session.last_message > HEARTBEAT_MISSES * session.heartbeat_interval:
                log.warning("agent.silent", agent_id=agent.id,
                            silent_s=round(now - session.last_message, 1))
                session.close(f"no heartbeat for {now - session.last_message:.0f}s")
            elif agent.state == DISCONNECTED and now - agent.since > self.lost_after:
                agent.state, agent.since = LOST, now
                log.warning("agent.lost", agent_id=agent.id, after_s=self.lost_after)
                for callback in self.on_lost:
                    callback(agent.id)

    async def sweeper(self, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.sweep()

    def cut_off(self, agent_id: str, reason: str) -> bool:
        """End the agent's session now (its certificate was revoked); True if it had one."""
        agent = self.agents.get(agent_id)
        if agent is None or agent.session is None:
            return False
        agent.session.revoked = True
        agent.session.close(reason)
        return True

    def close_all(self, reason: str) -> None:
        for agent in self.agents.values():
            if agent.session:
                agent.session.send(pb.ControllerMessage(goodbye=pb.Goodbye(reason=reason)))
                agent.session.close(reason)


def peer_host(peer: str) -> str:
    """The IP address in a gRPC peer string (`ipv4:10.0.0.5:41234`, `ipv6:[::1]:41234`); an agent
    on a Unix socket, or a peer not known, is on this host."""
    kind, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
    if host.lower().startswith("::ffff:") and "." in host:
        host = host[7:]  # an IPv4 client of a dual-stack socket
    return host if host and valid_host(host) and "%" not in host else "127.0.0.1"
