"""Unit tests of pure code: spool and output log framing, rendering, backoff, config, targeting."""

from __future__ import annotations

import argparse
import ast
import errno
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from agent import link, spool as spool_mod
from agent.config import ConfigError, load
from agent.spool import Spool
from controller import daemon
from deployctl import render
from deployctl.cli import describe
from controller.fleet.gateway import check_hello
from controller.fleet.oplog import OutputGap, OutputLog
from controller.operator_service import resolve_targets
from controller.fleet.registry import CONNECTED, DISCONNECTED, Agent
from protos import deployer_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- spool

@settings(max_examples=40, deadline=None)
@given(writes=st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(min_size=1, max_size=300)), max_size=40),
       read_size=st.integers(1, 500), release_at=st.integers(0, 6000))
def test_spool_reads_back_everything_in_order(tmp_path_factory, writes, read_size, release_at):
    folder = tmp_path_factory.mktemp("spool")
    old = spool_mod.SEGMENT_BYTES
    spool_mod.SEGMENT_BYTES = 512  # many segments
    try:
        s = Spool(folder)
        for stream, data in writes:
            s.append(stream, data)
        expected = b"".join(d for _, d in writes)
        release = min(release_at, len(expected))
        s.release_below(release)
        got, offset = b"", release
        while records := s.read(offset, read_size):
            for r in records:
                assert r.offset == offset
                got += r.data
                offset = r.end
        assert got == expected[release:]
        s.close()
        assert Spool(folder).end == len(expected)  # recovered from disk alone
    finally:
        spool_mod.SEGMENT_BYTES = old


def test_spool_drops_a_torn_record(tmp_path):
    s = Spool(tmp_path)
    s.append(1, b"hello\n")
    s.append(1, b"world\n")
    s.close()
    seg = next(tmp_path.glob("seg-*"))
    seg.write_bytes(seg.read_bytes()[:-3])  # a crash mid-write
    again = Spool(tmp_path)
    assert again.end == 6
    assert b"".join(r.data for r in again.read(0)) == b"hello\n"
    again.append(2, b"more")
    assert [(r.stream, r.data) for r in again.read(0)] == [(1, b"hello\n"), (2, b"more")]


# ---------------------------------------------------------------- controller output log

def chunk(offset: int, data: bytes, stream=pb.STDOUT) -> pb.OutputChunk:
    return pb.OutputChunk(op_id="op-1", offset=offset, stream=stream, data=data)


def test_output_log_deduplicates_by_offset(tmp_path):
    log = OutputLog(tmp_path)
    assert log.write(chunk(0, b"abc")) == 3
    assert log.write(chunk(0, b"abc")) == 0          # resent whole
    assert log.write(chunk(1, b"bcdef")) == 3         # overlapping
    assert log.write(chunk(6, b"X", pb.STDERR)) == 1
    with pytest.raises(OutputGap):
        log.write(chunk(10, b"late"))
    assert (tmp_path / "output.log").read_bytes() == b"abcdefX"
    assert log.read(0) == [(0, pb.STDOUT, b"abcdef"), (6, pb.STDERR, b"X")]
    assert log.read(4, 1) == [(4, pb.STDOUT, b"e")]
    log.close()
    again = OutputLog(tmp_path)
    assert again.received == 7 and again.read(5) == [(5, pb.STDOUT, b"f"), (6, pb.STDERR, b"X")]


def test_output_log_ignores_index_entries_past_its_data(tmp_path):
    (tmp_path / "output.log").write_bytes(b"abc")
    (tmp_path / "streams.idx").write_text("0 1\n3 2\n")  # crash after the index line, before data
    log = OutputLog(tmp_path)
    log.write(chunk(3, b"d", pb.STDOUT))
    assert log.read(0) == [(0, pb.STDOUT, b"abcd")]


class SmallDisk:
    """`os` for an OutputLog whose disk has `room` bytes left: a write beyond it is short, then
    refused; `fsync_fails` makes the next fsync fail as a full disk can (delayed allocation)."""

    def __init__(self, room: int) -> None:
        self.room, self.fsync_fails = room, False

    def __getattr__(self, name):
        return getattr(os, name)

    def _take(self, data: bytes) -> bytes:
        if not self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        taken = data[:self.room]
        self.room -= len(taken)
        return taken

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, self._take(data), offset)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, self._take(data))

    def fsync(self, fd: int) -> None:
        if self.fsync_fails:
            self.fsync_fails = False
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)


def test_output_log_keeps_only_what_a_short_write_took(tmp_path, monkeypatch):
    from controller.fleet import oplog
    disk = SmallDisk(room=4 + 10)  # the index line "0 1\n", then 10 bytes of output
    monkeypatch.setattr(oplog, "os", disk)
    log = OutputLog(tmp_path)
    with pytest.raises(oplog.OutputRefused, match="No space left on device"):
        log.write(chunk(0, b"0123456789abcdef"))
    assert log.received == 10 and log.sync() == 10  # only what is on disk can be acknowledged
    with pytest.raises(OutputGap):
        log.write(chunk(16, b"ghij"))  # sent before the agent heard it should send again
    with pytest.raises(oplog.OutputRefused):
        log.write(chunk(0, b"0123456789abcdef"))  # resent while the disk is still full
    assert log.received == 10
    disk.room = 1 << 20
    assert log.write(chunk(0, b"0123456789abcdef")) == 6  # resent once there is room
    assert log.write(chunk(16, b"ghij", pb.STDERR)) == 4
    assert log.sync() == 20
    assert (tmp_path / "output.log").read_bytes() == b"0123456789abcdefghij"
    assert log.read(0) == [(0, pb.STDOUT, b"0123456789abcdef"), (16, pb.STDERR, b"ghij")]
    log.close()
    assert OutputLog(tmp_path).read(0) == [(0, pb.STDOUT, b"0123456789abcdef"), (16, pb.STDERR, b"ghij")]


def test_output_log_takes_back_what_a_failed_fsync_may_have_lost(tmp_path, monkeypatch):
    from controller.fleet import oplog
    disk = SmallDisk(room=1 << 20)
    monkeypatch.setattr(oplog, "os", disk)
    log = OutputLog(tmp_path)
    log.write(chunk(0, b"kept "))
    assert log.sync() == 5
    log.write(chunk(5, b"maybe ", pb.STDERR))
    log.write(chunk(11, b"lost"))
    disk.fsync_fails = True
    with pytest.raises(oplog.OutputRefused):
        log.sync()
    assert log.received == log.synced == 5
    assert log.read(0) == [(0, pb.STDOUT, b"kept ")]
    assert log.write(chunk(5, b"maybe ", pb.STDERR)) == 6 and log.write(chunk(11, b"lost")) == 4
    assert log.sync() == 15
    log.close()
    again = OutputLog(tmp_path)
    assert again.read(0) == [(0, pb.STDOUT, b"kept "), (5, pb.STDERR, b"maybe "), (11, pb.STDOUT, b"lost")]


def test_output_log_never_tears_its_index(tmp_path, monkeypatch):
    from controller.fleet import oplog
    disk = SmallDisk(room=4 + 3 + 2)  # "0 1\n", "abc", then only 2 bytes of the line "3 2\n"
    monkeypatch.setattr(oplog, "os", disk)
    log = OutputLog(tmp_path)
    log.write(chunk(0, b"abc"))
    with pytest.raises(oplog.OutputRefused):
        log.write(chunk(3, b"err", pb.STDERR))
    assert (tmp_path / "streams.idx").read_text() == "0 1\n" and log.received == 3
    disk.room = 1 << 20
    assert log.write(chunk(3, b"err", pb.STDERR)) == 3
    log.close()
    assert OutputLog(tmp_path).read(0) == [(0, pb.STDOUT, b"abc"), (3, pb.STDERR, b"err")]


# ---------------------------------------------------------------- rendering

@settings(max_examples=200)
@given(pieces=st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"|", b"")), max_size=20))
def test_prefixer_prefixes_every_line_once(pieces):
    p = render.LinePrefixer(b"a | ")
    out = b"".join(p.feed(x) for x in pieces) + p.finish()
    text = b"".join(pieces)
    if not text:
        assert out == b""
        return
    lines = out.split(b"\n")
    assert lines[-1] == b""
    assert all(line.startswith(b"a | ") for line in lines[:-1])
    restored = b"\n".join(line[4:] for line in lines[:-1])
    assert restored + b"\n" == (text if text.endswith(b"\n") else text + b"\n")


def test_prefixer_holds_partial_lines_until_complete():
    p = render.LinePrefixer(b"x | ")
    assert p.feed(b"hel") == b""
    assert p.feed(b"lo\nwor") == b"x | hello\n"
    assert p.finish() == b"x | wor\n"


def test_sizes_ages_and_tables():
    assert render.size(512) == "512 B" and render.size(3 << 30) == "3.0 GiB"
    assert render.age(0.5) == "now" and render.age(90) == "90s ago" and render.age(600) == "10m ago"
    assert render.age(3 * 86400) == "3d ago" and render.span(50 * 3600) == "2d" and render.span(7199) == "119m"
    assert render.table(["A", "BB"], [["x", "y"]]) == "A  BB\nx  y\n"
    # What an agent reports cannot move the cursor, break a row or stretch a column.
    assert render.table(["V"], [["1.0\x1b[2J\nroot"]]) == "V\n1.0?[2J?root\n"
    assert render.printable("0.1.0-" + "x" * 100, 24) == "0.1.0-" + "x" * 17 + "…"
    assert render.printable("0.1.0", 24) == "0.1.0"


def test_errors_are_bounded_keeping_start_and_end():
    from common.redact import bounded
    assert bounded("short") == "short"
    long = "systemctl start x: " + "y" * 5000 + " the cause"
    cut = bounded(long)
    assert len(cut) < 2100 and cut.startswith("systemctl start x: ") and cut.endswith(" the cause")
    assert f"({len(long) - 2000} characters left out)" in cut


@pytest.mark.parametrize("result, ok, line", [
    (pb.OperationResult(outcome=pb.EXITED, duration_s=0.5), True, "ok (500ms"),
    (pb.OperationResult(outcome=pb.EXITED, exit_code=3), False, "failed: exit 3"),
    (pb.OperationResult(outcome=pb.EXITED, error="output incomplete: 5 bytes could not be kept"), False,
     "exit 0 (0ms, rss 0 B, cpu 0ms), but output incomplete: 5 bytes"),
    (pb.OperationResult(outcome=pb.SIGNALED, signal=9), False, "failed: killed by signal SIGKILL"),
    (pb.OperationResult(outcome=pb.TIMED_OUT, error="timed out after 1s"), False, "timed out after 1s"),
    (pb.OperationResult(outcome=pb.FAILED_TO_START, error="command not found: x"), False,
     "failed to start: command not found: x"),
    (pb.OperationResult(outcome=pb.LOST, error="agent a lost"), False, "lost: agent a lost"),
])
def test_describe_results(result, ok, line):
    got_ok, got_line = describe(result)
    assert got_ok is ok and got_line.startswith(line)


# ---------------------------------------------------------------- link

def test_backoff_windows_grow_and_cap():
    rng = random.Random(7)
    for attempts in range(12):
        window = link.INITIAL_BACKOFF_S * (1 << min(attempts, link.MAX_DOUBLINGS))
        for _ in range(50):
            delay = link.backoff_delay(attempts, rng)
            assert window / 4 <= delay <= window
    assert link.backoff_delay(100, rng) <= 32


def test_backoff_spreads_a_fleet():
    delays = sorted(link.backoff_delay(3, random.Random(i)) for i in range(100))
    assert delays[-1] - delays[0] > 2  # a hundred agents do not dial back in the same instant


def test_keepalive_settings_agree():
    server = dict(daemon.SERVER_OPTIONS)
    client = dict(link.CHANNEL_OPTIONS)
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert client["grpc.max_send_message_length"] <= server["grpc.max_receive_message_length"]


def test_fatal_errors_are_classified_once():
    import grpc
    assert link.is_fatal(grpc.StatusCode.UNAUTHENTICATED)
    assert link.is_fatal(grpc.StatusCode.PERMISSION_DENIED)
    assert not link.is_fatal(grpc.StatusCode.UNAVAILABLE)


def test_agent_never_imports_controller():
    for path in (ROOT / "agent").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n == "controller" or n.startswith("controller.") for n in names), path


# ---------------------------------------------------------------- config and targeting

def args(**kw) -> argparse.Namespace:
    base = dict(config=None, id=None, controller=None, role=None, capability=None, state_dir=None,
                services_root=None, heartbeat_interval=None, provide=None, service_driver=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_agent_config_from_file_and_flags(tmp_path):
    path = tmp_path / "agent.yml"
    path.write_text("id: web-1\ncontroller: 10.0.0.5:7710\nroles: [computing]\ncapabilities: [nginx]\n")
    config = load(args(config=str(path), role=["daemons"]))
    assert config.id == "web-1" and config.roles == ("daemons",) and config.capabilities == ("nginx",)


@pytest.mark.parametrize("content, message", [
    ("id: Web_1\ncontroller: x:1\nroles: [computing]\n", "id 'Web_1' must match"),
    ("id: w\nroles: [computing]\n", "controller is required"),
    ("id: w\ncontroller: x:1\nroles: [web]\n", "unknown role 'web'"),
    ("id: w\ncontroller: x:1\nroles: [computing]\ncolour: blue\n", "unknown key 'colour'"),
    ("id: [\n", "not valid YAML"),
])
def test_agent_config_errors_name_the_key(tmp_path, content, message):
    path = tmp_path / "agent.yml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load(args(config=str(path)))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("hello, problem", [
    (pb.AgentMessage(heartbeat=pb.Heartbeat()), "must be a hello"),
    (pb.AgentMessage(hello=pb.Hello(agent_id="../x", roles=["computing"])), "invalid agent id"),
    (pb.AgentMessage(hello=pb.Hello(agent_id="a")), "at least one role"),
    (pb.AgentMessage(hello=pb.Hello(agent_id="a", roles=["root"])), "unknown role"),
    (pb.AgentMessage(hello=pb.Hello(agent_id="a", roles=["daemons"])), ""),
])
def test_hello_checks(hello, problem):
    assert problem in check_hello(hello) if problem else check_hello(hello) == ""


class FakeRegistry:
    def __init__(self, **agents):
        self.agents = {
            name: Agent(id=name, roles=roles, capabilities=[], version="0", facts=pb.HostFacts(),
                        last_seen=0, state=state)
            for name, (roles, state) in agents.items()
        }


def test_targets_resolve_by_id_role_and_all():
    reg = FakeRegistry(c1=(["computing"], CONNECTED), c2=(["computing"], DISCONNECTED),
                       d1=(["daemons"], CONNECTED))
    chosen, errors = resolve_targets(reg, pb.Target(agent_ids=["c1", "c2", "zz"], roles=["daemons"]))
    assert chosen == ["c1", "d1"]
    assert [e.error for e in errors] == ["agent c2 is disconnected", "unknown agent 'zz'"]
    chosen, errors = resolve_targets(reg, pb.Target(all=True))
    assert chosen == ["c1", "d1"] and not errors
    chosen, errors = resolve_targets(FakeRegistry(), pb.Target(all=True))
    assert not chosen and errors[0].error == "no agent is connected"


def test_ledger_diagram_marks_new_kept_and_rolled_back_instances():
    from controller.state.ledger import DeployRow, diagram

    def row(n, code, mysql, redis, new=(), outcome="succeeded", reason=""):
        return DeployRow(n, code, "code" in new, mysql, "mysql" in new, redis, "redis" in new,
                         "", "", 0, outcome, reason, "", 0)
    rows = [row(1, 1, 1, 1, ("code", "mysql", "redis")), row(2, 2, 1, 1, ("code",)),
            row(3, 3, 2, 1, ("code", "mysql"), "failed", "web: health failed"),
            row(4, 2, 1, 2, ("redis",)), row(5, 1, 1, 2), row(6, 4, None, 2, ("code",))]
    assert diagram(rows) == (
        "deploy  code  mysql  redis\n"
        "1       (1)   (1)    (1)\n"
        "2       (2)    |      |\n"
        "3       (3)   (2)     |      failed: web: health failed\n"
        "4        |     |     (2)\n"
        "5        1     |      |\n"
        "6       (4)           |\n")


# ---------------------------------------------------------------- fixes found in review

def test_redis_purge_deletes_exact_keys_of_its_prefix_only():
    import secrets
    import subprocess
    from controller.environments.commands import redis_purge_script
    prefix = f"auto-t{secrets.token_hex(3)}-e-s-1:"
    neighbour = f"auto-t{secrets.token_hex(3)}-prod-s-1:sessions"
    cli = ["redis-cli"]
    keys = (prefix + "plain", f"{prefix}x {neighbour}", prefix + "quote'd", neighbour)
    try:
        for key in keys:
            subprocess.run([*cli, "SET", key, "1"], check=True, capture_output=True)
        subprocess.run(["sh", "-c", redis_purge_script("redis-cli", prefix)], check=True)
        left = subprocess.run([*cli, "--scan", "--pattern", prefix + "*"], capture_output=True, text=True).stdout
        assert left.strip() == ""
        assert subprocess.run([*cli, "GET", neighbour], capture_output=True, text=True).stdout.strip() == "1"
    finally:
        subprocess.run([*cli, "DEL", *keys], capture_output=True)


def test_env_values_with_line_breaks_are_refused_in_the_spec():
    from controller.environments.spec import SpecError, parse_spec
    text = ("app: shop\nenvironment: prod\ndomain: shop.test\nservices:\n  web:\n    path: /\n"
            "    source: /r\n    ref: main\n    start: x\n    env:\n      X: |\n        a\n        b\n")
    with pytest.raises(SpecError, match="env.X: contains a line break"):
        parse_spec(text, "environment.yml")


def test_journal_forgets_the_payload_once_done(tmp_path):
    from agent.journal import Journal
    journal = Journal(tmp_path)
    op = pb.Operation(id="op-1", write_file=pb.WriteFileSpec(path="/x/.env", content=b"DB_PASSWORD=hunter2\n"))
    assert journal.accept(op)
    journal.record_result(pb.OperationResult(op_id="op-1", outcome=pb.EXITED))
    journal.mark_done("op-1")
    assert b"hunter2" not in b"".join(p.read_bytes() for p in (tmp_path / "operations").rglob("*") if p.is_file())
    assert not journal.accept(op)                      # still recognised: never run twice
    assert journal.load("op-1").result.outcome == pb.EXITED


def test_operation_summaries_hide_url_credentials():
    from controller.fleet.operations import exec_op, summary
    op = exec_op("op-1", ["sh", "-c", "git clone https://deploy:t0ken@git.example/shop.git /x"])
    assert "t0ken" not in " ".join(summary(op)) and "git.example/shop.git" in summary(op)[2]
