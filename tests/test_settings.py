"""The controller's config file, job retention on a real store, and the webhook sender against a
real local HTTP server: pure parts and SQLite, no agents."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import threading
import time
from pathlib import Path

import pytest

from controller import settings
from controller.environments.notify import Notifier, Retry, Target, signature
from controller.state import retention
from controller.state.db import Database
from controller.state.jobs import Job, JobTable
from controller.state.outbox import Outbox
from tests.harness import free_port

KEY = b"0123456789abcdef0123456789abcdef"


def config(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "controller.yml"
    path.write_text(text)
    path.chmod(mode)
    return path


def key_file(tmp_path: Path, content: bytes = KEY, mode: int = 0o600) -> Path:
    path = tmp_path / "hook.key"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_defaults_without_a_file_and_with_an_empty_one(tmp_path):
    assert settings.load(None) == settings.Settings()
    loaded = settings.load(config(tmp_path, ""))
    assert loaded.retention == retention.Retention(30 * 86400.0, 20) and loaded.targets == ()


def test_a_full_file_is_read(tmp_path):
    key = key_file(tmp_path)
    loaded = settings.load(config(tmp_path, f"""
jobs: {{keep: 7d, keep_last: 5}}
notify:
  - {{name: ops, url: "https://hooks.example.org/x?y=1", key_file: {key}}}
  - {{name: chat, url: "http://127.0.0.1:9/c", format: slack, events: [agent.lost]}}
notify_retry: {{first: 2s, max: 1m, give_up_after: 2h}}
"""))
    assert loaded.retention == retention.Retention(7 * 86400.0, 5)
    ops, chat = loaded.targets
    assert (ops.name, ops.format, ops.key, len(ops.events)) == ("ops", "json", KEY, 4)
    assert (chat.format, chat.key, chat.events) == ("slack", None, frozenset({"agent.lost"}))
    assert loaded.retry == Retry(2.0, 60.0, 7200.0)
    assert KEY.decode() not in repr(loaded) and "hooks.example.org" not in repr(loaded)


@pytest.mark.parametrize("text, message", [
    ("jobs: [1]", "jobs: a mapping of keep, keep_last is expected"),
    ("jobs: {keep: 10m}", "jobs.keep: keep finished jobs at least 1h"),
    ("jobs: {keep: soon}", "jobs.keep: 'soon' is not a duration"),
    ("jobs: {keep_last: 0}", "jobs.keep_last: 0 is not a number of jobs"),
    ("job: {}", "job: not a setting (known: jobs, notify, notify_retry, health, acme)"),
    ("acme: {directory: 'http://ca.example/dir'}", "acme.directory: the ACME server's directory URL is needed"),
    ("acme: {contact: a@b.example}", "acme.directory: the ACME server's directory URL is needed"),
    ("acme: {directory: 'https://ca.example/dir', contact: 'a b'}", "acme.contact: 'a b' is not an email address"),
    ("acme: {directory: 'https://ca.example/dir', ca_file: /nonexistent.pem}", "acme.ca_file: '/nonexistent.pem' is not"),
    ("acme: {directory: 'https://ca.example/dir', renew_before: soon}", "acme.renew_before: 'soon' is not a duration"),
    ("acme: {directory: 'https://ca.example/dir', check_every: 30d}", "acme.check_every: from 1s to 7d"),
    ("acme: {directory: 'https://ca.example/dir', port: 1}", "acme.port: not a setting"),
    ("notify: {name: x}", "notify: a list of targets"),
    ("notify: [{name: x, url: ftp://h/}]", "notify[0].url: an http:// or https:// URL is needed"),
    ("notify: [{url: 'http://h/'}]", "notify[0].name: a short name is needed"),
    ("notify: [{name: a, url: 'http://h/'}, {name: a, url: 'http://h/'}]", "notify[1].name: a is named twice"),
    ("notify: [{name: a, url: 'http://h/', format: xml}]", "notify[0].format: 'xml' is not one of json, slack"),
    ("notify: [{name: a, url: 'http://h/', events: [job.started]}]", "notify[0].events: a list of"),
    ("notify: [{name: a, url: 'http://h/', key_file: rel.key}]", "notify[0].key_file: an absolute path"),
    ("notify: [{name: a, url: 'http://h/', key_file: /nonexistent/k}]", "cannot read /nonexistent/k"),
    ("notify_retry: {first: 2m, max: 1m}", "notify_retry.first: longer than notify_retry.max"),
    ("a: [", "not YAML"),
    ("health: {every: 0.5s}", "health.every: from 1s to 1h"),
    ("health: {every: 5s, timeout: 5s}", "health.timeout: at most 30s, and shorter than health.every"),
    ("health: {failures: 0}", "health.failures: 0 is not a number of rounds"),
])
def test_a_mistake_is_one_line_naming_the_file_and_the_key(tmp_path, text, message):
    path = config(tmp_path, text)
    with pytest.raises(settings.ConfigError) as caught:
        settings.load(path)
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_acme_settings_are_read_with_their_defaults(tmp_path):
    loaded = settings.load(config(tmp_path, "acme: {directory: 'https://ca.example/dir', contact: ops@shop.example, "
                                            "renew_before: 20d}"))
    assert loaded.acme == settings.AcmeSettings("https://ca.example/dir", "", "ops@shop.example", 20 * 86400.0,
                                                12 * 3600.0)
    assert settings.load(config(tmp_path, "jobs: {keep: 2d}")).acme.directory == ""


def test_a_key_others_can_read_or_too_short_is_refused(tmp_path):
    for content, mode, message in ((KEY, 0o644, "mode 0600 or 0640 (it is 0644"), (b"short", 0o600, "fewer than 16 bytes")):
        key = key_file(tmp_path, content, mode)
        with pytest.raises(settings.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            settings.load(config(tmp_path, f"notify: [{{name: a, url: 'http://h/', key_file: {key}}}]"))


def test_a_config_with_webhooks_that_everyone_reads_is_refused(tmp_path):
    with pytest.raises(settings.ConfigError, match="readable by every user"):
        settings.load(config(tmp_path, "notify: [{name: a, url: 'http://h/'}]", mode=0o644))


# ---------------------------------------------------------------- retention on a real store


def finished_job(store: Path, db: Database, env_key: str, age_days: float, state: str = "succeeded") -> Job:
    job = Job(store, db, f"job-{env_key.replace('/', '-')}-{time.monotonic_ns()}", env_key, "apply")
    job.save("ops/op-1/output.log", b"x" * 1000)
    job.finish(state, "done")
    back = age_days * 86400
    db.conn.execute("UPDATE jobs SET created=created-?, finished=finished-? WHERE id=?", (back, back, job.id))
    return job


def run_retention(store: Path, db: Database, keep: retention.Retention, followed=lambda op: False):
    done = retention.remove(retention.plan(store, db, keep, followed))
    retention.record(db, done)
    return done


def test_old_jobs_go_beyond_the_newest_of_each_environment_and_their_rows_stay(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    db = Database(store / "deployer.db")
    old = [finished_job(store, db, "a/prod", 40 - i) for i in range(5)]
    young = finished_job(store, db, "a/prod", 1)
    other = finished_job(store, db, "b/prod", 40)  # alone in its environment: among its newest
    done = run_retention(store, db, retention.Retention(30 * 86400.0, 2))
    gone = {j for j, _ in done.jobs}
    # Newest two of a/prod: `young` and old[4]; older than 30 days and not among them: old[0..3].
    assert gone == {j.id for j in old[:4]}
    assert all(not j.folder.exists() for j in old[:4]) and old[4].folder.is_dir() and young.folder.is_dir()
    assert other.folder.is_dir()
    assert done.bytes >= 4 * 1000
    rows = {r["id"]: r for r in JobTable(db).recent(limit=100)}
    assert all(rows[j.id]["pruned"] for j in old[:4]) and rows[young.id]["pruned"] is None
    assert run_retention(store, db, retention.Retention(30 * 86400.0, 2)).jobs == []  # said once


def test_retention_never_takes_a_running_an_unsettled_or_a_followed_job(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    db = Database(store / "deployer.db")
    running = Job(store, db, "job-running", "a/prod", "apply")
    db.conn.execute("UPDATE jobs SET created=created-90*86400 WHERE id=?", (running.id,))
    unsettled = finished_job(store, db, "a/prod", 60, state="failed")
    db.conn.execute("UPDATE jobs SET state='interrupted', recovered_by=NULL WHERE id=?", (unsettled.id,))
    followed = finished_job(store, db, "a/prod", 50)
    db.conn.execute("INSERT INTO operations (id, agent_id, kind, summary, state, created, folder) "
                    "VALUES ('op-f', 'h', 'exec', '[]', 'finished', 0, ?)", (str(followed.folder / "ops" / "op-f"),))
    settled = finished_job(store, db, "a/prod", 45, state="failed")
    db.conn.execute("UPDATE jobs SET state='interrupted', recovered_by='job-x' WHERE id=?", (settled.id,))
    for _ in range(3):
        finished_job(store, db, "a/prod", 0)
    done = run_retention(store, db, retention.Retention(30 * 86400.0, 1), followed=lambda op: op == "op-f")
    assert {j for j, _ in done.jobs} == {settled.id}
    assert running.folder.is_dir() and unsettled.folder.is_dir() and followed.folder.is_dir()


# ---------------------------------------------------------------- the sender


class Flaky:
    """A receiver that refuses the first `fail` posts with 503, then takes them."""

    def __init__(self, fail: int) -> None:
        self.fail, self.got = fail, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.fail > 0:
                    outer.fail -= 1
                    self.send_response(503)
                else:
                    outer.got.append((dict(self.headers), body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


def test_the_sender_retries_in_order_and_signs_what_it_sends(tmp_path):
    db = Database(tmp_path / "deployer.db")
    flaky = Flaky(fail=3)
    target = Target("ops", flaky.url, key=KEY)
    notifier = Notifier(Outbox(db), (target,), Retry(first=0.05, max=0.2))

    async def scenario():
        notifier.start()
        for n in range(5):
            notifier.job_finished(f"job-{n}", "a/prod", "apply", "succeeded", "done", 0.0, 1.0)
        for _ in range(200):
            if len(flaky.got) == 5 and Outbox(db).summary() == {"ops": {"delivered": 5}}:  # answered and noted
                break
            await asyncio.sleep(0.05)
        notifier.stop()

    asyncio.run(scenario())
    flaky.server.shutdown()
    assert [json.loads(body)["job"] for _, body in flaky.got] == [f"job-{n}" for n in range(5)]
    for headers, body in flaky.got:
        mac = hmac.new(KEY, headers["X-Deployer-Timestamp"].encode() + b"." + body, hashlib.sha256).hexdigest()
        assert headers["X-Deployer-Signature"] == f"sha256={mac}" == signature(KEY, headers["X-Deployer-Timestamp"], body)
    assert Outbox(db).summary() == {"ops": {"delivered": 5}}


def test_a_notification_no_one_takes_is_given_up_on_and_said(tmp_path):
    db = Database(tmp_path / "deployer.db")
    target = Target("gone", f"http://127.0.0.1:{free_port()}/nothing-listens")
    notifier = Notifier(Outbox(db), (target,), Retry(first=0.05, max=0.1, give_up_after=0.3))

    async def scenario():
        notifier.start()
        notifier.agent_lost("web-1", [])
        for _ in range(100):
            if Outbox(db).summary().get("gone", {}).get("dropped"):
                break
            await asyncio.sleep(0.05)
        notifier.stop()

    asyncio.run(scenario())
    assert Outbox(db).summary() == {"gone": {"dropped": 1}}
