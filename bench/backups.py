"""Snapshots beside a plain dump: a live environment's MySQL instance filled with rows, then
`deployctl backup` (a job: mariadb-dump --single-transaction on the data host, gzip, 0600 file)
against `mariadb-dump --single-transaction --quick` of the same database by hand, plain and
piped through gzip; and `deployctl restore` (a new instance filled from the snapshot, every user
of the instance switched to it) against `mariadb NEWDB < dump.sql`. Run alone:
`python bench/backups.py`; `make bench` runs it too."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.deploy_harness import deploy_cluster, mysql, new_repo, purge, service_users_base  # noqa: E402


def _run(argv: list[str] | str, shell: bool = False) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, shell=shell, capture_output=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv if shell else ' '.join(argv)[:80]}: {done.stderr.decode()[-400:]}")
    return seconds


def run(rows: int = 500_000, runs: int = 3) -> dict:
    base = service_users_base("deployer-bench-bak-")
    env = f"b{int(time.time()) % 100000}"
    scratch = Path(tempfile.mkdtemp(prefix="deployer-bench-dump-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        cleanup.callback(purge, "bench", env)
        nginx, cluster = deploy_cluster(base, cleanup)
        repo = new_repo(base / "repo", {"index.html": "ok\n"})
        spec = base / f"{env}.yml"
        spec.write_text(yaml.safe_dump({"app": "bench", "environment": env, "domain": f"{env}.bench.test",
                                        "services": {"site": {
                                            "path": "/", "source": str(repo), "ref": "main", "uses": ["mysql"],
                                            "start": "python3 -m http.server $PORT --bind 127.0.0.1",
                                            "health": "/index.html"}}}, sort_keys=False))
        done = cluster.deployctl("apply", str(spec), timeout=600)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.decode()[-800:])
        db = f"auto-bench-{env}-site-1"
        mysql(f"CREATE TABLE `{db}`.items (id INT PRIMARY KEY, label VARCHAR(64), body TEXT, price DECIMAL(10,2))")
        mysql(f"SET SESSION max_recursive_iterations = {rows + 1}; "
              f"INSERT INTO `{db}`.items WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq "
              f"WHERE n < {rows}) SELECT n, CONCAT('label-', n), REPEAT(MD5(n), 3), n / 100 FROM seq")
        mysql(f"ANALYZE TABLE `{db}`.items")
        size = int(mysql(f"SELECT SUM(data_length) FROM information_schema.tables WHERE table_schema='{db}'").split()[-1])
        target = f"bench/{env}/site"
        ours, plain, gzipped = [], [], []
        for _ in range(runs):
            start = time.perf_counter()
            done = cluster.deployctl("backup", target, timeout=900)
            ours.append(time.perf_counter() - start)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.decode()[-800:])
            plain.append(_run(f"mariadb-dump --single-transaction --quick '{db}' > {scratch}/plain.sql", shell=True))
            gzipped.append(_run(f"mariadb-dump --single-transaction --quick '{db}' | gzip > {scratch}/plain.sql.gz",
                                shell=True))
            time.sleep(1.1)  # snapshot IDs are to the second
        listed = json.loads(cluster.deployctl("backups", target, "--json").stdout)
        snapshot = listed[0]
        start = time.perf_counter()
        done = cluster.deployctl("restore", target, "--from", snapshot["id"], "--yes", timeout=900)
        restore = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(done.stderr.decode()[-800:])
        mysql("CREATE DATABASE `bench-by-hand`")
        try:
            by_hand = _run(f"mariadb bench-by-hand < {scratch}/plain.sql", shell=True)
        finally:
            mysql("DROP DATABASE `bench-by-hand`")
        return {"rows": rows, "table_bytes": size, "runs": runs, "ours": statistics.median(ours),
                "plain": statistics.median(plain), "gzip": statistics.median(gzipped),
                "ours_bytes": snapshot["bytes"], "plain_bytes": (scratch / "plain.sql").stat().st_size,
                "gzip_bytes": (scratch / "plain.sql.gz").stat().st_size, "restore": restore, "by_hand": by_hand}


def render(r: dict) -> list[str]:
    mib = 2 ** 20
    return ["", "## Snapshots: `deployctl backup` and `restore` beside a plain mariadb-dump", "",
            f"A live environment's MySQL instance with {r['rows']:,} rows ({r['table_bytes'] / mib:.0f} MiB of table "
            f"data); median of {r['runs']} runs. `deployctl backup` is the whole command: a job, the dump "
            "(`--single-transaction --quick`) and gzip on the data host, a 0600 file, the job's end. The restore "
            "makes a new instance from the snapshot and switches the service to it (blue/green); by hand, the "
            "plain dump is loaded into an empty database.", "",
            "| what | deployer | mariadb-dump | mariadb-dump \\| gzip |", "|---|---|---|---|",
            f"| snapshot time | {r['ours']:.2f} s | {r['plain']:.2f} s | {r['gzip']:.2f} s |",
            f"| snapshot size | {r['ours_bytes'] / mib:.1f} MiB | {r['plain_bytes'] / mib:.1f} MiB | "
            f"{r['gzip_bytes'] / mib:.1f} MiB |",
            f"| restore | {r['restore']:.2f} s (new instance + switch) | {r['by_hand']:.2f} s (load only) | |"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    result = run(args.rows, args.runs)
    print("\n".join(render(result)))
