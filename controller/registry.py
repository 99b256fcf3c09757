"""Agent registry: who is connected, disconnected or lost, driven by sessions and heartbeats.

Disconnected is not lost: an agent whose link dropped keeps its operations and is expected back.
It becomes lost only after `lost_after` seconds without contact.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass, field

import structlog

from protos import deployer_pb2 as pb

from .db import Database

log = structlog.get_logger("controller")
CONNECTED, DISCONNECTED, LOST = "connected", "disconnected", "lost"
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
    running: int = 0
    settings: dict[str, str] = field(default_factory=dict)
    services_root: str = ""
    facts_unsaved: bool = False  # the last facts could not be written (said once in the log)

    @property
    def address(self) -> str:
        """How nginx (and probes) reach the services this agent runs."""
        return self.settings.get("address", "127.0.0.1")

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
        for row in db.agents():
            # Known from before a restart: expected back, lost if they don't come.
            self.agents[row["id"]] = Agent(
                id=row["id"], roles=json.loads(row["roles"]),
                capabilities=json.loads(row["capabilities"]), version=row["version"],
                facts=pb.HostFacts.FromString(row["facts"] or b""), last_seen=row["last_seen"],
                peer=row["peer"] or "", settings=json.loads(row["settings"] or "{}"),
                services_root=row["services_root"] or "")

    def attach(self, hello: pb.Hello, peer: str) -> Session:
        agent = self.agents.get(hello.agent_id)
        if agent is not None and agent.session is not None:
            # The same agent dialled again (its old link may be half-open): the newest wins.
            log.warning("agent.session_replaced", agent_id=hello.agent_id, old_peer=agent.peer, peer=peer)
            agent.session.close("replaced by a newer session of the same agent")
        session = Session(hello.agent_id, peer, float(hello.heartbeat_interval_s or 5))
        self.agents[hello.agent_id] = Agent(
            id=hello.agent_id, roles=list(hello.roles), capabilities=list(hello.capabilities),
            version=hello.version, facts=hello.facts, last_seen=time.time(), peer=peer,
            state=CONNECTED, session=session,
            running=sum(1 for h in hello.held if h.state == pb.HELD_RUNNING),
            settings=dict(hello.settings), services_root=hello.services_root)
        self.db.save_agent(hello, peer)
        log.info("agent.connected", agent_id=hello.agent_id, peer=peer, roles=list(hello.roles),
                 version=hello.version, held=len(hello.held))
        return session

    def detach(self, session: Session) -> None:
        agent = self.agents.get(session.agent_id)
        session.close(session.close_reason or "stream ended")
        if agent is None or agent.session is not session:
            return  # already replaced by a newer session
        agent.session, agent.state, agent.since = None, DISCONNECTED, time.monotonic()
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
