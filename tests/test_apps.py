"""Apps nobody here wrote the way the deployer would like: their libraries come from the
registries at deploy time, and they read their settings the way their frameworks want.

- notes: a Python service on SQLAlchemy and PyMySQL, whose ORM needs its own URL scheme (built in
  the spec from the generated values), with a cachelib cache on a prefix-mode Redis user; it keeps
  its data across deploys and switches under traffic with no failed request.
- rqjobs: a Python web service and an rq worker sharing the web service's MySQL database and its
  dedicated Redis (rq's fixed key names, MULTI and pub/sub need a server of their own).
- bulljobs: the same pair on Node, with bull (Lua scripts) and ioredis, which sends a password
  and no user name."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common import envfile
from tests.deploy_harness import deploy_world, git, http_get, redis, unique_env
from tests.harness import wait_for
from tests.load import Load

APPS = Path(__file__).resolve().parent / "apps"


@pytest.fixture(scope="module")
def world():
    with deploy_world("deployer-apps-", "notes") as made:
        yield made


def app_repo(base: Path, name: str) -> Path:
    repo = base / f"{name}-repo"
    while repo.exists():  # a second test of the same app
        repo = repo.with_name(repo.name + "-2")
    shutil.copytree(APPS / name, repo)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"{name} v1")
    return repo


def test_a_sqlalchemy_app_reads_its_own_url_keeps_its_data_and_switches_with_no_failed_request(world):
    cluster, nginx = world["cluster"], world["nginx"]
    env = unique_env()
    world["envs"].append(env)
    repo = app_repo(world["base"], "notes")
    spec = world["base"] / f"{env}.yml"
    spec.write_text(yaml.safe_dump({"app": "notes", "environment": env, "domain": f"{env}.notes.test", "services": {
        "web": {"path": "/", "source": str(repo), "ref": "main",
                "install": "python3 -m venv .venv && .venv/bin/pip install -q --disable-pip-version-check "
                           "-r requirements.txt",
                "migrate": ".venv/bin/python app.py migrate", "start": ".venv/bin/python app.py serve",
                "health": "/health", "uses": ["mysql", "redis"],
                "env": {"SQLALCHEMY_DATABASE_URI":
                        "mysql+pymysql://${DB_USER}:${DB_PASSWORD}@${DB_HOST}:${DB_PORT}/${DB_NAME}"}}}},
        sort_keys=False))
    first = cluster.deployctl("apply", str(spec), timeout=900)
    assert first.returncode == 0, first.stdout.decode() + first.stderr.decode()
    host = f"{env}.notes.test"
    added = http_post(nginx.port, "/notes?text=kept+across+deploys", host)
    assert added == 201
    assert json.loads(http_get(nginx.port, "/notes", host)[1])["notes"] == ["kept across deploys"]
    # The cache lives under the service's prefix, through its ACL user: read, then served from it.
    counted = [json.loads(http_get(nginx.port, "/count", host)[1]) for _ in range(2)]
    assert counted == [{"count": 1, "cached": False}, {"count": 1, "cached": True}]
    assert redis("--scan", "--pattern", f"auto-notes-{env}-web-1:*").split() == [f"auto-notes-{env}-web-1:count"]

    (repo / "CHANGES").write_text("v2\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "notes v2")
    with Load(nginx.port, host, min_requests=1000, served_from=f"/auto-notes-{env}-web/") as load:
        load.wait_for(200)
        second = cluster.deployctl("apply", str(spec), timeout=900)
        assert second.returncode == 0, second.stdout.decode() + second.stderr.decode()
        load.wait_for(200)
    assert load.tally.failed == [] and load.tally.releases == {"1", "2"}, str(load.tally)
    assert load.tally.total >= 1000
    # The same database instance, and its data, after the second deploy.
    assert json.loads(http_get(nginx.port, "/notes", host)[1])["notes"] == ["kept across deploys"]
    ledger = json.loads(cluster.deployctl("ledger", f"notes/{env}", "web", "--json").stdout)["web"]
    assert [(d["code"], d["mysql"], d["mysql_new"]) for d in ledger["deploys"]] == [(1, 1, True), (2, 1, False)]


def http_post(port: int, path: str, host: str) -> int:
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, headers={"Host": host, "Content-Length": "0"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


QUEUE_APPS = {
    "rqjobs": {"install": "python3 -m venv .venv && .venv/bin/pip install -q --disable-pip-version-check "
                          "-r requirements.txt",
               "migrate": ".venv/bin/python app.py migrate", "web": ".venv/bin/python app.py serve",
               # rq reads its URL from RQ_REDIS_URL: a password on a command line is in every
               # local user's `ps`.
               "worker": ".venv/bin/rq worker --path . default",
               "env": {"SQLALCHEMY_DATABASE_URI":
                       "mysql+pymysql://${DB_USER}:${DB_PASSWORD}@${DB_HOST}:${DB_PORT}/${DB_NAME}",
                       "RQ_REDIS_URL": "${REDIS_URL}"}},
    "bulljobs": {"install": "npm ci --omit=dev --no-audit --no-fund", "migrate": "node migrate.js",
                 "web": "node web.js", "worker": "node worker.js", "env": {}},
}


def queue_spec(world, app: str, env: str, repo: Path) -> Path:
    """A web service and its worker: the worker uses the web service's MySQL and dedicated Redis."""
    shape = QUEUE_APPS[app]
    common = {"source": str(repo), "ref": "main", "install": shape["install"]}
    if shape["env"]:
        common["env"] = shape["env"]
    spec = world["base"] / f"{env}.yml"
    spec.write_text(yaml.safe_dump({"app": app, "environment": env, "domain": f"{env}.{app}.test", "services": {
        "web": {**common, "path": "/", "migrate": shape["migrate"], "start": shape["web"],
                "health": {"path": "/health", "deadline": "60s"}, "uses": ["mysql", "redis"],
                "redis": {"mode": "dedicated", "maxmemory": "32M"}},
        "worker": {**common, "start": shape["worker"], "uses": ["web.mysql", "web.redis"]}}}, sort_keys=False))
    return spec


def processed(port: int, host: str, text: str) -> dict:
    """Enqueue a job through the web service and wait for the worker's row in MySQL."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", f"/jobs?text={text}", headers={"Host": host, "Content-Length": "0"})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 202, body
    found = {}

    def done() -> bool:
        status, answer = http_get(port, f"/jobs/{body['id']}", host)
        found.update(json.loads(answer) if status == 200 else {})
        return status == 200
    wait_for(done, 60, every=0.2, what=f"the worker processing job {body['id']}")
    return found


def dotenv(world, app: str, env: str, service: str, release: int) -> dict[str, str]:
    root = world["cluster"].agents["computing-1"].services_root
    return envfile.parse((root / f"auto-{app}-{env}-{service}/releases/{release}/.env").read_text())


def apply_ok(cluster, *args: str) -> str:
    done = cluster.deployctl(*args, timeout=900)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    return done.stdout.decode()


@pytest.mark.parametrize("app", ["rqjobs", "bulljobs"])
def test_a_web_service_and_its_worker_share_a_queue_on_a_dedicated_redis(world, app):
    cluster, nginx = world["cluster"], world["nginx"]
    env = unique_env()
    world["envs"].append(f"{app}/{env}")  # purged at the end under its own app's names
    repo = app_repo(world["base"], app)
    spec = queue_spec(world, app, env, repo)
    host = f"{env}.{app}.test"
    apply_ok(cluster, "apply", str(spec))
    assert processed(nginx.port, host, "first")["text"] == "first"

    # One instance of each, used by both services: the ledger says whose.
    worker = json.loads(cluster.deployctl("ledger", f"{app}/{env}", "worker", "--json").stdout)["worker"]
    assert [(d["mysql"], d["mysql_of"], d["redis"], d["redis_of"]) for d in worker["deploys"]] == [(1, "web", 1, "web")]
    assert "web:1" in worker["diagram"] and "instance n of service web's" in worker["diagram"]
    web_env, worker_env = dotenv(world, app, env, "web", 1), dotenv(world, app, env, "worker", 1)
    assert {k: v for k, v in worker_env.items() if k.startswith(("DB_", "REDIS_"))} == \
        {k: v for k, v in web_env.items() if k.startswith(("DB_", "REDIS_"))}
    assert web_env["REDIS_URL"] == f"redis://:{web_env['REDIS_PASSWORD']}@127.0.0.1:{web_env['REDIS_PORT']}"
    assert web_env["REDIS_PORT"] != "6379" and web_env["REDIS_PREFIX"] == ""

    # A client that sends only a password; any key name, a script: a server of its own.
    own = ["redis-cli", "-p", web_env["REDIS_PORT"], "--no-auth-warning", "-a", web_env["REDIS_PASSWORD"]]
    assert subprocess.run(own + ["EVAL", "return redis.call('SET', 'rq:any', 'x')", "0"],
                          capture_output=True, text=True).stdout.strip() == "OK"
    assert subprocess.run(own + ["CONFIG", "GET", "maxmemory"], capture_output=True,
                          text=True).stdout.split() == ["maxmemory", str(32 << 20)]
    refused = subprocess.run(["redis-cli", "-p", web_env["REDIS_PORT"], "GET", "rq:any"], capture_output=True,
                             text=True)
    assert "NOAUTH" in refused.stdout + refused.stderr
    server = subprocess.run(["pgrep", "-u", f"auto-{app}-{env}", "-f", "redis-server"], capture_output=True, text=True)
    assert server.stdout.split(), "the dedicated redis-server runs as the environment's user"
    # No process of the environment has the password on its command line (`ps` shows it to all).
    argv = subprocess.run(["ps", "-u", f"auto-{app}-{env}", "-o", "args="], capture_output=True, text=True).stdout
    assert web_env["REDIS_PASSWORD"] not in argv and web_env["DB_PASSWORD"] not in argv

    # A new release of both, under traffic: the queue and the data are kept.
    (repo / "CHANGES").write_text("v2\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"{app} v2")
    with Load(nginx.port, host, path="/health", min_requests=1000) as load:
        load.wait_for(200)
        apply_ok(cluster, "apply", str(spec))
        load.wait_for(200)
    assert load.tally.failed == [] and load.tally.total >= 1000, str(load.tally)
    assert processed(nginx.port, host, "second")["release"] == "2"  # the new worker took it
    assert [d["text"] for d in json.loads(http_get(nginx.port, "/done", host)[1])["done"]] == ["first", "second"]

    # verify sees the server; killed, it is reported, and repair starts it again on its data.
    assert cluster.deployctl("verify", f"{app}/{env}").returncode == 0
    subprocess.run(["pkill", "-KILL", "-u", f"auto-{app}-{env}", "-f", "redis-server"], check=True)
    found = cluster.deployctl("verify", f"{app}/{env}")
    assert found.returncode == 2 and b"redis 1: dedicated server is not running" in found.stdout, found.stdout.decode()
    assert "restarted its dedicated Redis 1" in apply_ok(cluster, "repair", f"{app}/{env}")
    assert subprocess.run(own + ["GET", "rq:any"], capture_output=True, text=True).stdout.strip() == "x"  # AOF
    assert processed(nginx.port, host, "after-repair")["text"] == "after-repair"


def test_renewing_a_shared_redis_deploys_its_users_too_destroy_keeps_it_and_a_purge_removes_it(world):
    cluster, nginx = world["cluster"], world["nginx"]
    env, app = unique_env(), "rqjobs"
    world["envs"].append(f"{app}/{env}")
    spec = queue_spec(world, app, env, app_repo(world["base"], app))
    host = f"{env}.{app}.test"
    apply_ok(cluster, "apply", str(spec))
    options = world["base"] / f"{env}-renew.yml"
    options.write_text("services: [web]\nrenew: {web: [redis]}\n")
    planned = cluster.deployctl("plan", str(spec), "--options", str(options))
    assert b"worker is deployed too: it uses web's redis, which is new" in planned.stdout, planned.stdout
    assert b"redis of web (new)" in planned.stdout, planned.stdout
    apply_ok(cluster, "apply", str(spec), "--options", str(options))
    worker = json.loads(cluster.deployctl("ledger", f"{app}/{env}", "worker", "--json").stdout)["worker"]
    assert [(d["code"], d["redis"], d["redis_of"]) for d in worker["deploys"]] == [(1, 1, "web"), (1, 2, "web")]
    assert processed(nginx.port, host, "on-redis-2")["text"] == "on-redis-2"
    data = cluster.agents["computing-1"].services_root / f"auto-{app}-{env}-web" / "data"
    assert sorted(p.name for p in data.iterdir()) == ["redis-1", "redis-2"]  # the replaced one is kept

    # A new memory bound: the same server takes it (planned as such), no new instance.
    web_env = dotenv(world, app, env, "web", 1)
    own = ["redis-cli", "-p", web_env["REDIS_PORT"], "--no-auth-warning", "-a", web_env["REDIS_PASSWORD"]]
    spec.write_text(spec.read_text().replace("maxmemory: 32M", "maxmemory: 48M"))
    planned = cluster.deployctl("plan", str(spec))
    assert b"redis maxmemory is now 48M (live: 32M)" in planned.stdout, planned.stdout
    apply_ok(cluster, "apply", str(spec))
    assert subprocess.run(own + ["CONFIG", "GET", "maxmemory"], capture_output=True,
                          text=True).stdout.split() == ["maxmemory", str(48 << 20)]
    assert cluster.deployctl("plan", str(spec)).returncode == 0  # nothing left to do

    # destroy keeps the data; the next apply runs the same server on it, for the new user.
    assert subprocess.run(own + ["SET", "kept", "across a destroy"], capture_output=True, text=True).stdout == "OK\n"
    apply_ok(cluster, "destroy", f"{app}/{env}", "--yes")
    assert sorted(p.name for p in data.iterdir()) == ["redis-1", "redis-2"]
    assert sorted(p.name for p in data.parent.iterdir()) == [".deployer-owner", "data"]
    assert subprocess.run(["id", "-u", f"auto-{app}-{env}"], capture_output=True).returncode == 1
    assert subprocess.run(["pgrep", "-f", str(data)], capture_output=True).returncode == 1
    again = apply_ok(cluster, "apply", str(spec))
    assert "redis web:2" in again and "mysql web:1" in again, again  # the worker's line: the kept instances
    assert subprocess.run(own + ["GET", "kept"], capture_output=True, text=True).stdout == "across a destroy\n"
    assert [d["text"] for d in json.loads(http_get(nginx.port, "/done", host)[1])["done"]] == ["on-redis-2"]

    apply_ok(cluster, "destroy", f"{app}/{env}", "--purge-data", "--yes")
    assert not data.exists() and not data.parent.exists()
    # Its servers are gone with it (their command lines name their data folders), and so is its user.
    assert subprocess.run(["pgrep", "-f", str(data)], capture_output=True).returncode == 1
    assert subprocess.run(["id", "-u", f"auto-{app}-{env}"], capture_output=True).returncode == 1
