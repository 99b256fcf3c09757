"""Snapshots before migrations: a migrate that drops a table and then fails has already changed
the live database; the snapshot taken just before it brings the table and its rows back, into a
new MySQL instance every service using the old one is switched to."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from common import envfile
from tests.deploy_harness import deploy_world, git, mysql, new_repo, unique_env

pytestmark = pytest.mark.timeout(900)

MIGRATE_V1 = """set -e
export MYSQL_PWD="$DB_PASSWORD"
q() { mariadb --protocol=tcp -h "$DB_HOST" -P "$DB_PORT" -u "$DB_USER" "$DB_NAME" -e "$1"; }
q "CREATE TABLE IF NOT EXISTS items (id INT PRIMARY KEY, label VARCHAR(64), price DECIMAL(8,2))"
i=1; values=""
while [ $i -le 200 ]; do values="$values${values:+,}($i, 'row-marker-$i', $i.25)"; i=$((i + 1)); done
q "INSERT IGNORE INTO items VALUES $values"
"""
MIGRATE_V2 = """set -e
export MYSQL_PWD="$DB_PASSWORD"
mariadb --protocol=tcp -h "$DB_HOST" -P "$DB_PORT" -u "$DB_USER" "$DB_NAME" -e "DROP TABLE items"
echo "migration 2 failed half-way" >&2
exit 1
"""


@pytest.fixture(scope="module")
def world():
    with deploy_world("deployer-backups-", "bak") as made:
        yield made


def checksum(database: str) -> str:
    return mysql(f"CHECKSUM TABLE `{database}`.items").split()[-1]


def test_a_failed_migrate_is_undone_by_restoring_the_snapshot_taken_before_it(world):
    cluster, base = world["cluster"], world["base"]
    env = unique_env()
    world["envs"].append(env)
    repo = new_repo(base / f"{env}-repo", {"migrate.sh": MIGRATE_V1, "index.html": "ok\n"})
    spec = base / f"{env}.yml"
    spec.write_text(yaml.safe_dump({"app": "bak", "environment": env, "domain": f"{env}.bak.test", "services": {
        "site": {"path": "/", "source": str(repo), "ref": "main", "migrate": "sh migrate.sh", "uses": ["mysql"],
                 "start": "python3 -m http.server $PORT --bind 127.0.0.1", "health": "/index.html"}}},
        sort_keys=False))
    first = cluster.deployctl("apply", str(spec), timeout=300)
    assert first.returncode == 0, first.stdout.decode() + first.stderr.decode()
    live_db = f"auto-bak-{env}-site-1"
    before = checksum(live_db)
    assert mysql(f"SELECT COUNT(*) FROM `{live_db}`.items").strip() == "200"

    (repo / "migrate.sh").write_text(MIGRATE_V2)
    git(repo, "commit", "-qam", "v2: a migration that drops a table, then fails")
    failed = cluster.deployctl("apply", str(spec), timeout=300)
    said = failed.stdout.decode() + failed.stderr.decode()
    assert failed.returncode != 0
    offer = re.search(rf"deployctl restore bak/{env}/site --from (\d{{8}}T\d{{6}}Z) puts that back", said)
    assert offer, said
    snapshot = offer.group(1)
    # The harm is real: the live database lost the table before the migrate failed.
    assert mysql(f"SHOW TABLES FROM `{live_db}`").strip() == ""

    listed = json.loads(cluster.deployctl("backups", f"bak/{env}/site", "--json").stdout)
    assert [(b["id"], b["mysql"], b["live"]) for b in listed] == [(snapshot, 1, True)] and listed[0]["bytes"] > 0
    assert snapshot in cluster.deployctl("backups", f"bak/{env}/site").stdout.decode()

    refused = cluster.deployctl("restore", f"bak/{env}/site", "--from", snapshot)  # not confirmed: nothing done
    assert refused.returncode != 0 and b"writes made after the snapshot are not in it" in refused.stderr
    restored = cluster.deployctl("restore", f"bak/{env}/site", "--from", snapshot, "--yes", timeout=300)
    shown = restored.stdout.decode() + restored.stderr.decode()
    assert restored.returncode == 0, shown
    new_db = f"auto-bak-{env}-site-2"
    assert checksum(new_db) == before  # the table and its rows, as they were
    ledger = json.loads(cluster.deployctl("ledger", f"bak/{env}", "site", "--json").stdout)["site"]
    mysqls = {i["number"]: i["status"] for i in ledger["instances"] if i["component"] == "mysql"}
    assert mysqls == {1: "standby", 2: "live"}  # the replaced one is kept
    assert ledger["deploys"][-1]["mysql"] == 2 and ledger["deploys"][-1]["mysql_new"] is True
    dotenv = envfile.parse((cluster.agents["computing-1"].services_root / f"auto-bak-{env}-site/releases/1/.env")
                           .read_text())
    assert dotenv["DB_NAME"] == new_db  # the service now uses the restored instance

    # What the database holds never leaves the data host: not in a job folder, not in any output;
    # nor does a password appear in what was run.
    jobs = cluster.controller.store / "jobs"
    for secret in ("row-marker-17", dotenv["DB_PASSWORD"]):
        found = subprocess.run(["grep", "-rlF", secret, str(jobs)], capture_output=True, text=True).stdout
        assert found == "", (secret, found)
        assert secret not in shown and secret not in said

    # A purge takes the snapshots with the databases.
    folder = f"/var/backups/deployer/auto-bak-{env}-site-1"
    assert subprocess.run(["test", "-d", folder]).returncode == 0
    purged = cluster.deployctl("destroy", f"bak/{env}", "--purge-data", "--yes", timeout=300)
    assert purged.returncode == 0, purged.stdout.decode() + purged.stderr.decode()
    assert subprocess.run(["test", "-e", folder]).returncode == 1
