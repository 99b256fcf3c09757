"""Telling operators: the events worth a message go to the webhooks of the controller's config,
signed, retried with backoff and kept in the outbox until taken (decision 031).

`emit` only adds rows to the outbox (one SQLite insert): a job, a heal or a sweep never waits for
a receiver. One sender task per target posts its notifications in order; a failure waits
`retry_first` × 2^attempts (at most `retry_max`) before the next try, and a notification no one
took for `give_up_after` is dropped and logged. The same notification keeps its `id` across
tries, so a receiver that answered too late for us to hear can tell a repeat.

What a body holds is what `deployctl` already shows an operator (a job's summary, a finding's
line, a service's name and how it ended), never a secret value, an `.env` or an output. A
target's URL (a Slack one is a secret) and key are never logged: logs name the target.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import structlog

from common import __version__
from controller.state.outbox import Outbox, Pending

log = structlog.get_logger("notify")

EVENTS = ("job.finished", "service.crash_loop", "agent.lost", "verify.drift")
FORMATS = ("json", "slack")
MAX_LINES = 20  # finding lines in one drift notification; the job holds them all


@dataclass(frozen=True)
class Target:
    name: str
    url: str = field(repr=False)
    format: str = "json"
    key: bytes | None = field(default=None, repr=False)
    events: frozenset[str] = frozenset(EVENTS)
    timeout_s: float = 5.0


@dataclass(frozen=True)
class Retry:
    first: float = 1.0
    max: float = 60.0
    give_up_after: float = 24 * 3600.0

    def delay(self, attempts: int) -> float:
        return min(self.max, self.first * 2.0 ** max(attempts - 1, 0))


def signature(key: bytes, timestamp: str, body: bytes) -> str:
    """What `X-Deployer-Signature` carries: HMAC-SHA256 of `TIMESTAMP.BODY` under the target's key."""
    return "sha256=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def payload(target: Target, body: str) -> bytes:
    """The bytes posted: the event as JSON, or Slack's `{"text": …}` made of its one line."""
    if target.format == "slack":
        return json.dumps({"text": json.loads(body)["text"]}).encode()
    return body.encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a webhook that moved is a failed delivery, said as such
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def post(target: Target, pending: Pending) -> None:
    """One try; raises OSError (refused, timed out, an HTTP status that is not 2xx)."""
    data = payload(target, pending.body)
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": f"deployer-controller/{__version__}",
               "X-Deployer-Event": pending.event, "X-Deployer-Delivery": json.loads(pending.body)["id"],
               "X-Deployer-Timestamp": timestamp}
    if target.key:
        headers["X-Deployer-Signature"] = signature(target.key, timestamp, data)
    request = urllib.request.Request(target.url, data=data, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=target.timeout_s) as answer:
            answer.read(64 << 10)
    except urllib.error.HTTPError as exc:
        raise OSError(f"answered {exc.code}") from None
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None


class Notifier:
    def __init__(self, outbox: Outbox | None, targets: tuple[Target, ...] = (), retry: Retry = Retry()) -> None:
        self.outbox, self.targets, self.retry = outbox, targets, retry
        self.wake = {t.name: asyncio.Event() for t in targets}
        self.tasks: list[asyncio.Task] = []

    def emit(self, event: str, text: str, **fields) -> None:
        """Queue `event` for every target that wants it; returns at once."""
        names = [t.name for t in self.targets if event in t.events]
        if not names or self.outbox is None:
            return
        body = {"id": uuid.uuid4().hex, "event": event,
                "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "text": text, **fields}
        self.outbox.add(names, event, json.dumps(body, sort_keys=True))
        for name in names:
            self.wake[name].set()

    # ---------------------------------------------------------------- the events

    def job_finished(self, job_id: str, env_key: str, kind: str, state: str, summary: str,
                     created: float, finished: float) -> None:
        self.emit("job.finished", f"{env_key}: {kind} {job_id} {state}: {summary}", environment=env_key,
                  job=job_id, kind=kind, state=state, summary=summary, seconds=round(finished - created, 3))

    def crash_loop(self, env_key: str, service: str, restarts: int, why: str) -> None:
        self.emit("service.crash_loop", f"{env_key}/{service} is in a crash loop: {why}", environment=env_key,
                  service=service, restarts=restarts, why=why)

    def agent_lost(self, agent_id: str, live: list[tuple[str, str, str]]) -> None:
        names = sorted({f"{env_key}/{service}" for env_key, service, _ in live})
        self.emit("agent.lost", f"agent {agent_id} is lost" + (f"; live there: {', '.join(names)}" if names else ""),
                  agent=agent_id, live=[{"environment": e, "service": s, "process": p} for e, s, p in live])

    def drift(self, env_key: str, job_id: str, lines: list[str]) -> None:
        self.emit("verify.drift", f"{env_key}: verify {job_id} found {len(lines)} finding(s): {lines[0]}",
                  environment=env_key, job=job_id, findings=len(lines), lines=lines[:MAX_LINES])

    # ---------------------------------------------------------------- sending

    def start(self) -> None:
        if self.outbox is None:
            return
        gone = self.outbox.forget_targets_except([t.name for t in self.targets])
        if gone:
            log.warning("notify.targets_removed", dropped=gone)
        self.tasks = [asyncio.create_task(self._send(t)) for t in self.targets]

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()

    async def _send(self, target: Target) -> None:
        failing = False
        while True:
            now = time.time()
            pending = self.outbox.head(target.name)
            if pending is None or pending.next_at > now:
                self.wake[target.name].clear()
                try:
                    await asyncio.wait_for(self.wake[target.name].wait(),
                                           None if pending is None else max(pending.next_at - now, 0.05))
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                await asyncio.to_thread(post, target, pending)
            except OSError as exc:
                error = str(exc) or type(exc).__name__
                if now - pending.created >= self.retry.give_up_after:
                    self.outbox.dropped(pending.id, error)
                    log.error("notify.dropped", target=target.name, event=pending.event, error=error,
                              tries=pending.attempts + 1)
                    continue
                self.outbox.failed(pending.id, error, now + self.retry.delay(pending.attempts + 1))
                if not failing:  # said once per outage, not at every try
                    log.warning("notify.failing", target=target.name, error=error)
                failing = True
                continue
            self.outbox.delivered(pending.id)
            if failing:
                log.info("notify.delivering_again", target=target.name)
            failing = False
