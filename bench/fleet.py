"""Across hosts: agents each on a test host of its own (a network namespace on a bridge,
tests/netns.py), beside the same number of agents on loopback; and one environment of five web
services deployed across three computing hosts beside the same deploy pinned to one of them.

    python -m bench.fleet        (make bench runs it; root, for the namespaces)
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.deploy_harness import new_repo, purge_each, service_users_base, unique_env  # noqa: E402
from tests.fleet_harness import Fleet  # noqa: E402
from tests.harness import Cluster  # noqa: E402

DEPLOYCTL = ROOT / ".venv" / "bin" / "deployctl"
HOSTS = 5
SERVICES = 5


def _timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}…: exit {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return seconds


def fanout(cluster: Cluster, ids: list[str], runs: int) -> float:
    argv = [str(DEPLOYCTL), "exec", *(a for i in ids for a in ("--agent", i)), "--", "true"]
    _timed(argv, cluster.env())  # a first one, so no figure counts a first connection
    return statistics.median(_timed(argv, cluster.env()) for _ in range(runs))


ACROSS = 3  # computing hosts the deploy may spread over (granted the label bench=across)


def _spec(base: Path, repo: Path, env: str, pin: str) -> Path:
    # Each service's install waits 2 s (like a small dependency install): what a parallel deploy saves.
    web = {"source": str(repo), "ref": "main", "install": "sleep 2",
           "start": "python3 -m http.server $PORT --bind 0.0.0.0", "health": "/"}
    where = {"host": pin} if pin else {"host_labels": {"bench": "across"}}
    services = {f"s{n}": {**web, "path": f"/s{n}/", **where} for n in range(1, SERVICES + 1)}
    path = base / f"{env}.yml"
    path.write_text(yaml.safe_dump({"app": "bf", "environment": env, "domain": f"{env}.bench.test",
                                    "services": services}, sort_keys=False))
    return path


def run(runs: int = 5, deploy_runs: int = 3) -> dict:
    out: dict = {}
    with contextlib.ExitStack() as cleanup:
        base = service_users_base("deployer-bench-fleet-")
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        envs: list[str] = []
        cleanup.callback(purge_each, "bf", envs)
        fleet = Fleet(base, cleanup).start()
        fleet.add_router("router-1")
        computing = [f"computing-{n}" for n in range(1, HOSTS + 1)]
        for name in computing:
            fleet.add_computing(name)
        fleet.cluster.wait_connected("router-1", *computing, timeout=120)
        for name in computing[:ACROSS]:
            subprocess.run([str(DEPLOYCTL), "agents", "grant", name, "--label", "bench=across"],
                           env=fleet.cluster.env(), check=True, capture_output=True)
        local = Cluster(base / "loopback")
        (base / "loopback").mkdir()
        cleanup.callback(local.close)
        local.controller.start()
        for n in range(1, HOSTS + 1):
            local.add_agent(f"local-{n}", ["computing"])
        local.wait_connected(*local.agents, timeout=120)
        out["fanout_hosts"] = fanout(fleet.cluster, computing, runs)
        out["fanout_loopback"] = fanout(local, list(local.agents), runs)
        repo = new_repo(base / "repo", {"index.html": "bench\n"})
        times: dict[str, list[float]] = {"across": [], "one": []}
        for _ in range(deploy_runs):
            for label, pin in (("across", ""), ("one", "computing-1")):
                env = unique_env()
                envs.append(env)
                times[label].append(_timed([str(DEPLOYCTL), "apply", str(_spec(base, repo, env, pin))],
                                           fleet.cluster.env()))
                subprocess.run([str(DEPLOYCTL), "destroy", f"bf/{env}", "--yes"], env=fleet.cluster.env(),
                               capture_output=True, timeout=600)
        out["deploy_across"] = statistics.median(times["across"])
        out["deploy_one"] = statistics.median(times["one"])
        out["runs"], out["deploy_runs"] = runs, deploy_runs
    return out


def render(r: dict) -> list[str]:
    return [
        "",
        f"## Across hosts: {HOSTS} agents on test hosts of their own",
        "",
        f"Each agent in a network namespace of its own, joined to the controller by a veth pair and a "
        f"bridge (tests/netns.py), beside {HOSTS} agents on loopback; medians of {r['runs']} runs.",
        "",
        "| case | on their own hosts | on loopback | ratio |",
        "|---|---|---|---|",
        f"| `exec true` on {HOSTS} agents | {r['fanout_hosts'] * 1000:.0f} ms | {r['fanout_loopback'] * 1000:.0f} ms | "
        f"{r['fanout_hosts'] / r['fanout_loopback']:.2f}× |",
        "",
        f"One environment of {SERVICES} web services (a 2 s install each, Python's `http.server`), applied "
        f"from nothing, median of {r['deploy_runs']}: placed across 3 computing hosts by room (`host_labels`), beside the "
        "same services pinned to one host (`host: computing-1`). Services of one job on different hosts "
        "come up at the same time; on one host, one after the other.",
        "",
        "| across hosts | on one host | ratio |",
        "|---|---|---|",
        f"| {r['deploy_across']:.2f} s | {r['deploy_one']:.2f} s | {r['deploy_one'] / r['deploy_across']:.2f}× faster |",
    ]


if __name__ == "__main__":
    result = run()
    print("\n".join(render(result)))
