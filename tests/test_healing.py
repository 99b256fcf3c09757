"""Services that stay up with nobody watching: a live process that ends without an order is
restarted on the controller's decision (the agent only says that it ended), blue/green as a
reload; a process that keeps dying ends in a crash loop and the controller stops trying; a
controller that was down while a service died heals it once the agents are back."""

from __future__ import annotations

import json
import os
import signal
import statistics
import time

import pytest
import yaml

from tests.deploy_harness import deploy_world, example_repo, http_get, unique_env
from tests.harness import wait_for
from tests.load import Load

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def world():
    with deploy_world("deployer-heal-", "heal") as made:
        made["repo"] = example_repo(made["base"])
        yield made


def site(world, env: str, restart: dict | str, flag: str = "") -> str:
    """A minimal web service (python's http.server on the example's web folder); with `flag`, it
    exits at once at every start while that file exists."""
    crash = f"[ -e {flag} ] && exit 3; " if flag else ""
    spec = world["base"] / f"{env}.yml"
    spec.write_text(yaml.safe_dump({"app": "heal", "environment": env, "domain": f"{env}.heal.test", "services": {
        "site": {"path": "/", "source": str(world["repo"]), "ref": "main", "root": "web",
                 "start": f"sh -c '{crash}exec python3 -m http.server $PORT --bind 127.0.0.1'",
                 "health": "/package.json", "restart": restart}}}, sort_keys=False))
    return str(spec)


def new_env(world) -> str:
    env = unique_env()
    world["envs"].append(env)
    return env


def ok(done) -> str:
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    return done.stdout.decode()


def status(world, env: str) -> dict:
    return json.loads(ok(world["cluster"].deployctl("status", f"heal/{env}", "--json")))[0]


def events(world, env: str) -> list[dict]:
    return [json.loads(line) for line in ok(world["cluster"].deployctl("events", f"heal/{env}", "--json")).splitlines()]


def answers(world, env: str) -> bool:
    try:
        return http_get(world["nginx"].port, "/package.json", f"{env}.heal.test", timeout=2)[0] == 200
    except OSError:
        return False


def kill_live(world, env: str) -> int:
    pid = status(world, env)["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.drivers  # with the systemd driver too: the unit's ExecStopPost says the end at once
def test_a_killed_web_process_comes_back_with_no_operator_action(world):
    cluster, env = world["cluster"], new_env(world)
    ok(cluster.deployctl("apply", site(world, env, {"stable_after": "1s"}), timeout=300))
    back: list[float] = []
    with Load(world["nginx"].port, f"{env}.heal.test", path="/package.json", min_requests=2000,
              max_seconds=600) as load:
        load.wait_for(50)
        for _ in range(20):
            killed, start = kill_live(world, env), time.monotonic()
            wait_for(lambda: not answers(world, env) or status(world, env).get("pid") not in (killed, None), 10,
                     every=0.01, what="the killed process to stop answering")
            wait_for(lambda: answers(world, env), 60, every=0.02, what="the site answering again")
            back.append(time.monotonic() - start)
            time.sleep(1.2)  # it stayed up past stable_after: the next end is a fresh one
    print(f"\nback after kill -9 over {len(back)} kills: median {statistics.median(back):.2f}s, "
          f"worst {max(back):.2f}s; {len(load.tally.failed)} of {load.tally.total} requests failed meanwhile "
          "(nginx answers 502 at once while nothing listens)")
    assert load.tally.total >= 2000
    # The site answers once the route is switched; the heal's own event follows when its job ends.
    wait_for(lambda: [e["kind"] for e in events(world, env)].count("restarted") >= 20, 30,
             what="the last heal's event")
    kinds = [e["kind"] for e in events(world, env)]
    assert kinds.count("exited") == 20 and kinds.count("restarted") == 20 and "crash-loop" not in kinds
    exited = next(e for e in events(world, env) if e["kind"] == "exited")
    assert exited["why"] == "killed by signal 9" and exited["service"] == "site"
    now = status(world, env)
    assert now["process"] == "running" and now["restarts"] == 20 and now["last_exit"] == "killed by signal 9"
    # The same code instance throughout: restarts never change the ledger's instance numbers.
    ledger = json.loads(ok(cluster.deployctl("ledger", f"heal/{env}", "site", "--json")))["site"]
    assert {d["code"] for d in ledger["deploys"]} == {1} and len(ledger["deploys"]) == 21


def test_a_process_that_dies_at_every_start_ends_in_a_crash_loop(world):
    cluster, env = world["cluster"], new_env(world)
    flag = world["base"] / f"{env}.crash"
    ok(cluster.deployctl("apply", site(world, env, {"attempts": 3, "stable_after": "2s"}, str(flag)), timeout=300))
    flag.touch()
    time.sleep(2.5)  # up past stable_after: its end is a fresh one, restarted at once
    kill_live(world, env)
    wait_for(lambda: "crash-loop" in [e["kind"] for e in events(world, env)], 120, every=0.5,
             what="the crash loop")
    kinds = [e["kind"] for e in events(world, env)]
    assert kinds.count("restart-failed") == 3 and kinds[-1] == "crash-loop", kinds
    now = status(world, env)
    assert now.get("crash_loop") is True
    shown = cluster.deployctl("status", f"heal/{env}")
    assert shown.returncode == 1 and b"crash loop (deploy it again)" in shown.stdout  # not running: exit 1
    time.sleep(5)  # and it stops ordering restarts
    assert [e["kind"] for e in events(world, env)] == kinds
    # Deployed again once fixed: it serves, and a later end is restarted as usual.
    flag.unlink()
    ok(cluster.deployctl("reload", f"heal/{env}/site", timeout=300))
    assert answers(world, env)
    kill_live(world, env)
    wait_for(lambda: answers(world, env) and status(world, env)["process"] == "running", 60, every=0.1,
             what="the site restarted after the crash loop was left")


@pytest.mark.drivers
def test_a_service_that_died_while_the_controller_was_down_is_healed_once_agents_are_back(world):
    # A hyphen in the name: its units get a hashed name, which a listing by prefix would miss.
    cluster, env = world["cluster"], unique_env() + "-x"
    world["envs"].append(env)
    ok(cluster.deployctl("apply", site(world, env, "always"), timeout=300))
    pid = status(world, env)["pid"]
    cluster.controller.stop()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    assert not answers(world, env)
    cluster.controller.start()
    cluster.wait_connected("computing-1", "daemons-1")
    wait_for(lambda: answers(world, env), 60, every=0.1, what="the site healed after the controller came back")
    wait_for(lambda: "restarted" in [e["kind"] for e in events(world, env)], 30, every=0.2,
             what="the restart in the environment's history")
    assert [e["kind"] for e in events(world, env)][0] == "restarting"  # no exit was heard: the hello's check found it
    # Healed once, and then left alone: a live process is not taken for a dead one.
    time.sleep(3)
    cluster.controller.stop()
    cluster.controller.start()
    cluster.wait_connected("computing-1", "daemons-1")
    time.sleep(3)
    assert [e["kind"] for e in events(world, env)] == ["restarting", "restarted"]


def test_restart_never_leaves_the_process_stopped_and_says_so(world):
    cluster, env = world["cluster"], new_env(world)
    ok(cluster.deployctl("apply", site(world, env, "never"), timeout=300))
    kill_live(world, env)
    wait_for(lambda: "left" in [e["kind"] for e in events(world, env)], 30, every=0.2, what="the end reported")
    time.sleep(3)
    assert not answers(world, env)
    assert [e["kind"] for e in events(world, env)] == ["exited", "left"]


def test_a_wiped_release_comes_back_from_its_commit_and_a_dropped_database_is_only_reported(world):
    """The service's folder is wiped under a live environment (a rebuilt server, a careless rm):
    repair checks the release out again from the commit the ledger recorded, installs it and
    restarts it; verify is then clean but for the database dropped by hand, which is reported
    and never made again empty."""
    import shutil
    from tests.deploy_harness import mysql
    cluster, env = world["cluster"], new_env(world)
    spec = world["base"] / f"{env}.yml"
    spec.write_text(yaml.safe_dump({"app": "heal", "environment": env, "domain": f"{env}.heal.test", "services": {
        "site": {"path": "/", "source": str(world["repo"]), "ref": "main", "root": "web", "uses": ["mysql"],
                 "install": "echo installed > installed.txt",  # what only an install makes
                 "start": "python3 -m http.server $PORT --bind 127.0.0.1", "health": "/installed.txt"}}},
        sort_keys=False))
    ok(cluster.deployctl("apply", str(spec), timeout=300))
    folder = cluster.agents["computing-1"].services_root / f"auto-heal-{env}-site"
    shutil.rmtree(folder)
    database = f"auto-heal-{env}-site-1"
    mysql(f"DROP DATABASE `{database}`")

    found = cluster.deployctl("verify", f"heal/{env}", timeout=120)
    out = found.stdout.decode()
    assert found.returncode == 2, out
    assert "code 1: release folder is missing (repair checks it out again from its commit)" in out, out
    assert f"mysql 1: database {database} is missing (needs an operator)" in out, out
    done = cluster.deployctl("repair", f"heal/{env}", timeout=300)
    repaired = done.stdout.decode()
    assert done.returncode == 2, repaired  # what it cannot repair is left, and said
    assert "checked out" in repaired and "again, installed, built and restarted" in repaired, repaired
    assert f"still: heal/{env}/site: mysql 1: database {database} is missing (needs an operator)" in repaired
    assert http_get(world["nginx"].port, "/installed.txt", f"{env}.heal.test")[0] == 200
    assert (folder / "releases" / "1" / "web" / "installed.txt").exists()
    after = cluster.deployctl("verify", f"heal/{env}", timeout=120).stdout.decode()
    assert "release folder" not in after and f"database {database} is missing" in after, after
    assert mysql(f"SHOW DATABASES LIKE '{database}'").strip() == ""  # reported, not recreated
    ledger = json.loads(ok(cluster.deployctl("ledger", f"heal/{env}", "site", "--json")))["site"]
    assert [d["code"] for d in ledger["deploys"]] == [1, 1]  # the same code instance, from its commit


def test_logs_since_and_until_give_exactly_a_window_across_a_restart(world):
    """Every line is stamped as it is read; a restart starts a file of its own in the same
    instance's folder, and a window is cut by those stamps, whichever run wrote the lines."""
    cluster, env = world["cluster"], new_env(world)
    ok(cluster.deployctl("apply", site(world, env, "always"), timeout=300))

    def mark(name: str) -> None:
        assert http_get(world["nginx"].port, f"/package.json?m={name}", f"{env}.heal.test")[0] == 200

    for i in range(5):
        mark(f"before-{i}")
    killed = kill_live(world, env)
    wait_for(lambda: answers(world, env) and status(world, env).get("pid") not in (killed, None), 30, every=0.05,
             what="the site back after its kill")
    for i in range(5):
        mark(f"after-{i}")
    time.sleep(0.5)
    target = f"heal/{env}/site"
    stamped = [line.split(" ", 2) for line in ok(cluster.deployctl("logs", target, "-t", "--since", "1h")).splitlines()]
    assert all(at.endswith("Z") and instance == "[1]" for at, instance, _body in stamped), stamped[:3]
    marked = [(at, body) for at, _i, body in stamped if "?m=" in body]
    assert [body.split("?m=")[1].split()[0] for _at, body in marked] == \
        [f"before-{i}" for i in range(5)] + [f"after-{i}" for i in range(5)]
    since, until = marked[3][0], marked[7][0]
    window = ok(cluster.deployctl("logs", target, "--since", since, "--until", until)).splitlines()
    assert window == [body for at, _i, body in stamped if since <= at < until]
    # Lines read in one go share their stamp: a window cut at a stamp takes all of them.
    inside = sum(since <= at < until for at, _body in marked)
    assert inside >= 2 and sum("?m=" in line for line in window) == inside, (marked, window)  # a restart between
    # The last line, whatever came since (the health rounds ask the site every few seconds): the
    # tail and a full read straight after agree once no line arrived between them.
    def tail_is_last() -> bool:
        tail = ok(cluster.deployctl("logs", target, "--tail", "1")).splitlines()
        return tail == ok(cluster.deployctl("logs", target, "--since", "1h")).splitlines()[-1:]
    wait_for(tail_is_last, 30, every=0.2, what="--tail 1 giving the last line")
    folder = cluster.agents["computing-1"].services_root / f"auto-heal-{env}-site" / "logs" / "1"
    runs = sorted(p.name for p in folder.iterdir())
    assert len(runs) == 2 and all(p.endswith(".0001.log") for p in runs), runs  # one file per run
    info = folder.stat()
    assert (info.st_uid, oct(info.st_mode & 0o777)) == (0, "0o750")
    bad = cluster.deployctl("logs", target, "--since", "yesterday")
    assert bad.returncode == 2 and bad.stderr.decode().strip() == (
        f"deployctl: logs {target}: --since: 'yesterday' is not a moment; write a time ago (10m, 2h, 1d) "
        "or a UTC date and time (2026-12-02T22:40)")
