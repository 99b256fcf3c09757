"""Traffic that proves a switch: concurrent clients through nginx, every response counted.

Each response's body names what served it (the example's `/version` answers its release and its
process id), so a test can show that the old and the new instance both answered while the switch
ran, not merely that nothing failed while perhaps nothing switched.

A request counts as failed when its status is not an expected one, or when anything at all goes
wrong with it (refused, reset, cut mid-body, a malformed status line, a timeout): whatever the
exception, it is recorded with its type. The one thing retried is what every HTTP client retries
(RFC 9112 §9.3.1): a request on a *reused* keep-alive connection that the server had already
closed when it arrived, before a single byte of an answer; those retries are counted apart, and a
retry that fails is a failure.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Tally:
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    retried: int = 0
    served_by: Counter = field(default_factory=Counter)  # (release, pid) → responses
    statuses: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.ok + len(self.failed)

    @property
    def releases(self) -> set[str]:
        return {release for release, _ in self.served_by}

    @property
    def pids(self) -> set[int]:
        return {pid for _, pid in self.served_by}

    def __str__(self) -> str:
        return (f"{self.total} requests, {len(self.failed)} failed {self.failed[:5]}, {self.retried} retried "
                f"on closed keep-alive connections, served by {dict(self.served_by)}, statuses {dict(self.statuses)}")


class Load:
    """Clients hammering `path` on nginx's `port` with Host `host` until stopped.

    Half the clients keep their connection alive, half open one per request. `stop()` waits until
    at least `min_requests` were made (bounded by `max_seconds` overall), then returns the tally.
    """

    def __init__(self, port: int, host: str, path: str = "/version", clients: int = 4,
                 expect: tuple[int, ...] = (200,), min_requests: int = 1000, max_seconds: float = 300,
                 timeout: float = 10.0, served_from: str = "") -> None:
        self.port, self.host, self.path, self.expect = port, host, path, expect
        self.served_from = served_from  # what the answering process's folder must contain
        self.min_requests, self.max_seconds, self.timeout = min_requests, max_seconds, timeout
        self.tally = Tally()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i % 2 == 0,), daemon=True)
                         for i in range(clients)]
        self._started = 0.0

    def __enter__(self) -> "Load":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Load":
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def wait_for(self, requests: int) -> None:
        """Until `requests` more responses were counted: e.g. some traffic before a switch begins."""
        goal = self.tally.total + requests
        while self.tally.total < goal and time.monotonic() - self._started < self.max_seconds:
            time.sleep(0.02)

    def stop(self) -> Tally:
        while self.tally.total < self.min_requests and time.monotonic() - self._started < self.max_seconds:
            time.sleep(0.02)
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        return self.tally

    # ---------------------------------------------------------------- one client

    def _client(self, keep_alive: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        reused = False
        while not self._stop.is_set() and time.monotonic() - self._started < self.max_seconds:
            if conn is None:
                conn, reused = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout), False
            try:
                status, body = self._request(conn, keep_alive)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                conn = None
                if keep_alive and reused and not getattr(exc, "answer_started", False):
                    with self._lock:
                        self.tally.retried += 1
                    continue  # the next turn sends it again on a fresh connection
                self._fail(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - every way a request can go wrong is a failure
                conn.close()
                conn = None
                self._fail(exc)
                continue
            self._count(status, body)
            if keep_alive:
                reused = True
            else:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _request(self, conn: http.client.HTTPConnection, keep_alive: bool) -> tuple[int, bytes]:
        headers = {"Host": self.host}
        if not keep_alive:
            headers["Connection"] = "close"
        conn.request("GET", self.path, headers=headers)
        response = conn.getresponse()
        try:
            return response.status, response.read()
        except (ConnectionResetError, BrokenPipeError) as exc:
            exc.answer_started = True  # a status line came: this is a cut answer, never retried
            raise

    def _count(self, status: int, body: bytes) -> None:
        served, cwd = ("?", 0), ""
        try:
            answer = json.loads(body)
            served = (str(answer.get("release", "?")), int(answer.get("pid", 0)))
            cwd = str(answer.get("cwd", ""))
        except (ValueError, AttributeError):
            pass
        with self._lock:
            self.tally.statuses[status] += 1
            if status in self.expect and self.served_from and self.served_from not in cwd:
                self.tally.failed.append(f"answered by a process of another environment: {served} in {cwd}")
            elif status in self.expect:
                self.tally.ok += 1
                self.tally.served_by[served] += 1
            else:
                self.tally.failed.append(f"status {status}")

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self.tally.failed.append(f"{type(exc).__name__}: {exc}")
