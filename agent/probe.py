"""HTTP health probe: GET a URL until it gives the expected status or attempts run out."""

from __future__ import annotations

import asyncio
import http.client
import time
import urllib.parse

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


async def probe(op_id: str, spec: pb.HttpProbeSpec) -> pb.OperationResult:
    started = time.monotonic()
    attempts = max(1, spec.attempts)
    last = ""
    for attempt in range(attempts):
        try:
            status = await asyncio.to_thread(_get, spec.url, spec.timeout_s or 2.0, spec.host_header)
            ok = status == spec.expect_status if spec.expect_status else 200 <= status < 300
            if ok:
                return pb.OperationResult(op_id=op_id, outcome=pb.EXITED,
                                          duration_s=time.monotonic() - started)
            last = f"status {status}"
        except OSError as exc:
            last = str(exc) or type(exc).__name__
        if attempt + 1 < attempts:
            await asyncio.sleep(spec.interval_s or 0.5)
    return pb.OperationResult(op_id=op_id, outcome=pb.EXITED, exit_code=1,
                              duration_s=time.monotonic() - started,
                              error=f"GET {spec.url}: {last} after {attempts} attempts")
