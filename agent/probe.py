"""HTTP health probe: GET a URL until it gives the expected status or attempts run out."""

from __future__ import annotations

import asyncio
import http.client
import time
import urllib.parse

import psutil

from protos import deployer_pb2 as pb


def _get(url: str, timeout: float, host_header: str) -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        headers = {"Host": host_header} if host_header else {}
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        conn.request("GET", target, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def listeners(port: int) -> set[int]:
    """The pids listening on a TCP port of this host (root sees every process's sockets)."""
    return {c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}


def tree(pid: int) -> set[int]:
    try:
        process = psutil.Process(pid)
        return {pid, *(child.pid for child in process.children(recursive=True))}
    except psutil.Error:
        return set()


def stranger(port: int, owner: int) -> str:
    """Why the answer on `port` is not the instance's own (whose main process is `owner`), or ''."""
    found = listeners(port)
    if not owner:
        return "the instance is not running"
    if not found:
        return f"no process is seen listening on port {port}"
    if found <= tree(owner):  # every listener: a stranger on another address of the port answers too
        return ""
    return f"port {port} is held by another process (pid {', '.join(map(str, sorted(found)))}), not the instance"


# Answers that waiting will not change: the app is up and says this path is not its health (a
# 404, a 401…). 408, 425 and 429 say "not now", and 5xx may be a start still under way.
RETRY_4XX = (408, 425, 429)


def expected(spec: pb.HttpProbeSpec, status: int) -> bool:
    if spec.expect_statuses:
        return status in spec.expect_statuses
    if spec.expect_status:
        return status == spec.expect_status
    return 200 <= status < 400  # a redirect (to a login page, say) is an app that answers


async def probe(op_id: str, spec: pb.HttpProbeSpec, owner=None) -> pb.OperationResult:
    """`owner()`: the main pid of the instance the probe is for (0 if none), when it names one.

    Tries until an expected answer, the deadline (or the attempts) run out, or waiting cannot
    help: the instance has exited, another process holds its port, or it gave a definite 4xx."""
    started = time.monotonic()
    attempts = max(1, spec.attempts)
    last, gone = "", 0
    port = urllib.parse.urlsplit(spec.url).port or 80

    def failed(error: str) -> pb.OperationResult:
        return pb.OperationResult(op_id=op_id, outcome=pb.EXITED, exit_code=1,
                                  duration_s=time.monotonic() - started, error=f"GET {spec.url}: {error}")

    attempt = 0
    while True:
        attempt += 1
        try:
            status = await asyncio.to_thread(_get, spec.url, spec.timeout_s or 2.0, spec.host_header)
            ok = expected(spec, status)
            problem = await asyncio.to_thread(lambda: stranger(port, owner())) if ok and owner is not None else ""
            if problem.startswith("port "):
                # Another process answers in the instance's place: waiting cannot make it ours.
                return failed(f"answered, but {problem}")
            if ok and not problem:
                return pb.OperationResult(op_id=op_id, outcome=pb.EXITED, duration_s=time.monotonic() - started)
            if not ok and 400 <= status < 500 and status not in RETRY_4XX:
                return failed(f"answered {status}, which is not a healthy answer (expected "
                              f"{_expected_text(spec)}); waiting would not change it")
            last = problem or f"status {status}"
        except OSError as exc:
            last = str(exc) or type(exc).__name__
        if owner is not None:
            # Twice in a row, a poll apart: a driver may not see a process that has just started.
            gone = gone + 1 if await asyncio.to_thread(owner) == 0 else 0
            if gone >= 2:
                return failed(f"the instance exited before it answered (last: {last})")
        elapsed = time.monotonic() - started
        if (spec.deadline_s and elapsed + (spec.interval_s or 0.5) > spec.deadline_s) or \
                (not spec.deadline_s and attempt >= attempts):
            break
        await asyncio.sleep(spec.interval_s or 0.5)
    within = f"within {spec.deadline_s:g} s" if spec.deadline_s else f"after {attempt} attempts"
    return failed(f"{last} {within}")


def _expected_text(spec: pb.HttpProbeSpec) -> str:
    if spec.expect_statuses:
        return " or ".join(str(s) for s in spec.expect_statuses)
    return str(spec.expect_status) if spec.expect_status else "2xx or 3xx"


# ---------------------------------------------------------------- rounds the controller orders

ROUND_CONCURRENCY = 64
MAX_TARGETS = 10_000


async def _status(target: pb.ProbeTarget, timeout: float) -> int:
    """The status line's code of one GET, over a connection of its own (no thread per check)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(target.host, target.port), timeout)
    try:
        writer.write(f"GET {target.path} HTTP/1.0\r\nHost: {target.host}\r\nUser-Agent: deployer-probe\r\n"
                     "Connection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise OSError("not an HTTP answer")
    return int(parts[1])


async def check_round(message: pb.Probe) -> pb.ProbeReport:
    """Every target of the round at once (at most ROUND_CONCURRENCY in flight), one try each."""
    gate = asyncio.Semaphore(ROUND_CONCURRENCY)
    timeout = min(max(message.timeout_s or 2.0, 0.1), 30.0)

    async def one(target: pb.ProbeTarget) -> pb.ProbeResult:
        if not target.path.startswith("/") or not 0 < target.port < 65536 or any(c in target.path for c in " \r\n"):
            return pb.ProbeResult(key=target.key, ok=False, problem="not a target this agent checks")
        async with gate:
            try:
                status = await _status(target, timeout)
            except asyncio.TimeoutError:
                return pb.ProbeResult(key=target.key, ok=False, problem=f"no answer within {timeout:g}s")
            except OSError as exc:
                return pb.ProbeResult(key=target.key, ok=False, problem=exc.strerror or str(exc) or type(exc).__name__)
        good = status in target.expect_statuses if target.expect_statuses else 200 <= status < 400
        return pb.ProbeResult(key=target.key, ok=good, problem="" if good else f"status {status}")

    results = await asyncio.gather(*(one(t) for t in message.targets[:MAX_TARGETS]))
    return pb.ProbeReport(round=message.round, results=results)
