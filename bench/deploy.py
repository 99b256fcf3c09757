"""Deploy benchmarks: a no-op re-apply of a 20-service environment, and a full deploy of the
example against a plain shell script that runs the same commands by hand."""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import time
from pathlib import Path

import yaml

from tests.deploy_harness import Nginx, deploy_cluster, example_repo, new_commit, purge, service_users_base
from tests.harness import Cluster

INSTALL = "npm ci --omit=dev --no-audit --no-fund --prefer-offline"


def _apply(cluster: Cluster, spec: Path) -> float:
    start = time.perf_counter()
    result = cluster.deployctl("apply", str(spec), timeout=900)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"apply failed: {result.stderr.decode()[-800:]}")
    return seconds


def _write(folder: Path, name: str, data: dict) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def example_spec(folder: Path, env: str, repo: Path) -> Path:
    web = {"path": "/", "source": str(repo), "ref": "main", "root": "web", "install": INSTALL,
           "build": "npm run build", "migrate": "node migrate.js", "start": "node server.js",
           "health": "/health", "uses": ["mysql", "redis"]}
    worker = {"source": str(repo), "ref": "main", "root": "worker", "install": INSTALL,
              "start": "node worker.js", "uses": ["redis"]}
    return _write(folder, f"{env}.yml", {"app": "bench", "environment": env, "domain": f"{env}.bench.test",
                                         "services": {"web": web, "worker": worker}})


def wide_spec(folder: Path, env: str, repo: Path, count: int) -> Path:
    services = {f"s{i:02d}": {"path": f"/s{i:02d}", "source": str(repo), "ref": "main",
                              "start": "python3 -m http.server $PORT --bind 127.0.0.1"}
                for i in range(count)}
    return _write(folder, f"{env}.yml", {"app": "bench", "environment": env, "domain": "wide.test",
                                         "services": services})


SHELL_DEPLOY = r"""set -eu
# The example's deploy by hand: what an operator's script would do, without a ledger or checks.
D=$BASE/by-hand; rm -rf "$D"; mkdir -p "$D"
PW=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
mariadb -e "CREATE DATABASE \`$DB\`; CREATE USER '$DB'@'%' IDENTIFIED BY '$PW'; GRANT ALL ON \`$DB\`.* TO '$DB'@'%';"
redis-cli ACL SETUSER "$DB" reset on ">$PW" "~$DB:*" -@all +@connection +@read +@write +@keyspace >/dev/null
redis-cli ACL SETUSER "$DB-w" reset on ">$PW" "~$DB-w:*" -@all +@connection +@read +@write +@keyspace >/dev/null
for part in web worker; do
  git clone -q --no-checkout "$REPO" "$D/$part"; git -C "$D/$part" checkout -q --detach main
done
printf 'DATABASE_URL=mysql://%s:%s@127.0.0.1:3306/%s\nREDIS_URL=redis://%s:%s@127.0.0.1:6379\nREDIS_PREFIX=%s:\n' \
  "$DB" "$PW" "$DB" "$DB" "$PW" "$DB" > "$D/web/.env"
printf 'REDIS_URL=redis://%s-w:%s@127.0.0.1:6379\nREDIS_PREFIX=%s-w:\n' "$DB" "$PW" "$DB" > "$D/worker/.env"
cd "$D/web/web"; set -a; . "$D/web/.env"; set +a
npm ci --omit=dev --no-audit --no-fund --prefer-offline >/dev/null; npm run build >/dev/null; node migrate.js >/dev/null
PORT=$WEB_PORT setsid node server.js >/dev/null 2>&1 &
echo $! > "$D/web.pid"
cd "$D/worker/worker"; set -a; . "$D/worker/.env"; set +a
npm ci --omit=dev --no-audit --no-fund --prefer-offline >/dev/null
setsid node worker.js >/dev/null 2>&1 &
echo $! > "$D/worker.pid"
for i in $(seq 100); do curl -sf "http://127.0.0.1:$WEB_PORT/health" >/dev/null && break; sleep 0.1; done
printf 'server { listen %s; server_name byhand.test; location / { proxy_pass http://127.0.0.1:%s; } }\n' \
  "$NGINX_PORT" "$WEB_PORT" > "$CONF_DIR/by-hand.conf"
$NGINX_CMD -t 2>/dev/null; $NGINX_CMD -s reload
sleep 5   # the deployer waits as long for a daemon to prove it stays up
"""


def shell_deploy(base: Path, repo: Path, nginx: Nginx, db: str) -> float:
    from tests.harness import free_port
    env = {**os.environ, "BASE": str(base), "REPO": str(repo), "DB": db, "WEB_PORT": str(free_port()),
           "NGINX_PORT": str(nginx.port), "CONF_DIR": str(nginx.conf_dir), "NGINX_CMD": nginx.base_cmd}
    start = time.perf_counter()
    subprocess.run(["bash", "-c", SHELL_DEPLOY], env=env, check=True)
    seconds = time.perf_counter() - start
    for pid_file in (base / "by-hand").glob("*.pid"):
        subprocess.run(["kill", "--", f"-{pid_file.read_text().strip()}"], check=False)
    (nginx.conf_dir / "by-hand.conf").unlink(missing_ok=True)
    return seconds


def _du(*paths: str, apparent: bool = False) -> int:
    """Bytes on disk of `paths` together: du counts an inode once, however many names it has."""
    out = subprocess.run(["du", "-s", "-B1", "-c", *(["--apparent-size"] if apparent else []), *paths],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def kept_release_disk(cluster: Cluster, base: Path, repo: Path, env: str, releases: int = 4) -> dict:
    """Deploy the example's web again `releases - 1` times (a new commit each: a new release with its
    own npm install); what each kept release adds on disk, against a full copy of it."""
    for n in range(releases - 1):
        new_commit(repo, f"release {n + 2}")
        _apply(cluster, example_spec(base, env, repo))
    web = cluster.agents["computing-1"].services_root / f"auto-bench-{env}-web"
    kept = sorted(str(p) for p in (web / "releases").iterdir())
    full = _du(kept[0])
    together = _du(*kept, str(web / "store"))
    return {"releases": len(kept), "first": full, "together": together,
            "each_more": (together - full) / (len(kept) - 1), "apparent": _du(kept[0], apparent=True)}


def run(runs: int = 3) -> dict:
    base = service_users_base("deployer-bench-deploy-")
    nginx, cluster = deploy_cluster(base)
    repo = example_repo(base)
    envs: list[str] = []
    try:
        ours, by_hand = [], []
        for _ in range(runs):
            env = "b" + secrets.token_hex(3)
            envs.append(env)
            ours.append(_apply(cluster, example_spec(base, env, repo)))
            db = f"auto-bench-{env}-byhand"
            envs.append(env)
            by_hand.append(shell_deploy(base, repo, nginx, db))
        disk = kept_release_disk(cluster, base, repo, envs[0])
        wide_env = "w" + secrets.token_hex(3)
        envs.append(wide_env)
        wide = wide_spec(base, wide_env, repo, 20)
        first = _apply(cluster, wide)
        noop = [_apply(cluster, wide) for _ in range(5)]
        return {"deploy": statistics.median(ours), "by_hand": statistics.median(by_hand),
                "wide_first": first, "noop": statistics.median(noop), "runs": runs, "disk": disk}
    finally:
        cluster.close()
        nginx.stop()
        for env in envs:
            purge("bench", env)
