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


async def probe(op_id: str, spec: pb.HttpProbeSpec, owner=None) -> pb.OperationResult:
    """`owner()`: the main pid of the instance the probe is for (0 if none), when it names one."""
    started = time.monotonic()
    attempts = max(1, spec.attempts)
    last = ""
    port = urllib.parse.urlsplit(spec.url).port or 80
    for attempt in range(attempts):
        try:
            status = await asyncio.to_thread(_get, spec.url, spec.timeout_s or 2.0, spec.host_header)
            ok = status == spec.expect_status if spec.expect_status else 200 <= status < 300
            problem = await asyncio.to_thread(lambda: stranger(port, owner())) if ok and owner is not None else ""
            if problem.startswith("port "):
                # Another process answers in the instance's place: waiting cannot make it ours.
                return pb.OperationResult(op_id=op_id, outcome=pb.EXITED, exit_code=1,
                                          duration_s=time.monotonic() - started,
                                          error=f"GET {spec.url}: answered, but {problem}")
            if ok and not problem:
                return pb.OperationResult(op_id=op_id, outcome=pb.EXITED,
                                          duration_s=time.monotonic() - started)
            last = problem or f"status {status}"
        except OSError as exc:
            last = str(exc) or type(exc).__name__
        if attempt + 1 < attempts:
            await asyncio.sleep(spec.interval_s or 0.5)
    return pb.OperationResult(op_id=op_id, outcome=pb.EXITED, exit_code=1,
                              duration_s=time.monotonic() - started,
                              error=f"GET {spec.url}: {last} after {attempts} attempts")
