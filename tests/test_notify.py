"""Operators are told: a local HTTP receiver gets each notification (job finished, crash loop,
agent lost, verify drift) once, signed, with the documented fields; while it is down for 30 s
nothing waits for it and nothing is lost, a controller restart included. Also here: an agent
stopped while its service runs is reported lost, and the service, killed meanwhile, is healed
when the agent is back; and the controller's job retention removes old jobs' folders, never an
unsettled one's, and says so when one asks for such a job. And a live process that stops
answering (SIGSTOP: it runs, its port accepts, nothing answers) is restarted once it failed its
periodic health checks."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time

import psutil
import pytest
import yaml

from tests.deploy_harness import deploy_world, example_repo, http_get, unique_env
from tests.harness import PY, ROOT, free_port, wait_for

pytestmark = pytest.mark.timeout(900)

KEY = b"9f2c1e7a55d04b8e8c3a61f0d2b7e4a19c0d3e5f"
SECRET = "s3cr3t-value-7f1d2c"


class Receiver:
    """A webhook receiver on a fixed port that can be down (nothing listening) and up again."""

    def __init__(self, port: int) -> None:
        self.port, self.got, self.server = port, [], None
        self.lock = threading.Lock()

    def start(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.got.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def bodies(self, path: str) -> list[dict]:
        with self.lock:
            return [json.loads(g["body"]) for g in self.got if g["path"] == path]


@pytest.fixture(scope="module")
def world():
    with deploy_world("deployer-notify-", "notify") as made:
        made["repo"] = example_repo(made["base"])
        base, cluster = made["base"], made["cluster"]
        receiver = Receiver(free_port())
        key_file = base / "notify.key"
        key_file.write_bytes(KEY + b"\n")
        key_file.chmod(0o600)
        config = base / "controller.yml"
        config.write_text(yaml.safe_dump({
            "jobs": {"keep": "1h", "keep_last": 2},
            "notify": [
                {"name": "ops", "url": f"http://127.0.0.1:{receiver.port}/ops", "key_file": str(key_file)},
                {"name": "chat", "url": f"http://127.0.0.1:{receiver.port}/chat", "format": "slack",
                 "events": ["service.crash_loop", "agent.lost"]}],
            "notify_retry": {"first": "1s", "max": "5s"},
            "health": {"every": "1s", "failures": 3, "timeout": "0.5s"}}))
        config.chmod(0o600)
        cluster.controller.stop()
        cluster.controller.extra_args = ("--config", str(config), "--lost-after", "3")
        cluster.controller.start()
        cluster.wait_connected("computing-1", "daemons-1")
        made.update(receiver=receiver, config=config)
        try:
            yield made
        finally:
            receiver.stop()


def ok(done) -> str:
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    return done.stdout.decode()


def site(world, env: str, restart, flag: str = "", migrate: str = "") -> str:
    crash = f"[ -e {flag} ] && exit 3; " if flag else ""
    service = {"path": "/", "source": str(world["repo"]), "ref": "main", "root": "web",
               "start": f"sh -c '{crash}exec python3 -m http.server $PORT --bind 127.0.0.1'",
               "health": "/package.json", "restart": restart, "secrets": ["SESSION_KEY"]}
    if migrate:
        service["migrate"] = migrate
    spec = world["base"] / f"{env}.yml"
    spec.write_text(yaml.safe_dump({"app": "notify", "environment": env, "domain": f"{env}.notify.test",
                                    "services": {"site": service}}, sort_keys=False))
    return str(spec)


def new_env(world) -> str:
    """A new environment of the app, with its declared secret set."""
    env = unique_env()
    world["envs"].append(env)
    done = subprocess.run([PY, "-m", "deployctl.cli", "secret", "set", f"notify/{env}", "SESSION_KEY"],
                          cwd=ROOT, env=world["cluster"].env(), input=SECRET.encode(), capture_output=True)
    assert done.returncode == 0, done.stderr
    return env


def status(world, env: str) -> dict:
    return json.loads(ok(world["cluster"].deployctl("status", f"notify/{env}", "--json")))[0]


def kinds(world, env: str) -> list[str]:
    out = ok(world["cluster"].deployctl("events", f"notify/{env}", "--json"))
    return [json.loads(line)["kind"] for line in out.splitlines()]


def answers(world, env: str) -> bool:
    try:
        return http_get(world["nginx"].port, "/package.json", f"{env}.notify.test", timeout=2)[0] == 200
    except OSError:
        return False


def pending(world) -> int:
    with sqlite3.connect(f"file:{world['cluster'].controller.store / 'deployer.db'}?mode=ro", uri=True) as db:
        return db.execute("SELECT COUNT(*) FROM outbox WHERE state='pending'").fetchone()[0]


def test_each_notification_arrives_once_signed_and_a_receiver_down_30s_loses_nothing(world):
    cluster, receiver = world["cluster"], world["receiver"]
    down_since = time.monotonic()  # the receiver is not listening yet
    a, b, c = new_env(world), new_env(world), new_env(world)

    # Jobs finish while the receiver is down: nothing waits for it, the notifications wait in the outbox.
    ok(cluster.deployctl("apply", site(world, a, "always"), timeout=300))
    assert pending(world) >= 1
    failed = cluster.deployctl("apply", site(world, c, "always", migrate="sh -c 'echo leaking $SESSION_KEY; exit 4'"),
                               timeout=300)
    assert failed.returncode != 0

    # Verify drift: the release's .env opened to everyone.
    env_file = next((world["base"] / "srv").glob(f"auto-notify-{a}-site/releases/*/.env"))
    env_file.chmod(0o644)
    assert cluster.deployctl("verify", f"notify/{a}", timeout=120).returncode == 2

    # A crash loop: every start exits at once.
    flag = world["base"] / f"{b}.crash"
    ok(cluster.deployctl("apply", site(world, b, {"attempts": 2, "stable_after": "2s"}, str(flag)), timeout=300))
    flag.touch()
    time.sleep(2.5)
    os.kill(status(world, b)["pid"], signal.SIGKILL)
    wait_for(lambda: "crash-loop" in kinds(world, b), 120, every=0.5, what="the crash loop")

    # An agent stopped while its service runs is reported lost; the service dies meanwhile and is
    # healed once the agent is back.
    agent = cluster.agents["computing-1"]
    pid = status(world, a)["pid"]
    agent.stop()
    wait_for(lambda: "agent-lost" in kinds(world, a), 30, every=0.3, what="the agent reported lost")
    assert status(world, a)["process"] == "agent computing-1 is lost"
    os.kill(pid, 0)  # reported, not moved: the service outlived its agent
    os.kill(pid, signal.SIGKILL)
    agent.start()
    cluster.wait_connected("computing-1")
    wait_for(lambda: answers(world, a) and status(world, a).get("pid") not in (pid, None), 60, every=0.2,
             what="the site healed after its agent came back")
    wait_for(lambda: "restarted" in kinds(world, a), 30, every=0.3, what="the heal in the history")

    # A controller restart loses nothing still waiting.
    cluster.controller.stop()
    cluster.controller.start()
    cluster.wait_connected("computing-1", "daemons-1")
    assert pending(world) >= 8
    # A crash loop outlives the restart: no more restarts are ordered for it.
    assert status(world, b).get("crash_loop") is True
    before = kinds(world, b)
    time.sleep(max(0.0, 30 - (time.monotonic() - down_since)))
    receiver.start()

    jobs = {j["id"]: j for j in json.loads(ok(cluster.deployctl("jobs", "--json")))
            if j["env_key"] in (f"notify/{a}", f"notify/{b}", f"notify/{c}") and j["state"] != "running"}
    wait_for(lambda: {n["job"] for n in receiver.bodies("/ops") if n["event"] == "job.finished"} >= set(jobs)
             and pending(world) == 0, 60, every=0.3, what="every notification delivered")

    ops = receiver.bodies("/ops")
    ids = [n["id"] for n in ops]
    assert len(ids) == len(set(ids)), "a notification arrived twice"
    for got in receiver.got:
        headers = got["headers"]
        assert headers["X-Deployer-Delivery"] == json.loads(got["body"]).get("id", headers["X-Deployer-Delivery"])
        if got["path"] == "/ops":
            expected = "sha256=" + hmac.new(KEY, headers["X-Deployer-Timestamp"].encode() + b"." + got["body"],
                                            hashlib.sha256).hexdigest()
            assert headers["X-Deployer-Signature"] == expected
            assert headers["X-Deployer-Event"] == json.loads(got["body"])["event"]
        else:
            assert "X-Deployer-Signature" not in headers  # no key given to that target
        assert SECRET.encode() not in got["body"] and KEY not in got["body"]
    finished = {n["job"]: n for n in ops if n["event"] == "job.finished"}
    for job_id, job in jobs.items():
        n = finished[job_id]
        assert (n["environment"], n["kind"], n["state"]) == (job["env_key"], job["kind"], job["state"])
        assert set(n) >= {"id", "event", "at", "text", "environment", "job", "kind", "state", "summary", "seconds"}
    leak = next(n for n in finished.values() if n["environment"] == f"notify/{c}")
    assert leak["state"] == "failed" and leak["summary"] == "site: migrate failed: exit 4"
    # The migrate did print the secret (redacted in its output); no notification carries output.
    assert b"leaking ***" in ok(cluster.deployctl("logs", leak["job"])).encode()
    assert kinds(world, b) == before
    loops = [n for n in ops if n["event"] == "service.crash_loop"]
    assert [(n["environment"], n["service"], n["restarts"]) for n in loops] == [(f"notify/{b}", "site", 2)]
    lost = [n for n in ops if n["event"] == "agent.lost"]
    assert len(lost) == 1 and lost[0]["agent"] == "computing-1"
    assert {"environment": f"notify/{a}", "service": "site"} in [
        {k: v for k, v in x.items() if k != "process"} for x in lost[0]["live"]]
    drift = [n for n in ops if n["event"] == "verify.drift"]
    assert len(drift) == 1 and drift[0]["environment"] == f"notify/{a}" and drift[0]["findings"] >= 1
    assert any(".env" in line for line in drift[0]["lines"])
    chat = receiver.bodies("/chat")
    assert sorted(list(n) for n in chat) == [["text"], ["text"]]
    assert any("crash loop" in n["text"] for n in chat) and any("computing-1 is lost" in n["text"] for n in chat)


def test_job_retention_removes_old_folders_and_never_an_unsettled_one(world):
    cluster = world["cluster"]
    env = new_env(world)
    spec = site(world, env, "always")
    ok(cluster.deployctl("apply", spec, timeout=300))
    for _ in range(3):
        cluster.deployctl("verify", f"notify/{env}", timeout=120)
    jobs = sorted(json.loads(ok(cluster.deployctl("jobs", "--json"))), key=lambda j: j["created"])
    mine = [j["id"] for j in jobs if j["env_key"] == f"notify/{env}"]
    assert len(mine) == 4
    store = cluster.controller.store
    cluster.controller.stop()
    # Forty days pass for this environment's jobs; one of them is left interrupted and unsettled.
    with sqlite3.connect(store / "deployer.db") as db:
        db.execute(f"UPDATE jobs SET created=created-40*86400, finished=finished-40*86400 "
                   f"WHERE id IN ({','.join('?' * len(mine))})", mine)
        db.execute("UPDATE jobs SET state='interrupted', recovered_by='-' WHERE id=?", (mine[1],))
    unsettled = mine[0]
    with sqlite3.connect(store / "deployer.db") as db:
        db.execute("UPDATE jobs SET state='interrupted', recovered_by=NULL WHERE id=?", (unsettled,))
    cluster.controller.start()
    cluster.wait_connected("computing-1", "daemons-1")
    # The newest two stay (keep_last: 2): the job that settles the interrupted one, started at
    # once, and the last verify. The settled interrupted one goes; the unsettled one stays.
    wait_for(lambda: not (store / "jobs" / mine[1]).exists(), 30, what="retention at start")
    after = [j for j in json.loads(ok(cluster.deployctl("jobs", "--json"))) if j["env_key"] == f"notify/{env}"]
    assert [j["kind"] for j in sorted(after, key=lambda j: j["created"])][-1] == "recover"
    assert (store / "jobs" / unsettled).is_dir() and (store / "jobs" / mine[3]).is_dir()
    assert not (store / "jobs" / mine[2]).exists()
    shown = cluster.deployctl("logs", mine[1])
    assert shown.returncode != 0
    assert b"removed by the controller's job retention" in shown.stderr, shown.stderr
    assert cluster.controller.events("retention.pruned")


def test_a_process_that_stops_answering_is_restarted_after_failing_its_health_checks(world):
    cluster = world["cluster"]
    env = new_env(world)
    ok(cluster.deployctl("apply", site(world, env, "always"), timeout=300))
    pid = status(world, env)["pid"]
    os.kill(pid, signal.SIGSTOP)  # it still runs and its port still accepts: only a check can tell
    try:
        wait_for(lambda: answers(world, env) and status(world, env).get("pid") not in (pid, None), 60, every=0.2,
                 what="the hung instance replaced")
        wait_for(lambda: "restarted" in kinds(world, env), 30, every=0.3, what="the heal in the history")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    out = ok(cluster.deployctl("events", f"notify/{env}", "--json"))
    history = [json.loads(line) for line in out.splitlines()]
    assert [e["kind"] for e in history] == ["unhealthy", "restarting", "restarted"]
    assert history[0]["why"].startswith("failed 3 health checks in a row (last: no answer within 0.5s)")
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 30,
             what="the hung process stopped by the heal")
    assert status(world, env)["restarts"] == 1
