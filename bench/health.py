"""The controller's cost of periodic health checks: CPU time and bytes written over a window, with
1,000 live web instances checked every 10 s, on 1 agent and spread over 10, beside the same
controller with the checks off. Run alone: `python bench/health.py`; `make bench` runs it too.

The 1,000 instances are rows of the ledger (100 environments of 10 web services each, specs
accepted as `deployctl apply` stores them), added once the agents are connected, and their
ports are served by one process listening on all 1,000 and answering 200: what is measured is
the controller's work (rounds, reports, failure counts) and the agents' checks over real
sockets, not 1,000 application processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controller.environments import spec as spec_mod  # noqa: E402
from tests.harness import Cluster  # noqa: E402

ENVIRONMENTS, SERVICES = 100, 10


def _serve(count: int, ports, answered) -> None:
    async def answer(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            with answered.get_lock():
                answered.value += 1
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def main():
        bound = []
        for _ in range(count):
            server = await asyncio.start_server(answer, "127.0.0.1", 0)
            bound.append(server.sockets[0].getsockname()[1])
        ports.put(bound)
        await asyncio.Event().wait()

    asyncio.run(main())


def _spec(env: str) -> str:
    services = "".join(f"  s{i}:\n    path: /s{i}\n    source: /srv/git/none.git\n    ref: main\n"
                       f"    start: run\n    health: /health\n" for i in range(SERVICES))
    text = f"app: bench\nenvironment: {env}\ndomain: {env}.bench.test\nservices:\n{services}"
    return json.dumps(spec_mod.parse_spec(text, f"{env}.yml").to_dict())


def _populate(db_path: Path, hosts: list[str], ports: list[int]) -> None:
    now = time.time()
    with sqlite3.connect(db_path, timeout=30) as db:
        n = 0
        for e in range(ENVIRONMENTS):
            env = f"e{e:03d}"
            db.execute("INSERT INTO environments (key, spec, updated) VALUES (?, ?, ?)", (f"bench/{env}", _spec(env), now))
            for s in range(SERVICES):
                port = ports[n]
                db.execute("INSERT INTO instances (env_key, service, component, number, status, host, port, names, "
                           "created, updated) VALUES (?, ?, 'code', 1, 'live', ?, ?, ?, ?, ?)",
                           (f"bench/{env}", f"s{s}", hosts[n % len(hosts)], port,
                            json.dumps({"process": f"1-{port}"}), now, now))
                n += 1


def _usage(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and bytes written to storage by a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return ticks / os.sysconf("SC_CLK_TCK"), int(io["write_bytes"])


def measure(agents: int, checks: bool, window: float, every: float = 10.0) -> dict:
    base = Path(tempfile.mkdtemp(prefix="deployer-bench-health-"))
    config = base / "controller.yml"
    config.write_text(f"health: {{every: {every if checks else 3600}s}}\n")
    cluster = Cluster(base)
    cluster.controller.extra_args = ("--config", str(config))
    queue, answered = multiprocessing.Queue(), multiprocessing.Value("q", 0)
    server = multiprocessing.Process(target=_serve, args=(ENVIRONMENTS * SERVICES, queue, answered), daemon=True)
    server.start()
    try:
        ports = queue.get(timeout=60)
        cluster.controller.start()
        hosts = [f"h{i:02d}" for i in range(1, agents + 1)]
        for host in hosts:
            cluster.add_agent(host, ["computing"])
        cluster.wait_connected(*hosts, timeout=120)
        _populate(cluster.controller.store / "deployer.db", hosts, ports)
        time.sleep(2 * every if checks else 5)  # settle: the first rounds, caches warm
        pid = cluster.controller.proc.pid
        agent_pids = [a.proc.pid for a in cluster.agents.values()]
        cpu0, written0 = _usage(pid)
        agents0, checked0 = sum(_usage(p)[0] for p in agent_pids), answered.value
        time.sleep(window)
        cpu1, written1 = _usage(pid)
        agents1, checked1 = sum(_usage(p)[0] for p in agent_pids), answered.value
        unhealthy = len(cluster.controller.events("health.unhealthy"))
        return {"agents": agents, "checks": checks, "window": window, "cpu": cpu1 - cpu0,
                "written": written1 - written0, "agents_cpu": agents1 - agents0, "unhealthy": unhealthy,
                "checked": checked1 - checked0}
    finally:
        cluster.close()
        server.kill()
        shutil.rmtree(base, ignore_errors=True)


def run(window: float = 60.0) -> list[dict]:
    rows = [measure(agents, checks, window) for agents in (1, 10) for checks in (False, True)]
    for row in rows:
        print(f"health checks {'on ' if row['checks'] else 'off'} over {row['agents']:>2} agent(s): controller "
              f"{row['cpu'] / row['window'] * 100:.2f}% of a CPU, {row['written'] / row['window'] / 1024:.1f} KiB/s "
              f"written; agents {row['agents_cpu'] / row['window'] * 100:.2f}%; {row['checked']} checks answered, "
              f"unhealthy {row['unhealthy']}",
              flush=True)
    return rows


def render(rows: list[dict]) -> list[str]:
    out = ["", "## Periodic health checks: 1,000 live web instances every 10 s", "",
           f"Over {rows[0]['window']:.0f} s, after the first rounds: the controller's CPU time and the bytes it "
           "wrote to storage (`/proc/PID/io` write_bytes), and the agents' CPU time, with the checks on and, "
           "as the baseline, off. 100 environments of 10 web services, their ports served by one "
           "listener process (bench/health.py).", "",
           "| checks | agents | controller CPU | controller writes | agents' CPU | checks answered | found unhealthy |",
           "|---|---|---|---|---|---|---|"]
    for row in rows:
        out.append(f"| {'on' if row['checks'] else 'off'} | {row['agents']} | "
                   f"{row['cpu'] / row['window'] * 100:.2f}% of a core | {row['written'] / row['window'] / 1024:.1f} KiB/s | "
                   f"{row['agents_cpu'] / row['window'] * 100:.2f}% of a core | {row['checked']} | {row['unhealthy']} |")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=60.0)
    args = parser.parse_args()
    print("\n".join(render(run(args.window))))
