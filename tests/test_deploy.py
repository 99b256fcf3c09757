"""Deploying the example for real: MariaDB, Redis, nginx, git, Node.js, agents over gRPC."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.deploy_harness import (deploy_cluster, example_repo, http_get, mysql, new_commit, purge_each, redis,
                                  service_users_base, unique_env, served_from)
from tests.load import Load

pytestmark = [pytest.mark.slow, pytest.mark.drivers]
INSTALL = "npm ci --omit=dev --no-audit --no-fund --prefer-offline"


def web_service(repo: Path, **extra) -> dict:
    service = {"path": "/", "source": str(repo), "ref": "main", "root": "web", "install": INSTALL,
               "build": "npm run build", "migrate": "node migrate.js", "start": "node server.js",
               "health": "/health", "uses": ["mysql", "redis"]}
    service.update(extra)
    return service


def write_spec(folder: Path, env: str, services: dict, name: str = "environment.yml") -> Path:
    import yaml
    path = folder / name
    path.write_text(yaml.safe_dump({"app": "shop", "environment": env, "domain": f"{env}.shop.test",
                                    "services": services}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def world():
    # Every clean-up is registered as soon as there is something to clean, and each runs even if
    # an earlier one failed: a failed purge must not leave the other environments' data behind.
    with contextlib.ExitStack() as cleanup:
        base = service_users_base()
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        envs: list[str] = []
        cleanup.callback(purge_each, "shop", envs)
        nginx, cluster = deploy_cluster(base, cleanup)
        repo = example_repo(base)
        yield {"base": base, "nginx": nginx, "cluster": cluster, "repo": repo, "envs": envs}


def new_env(world) -> str:
    env = unique_env()
    world["envs"].append(env)
    return env


def apply(world, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = world["cluster"].deployctl("apply", *args, timeout=600)
    if ok:
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    return result


def through_nginx(world, env: str, path: str = "/") -> tuple[int, bytes]:
    """A request through nginx to one environment (each test environment has its own domain)."""
    return http_get(world["nginx"].port, path, host=f"{env}.shop.test")


def test_the_four_deploys_of_the_notes(world, tmp_path):
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    spec = write_spec(tmp_path, env, {"web": web_service(repo)})

    apply(world, str(spec))                                   # deploy 1: code 1, mysql 1, redis 1
    status, body = through_nginx(world, env)
    assert status == 200, body
    assert json.loads(body)["visits"] >= 1
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", world["nginx"].port, timeout=5)
    conn.request("POST", "/notes", body=b"written through mysql 1", headers={"Host": f"{env}.shop.test"})
    assert conn.getresponse().status in (200, 201)

    new_commit(repo, "v2")                                    # deploy 2: new ref → code 2 only
    apply(world, str(spec))
    assert b"written through mysql 1" in through_nginx(world, env, "/notes")[1]

    new_commit(repo, "v3")                                    # deploy 3: new ref + renew mysql
    options = tmp_path / "deploy-options.yml"
    options.write_text("renew: [mysql]\n")
    apply(world, str(spec), "--options", str(options))
    status, body = through_nginx(world, env, "/notes")
    assert status == 200 and b"written through mysql 1" not in body   # mysql 2 starts empty

    options.write_text("renew: [redis]\n")                    # deploy 4: renew redis only
    apply(world, str(spec), "--options", str(options))
    assert through_nginx(world, env)[0] == 200

    ledger = cluster.deployctl("ledger", f"shop/{env}", "web")
    assert ledger.returncode == 0, ledger.stderr
    assert ledger.stdout.decode() == (
        "deploy  code  mysql  redis\n"
        "1       (1)   (1)    (1)\n"
        "2       (2)    |      |\n"
        "3       (3)   (2)     |\n"
        "4        |     |     (2)\n")

    plan = cluster.deployctl("plan", str(spec))               # unchanged spec: nothing to do
    assert plan.returncode == 0, plan.stdout
    assert b"nothing to do" in plan.stdout
    again = apply(world, str(spec))
    assert b"nothing to do" in again.stdout
    assert cluster.deployctl("ledger", f"shop/{env}", "web").stdout == ledger.stdout

    # While a job holds the environment, "nothing to do" would be a guess: the order is refused.
    lock = cluster.controller.store / "locks" / f"shop--{env}"
    lock.mkdir(parents=True)
    (lock / "owner.json").write_text(json.dumps({"job": "job-held", "since": 0, "reason": "verify"}))
    try:
        held = cluster.deployctl("apply", str(spec))
        assert held.returncode == 5 and b"nothing to do" not in held.stdout   # not now: try again later
        assert f"shop/{env} is locked by job job-held".encode() in held.stderr
        assert held.stderr.strip().count(b"\n") == 0
    finally:
        shutil.rmtree(lock)
    assert b"nothing to do" in apply(world, str(spec)).stdout


def test_zero_downtime_redeploy_and_failed_health_check(world, tmp_path):
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    spec = write_spec(tmp_path, env, {"web": web_service(repo)})
    apply(world, str(spec))
    # apply returns once nginx runs the new route: no answer from another environment after it
    answers = [served_from(world["nginx"].port, f"{env}.shop.test") for _ in range(20)]
    assert all(f"/auto-shop-{env}-web/" in a for a in answers), answers
    new_commit(repo, "zero downtime")
    with Load(world["nginx"].port, f"{env}.shop.test", min_requests=1000,
              served_from=f"/auto-shop-{env}-web/") as load:
        load.wait_for(200)                 # the old release is answering before the switch starts
        apply(world, str(spec))
        load.wait_for(200)                 # and the new one after it
    tally = load.tally
    ledger = cluster.deployctl("ledger", f"shop/{env}", "web", "--json").stdout.decode()
    assert tally.failed == [], f"{tally}; nginx routed {world['nginx'].routed(f'{env}.shop.test')}; ledger {ledger}"
    assert tally.total >= 1000, str(tally)
    assert tally.releases == {"1", "2"}, f"{tally}; ledger {ledger}"  # the switch happened while the clients ran

    # A release whose health check fails: the old one keeps serving, the new one is failed.
    broken = write_spec(tmp_path, env, {"web": web_service(repo, health="/no-such-health")}, "broken.yml")
    result = apply(world, str(broken), ok=False)
    assert result.returncode == 1
    assert b"health failed" in result.stderr
    assert through_nginx(world, env, "/health")[0] == 200
    ledger = json.loads(cluster.deployctl("ledger", f"shop/{env}", "web", "--json").stdout)["web"]
    statuses = {i["number"]: i["status"] for i in ledger["instances"] if i["component"] == "code"}
    assert statuses == {1: "standby", 2: "live", 3: "failed"}
    assert ledger["deploys"][-1]["outcome"] == "failed"


def test_isolation_between_services(world, tmp_path):
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    spec = write_spec(tmp_path, env, {"a": web_service(repo, path="/a"), "b": web_service(repo, path="/b")})
    apply(world, str(spec))
    root = cluster.agents["computing-1"].services_root

    def env_of(service: str) -> dict[str, str]:
        path = root / f"auto-shop-{env}-{service}" / "current" / ".env"
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        return dict(line.split("=", 1) for line in path.read_text().splitlines())

    a, b = env_of("a"), env_of("b")
    redis("SET", b["REDIS_PREFIX"] + "secret", "b-only")
    as_a = ["redis-cli", "--user", a["REDIS_PREFIX"][:-1], "--pass", a["REDIS_URL"].split(":")[2].split("@")[0],
            "--no-auth-warning"]
    read = subprocess.run([*as_a, "GET", b["REDIS_PREFIX"] + "secret"], capture_output=True, text=True)
    assert "NOPERM" in read.stdout + read.stderr
    write = subprocess.run([*as_a, "SET", b["REDIS_PREFIX"] + "x", "1"], capture_output=True, text=True)
    assert "NOPERM" in write.stdout + write.stderr
    own = subprocess.run([*as_a, "SET", a["REDIS_PREFIX"] + "x", "1"], capture_output=True, text=True)
    assert own.stdout.strip() == "OK"
    opened = subprocess.run(["mariadb", "-h", "127.0.0.1", "-u", a["DB_USER"], f"-p{a['DB_PASSWORD']}",
                             b["DB_NAME"], "-e", "SELECT 1"], capture_output=True, text=True)
    assert opened.returncode != 0 and "Access denied" in opened.stderr
    mine = subprocess.run(["mariadb", "-h", "127.0.0.1", "-u", a["DB_USER"], f"-p{a['DB_PASSWORD']}",
                           a["DB_NAME"], "-e", "SELECT 1"], capture_output=True, text=True)
    assert mine.returncode == 0, mine.stderr


def test_env_values_are_built_from_the_generated_ones(world, tmp_path):
    """An ORM's own URL scheme, a bind address from PORT and a literal `$`, built where the .env is
    written: the URL really opens the service's database, and its password reaches no job file."""
    import urllib.parse

    from common import envfile
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    spec = write_spec(tmp_path, env, {"web": web_service(repo, env={
        "SQLALCHEMY_DATABASE_URI": "mysql+pymysql://${DB_USER}:${DB_PASSWORD}@${DB_HOST}:${DB_PORT}/${DB_NAME}",
        "BIND": "127.0.0.1:${PORT}", "QUEUE_URL": "${REDIS_URL}/0", "PRICE": "$$5"})})
    apply(world, str(spec))
    root = cluster.agents["computing-1"].services_root
    values = envfile.parse((root / f"auto-shop-{env}-web" / "current" / ".env").read_text())
    url = urllib.parse.urlsplit(values["SQLALCHEMY_DATABASE_URI"])
    assert url.scheme == "mysql+pymysql" and url.username == values["DB_USER"] and url.password == values["DB_PASSWORD"]
    assert (url.hostname, str(url.port), url.path) == (values["DB_HOST"], values["DB_PORT"], "/" + values["DB_NAME"])
    opened = subprocess.run(["mariadb", "-h", url.hostname, "-P", str(url.port), "-u", url.username,
                             f"-p{url.password}", url.path[1:], "-e", "SELECT 1"], capture_output=True, text=True)
    assert opened.returncode == 0, opened.stderr
    live = json.loads(cluster.deployctl("ledger", f"shop/{env}", "web", "--json").stdout)["web"]["instances"]
    assert values["BIND"] == f"127.0.0.1:{next(i['port'] for i in live if i['status'] == 'live')}"
    assert values["QUEUE_URL"] == values["REDIS_URL"] + "/0" and values["PRICE"] == "$5"
    assert values["REDIS_PASSWORD"] in values["REDIS_URL"] and values["REDIS_USER"] == values["REDIS_PREFIX"][:-1]
    assert http_get(world["nginx"].port, "/health", host=f"{env}.shop.test")[0] == 200
    jobs = cluster.controller.store / "jobs"
    leaked = [p for p in jobs.rglob("*") if p.is_file() and values["DB_PASSWORD"].encode() in p.read_bytes()]
    assert leaked == []


def test_failing_install_changes_nothing_and_secrets_stay_secret(world, tmp_path):
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    secret = "s3cr3t-" + unique_env() + "-value"
    set_secret = subprocess.run([*cluster_cmd(cluster), "secret", "set", f"shop/{env}", "SESSION_KEY"],
                                input=secret.encode(), capture_output=True, env=cluster.env())
    assert set_secret.returncode == 0, set_secret.stderr
    spec = write_spec(tmp_path, env, {"web": web_service(repo, secrets=["SESSION_KEY"])})
    outputs = [apply(world, str(spec))]
    before = cluster.deployctl("ledger", f"shop/{env}", "--json").stdout

    bad = write_spec(tmp_path, env, {"web": web_service(repo, secrets=["SESSION_KEY"],
                                                        install="echo installing; echo boom >&2; exit 3")}, "bad.yml")
    result = apply(world, str(bad), ok=False)
    outputs.append(result)
    assert result.returncode == 1
    assert b"install failed: exit 3" in result.stderr and b"boom" in result.stderr
    after = json.loads(cluster.deployctl("ledger", f"shop/{env}", "--json").stdout)
    live = {(i["component"], i["number"]) for i in after["web"]["instances"] if i["status"] == "live"}
    assert live == {("code", 1), ("mysql", 1), ("redis", 1)}
    assert through_nginx(world, env)[0] == 200
    assert json.loads(before)["web"]["deploys"][0]["outcome"] == "succeeded"

    for name in ("status", "jobs"):
        outputs.append(cluster.deployctl(name, f"shop/{env}") if name == "status" else cluster.deployctl(name))
    job_ids = [r["id"] for r in json.loads(cluster.deployctl("jobs", "--json").stdout)]
    outputs += [cluster.deployctl("logs", job) for job in job_ids]
    import sqlite3
    from controller.state.vault import Vault
    db = sqlite3.connect(cluster.controller.store / "deployer.db")
    vault = Vault.for_store(cluster.controller.store / "secrets.key", create=False)   # sealed at rest
    passwords = [vault.open_text(row[0]) for row in db.execute("SELECT password FROM credentials")]
    assert passwords
    values = [secret, *passwords]
    haystacks = [o.stdout + o.stderr for o in outputs]
    haystacks += [p.read_bytes() for p in (cluster.controller.store / "jobs").rglob("*") if p.is_file()]
    haystacks += [cluster.controller.log.read_bytes()]
    haystacks += [p.read_bytes() for p in world["base"].glob("agent-*.log")]
    for value in values:
        for haystack in haystacks:
            assert value.encode() not in haystack


def cluster_cmd(cluster) -> list[str]:
    import sys
    return [sys.executable, "-m", "deployctl.cli"]


@pytest.mark.parametrize("spec_text, error", [
    ("app: shop\nenvironment: {env}\ndomain: shop.test\nservices:\n  web:\n    path: /\n    source: {repo}\n"
     "    ref: no-such-branch\n    start: node server.js\n", ":8: services.web.ref: ref 'no-such-branch' not found"),
    ("app: shop\nenvironment: {env}\ndomain: shop.test\nservices:\n  web:\n    path: /\n    source: /nonexistent/repo\n"
     "    ref: main\n    start: node server.js\n", ":8: services.web.ref:"),
])
def test_bad_refs_are_refused_before_any_job(world, tmp_path, spec_text, error):
    env, cluster = new_env(world), world["cluster"]
    path = tmp_path / "environment.yml"
    path.write_text(spec_text.format(env=env, repo=world["repo"]))
    jobs_before = json.loads(cluster.deployctl("jobs", "--json").stdout)
    for command in ("plan", "apply"):
        result = cluster.deployctl(command, str(path))
        assert result.returncode == 1
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and error in lines[0] and "environment.yml" in lines[0], lines
    assert json.loads(cluster.deployctl("jobs", "--json").stdout) == jobs_before


BAD_SPECS = [
    ("app: shop\nenvironment: {env}\nservices: [\n", ":4:", "invalid YAML"),
    ("app: shop\nenvironment: {env}\ndomain: shop.test\ncolour: blue\nservices:\n  web:\n    source: {repo}\n"
     "    ref: main\n    start: x\n", ":4: colour:", "unknown key"),
    ("app: Shop\nenvironment: {env}\ndomain: shop.test\nservices:\n  web:\n    source: {repo}\n    ref: main\n"
     "    start: x\n", ":1: app:", ""),
    ("app: shop\nenvironment: {env}\ndomain: shop.test\nservices:\n  a:\n    path: /x\n    source: {repo}\n"
     "    ref: main\n    start: x\n  b:\n    path: /x\n    source: {repo}\n    ref: main\n    start: x\n",
     ":11: services.b.path:", ""),
    ("app: shop\nenvironment: {env}\ndomain: shop.test\nservices:\n  web:\n    source: {repo}\n    ref: main\n"
     "    start: x\n    uses: [mysql, postgres]\n", ":9: services.web.uses[1]:", "postgres"),
    ("app: shop\nenvironment: {env}\ndomain: shop.test\nservices:\n  web:\n    source: {repo}\n    ref: main\n",
     ":5: services.web", "start"),
    ("app: shop\nenvironment: {env}\ndomain: shop.test\nservices:\n  worker:\n    source: {repo}\n    ref: main\n"
     "    start: x\n    uses: [web.redis]\n", ":9: services.worker.uses[0]:", "web.redis: no service 'web'"),
    ("app: shop\nenvironment: {env}\ndomain: shop.test\nservices:\n  web:\n    path: /\n    source: {repo}\n"
     "    ref: main\n    start: x\n    health: {{path: /, status: [200, 700]}}\n",
     ":10: services.web.health.status[1]:", "not an HTTP status (100 to 599)"),
]


def test_a_data_instance_no_connected_agent_provides_is_refused_at_its_line(world, tmp_path):
    """The redis mode (or component) of a new instance must have a connected agent able to
    provide it: refused before any job, at the line that asks for it."""
    env, cluster = new_env(world), world["cluster"]
    web = {"path": "/", "source": str(world["repo"]), "ref": "main", "start": "x", "uses": ["redis"]}
    dedicated = write_spec(tmp_path, env, {"web": {**web, "redis": {"mode": "dedicated"}}}, "dedicated.yml")
    prefix = write_spec(tmp_path, env, {"web": web}, "prefix.yml")
    jobs_before = cluster.deployctl("jobs", "--json").stdout
    cluster.controller.grant("computing-1", ["redis"], ungrant=True)
    try:
        for path, key, what in (
                (dedicated, "services.web.redis.mode", "dedicated: no connected agent runs dedicated Redis servers "
                 "(one granted redis, with redis.server set in its configuration)"),
                (prefix, "services.web.uses", "redis: no connected agent has capability redis (computing-1 is "
                 "configured for it but not granted it: deployctl agents grant computing-1 --provides redis)")):
            word = key.rsplit(".", 1)[1] + ":"
            line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith(word))
            for command in ("plan", "apply"):
                result = cluster.deployctl(command, str(path))
                assert result.returncode == 1
                assert result.stderr.decode().strip().splitlines() == [f"deployctl: {path}:{line}: {key}: {what}"]
    finally:
        cluster.controller.grant("computing-1", ["redis"])
    assert cluster.deployctl("jobs", "--json").stdout == jobs_before


@pytest.mark.parametrize("spec_text, where, what", BAD_SPECS)
def test_bad_specs_give_one_line_and_start_no_job(world, tmp_path, spec_text, where, what):
    env, cluster = new_env(world), world["cluster"]
    path = tmp_path / "environment.yml"
    path.write_text(spec_text.format(env=env, repo=world["repo"]))
    jobs_before = cluster.deployctl("jobs", "--json").stdout
    for command in ("plan", "apply"):
        result = cluster.deployctl(command, str(path))
        assert result.returncode == 1
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert f"environment.yml{where}" in lines[0] and what in lines[0], lines[0]
    assert cluster.deployctl("jobs", "--json").stdout == jobs_before


def test_services_outlive_an_agent_crash_and_are_adopted(world, tmp_path):
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    spec = write_spec(tmp_path, env, {"web": web_service(repo)})
    apply(world, str(spec))
    status = json.loads(cluster.deployctl("status", f"shop/{env}", "--json").stdout)[0]
    old_pid = status["pid"]
    agent = cluster.agents["computing-1"]
    agent.kill9()
    assert through_nginx(world, env)[0] == 200          # the service does not depend on its agent
    agent.start()
    cluster.wait_connected("computing-1")
    status = json.loads(cluster.deployctl("status", f"shop/{env}", "--json").stdout)[0]
    assert (status["process"], status["pid"], status["health"]) == ("running", old_pid, "ok")
    new_commit(repo, "after the agent came back")
    apply(world, str(spec))                         # the adopted process is retired as usual
    import psutil
    from tests.harness import wait_for

    def gone() -> bool:
        try:
            return psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    wait_for(gone, 15, what=f"the adopted process {old_pid} stopped")
    assert through_nginx(world, env)[0] == 200


def test_rollback_from_a_release_that_serves_errors(world, tmp_path):
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    good = write_spec(tmp_path, env, {"web": web_service(repo)})
    apply(world, str(good))                                              # deploy 1: code 1
    bad = write_spec(tmp_path, env, {"web": web_service(repo, env={"FAIL_MODE": "errors"})}, "bad.yml")
    apply(world, str(bad))                                               # deploy 2: code 2, healthy, serves 500
    assert through_nginx(world, env)[0] == 500
    # /version answers 200 from both releases and names the one that served it: the bad release
    # until the switch, the good one after it. A failed request is anything else.
    with Load(world["nginx"].port, f"{env}.shop.test", min_requests=1000,
              served_from=f"/auto-shop-{env}-web/") as load:
        load.wait_for(200)
        rollback = cluster.deployctl("rollback", f"shop/{env}/web", timeout=300)
        load.wait_for(200)
    tally = load.tally
    assert rollback.returncode == 0, rollback.stderr
    assert b"rollback to code instance 1; data is not touched: mysql 1, redis 1 stay live" in rollback.stdout
    assert tally.failed == [] and tally.total >= 1000, str(tally)
    assert tally.releases == {"1", "2"}, str(tally)
    assert through_nginx(world, env)[0] == 200
    ledger = cluster.deployctl("ledger", f"shop/{env}", "web").stdout.decode()
    assert ledger == ("deploy  code  mysql  redis\n"
                      "1       (1)   (1)    (1)\n"
                      "2       (2)    |      |\n"
                      "3        1     |      |\n")
    rows = json.loads(cluster.deployctl("ledger", f"shop/{env}", "web", "--json").stdout)["web"]["deploys"]
    assert (rows[-1]["code"], rows[-1]["code_new"]) == (1, False)

    gone = cluster.deployctl("rollback", f"shop/{env}/web", "--to", "9")
    assert gone.returncode == 1
    assert gone.stderr.decode().strip() == f"deployctl: shop/{env}/web: code instance 9 never existed"
    before = json.loads(cluster.deployctl("status", f"shop/{env}", "--json").stdout)[0]["pid"]
    with Load(world["nginx"].port, f"{env}.shop.test", min_requests=1000,
              served_from=f"/auto-shop-{env}-web/") as load:
        load.wait_for(200)
        reload = cluster.deployctl("reload", f"shop/{env}/web", timeout=300)
        load.wait_for(200)
    tally = load.tally
    assert reload.returncode == 0, reload.stderr
    assert tally.failed == [] and tally.total >= 1000, str(tally)
    assert tally.releases == {"1"} and len(tally.pids) == 2, str(tally)   # the old process, then the new
    assert through_nginx(world, env)[0] == 200
    after = json.loads(cluster.deployctl("status", f"shop/{env}", "--json").stdout)[0]
    assert after["pid"] != before and after["code"] == 1
    import psutil
    from tests.harness import wait_for
    wait_for(lambda: not psutil.pid_exists(before) or psutil.Process(before).status() == psutil.STATUS_ZOMBIE,
             15, what="the reloaded instance's previous process stopped")

    # --to an instance still on disk: the bad release serves again, on the same data.
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", world["nginx"].port, timeout=5)
    conn.request("POST", "/notes", body=b"written before the rollbacks", headers={"Host": f"{env}.shop.test"})
    assert conn.getresponse().status == 201
    live_data = {(i["component"], i["number"]) for i in json.loads(
        cluster.deployctl("ledger", f"shop/{env}", "web", "--json").stdout)["web"]["instances"]
        if i["status"] == "live" and i["component"] != "code"}
    to_two = cluster.deployctl("rollback", f"shop/{env}/web", "--to", "2", timeout=300)
    assert to_two.returncode == 0, to_two.stderr
    assert through_nginx(world, env)[0] == 500
    assert b"written before the rollbacks" in through_nginx(world, env, "/notes")[1]     # data untouched
    after = json.loads(cluster.deployctl("ledger", f"shop/{env}", "web", "--json").stdout)["web"]
    assert {(i["component"], i["number"]) for i in after["instances"]
            if i["status"] == "live" and i["component"] != "code"} == live_data == {("mysql", 1), ("redis", 1)}

    # --to a kept instance whose folder is gone from disk (a wiped server): it comes back from the
    # commit the ledger recorded, installed and built again, under its number; the data is untouched.
    shutil.rmtree(cluster.agents["computing-1"].services_root / f"auto-shop-{env}-web" / "releases" / "1")
    gone_from_disk = cluster.deployctl("rollback", f"shop/{env}/web", "--to", "1", timeout=300)
    assert gone_from_disk.returncode == 0, gone_from_disk.stdout.decode() + gone_from_disk.stderr.decode()
    assert b"release 1 is missing on computing-1: checked out again from" in gone_from_disk.stdout
    assert through_nginx(world, env)[0] == 200
    assert b"written before the rollbacks" in through_nginx(world, env, "/notes")[1]
    assert json.loads(cluster.deployctl("ledger", f"shop/{env}", "web", "--json").stdout)["web"]["deploys"][-1][
        "code"] == 1


def test_verify_repair_and_clean(world, tmp_path):
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    # restart: never, so a process that dies stays dead for verify to see (test_healing.py has the rest)
    apply(world, str(write_spec(tmp_path, env, {"web": {**web_service(repo), "restart": "never"}})))
    key = f"shop/{env}"

    def verify() -> tuple[int, str]:
        result = cluster.deployctl("verify", key, timeout=120)
        return result.returncode, result.stdout.decode()

    assert verify()[0] == 0
    import os
    import signal as sig
    pid = json.loads(cluster.deployctl("status", key, "--json").stdout)[0]["pid"]
    os.killpg(pid, sig.SIGKILL)                                    # a live process dies
    code, out = verify()
    assert code == 2 and "is not running (repair restarts it)" in out, out
    repaired = cluster.deployctl("repair", key, timeout=300)
    assert repaired.returncode == 0, repaired.stdout.decode() + repaired.stderr.decode()
    assert verify()[0] == 0 and through_nginx(world, env)[0] == 200

    conf = world["nginx"].conf_dir / f"auto-shop-{env}.conf"    # the environment's route vanishes
    conf.unlink()
    code, out = verify()
    assert code == 2 and "nginx file is missing" in out
    assert cluster.deployctl("repair", key, timeout=300).returncode == 0
    assert verify()[0] == 0 and conf.exists()

    user = f"auto-shop-{env}-web-1"                               # the Redis ACL user is dropped
    redis("ACL", "DELUSER", user)
    code, out = verify()
    assert code == 2 and f"ACL user {user} is missing" in out
    assert cluster.deployctl("repair", key, timeout=300).returncode == 0
    assert verify()[0] == 0 and through_nginx(world, env)[0] == 200

    # An orphan (marked as this controller's, unknown to the ledger), an auto-* folder without
    # our mark (someone else's: left alone), and a folder outside our namespace.
    from common.tls import fingerprint
    from controller.environments.ownership import FOLDER_MARK, owner_id, owner_mark
    mark = owner_mark(owner_id(fingerprint((cluster.controller.store / "pki" / "ca.crt").read_bytes())))
    root = cluster.agents["computing-1"].services_root
    (root / "auto-x-y-z").mkdir()
    (root / "auto-x-y-z" / FOLDER_MARK).write_text(mark + "\n")
    (root / "auto-x-y-w").mkdir()
    (root / "keep-me").mkdir()
    dry = cluster.deployctl("clean", key, "--dry-run", timeout=120)
    assert dry.returncode == 0 and f"remove {root}/auto-x-y-z" in dry.stdout.decode()
    assert f"folder {root}/auto-x-y-w is not this deployer's (no mark): left alone" in dry.stdout.decode()
    assert (root / "auto-x-y-z").exists()
    cleaned = cluster.deployctl("clean", key, timeout=120)
    assert cleaned.returncode == 0 and f"remove {root}/auto-x-y-z" in cleaned.stdout.decode()
    assert not (root / "auto-x-y-z").exists() and (root / "keep-me").exists() and (root / "auto-x-y-w").exists()
    assert verify()[0] == 0
    (root / "auto-x-y-w").rmdir()


def test_verify_sees_each_kind_of_drift_and_repair_closes_what_it_can(world, tmp_path):
    """Each drift verify claims to see, made for real on a live environment; each one is shown
    found (exit 2, its own line) and then gone after repair, or reported for an operator."""
    import os
    import signal as sig
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    apply(world, str(write_spec(tmp_path, env, {"web": web_service(repo)})))
    key = f"shop/{env}"
    root = cluster.agents["computing-1"].services_root / f"auto-shop-{env}-web"
    conf = world["nginx"].conf_dir / f"auto-shop-{env}.conf"

    def verify() -> tuple[int, str]:
        result = cluster.deployctl("verify", key, timeout=120)
        return result.returncode, result.stdout.decode()

    def repaired() -> None:
        result = cluster.deployctl("repair", key, timeout=300)
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
        code, out = verify()
        assert code == 0, out

    assert verify()[0] == 0
    original = conf.read_bytes()                                    # an edited nginx file, byte for byte
    conf.write_bytes(original.replace(b"proxy_http_version 1.1;", b"proxy_http_version 1.0;", 1))
    code, out = verify()
    assert code == 2 and "nginx file differs from what the ledger says" in out, out
    repaired()
    # Written again whole, byte for byte but for the probe's nonce, which every switch draws anew.
    from controller.environments.commands import probe_of
    rewritten = conf.read_bytes()
    was, now = probe_of(original.decode()), probe_of(rewritten.decode())
    assert was and now and was != now
    assert rewritten.replace(now.encode(), was.encode()) == original

    db_user = f"auto-shop-{env}-web-1"                             # a dropped MariaDB user
    mysql(f"DROP USER '{db_user}'@'%'")
    code, out = verify()
    assert code == 2 and f"mysql 1: user {db_user} is missing" in out, out
    repaired()
    assert mysql(f"SELECT User FROM mysql.user WHERE User = '{db_user}'").strip() == db_user
    assert through_nginx(world, env)[0] == 200                     # and the service can use it again

    env_file = root / "current" / ".env"                           # a wrong .env mode
    os.chmod(env_file, 0o644)
    code, out = verify()
    assert code == 2 and "code 1: .env has mode 644, not 600" in out, out
    repaired()
    assert env_file.stat().st_mode & 0o777 == 0o600

    pid = json.loads(cluster.deployctl("status", key, "--json").stdout)[0]["pid"]
    os.kill(pid, sig.SIGSTOP)                                       # running, but not answering
    try:
        code, out = verify()
        assert code == 2 and "code 1: health check fails" in out, out
    finally:
        os.kill(pid, sig.SIGCONT)
    assert verify()[0] == 0

    release = root / "releases" / "1"                              # a release gone from disk
    moved = root / "releases" / "1.away"
    release.rename(moved)
    try:
        code, out = verify()
        assert code == 2 and "code 1: release folder is missing" in out, out
    finally:
        moved.rename(release)
    assert verify()[0] == 0

    database = f"auto-shop-{env}-web-1"                            # a dropped database: reported, never recreated
    mysql(f"DROP DATABASE `{database}`")
    code, out = verify()
    assert code == 2 and f"mysql 1: database {database} is missing" in out, out
    result = cluster.deployctl("repair", key, timeout=300)
    assert result.returncode != 0
    assert mysql(f"SHOW DATABASES LIKE '{database}'").strip() == ""


def test_destroy_keeps_data_unless_purged(world, tmp_path):
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    spec = write_spec(tmp_path, env, {"web": web_service(repo)})
    apply(world, str(spec))
    key, name = f"shop/{env}", f"auto-shop-{env}-web-1"
    redis("SET", f"{name}:kept", "1")
    folder = cluster.agents["computing-1"].services_root / f"auto-shop-{env}-web"
    conf = world["nginx"].conf_dir / f"auto-shop-{env}.conf"
    pid = json.loads(cluster.deployctl("status", key, "--json").stdout)[0]["pid"]

    kept = cluster.deployctl("destroy", key, timeout=300)
    assert kept.returncode == 0, kept.stderr
    assert b"databases and Redis keys are kept" in kept.stdout
    assert not folder.exists() and not conf.exists()
    import psutil
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert mysql(f"SHOW DATABASES LIKE '{name}'").strip() == name
    assert name in redis("ACL", "USERS").split() and redis("GET", f"{name}:kept").strip() == "1"

    apply(world, str(spec))                                  # comes back on the data it kept
    ledger = cluster.deployctl("ledger", key, "web").stdout.decode().splitlines()
    assert ledger[-1].split() == ["2", "(2)", "|", "|"]
    refused = cluster.deployctl("destroy", key, "--purge-data")
    assert refused.returncode == 2 and b"--yes" in refused.stderr
    purged = cluster.deployctl("destroy", key, "--purge-data", "--yes", timeout=300)
    assert purged.returncode == 0, purged.stderr
    assert mysql(f"SHOW DATABASES LIKE 'auto-shop-{env}-%'").strip() == ""
    assert mysql(f"SELECT User FROM mysql.user WHERE User LIKE 'auto-shop-{env}-%'").strip() == ""
    assert not [u for u in redis("ACL", "USERS").split() if u.startswith(f"auto-shop-{env}-")]
    assert redis("--scan", "--pattern", f"auto-shop-{env}-*").strip() == ""
    assert not conf.exists() and not folder.exists()


def test_prune_removes_a_service_dropped_from_the_spec(world, tmp_path):
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    both = write_spec(tmp_path, env, {"a": web_service(repo, path="/a"), "b": web_service(repo, path="/b")})
    apply(world, str(both))
    only_a = write_spec(tmp_path, env, {"a": web_service(repo, path="/a")}, "only-a.yml")
    kept = cluster.deployctl("plan", str(only_a))
    assert kept.returncode == 0 and b"b is no longer in the spec" in kept.stdout
    assert cluster.deployctl("plan", str(only_a), "--prune").returncode == 2
    apply(world, str(only_a), "--prune")
    # apply returns once nginx runs the new route: /b is gone at once
    assert through_nginx(world, env, "/b/health")[0] == 404
    assert through_nginx(world, env, "/a/health")[0] == 200
    assert not (cluster.agents["computing-1"].services_root / f"auto-shop-{env}-b").exists()
    assert mysql(f"SHOW DATABASES LIKE 'auto-shop-{env}-b-1'").strip()      # data is kept


def test_service_logs_follow_live_and_across_a_redeploy(world, tmp_path):
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    ticker = {"source": str(repo), "ref": "main", "healthy_after": 1,
              "start": "sh -c 'while true; do echo \"$RELEASE $(date +%s.%N)\"; sleep 0.2; done'"}
    spec = write_spec(tmp_path, env, {"ticker": ticker})
    apply(world, str(spec))
    import queue
    lines: queue.Queue = queue.Queue()
    since = time.time()
    follower = cluster.deployctl_bg("logs", f"shop/{env}/ticker", "-f", "--tail", "1")
    reader = threading.Thread(target=lambda: [lines.put(line.decode()) for line in follower.stdout], daemon=True)
    reader.start()

    def next_line(deadline: float) -> tuple[str, float]:
        release, stamp = lines.get(timeout=max(0.1, deadline - time.monotonic())).split()
        return release, float(stamp)

    try:
        deadline = time.monotonic() + 120
        first = [next_line(deadline) for _ in range(10)]
        assert {release for release, _ in first} == {"1"}, first
        stamps = [stamp for _, stamp in first]
        assert stamps == sorted(stamps), first
        # Followed live: all but the one line asked for with --tail were printed after it began.
        assert sum(stamp > since for stamp in stamps) >= 9, first
        apply(world, str(write_spec(tmp_path, env, {"ticker": {**ticker, "env": {"V": "2"}}}, "v2.yml")))
        deadline = time.monotonic() + 120
        while next_line(deadline)[0] != "2":   # the same follower, onto the new instance
            pass
    finally:
        follower.kill()
        follower.wait()


def test_a_domain_belongs_to_one_environment(world, tmp_path):
    first, second, repo, cluster = new_env(world), new_env(world), world["repo"], world["cluster"]
    apply(world, str(write_spec(tmp_path, first, {"web": web_service(repo)})))
    import yaml
    path = write_spec(tmp_path, second, {"web": web_service(repo)}, "second.yml")
    data = yaml.safe_load(path.read_text())
    data["domain"] = f"{first}.shop.test"
    path.write_text(yaml.safe_dump(data))
    result = cluster.deployctl("apply", str(path))
    assert result.returncode == 1
    assert f"domain {first}.shop.test is already used by shop/{first}".encode() in result.stderr


def test_a_daemon_that_dies_fails_its_deploy_with_its_own_output(world, tmp_path):
    env, repo = new_env(world), world["repo"]
    dying = {"source": str(repo), "ref": "main", "healthy_after": 1,
             "start": "sh -c 'sleep 0.5; echo cannot reach the queue >&2; exit 4'"}
    result = apply(world, str(write_spec(tmp_path, env, {"worker": dying})), ok=False)
    assert result.returncode == 1
    assert b"worker: health failed: the daemon did not stay up for 1s" in result.stderr
    assert b"cannot reach the queue" in result.stderr


def test_health_checks_fit_the_app_and_fail_at_once_when_waiting_cannot_help(world, tmp_path):
    env, other, repo = new_env(world), new_env(world), world["repo"]
    # The app answers 404 on /missing: a definite answer, not a slow start; the error says so.
    result = apply(world, str(write_spec(tmp_path, env, {"web": web_service(repo, health={"path": "/missing"})})),
                   ok=False)
    assert result.returncode == 1
    assert b"web: health failed: GET http://" in result.stderr, result.stderr
    assert b"answered 404, which is not a healthy answer (expected 2xx or 3xx)" in result.stderr
    assert not (world["nginx"].conf_dir / f"auto-shop-{env}.conf").exists()   # nothing went live
    assert b"web: listening on" in result.stderr                     # the instance's own last lines
    # The instance that never went live still has its output, and the error says how to see it.
    cluster = world["cluster"]
    nothing = cluster.deployctl("logs", f"shop/{env}/web")
    assert nothing.returncode != 0 and (f"shop/{env}/web: nothing is live; the last code instance is 1 (failed): "
                                        f"deployctl logs shop/{env}/web --instance 1").encode() in nothing.stderr
    shown = cluster.deployctl("logs", f"shop/{env}/web", "--instance", "1")
    assert shown.returncode == 0 and b"web: listening on" in shown.stdout, shown.stderr
    assert cluster.deployctl("logs", f"shop/{env}/web", "--instance", "9").stderr.strip().endswith(
        f"shop/{env}/web: code instance 9 never ran".encode())
    # The same path is healthy where the spec says which answer counts.
    fits = web_service(repo, health={"path": "/missing", "status": [404]}, drain="1s")
    apply(world, str(write_spec(tmp_path, env, {"web": fits}, "fits.yml")))
    assert through_nginx(world, env, "/health")[0] == 200
    # A daemon's health command runs in its release, as the environment's user; one that never
    # succeeds fails the deploy with its own output.
    daemon = {"source": str(repo), "ref": "main", "healthy_after": 1, "start": "sleep 600",
              "health": {"command": f'test "$(id -un)" = auto-shop-{other} && test -d web', "deadline": "5s"}}
    apply(world, str(write_spec(tmp_path, other, {"worker": daemon}, "daemon.yml")))
    never = {**daemon, "health": {"command": "echo the queue is not reachable; exit 3", "interval": "200ms",
                                  "deadline": "1s"}}
    result = apply(world, str(write_spec(tmp_path, other, {"worker": never}, "never.yml")), ok=False)
    assert result.returncode == 1
    assert b"worker: health failed: 'echo the queue is not reachable; exit 3' did not succeed within 1s" in result.stderr
    assert b"the queue is not reachable" in result.stderr


def test_one_switch_for_the_environment_or_none(world, tmp_path):
    """A job that deploys two web services and a daemon: if the second web service fails its
    health check, nothing switches — the first one's new instance is stopped, both old instances
    keep serving, the nginx file is byte for byte what it was, and the daemon (started after the
    web services) was never touched."""
    env, repo, cluster = new_env(world), world["repo"], world["cluster"]
    ticker = {"source": str(repo), "ref": "main", "healthy_after": 1, "start": "sleep 600"}
    spec = write_spec(tmp_path, env, {"a": web_service(repo, path="/a"), "b": web_service(repo, path="/b"),
                                      "ticker": ticker})
    apply(world, str(spec))
    conf = world["nginx"].conf_dir / f"auto-shop-{env}.conf"
    before = conf.read_bytes()
    new_commit(repo, "both change")
    broken = write_spec(tmp_path, env, {"a": web_service(repo, path="/a"),
                                        "b": web_service(repo, path="/b", health={"path": "/missing"}),
                                        "ticker": {**ticker, "start": "sleep 601"}}, "broken.yml")
    result = apply(world, str(broken), ok=False)
    assert result.returncode == 1
    assert b"b: health failed" in result.stderr
    assert conf.read_bytes() == before
    for path in ("/a", "/b"):
        status, body = http_get(world["nginx"].port, f"{path}/version", host=f"{env}.shop.test")
        assert status == 200 and json.loads(body)["release"] == "1", (path, body)
    ledger = json.loads(cluster.deployctl("ledger", f"shop/{env}", "--json").stdout)
    last = {service: ledger[service]["deploys"][-1] for service in ("a", "b", "ticker")}
    # web first: b failed before the daemon's new instance was started at all
    assert {s: d["outcome"] for s, d in last.items()} == {"a": "failed", "b": "failed", "ticker": "succeeded"}
    assert [d["number"] for d in ledger["ticker"]["deploys"]] == [1]
    assert last["a"]["reason"].startswith("not switched: b: health failed"), last["a"]
    assert last["b"]["reason"].startswith("b: health failed"), last["b"]
    live = {s: [i["number"] for i in ledger[s]["instances"] if i["component"] == "code" and i["status"] == "live"]
            for s in ledger}
    assert live == {"a": [1], "b": [1], "ticker": [1]}
    processes = cluster.agents["computing-1"].services() + cluster.agents["daemons-1"].services()
    mine = sorted(p["name"] + "@" + p["instance"] for p in processes if f"-{env}-" in p["name"] and p.get("alive"))
    assert len(mine) == 3 and all("@1-" in p for p in mine), mine      # only the old instances run
    import re
    job = re.search(rb"job-[0-9T]+-[0-9a-f]+", result.stdout + result.stderr).group().decode()
    notes = (cluster.controller.store / "jobs" / job / "events.jsonl").read_text()
    assert "b failed, so nothing switched: the new instances of a were stopped" in notes, notes[-2000:]


def minimal_site(repo: Path) -> dict:
    """A web service that starts at once: it serves its own working folder and says which it is
    (its environment's release), so an answer shows whose process gave it. The release is sealed
    (read-only) once built: `whoami` is a writable path, a link into the service's shared folder."""
    return {"path": "/", "source": str(repo), "ref": "main", "root": "web", "health": "/whoami", "writable": ["whoami"],
            "start": "sh -c 'pwd > whoami && exec python3 -m http.server $PORT --bind 127.0.0.1'"}


def test_a_first_deploy_answers_on_its_route_the_moment_apply_returns(world, tmp_path):
    """20 first deploys of a minimal service, each asked for once through nginx, with its host
    name, right after `apply` returns: a 200 from that environment's own process every time (no
    404 from a reload still under way, no answer from another environment's server block)."""
    cluster = world["cluster"]
    envs = [new_env(world) for _ in range(20)]
    answers = []
    try:
        for trial, env in enumerate(envs):
            apply(world, str(write_spec(tmp_path, env, {"site": minimal_site(world["repo"])}, f"trial-{trial}.yml")))
            status, body = http_get(world["nginx"].port, "/whoami", host=f"{env}.shop.test")
            answers.append((status, f"/auto-shop-{env}-site/releases/" in body.decode()))
    finally:
        destroyed = [cluster.deployctl("destroy", f"shop/{env}", timeout=300).returncode for env in envs]
    assert answers == [(200, True)] * 20, answers
    assert destroyed == [0] * 20
    assert not [env for env in envs if (world["nginx"].conf_dir / f"auto-shop-{env}.conf").exists()]


def test_a_switch_nginx_does_not_answer_from_the_new_instance_is_undone(world, tmp_path):
    """A file the deployer did not write claims the environment's host name, and nginx reads it
    first: `nginx -t` only warns and the reload works, but nginx answers the name from that
    block. The switch fails with one line saying so, no route file is left and the new instance
    is stopped; once the name is free, the same apply goes live."""
    import re
    env, cluster, nginx = new_env(world), world["cluster"], world["nginx"]
    spec = write_spec(tmp_path, env, {"site": minimal_site(world["repo"])})
    squatter = nginx.conf_dir / "00-hand-written.conf"
    squatter.write_text(f'server {{ listen {nginx.port}; server_name {env}.shop.test; return 200 "not yours"; }}\n')
    try:
        result = apply(world, str(spec), ok=False)
    finally:
        squatter.unlink()
    said = result.stderr.decode()
    assert result.returncode == 1, said
    assert re.search(rf"^error: site: route failed: nginx on computing-1 still answers / of {env}\.shop\.test from "
                     r"an older file or another server block \(HTTP 200\), not from the new instance "
                     r"127\.0\.0\.1:\d+; the previous configuration is back$", said, re.M), said
    assert not (nginx.conf_dir / f"auto-shop-{env}.conf").exists()
    ledger = json.loads(cluster.deployctl("ledger", f"shop/{env}", "site", "--json").stdout)["site"]
    assert [(i["number"], i["status"]) for i in ledger["instances"] if i["component"] == "code"] == [(1, "failed")]
    assert not [p for p in cluster.agents["computing-1"].services() if f"-{env}-" in p["name"] and p.get("alive")]

    apply(world, str(spec))
    status, body = through_nginx(world, env, "/whoami")
    assert status == 200 and f"/auto-shop-{env}-site/releases/2" in body.decode(), body
    assert cluster.deployctl("destroy", f"shop/{env}", timeout=300).returncode == 0


def test_each_environment_runs_as_its_own_user_and_cannot_read_another(world, tmp_path):
    import os
    import pwd

    import psutil

    from controller.environments import naming
    first, second, repo, cluster = new_env(world), new_env(world), world["repo"], world["cluster"]
    worker = {"source": str(repo), "ref": "main", "root": "worker", "install": INSTALL, "start": "node worker.js",
              "uses": ["redis"], "healthy_after": 1}
    apply(world, str(write_spec(tmp_path, first, {"web": web_service(repo)}, "first.yml")))
    apply(world, str(write_spec(tmp_path, second, {"web": web_service(repo), "worker": worker}, "second.yml")))
    root = cluster.agents["computing-1"].services_root
    users = {env: naming.unix_user("shop", env) for env in (first, second)}
    uids = {env: pwd.getpwnam(user).pw_uid for env, user in users.items()}

    def env_file(env: str):
        return root / f"auto-shop-{env}-web" / "current" / ".env"

    def cat_as(user: str, path) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", user, "--", "cat", str(path)], capture_output=True, text=True)

    for env, other in ((first, second), (second, first)):
        info = env_file(env).stat()
        assert (info.st_uid, oct(info.st_mode & 0o777)) == (uids[env], "0o600")
        own = cat_as(users[env], env_file(env))
        assert own.returncode == 0 and "DATABASE_URL=" in own.stdout, own.stderr
        denied = cat_as(users[other], env_file(env))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
        assert denied.stdout == ""
    for env in (first, second):
        for entry in json.loads(cluster.deployctl("status", f"shop/{env}", "--json").stdout):
            assert entry["process"] == "running", entry
            process = psutil.Process(entry["pid"])
            for p in (process, *process.children(recursive=True)):
                assert p.uids().real == p.uids().effective == uids[env], (entry["service"], p.cmdline())
    # npm kept its cache in the service's own home, not in a shared one
    assert (root / f"auto-shop-{second}-web" / ".home" / ".npm").is_dir()

    os.chown(env_file(first), 0, 0)                          # verify notices, repair puts it right
    key = f"shop/{first}"
    found = cluster.deployctl("verify", key, timeout=120)
    assert found.returncode == 2 and f".env belongs to root, not {users[first]}" in found.stdout.decode()
    repaired = cluster.deployctl("repair", key, timeout=300)
    assert repaired.returncode == 0, repaired.stdout.decode() + repaired.stderr.decode()
    assert cluster.deployctl("verify", key, timeout=120).returncode == 0
    assert env_file(first).stat().st_uid == uids[first] and through_nginx(world, first)[0] == 200

    subprocess.run(["userdel", "--force", users[first]], check=True)    # the user vanishes: made again
    found = cluster.deployctl("verify", key, timeout=120)
    assert found.returncode == 2 and f"Unix user {users[first]} is missing" in found.stdout.decode()
    repaired = cluster.deployctl("repair", key, timeout=300)
    assert repaired.returncode == 0, repaired.stdout.decode() + repaired.stderr.decode()
    assert cluster.deployctl("verify", key, timeout=120).returncode == 0
    uids[first] = pwd.getpwnam(users[first]).pw_uid
    entry = json.loads(cluster.deployctl("status", key, "--json").stdout)[0]
    assert psutil.Process(entry["pid"]).uids().real == uids[first]
    assert env_file(first).stat().st_uid == uids[first] and through_nginx(world, first)[0] == 200

    destroyed = cluster.deployctl("destroy", f"shop/{second}", timeout=300)   # the user goes with the rest
    assert destroyed.returncode == 0, destroyed.stderr
    assert subprocess.run(["id", "-u", users[second]], capture_output=True).returncode != 0
    assert subprocess.run(["getent", "group", users[second]], capture_output=True).returncode != 0
    assert pwd.getpwnam(users[first]).pw_uid == uids[first]
