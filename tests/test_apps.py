"""Apps nobody here wrote the way the deployer would like: their libraries come from the
registries at deploy time, and they read their settings the way their frameworks want.

So far: a Python service on SQLAlchemy and PyMySQL, whose ORM needs its own URL scheme (built in
the spec from the generated values), keeps its data across deploys and switches under traffic
with no failed request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy_harness import deploy_world, git, http_get, unique_env
from tests.load import Load

APPS = Path(__file__).resolve().parent / "apps"


@pytest.fixture(scope="module")
def world():
    with deploy_world("deployer-apps-", "notes") as made:
        yield made


def app_repo(base: Path, name: str) -> Path:
    repo = base / f"{name}-repo"
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
                "health": "/health", "uses": ["mysql"],
                "env": {"SQLALCHEMY_DATABASE_URI":
                        "mysql+pymysql://${DB_USER}:${DB_PASSWORD}@${DB_HOST}:${DB_PORT}/${DB_NAME}"}}}},
        sort_keys=False))
    first = cluster.deployctl("apply", str(spec), timeout=900)
    assert first.returncode == 0, first.stdout.decode() + first.stderr.decode()
    host = f"{env}.notes.test"
    added = http_post(nginx.port, "/notes?text=kept+across+deploys", host)
    assert added == 201
    assert json.loads(http_get(nginx.port, "/notes", host)[1])["notes"] == ["kept across deploys"]

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
