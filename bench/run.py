"""make bench: the deployer beside Ansible, pyinfra and ssh on the same hosts, in one run.

Prints a table and writes docs/benchmarks.md. Figures are medians of repeated runs; nothing here
asserts a target (the machine is shared and noisy): the report says which targets hold.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import backups as backups_bench, deploy as deploy_bench, fleet as fleet_bench, health as health_bench  # noqa: E402
from bench import peers as peers_mod  # noqa: E402
from tests.harness import Cluster, PeakRss  # noqa: E402

DEPLOYCTL = ROOT / ".venv" / "bin" / "deployctl"
LINE = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz"


def timed(argv: list[str], env: dict[str, str], stdout=subprocess.DEVNULL) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=stdout, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}…: exit {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return seconds


def median_of(fn, runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def start_fleet(base: Path, count: int) -> Cluster:
    cluster = Cluster(base)
    cluster.controller.start()
    for i in range(1, count + 1):
        cluster.add_agent(f"a{i:02d}", ["computing"])
    cluster.wait_connected(*cluster.agents, timeout=180)
    return cluster


def deployer_fanout(cluster: Cluster, n: int, runs: int) -> float:
    targets = [arg for i in range(1, n + 1) for arg in ("--agent", f"a{i:02d}")]
    argv = [str(DEPLOYCTL), "exec", *targets, "--", "true"]
    return median_of(lambda: timed(argv, cluster.env()), runs)


def deployer_throughput(cluster: Cluster, command: str, nbytes: int) -> tuple[float, int, int]:
    """MB/s end to end into the `deployctl exec` follower, and peak RSS of controller and agent."""
    controller, agent = cluster.controller.proc.pid, cluster.agents["a01"].proc.pid
    with PeakRss([controller, agent]) as peaks:
        seconds = timed([str(DEPLOYCTL), "exec", "--agent", "a01", "--", "sh", "-c", command],
                        cluster.env())
    return nbytes / seconds / 1e6, peaks[controller], peaks[agent]


def ssh_throughput(peers: peers_mod.Peers, command: str, nbytes: int) -> float:
    """Like the deployer's figure: into /dev/null, then one more run to check every byte came."""
    argv = ["ssh", "-F", str(peers.ssh_config), "127.0.0.1", command]
    seconds = timed(argv, dict(os.environ))
    counted = subprocess.run([*argv[:-1], f"{command} | wc -c"], capture_output=True, text=True)
    if int(counted.stdout.strip() or 0) != nbytes:
        raise RuntimeError(f"ssh: {counted.stdout.strip()}/{nbytes} bytes")
    return nbytes / seconds / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, nargs="*", default=[1, 10, 50])
    parser.add_argument("--runs", type=int, default=5, help="runs per fan-out figure for the deployer")
    parser.add_argument("--peer-runs", type=int, default=3, help="runs per figure for Ansible and pyinfra")
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--deploy-runs", type=int, default=3, help="full deploys of the example, each way")
    parser.add_argument("--health-window", type=float, default=60.0, help="seconds measured per health-check case")
    args = parser.parse_args()

    print("setting up peers (sshd on 127.0.0.1-50, Ansible, pyinfra)…", flush=True)
    peers = peers_mod.ensure_peers()
    load_before = os.getloadavg()
    base = Path(tempfile.mkdtemp(prefix="deployer-bench-"))
    print(f"starting a controller and {max(args.hosts)} agents…", flush=True)
    cluster = start_fleet(base, max(args.hosts))
    fanout = []
    try:
        for n in args.hosts:
            runs = args.peer_runs if n <= 10 else 1
            ours = deployer_fanout(cluster, n, args.runs)
            ansible = median_of(lambda: peers_mod.ansible_adhoc_true(n, cold=True, peers=peers), runs)
            peers_mod.ansible_adhoc_true(n, peers=peers)  # open ControlPersist masters
            ansible_warm = median_of(lambda: peers_mod.ansible_adhoc_true(n, peers=peers), runs)
            pyinfra = median_of(lambda: peers_mod.pyinfra_exec_true(n, peers=peers), runs)
            fanout.append((n, ours, ansible, ansible_warm, pyinfra))
            print(f"fan-out N={n}: deployer {ours:.3f}s, ansible {ansible:.2f}s (warm {ansible_warm:.2f}s), "
                  f"pyinfra {pyinfra:.2f}s", flush=True)
        zeros = f"head -c {args.bytes} /dev/zero"
        lines = f"yes {LINE} | head -c {args.bytes}"
        throughput = []
        for label, command in (("zeros", zeros), ("text lines", lines)):
            ours, c_rss, a_rss = deployer_throughput(cluster, command, args.bytes)
            ssh = ssh_throughput(peers, command, args.bytes)
            throughput.append((label, ours, ssh, c_rss, a_rss))
            print(f"throughput {label}: deployer {ours:.0f} MB/s (controller {c_rss >> 20} MiB, agent "
                  f"{a_rss >> 20} MiB), ssh {ssh:.0f} MB/s", flush=True)
    finally:
        cluster.close()
        peers_mod.stop_peers()
    print("deploying the example (deployer and a plain shell script), and a 20-service environment…", flush=True)
    deploys = deploy_bench.run(args.deploy_runs)
    print(f"deploy: deployer {deploys['deploy']:.2f}s, shell script {deploys['by_hand']:.2f}s; "
          f"no-op re-apply of 20 services {deploys['noop'] * 1000:.0f} ms", flush=True)
    print("periodic health checks of 1,000 live instances, on and off, over 1 and 10 agents…", flush=True)
    health = health_bench.run(args.health_window)
    print("snapshots of a 500,000-row database beside a plain mariadb-dump…", flush=True)
    snapshots = backups_bench.run()
    print(f"across hosts: {fleet_bench.HOSTS} agents in network namespaces, and a {fleet_bench.SERVICES}-service "
          "deploy across 3 hosts beside one…", flush=True)
    across = fleet_bench.run()
    report = (render(fanout, throughput, peers, load_before, args, deploys)
              + "\n".join(health_bench.render(health) + backups_bench.render(snapshots) + fleet_bench.render(across))
              + "\n")
    args.output.write_text(report)
    print()
    print(report)
    return 0


def render(fanout, throughput, peers, load_before, args, deploys) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` on {now}: {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
        f"load average {load_before[0]:.2f} at the start. All hosts are on loopback: the deployer's "
        "agents are local processes, the peers reach 127.0.0.x over SSH (OpenSSH sshd, key auth).",
        f"Peers: ansible-core {peers.ansible_core_version}, pyinfra {peers.pyinfra_version}.",
        "",
        "## Fan-out: `true` on N hosts, wall time of the whole command",
        "",
        f"Median of {args.runs} runs for the deployer (`deployctl exec --agent … -- true`, agents "
        f"already connected), {args.peer_runs} for the peers (1 at N=50). Ansible: ad-hoc "
        "`command` module with `--forks N`; *cold* without and *warm* with its ControlPersist "
        "connections open. pyinfra: `exec` with `--parallel N`.",
        "",
        "| N | deployer | Ansible cold | Ansible warm | pyinfra | vs Ansible cold | vs Ansible warm | vs pyinfra |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, ours, ansible, warm, pyinfra in fanout:
        out.append(f"| {n} | {ours * 1000:.0f} ms | {ansible:.2f} s | {warm:.2f} s | {pyinfra:.2f} s | "
                   f"{ansible / ours:.0f}× | {warm / ours:.0f}× | {pyinfra / ours:.0f}× |")
    out += [
        "",
        f"## Output throughput: one command writing {args.bytes / 2**30:.0f} GiB to stdout",
        "",
        "End to end into the `deployctl exec` follower (agent → controller → CLI, stdout to "
        "/dev/null), against `ssh 127.0.0.1 CMD > /dev/null` with OpenSSH's default cipher. Peak "
        "RSS sampled every 50 ms.",
        "",
        "| output | deployer | ssh | ratio | controller peak RSS | agent peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for label, ours, ssh, c_rss, a_rss in throughput:
        out.append(f"| {label} | {ours:.0f} MB/s | {ssh:.0f} MB/s | {ours / ssh:.2f} | "
                   f"{c_rss / 2**20:.0f} MiB | {a_rss / 2**20:.0f} MiB |")
    overhead = (deploys["deploy"] - deploys["by_hand"]) / deploys["by_hand"] * 100
    out += [
        "",
        "## Deploys",
        "",
        f"A full deploy of the example (web with MySQL and Redis, worker with Redis; median of "
        f"{deploys['runs']} fresh environments) with `deployctl apply`, against a plain shell script "
        "running the same commands by hand (clone, database and user, ACL users, .env, npm ci, build, "
        "migrate, start, health poll, nginx test and reload, the same 5 s for the daemon) with no "
        "ledger, no journal and no checks. A no-op re-apply of a 20-service environment is the whole "
        "`deployctl apply` command: validation, 20 ref resolutions and an empty plan.",
        "",
        "| what | deployer | plain shell script | overhead |",
        "|---|---|---|---|",
        f"| full deploy of the example | {deploys['deploy']:.2f} s | {deploys['by_hand']:.2f} s | {overhead:+.0f}% |",
        f"| first deploy of 20 services | {deploys['wide_first']:.2f} s | | |",
        f"| no-op re-apply of 20 services | {deploys['noop'] * 1000:.0f} ms | | |",
        "",
        "## Disk per kept release",
        "",
        f"The example's web deployed {deploys['disk']['releases']} times in one environment (a new commit each: a "
        "fresh checkout and `npm ci`), then the releases' folders and the service's store measured together "
        "with `du` (an inode counts once): sealed releases share each file with the kept "
        "ones by hard links to one root-owned copy.",
        "",
        "| what | on disk |",
        "|---|---|",
        f"| one release (the first) | {deploys['disk']['first'] / 2**20:.1f} MiB |",
        f"| {deploys['disk']['releases']} kept releases together | {deploys['disk']['together'] / 2**20:.1f} MiB |",
        f"| each further release | {deploys['disk']['each_more'] / 2**20:.2f} MiB "
        f"({deploys['disk']['each_more'] / deploys['disk']['first'] * 100:.0f}% of a full copy) |",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
