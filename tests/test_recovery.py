"""The controller killed (kill -9) mid-deploy and restarted: each deploy ends with a recorded
outcome, the ledger says what nginx really routes to, and no step runs twice. Also killed
mid-destroy, and with its router lost; and the router's agent killed mid-switch.

One cluster for every case: real controller, agent, MariaDB, Redis, nginx, git and Node.js; one
environment for the five kill points, one of its own for each other case. The moment to kill is
found from the job's events or from a marker file that a spec command (or the router's
`nginx -t` or reload) writes, never from a sleep.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from controller.environments import commands as ops
from controller.environments.recovery import _where, routed_to
from tests.deploy_harness import (LOCAL_DATA, Nginx, example_repo, http_get, mysql, new_commit, purge, service_users_base,
                                  unique_env)
from tests.harness import Cluster, wait_for
from tests.load import Load

INSTALL = "npm ci --omit=dev --no-audit --no-fund --prefer-offline"


# ---------------------------------------------------------------- pure parts

def test_routed_to_reads_what_the_deployer_writes():
    conf = ops.nginx_config("shop/prod", "shop.test", "80", [("/", "127.0.0.1", 20001),
                                                            ("/api", "10.0.0.2", 20002)]).decode()
    assert routed_to(conf, "/") == [("127.0.0.1", 20001)]
    assert routed_to(conf, "/api") == [("10.0.0.2", 20002)]
    assert routed_to(conf, "/admin") == []
    assert routed_to("<missing>\n", "/") == []
    replicated = ops.nginx_config("shop/prod", "shop.test", "80", [("/", "10.0.0.2", 20001), ("/", "10.0.0.3", 20002),
                                                                  ("/api", "10.0.0.2", 20003)]).decode()
    assert routed_to(replicated, "/") == [("10.0.0.2", 20001), ("10.0.0.3", 20002)]
    assert routed_to(replicated, "/api") == [("10.0.0.2", 20003)]


def test_where_a_job_was(tmp_path):
    events = [{"event": "deploy.started", "service": "web", "deploy": 3},
              {"event": "step.started", "service": "web", "step": "checkout", "op": "a"},
              {"event": "step.finished", "service": "web", "step": "checkout", "op": "a"},
              {"event": "step.started", "service": "web", "step": "install", "op": "b"}]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert _where(tmp_path) == "during step install of service web (deploy 3)"
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events[:3]))
    assert _where(tmp_path) == "after step checkout of service web (deploy 3)"
    assert _where(tmp_path / "nothing") == ""


def test_interrupt_says_where_each_job_was_and_frees_its_lock(tmp_path):
    from controller.state.db import Database
    from controller.state.jobs import EnvLock, Job
    from controller.state.ledger import Ledger
    from controller.environments.recovery import interrupt
    from controller.state.jobs import JobTable
    db = Database(tmp_path / "deployer.db")
    cut = Job(tmp_path, db, "job-cut", "shop/prod", "apply")
    EnvLock(tmp_path, "shop/prod").acquire("job-cut", "apply")
    cut.event("deploy.started", service="web", deploy=2)
    cut.event("step.started", service="web", step="install", op="op-1")
    Ledger(db).start_deploy("shop/prod", "web", "job-cut", code=2, code_new=True, mysql=None, mysql_new=False,
                            redis=None, redis_new=False, commit="c0ffee", host="computing-1")
    done = Job(tmp_path, db, "job-done", "shop/dev", "verify")   # finished, but the database had not heard
    EnvLock(tmp_path, "shop/dev").acquire("job-done", "verify")
    done.event("job.finished", state="succeeded", summary="no drift")

    assert interrupt(tmp_path, JobTable(db)) == ["shop/prod"]
    rows = {r["id"]: dict(r) for r in db.conn.execute("SELECT * FROM jobs")}
    assert rows["job-cut"]["state"] == "interrupted"
    assert rows["job-cut"]["summary"] == "the controller restarted during step install of service web (deploy 2)"
    assert (rows["job-done"]["state"], rows["job-done"]["summary"]) == ("succeeded", "no drift")
    deploy = db.conn.execute("SELECT outcome, reason FROM deploys").fetchone()
    assert deploy["outcome"] == "interrupted" and deploy["reason"].endswith("not settled yet")
    last = json.loads((tmp_path / "jobs" / "job-cut" / "events.jsonl").read_text().splitlines()[-1])
    assert (last["event"], last["state"]) == ("job.finished", "interrupted")
    assert json.loads((tmp_path / "jobs" / "job-cut" / "job.json").read_text())["state"] == "interrupted"
    assert EnvLock(tmp_path, "shop/prod").owner() is None and EnvLock(tmp_path, "shop/dev").owner() is None
    assert JobTable(db).pending("shop/prod") == ["job-cut"] and JobTable(db).pending("shop/dev") == []
    assert interrupt(tmp_path, JobTable(db)) == ["shop/prod"]          # a second start: still to settle, nothing rewritten
    assert len((tmp_path / "jobs" / "job-cut" / "events.jsonl").read_text().splitlines()) == 3


# ---------------------------------------------------------------- a cluster killed at five points

@pytest.fixture(scope="module")
def world():
    import contextlib
    # Each clean-up is registered once there is something to clean, and runs whatever failed before.
    with contextlib.ExitStack() as cleanup:
        base = service_users_base("deployer-recovery-")
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        env = unique_env()
        cleanup.callback(purge, "shop", env)
        flags = base / "flags"  # commands run as the environment's user: it reads flags and leaves marks here
        flags.mkdir()
        os.chmod(flags, 0o777)
        (base / "installs").touch()
        os.chmod(base / "installs", 0o666)
        nginx = Nginx(base)
        cleanup.callback(nginx.stop)
        nginx.start()
        cluster = Cluster(base)
        cleanup.callback(cluster.close)
        cluster.controller.start()
        settings = nginx.settings()
        # With the flag, the switch stops for 4 s between swapping the file in and reloading nginx.
        # With `fail-switch`, it then fails too, and the switch script puts the previous file back.
        settings["nginx.test"] = (f"if [ -f {flags}/slow-switch ]; then touch {flags}/switching; sleep 4; fi; "
                                  f"if [ -f {flags}/fail-switch ]; then touch {flags}/switching; sleep 4; exit 1; fi; "
                                  + settings["nginx.test"])
        # With `slow-reload`, a reload (as a destroy's last step does) stops for 4 s first.
        settings["nginx.reload"] = (f"if [ -f {flags}/slow-reload ]; then touch {flags}/reloading; sleep 4; fi; "
                                    + settings["nginx.reload"])
        cluster.add_agent("computing-1", ["computing"], provides={**settings, **LOCAL_DATA})
        cluster.wait_connected("computing-1")
        yield {"base": base, "flags": flags, "nginx": nginx, "cluster": cluster, "repo": example_repo(base),
               "env": env}


def spec_file(world, env: str | None = None) -> Path:
    flags, installs, env = world["flags"], world["base"] / "installs", env or world["env"]
    web = {"path": "/", "source": str(world["repo"]), "ref": "main", "root": "web",
           # Every install appends its release folder: a step run twice shows as a line seen twice.
           "install": f'echo "$PWD" >> {installs}; '
                      f"if [ -f {flags}/slow-install ]; then touch {flags}/installing; sleep 4; fi; {INSTALL}",
           "build": "npm run build", "migrate": "node migrate.js",
           "start": f"sh -c 'if [ -f {flags}/slow-start ]; then touch {flags}/starting; sleep 4; fi; "
                    "exec node server.js'",
           "health": "/health", "uses": ["mysql", "redis"],
           "drain": "3s"}   # a connection held to the old instance keeps a drain going this long
    path = world["base"] / f"environment-{env}.yml"
    path.write_text(yaml.safe_dump({"app": "shop", "environment": env, "domain": f"{env}.shop.test",
                                    "services": {"web": web}}, sort_keys=False))
    return path


def jobs(world) -> list[dict]:
    result = world["cluster"].deployctl("jobs", "--env", f"shop/{world['env']}", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ledger(world) -> dict:
    result = world["cluster"].deployctl("ledger", f"shop/{world['env']}", "web", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["web"]


def events(world, job_id: str) -> list[dict]:
    path = world["cluster"].controller.store / "jobs" / job_id / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def kill_during(world, *args: str, when) -> tuple[str, dict]:
    """Apply, kill -9 the controller once `when(job_id)` holds, start it again, and wait for the
    recovery job it starts; (the killed job's id, the recovery job)."""
    cluster = world["cluster"]
    started = cluster.deployctl("apply", str(spec_file(world)), *args, "--detach", timeout=120)
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.decode().strip()
    def moment() -> bool:
        if when(job_id):
            return True
        ended = [e for e in events(world, job_id) if e["event"] in ("job.finished", "step.failed")]
        if ended:  # it will never come: say why rather than wait
            raise AssertionError(f"{job_id} ended before the moment to kill it: {ended}")
        return False
    wait_for(moment, 180, every=0.02, what=f"the moment to kill {job_id}")
    cluster.controller.kill9()
    for flag in world["flags"].iterdir():
        flag.unlink()
    cluster.controller.start()
    killed_at = next(j["created"] for j in jobs(world) if j["id"] == job_id)

    def recovered():
        mine = [j for j in jobs(world) if j["kind"] == "recover" and j["created"] > killed_at]
        return mine[-1] if mine and mine[-1]["state"] != "running" else None
    recovery = wait_for(recovered, 180, every=0.3, what="the recovery job finished")
    cluster.wait_connected("computing-1")
    return job_id, recovery


def step_started(world, step: str):
    return lambda job_id: any(e["event"] == "step.started" and e.get("step") == step for e in events(world, job_id))


def assert_settled(world, killed: str, recovery: dict, during: str, live_code: int) -> dict:
    """The killed job is interrupted, saying where; the recovery job succeeded; the ledger has no
    deploy without an outcome and no instance building; nginx, the ledger and the processes agree;
    no install ran twice."""
    cluster, env = world["cluster"], world["env"]
    assert recovery["state"] == "succeeded", recovery
    row = next(j for j in jobs(world) if j["id"] == killed)
    assert row["state"] == "interrupted"
    during = (during,) if isinstance(during, str) else during
    assert row["summary"].startswith(tuple(f"the controller restarted {d}" for d in during)), row["summary"]
    assert row["summary"].endswith(f"settled by {recovery['id']}"), row["summary"]
    shown = cluster.deployctl("job", "show", killed).stdout.decode()
    assert "state       interrupted" in shown and any(f"restarted {d}" in shown for d in during), shown
    assert events(world, killed)[-1]["event"] == "job.finished"
    assert events(world, killed)[-1]["state"] == "interrupted"
    assert cluster.deployctl("jobs").returncode == 0

    data = ledger(world)
    assert {d["outcome"] for d in data["deploys"]} <= {"succeeded", "failed"}, data["deploys"]
    assert not [i for i in data["instances"] if i["status"] == "building"], data["instances"]
    live = [i for i in data["instances"] if i["component"] == "code" and i["status"] == "live"]
    assert [i["number"] for i in live] == [live_code]
    port = live[0]["port"]
    conf = (world["nginx"].conf_dir / f"auto-shop-{env}.conf").read_text()
    assert routed_to(conf, "/") == [("127.0.0.1", port)]
    status, body = http_get(world["nginx"].port, "/", host=f"{env}.shop.test")
    assert status == 200 and json.loads(body)["release"] == str(live_code), body

    # Only the live process runs; only the live instance holds a port.
    unit = f"auto-shop-{env}-web"
    states = cluster.agents["computing-1"].services(unit)
    assert [s["instance"] for s in states if s["name"] == unit] == [live[0]["names"]["process"]]
    db = sqlite3.connect(cluster.controller.store / "deployer.db")
    assert [r[0] for r in db.execute("SELECT port FROM ports WHERE env_key=?", (f"shop/{env}",))] == [port]
    db.close()

    installs = (world["base"] / "installs").read_text().splitlines()
    assert len(installs) == len(set(installs)), collections.Counter(installs).most_common(2)
    return data


@pytest.mark.slow
@pytest.mark.drivers
@pytest.mark.timeout(1500)  # seven real deploys with npm; the limit is a safety net, not a measure
def test_controller_killed_mid_deploy_settles_every_deploy(world):
    cluster, env, repo = world["cluster"], world["env"], world["repo"]
    flags = world["flags"]
    first = cluster.deployctl("apply", str(spec_file(world)), timeout=600)      # deploy 1: code 1, mysql 1, redis 1
    assert first.returncode == 0, first.stdout.decode() + first.stderr.decode()

    # 1. During install, of a deploy that also makes a new database: the install runs on (once),
    # then the deploy is undone and the database it made, never live, is dropped.
    new_commit(repo, "v2")
    (flags / "slow-install").touch()
    options = world["base"] / "deploy-options.yml"
    options.write_text("renew: [mysql]\n")
    killed, recovery = kill_during(world, "--options", str(options), when=lambda _: (flags / "installing").exists())
    data = assert_settled(world, killed, recovery, "during step install of service web (deploy 2)", live_code=1)
    assert data["deploys"][-1]["outcome"] == "failed"
    assert "interrupted during install by a controller restart" in data["deploys"][-1]["reason"]
    statuses = {(i["component"], i["number"]): i["status"] for i in data["instances"]}
    assert statuses[("code", 2)] == "failed" and statuses[("mysql", 2)] == "failed"
    assert statuses[("mysql", 1)] == "live"
    assert mysql(f"SHOW DATABASES LIKE 'auto-shop-{env}-web-2'").strip() == ""
    assert mysql(f"SHOW DATABASES LIKE 'auto-shop-{env}-web-1'").strip() == f"auto-shop-{env}-web-1"
    # The install was re-attached, not re-sent: same operation id, recognised by the agent's journal.
    install = next(e["op"] for e in events(world, killed) if e["event"] == "step.started" and e["step"] == "install")
    assert any(e["event"] == "step.finished" and e["op"] == install and e["of_job"] == killed and e["ok"]
               for e in events(world, recovery["id"]))
    assert install in {e["op_id"] for e in cluster.controller.events("op.duplicate")}
    release = cluster.agents["computing-1"].services_root / f"auto-shop-{env}-web" / "releases"
    assert (world["base"] / "installs").read_text().count(f"{release}/2/web\n") == 1

    # 2. Right after the new instance started, before the switch: it is stopped, the old one serves.
    new_commit(repo, "v3")
    (flags / "slow-start").touch()
    killed, recovery = kill_during(world, when=lambda _: (flags / "starting").exists())
    # The start command itself waits, so the kill finds the deploy starting or health checking.
    data = assert_settled(world, killed, recovery, ("during step start of service web (deploy 3)",
                                                    "during step health of service web (deploy 3)"), live_code=1)
    assert data["deploys"][-1]["outcome"] == "failed"
    assert {(i["number"], i["status"]) for i in data["instances"] if i["component"] == "code"} >= {(3, "failed")}

    # 3. In the middle of a switch that then fails (`nginx -t` refuses): the router's file is the
    # previous one again, so the deploy is undone and the old instance keeps serving.
    new_commit(repo, "v4")
    (flags / "fail-switch").touch()
    killed, recovery = kill_during(world, when=lambda _: (flags / "switching").exists())
    data = assert_settled(world, killed, recovery, "during step route of service web (deploy 4)", live_code=1)
    assert data["deploys"][-1]["outcome"] == "failed"
    assert any(e["event"] == "route.read" and e["new"] not in (e["routed_to"] or []) for e in events(world, recovery["id"]))

    # 4. In the middle of the switch (nginx has the new file, the ledger does not know yet): the
    # router's file says the new instance serves, so it goes live and the old one is retired.
    # Requests keep being answered throughout, by the old release and then the new one.
    new_commit(repo, "v5")
    (flags / "slow-switch").touch()
    with Load(world["nginx"].port, f"{env}.shop.test", min_requests=500,
              served_from=f"/auto-shop-{env}-web/") as load:
        load.wait_for(100)
        killed, recovery = kill_during(world, when=lambda _: (flags / "switching").exists())
        load.wait_for(100)
    assert load.tally.failed == [] and load.tally.releases == {"1", "5"}, str(load.tally)
    data = assert_settled(world, killed, recovery, "during step route of service web (deploy 5)", live_code=5)
    assert data["deploys"][-1]["outcome"] == "succeeded"
    assert any(e["event"] == "route.read" and e["routed_to"] == [e["new"]] for e in events(world, recovery["id"]))

    # 5. Right after the switch, while the previous process drains (a connection to it is held
    # open, so the drain waits for it): the deploy stands, and what it had left to do (stop the
    # previous process, free its port, `current`) is done.
    new_commit(repo, "v6")
    old_port = next(i["port"] for i in ledger(world)["instances"] if i["component"] == "code" and i["status"] == "live")
    held = socket.create_connection(("127.0.0.1", old_port))
    try:
        with Load(world["nginx"].port, f"{env}.shop.test", min_requests=500,
                  served_from=f"/auto-shop-{env}-web/") as load:
            load.wait_for(100)
            killed, recovery = kill_during(world, when=step_started(world, "drain"))
            load.wait_for(100)
    finally:
        held.close()
    assert load.tally.failed == [] and load.tally.releases == {"5", "6"}, str(load.tally)
    data = assert_settled(world, killed, recovery, "during step drain of service web (deploy 6)", live_code=6)
    # The recovery drained the previous instance (the held connection kept it waiting) before it
    # stopped it: the crash cut the drain short, not the requests.
    steps = [e["step"] for e in events(world, recovery["id"]) if e["event"] == "step.finished"
             and e.get("service") == "web" and "of_job" not in e]   # its own steps, not the ones it waited for
    assert "drain" in steps and "stop" in steps and steps.index("drain") < steps.index("stop"), steps
    assert data["deploys"][-1]["outcome"] == "succeeded"
    current = cluster.agents["computing-1"].services_root / f"auto-shop-{env}-web" / "current"
    assert current.resolve().name == "6"

    diagram = cluster.deployctl("ledger", f"shop/{env}", "web").stdout.decode().splitlines()
    assert [line.split()[:4] for line in diagram[1:]] == [
        ["1", "(1)", "(1)", "(1)"], ["2", "(2)", "(2)", "|"], ["3", "(3)", "|", "|"], ["4", "(4)", "|", "|"],
        ["5", "(5)", "|", "|"], ["6", "(6)", "|", "|"]]
    assert [line.split()[4] for line in diagram[2:5]] == ["failed:"] * 3

    # Afterwards the environment takes orders as usual, and verify finds nothing.
    new_commit(repo, "v7")
    again = cluster.deployctl("apply", str(spec_file(world)), timeout=600)
    assert again.returncode == 0, again.stdout.decode() + again.stderr.decode()
    verify = cluster.deployctl("verify", f"shop/{env}", timeout=120)
    assert verify.returncode == 0, verify.stdout.decode() + verify.stderr.decode()
    assert ledger(world)["deploys"][-1]["outcome"] == "succeeded"
    installs = (world["base"] / "installs").read_text().splitlines()
    assert sorted(Path(p).parent.name for p in installs) == ["1", "2", "3", "4", "5", "6", "7"]


@pytest.mark.slow
@pytest.mark.drivers
def test_controller_killed_mid_destroy_then_destroyed_again_leaves_nothing(world):
    """A destroy cut short by the controller's death ends `interrupted`, saying where; the
    environment still takes orders, and destroying it again removes everything."""
    cluster, flags, env = world["cluster"], world["flags"], unique_env()
    key = f"shop/{env}"
    try:
        made = cluster.deployctl("apply", str(spec_file(world, env)), timeout=600)
        assert made.returncode == 0, made.stdout.decode() + made.stderr.decode()
        folder = cluster.agents["computing-1"].services_root / f"auto-shop-{env}-web"
        conf = world["nginx"].conf_dir / f"auto-shop-{env}.conf"
        assert folder.exists() and conf.exists()

        (flags / "slow-reload").touch()
        cli = cluster.deployctl_bg("destroy", key, "--purge-data", "--yes")
        wait_for((flags / "reloading").exists, 120, every=0.05, what="the destroy at its last step")
        cluster.controller.kill9()
        for flag in flags.iterdir():
            flag.unlink()
        cli.kill()
        cli.communicate()
        cluster.controller.start()
        cluster.wait_connected("computing-1")

        def settled():
            mine = json.loads(cluster.deployctl("jobs", "--env", key, "--json").stdout)
            return mine if any(j["kind"] == "recover" and j["state"] != "running" for j in mine) else None
        mine = {j["kind"]: j for j in wait_for(settled, 180, every=0.3, what="the recovery job finished")}
        assert mine["recover"]["state"] == "succeeded", mine["recover"]
        assert mine["destroy"]["state"] == "interrupted"
        assert mine["destroy"]["summary"].startswith(f"the controller restarted during step remove route of {key}")
        assert not folder.exists()                 # what the destroy had done stays done

        again = cluster.deployctl("destroy", key, "--purge-data", "--yes", timeout=300)
        assert again.returncode == 0, again.stdout.decode() + again.stderr.decode()
        assert not folder.exists() and not conf.exists()
        assert subprocess.run(["id", "-u", f"auto-shop-{env}"], capture_output=True).returncode != 0
        assert mysql(f"SHOW DATABASES LIKE 'auto-shop-{env}-%'").strip() == ""
        units = [s["name"] for s in cluster.agents["computing-1"].services()]
        assert f"auto-shop-{env}-web" not in units
        data = json.loads(cluster.deployctl("ledger", key, "web", "--json").stdout)["web"]
        assert {i["status"] for i in data["instances"]} == {"removed"}, data["instances"]
        db = sqlite3.connect(cluster.controller.store / "deployer.db")
        assert db.execute("SELECT COUNT(*) FROM ports WHERE env_key=?", (key,)).fetchone()[0] == 0
        db.close()
    finally:
        purge("shop", env)


@pytest.mark.slow
@pytest.mark.drivers
def test_a_switch_whose_router_is_lost_stays_unsettled_until_the_router_returns(world):
    """Killed mid-switch, and the router's agent gone too: recovery cannot tell where nginx
    routes, so it does not guess; the deploy stays interrupted and every order is refused,
    naming the recovery job, until the router is back and a recovery settles it."""
    cluster, flags, env = world["cluster"], world["flags"], unique_env()
    key, agent = f"shop/{env}", cluster.agents["computing-1"]
    spec = spec_file(world, env)

    def recoveries() -> list[dict]:
        mine = json.loads(cluster.deployctl("jobs", "--env", key, "--json").stdout)
        return sorted((j for j in mine if j["kind"] == "recover"), key=lambda j: j["created"])

    def settled_recovery(count: int) -> dict | None:
        mine = recoveries()
        return mine[-1] if len(mine) >= count and mine[-1]["state"] != "running" else None

    try:
        made = cluster.deployctl("apply", str(spec), timeout=600)
        assert made.returncode == 0, made.stdout.decode() + made.stderr.decode()
        new_commit(world["repo"], f"lost-router-{env}")
        (flags / "slow-switch").touch()
        started = cluster.deployctl("apply", str(spec), "--detach", timeout=120)
        assert started.returncode == 0, started.stderr
        wait_for((flags / "switching").exists, 180, every=0.02, what="the switch under way")
        cluster.controller.kill9()
        agent.kill9()
        for flag in flags.iterdir():
            flag.unlink()
        cluster.controller.lost_after = 3.0
        cluster.controller.start()

        first = wait_for(lambda: settled_recovery(1), 120, every=0.3, what="a recovery without its router")
        assert first["state"] == "failed", first
        assert "no router could say where nginx routes" in first["summary"], first["summary"]
        deploys = json.loads(cluster.deployctl("ledger", key, "web", "--json").stdout)["web"]["deploys"]
        assert deploys[-1]["outcome"] == "interrupted"
        refused = cluster.deployctl("apply", str(spec), timeout=120)
        assert refused.returncode != 0 and b"first settles what an interrupted job left in flight" in refused.stderr
        assert refused.stderr.strip().count(b"\n") == 0, refused.stderr

        second = wait_for(lambda: settled_recovery(2), 120, every=0.3, what="the recovery the refused order started")
        assert second["state"] == "failed", second
        agent.start()                                            # the router is back
        cluster.wait_connected("computing-1")
        again = cluster.deployctl("apply", str(spec), timeout=120)   # starts the recovery that can settle it
        assert again.returncode != 0 and b"first settles" in again.stderr
        last = wait_for(lambda: settled_recovery(3), 180, every=0.3, what="a recovery with its router")
        assert last["state"] == "succeeded", cluster.deployctl("job", "show", last["id"]).stdout.decode()
        data = json.loads(cluster.deployctl("ledger", key, "web", "--json").stdout)["web"]
        # The file had been swapped in when everything died: the switch counts as done.
        assert [d["outcome"] for d in data["deploys"]] == ["succeeded", "succeeded"], data["deploys"]
        live = [i for i in data["instances"] if i["component"] == "code" and i["status"] == "live"]
        assert [i["number"] for i in live] == [2]
        conf = (world["nginx"].conf_dir / f"auto-shop-{env}.conf").read_text()
        assert routed_to(conf, "/") == [("127.0.0.1", live[0]["port"])]
        status, body = http_get(world["nginx"].port, "/", host=f"{env}.shop.test")
        # The switch's script died with its agent between swapping the file and reloading: the
        # file said the new instance, nginx still ran the old one (now stopped). Recovery reloads.
        assert status == 200 and json.loads(body)["release"] == str(live[0]["number"]), body
        done = cluster.deployctl("apply", str(spec), timeout=600)      # and it takes orders again
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    finally:
        cluster.controller.lost_after = 60.0
        if agent.proc.poll() is not None:
            agent.start()
        # Once no recovery holds the environment (a refused order starts one): destroy it.
        try:
            wait_for(lambda: cluster.deployctl("destroy", key, "--purge-data", "--yes", timeout=300).returncode == 0,
                     180, every=1, what=f"{key} destroyed")
        finally:
            purge("shop", env)


@pytest.mark.slow
@pytest.mark.drivers
def test_a_router_killed_mid_switch_leaves_the_previous_route_in_place(world):
    """The router's agent dies between the switch swapping the file in and reloading nginx: the
    deploy fails, and the file names the instance that still serves, so that the next reload
    of nginx (any environment's) does not route to the stopped new one."""
    cluster, flags, env = world["cluster"], world["flags"], unique_env()
    key, agent = f"shop/{env}", cluster.agents["computing-1"]
    spec = spec_file(world, env)
    try:
        made = cluster.deployctl("apply", str(spec), timeout=600)
        assert made.returncode == 0, made.stdout.decode() + made.stderr.decode()
        new_commit(world["repo"], f"killed-router-{env}")
        # First nginx says no: the switch script puts the previous file back itself, and the
        # controller leaves it at that (one staged write, one switch; nothing written after).
        (flags / "fail-switch").touch()
        refused = cluster.deployctl("apply", str(spec), timeout=600)
        (flags / "fail-switch").unlink()
        (flags / "switching").unlink()
        assert refused.returncode == 1 and b"nginx rejected the new configuration" in refused.stderr, refused.stderr
        job = next(j for j in json.loads(cluster.deployctl("jobs", "--env", key, "--json").stdout)
                   if j["kind"] == "apply" and j["state"] == "failed")
        assert [e["step"] for e in events(world, job["id"]) if e["event"] == "step.started"].count("route") == 2
        (flags / "slow-switch").touch()
        cli = cluster.deployctl_bg("apply", str(spec))
        wait_for((flags / "switching").exists, 180, every=0.02, what="the switch under way")
        agent.kill9()
        for flag in flags.iterdir():
            flag.unlink()
        agent.start()
        out, err = cli.communicate(timeout=300)
        assert cli.returncode == 1, out.decode() + err.decode()
        assert b"web: route failed" in err, err

        data = json.loads(cluster.deployctl("ledger", key, "web", "--json").stdout)["web"]
        assert [d["outcome"] for d in data["deploys"]] == ["succeeded", "failed", "failed"]
        live = [i for i in data["instances"] if i["component"] == "code" and i["status"] == "live"]
        assert [i["number"] for i in live] == [1]
        conf = (world["nginx"].conf_dir / f"auto-shop-{env}.conf").read_text()
        assert routed_to(conf, "/") == [("127.0.0.1", live[0]["port"])]
        subprocess.run(world["nginx"].settings()["nginx.reload"].split(), check=True)   # anyone's reload
        status, body = http_get(world["nginx"].port, "/", host=f"{env}.shop.test")
        assert status == 200 and json.loads(body)["release"] == "1", body
        verify = cluster.deployctl("verify", key, timeout=120)
        assert verify.returncode == 0, verify.stdout.decode() + verify.stderr.decode()
    finally:
        if agent.proc.poll() is not None:
            agent.start()
        cluster.wait_connected("computing-1")
        try:
            wait_for(lambda: cluster.deployctl("destroy", key, "--purge-data", "--yes", timeout=300).returncode == 0,
                     180, every=1, what=f"{key} destroyed")
        finally:
            purge("shop", env)
