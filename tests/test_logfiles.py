"""Stamped, rotated service logs (agent/logfiles.py): records, the writer as a real process
under a real pipe, pruning by size and reading by time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from agent import logfiles
from common import moments


def test_records_give_back_the_exact_bytes():
    s = logfiles.Stamper()
    at = b"2026-12-02T22:40:01.000001Z"
    out = s.feed(b"one\ntw", at, 0.0) + s.feed(b"o\n\nthree", b"2026-12-02T22:40:02.000000Z", 0.5) + s.flush()
    records = [logfiles.parse(r + b"\n") for r in out.split(b"\n")[:-1]]
    assert b"".join(body for _at, body in records) == b"one\ntwo\n\nthree"
    assert [r[0] for r in records] == [at, at, b"2026-12-02T22:40:02.000000Z", b"2026-12-02T22:40:02.000000Z"]


def test_long_lines_are_cut_and_come_back_whole():
    s = logfiles.Stamper()
    line = bytes(range(256)).replace(b"\n", b"") * 300  # > MAX_PIECE, every byte but a newline
    out = s.feed(line + b"\n" + line[:100], b"2026-12-02T22:40:01.000001Z", 0.0) + s.flush()
    records = out.split(b"\n")[:-1]
    assert all(len(r) <= logfiles.STAMP_LEN + 1 + logfiles.MAX_PIECE for r in records)
    assert b"".join(logfiles.parse(r + b"\n")[1] for r in records) == line + b"\n" + line[:100]


def test_a_line_a_tenant_prints_cannot_pass_for_a_record_of_its_own():
    s = logfiles.Stamper()
    forged = b"2020-01-01T00:00:00.000000Z fake line"
    out = s.feed(forged + b"\n", b"2026-12-02T22:40:01.000001Z", 0.0)
    at, body = logfiles.parse(out)
    assert at == b"2026-12-02T22:40:01.000001Z" and body == forged + b"\n"


def test_moments():
    now = datetime(2026, 12, 2, 22, 40, 0, tzinfo=timezone.utc)
    assert moments.parse("10m", now) == "2026-12-02T22:30:00.000000Z"
    assert moments.parse("1h30m", now) == "2026-12-02T21:10:00.000000Z"
    assert moments.parse("2026-12-01T08:00", now) == "2026-12-01T08:00:00.000000Z"
    assert moments.parse("2026-12-01T08:00:05Z", now) == "2026-12-01T08:00:05.000000Z"
    for bad in ("", "soon", "10x", "2026-13-01"):
        with pytest.raises(moments.MomentError, match="not a moment"):
            moments.parse(bad, now)


def _writer(folder, file_bytes, keep):
    return subprocess.Popen(logfiles.writer_argv(str(folder), file_bytes, keep), stdin=subprocess.PIPE)


@pytest.fixture
def logs(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir(mode=0o750)
    return folder


def test_a_window_gives_exactly_its_lines(logs):
    w = _writer(logs / "3", 1 << 20, 4 << 20)
    marks = []
    for i in range(6):
        marks.append(logfiles.stamp().decode())
        w.stdin.write(f"marker {i}\n".encode())
        w.stdin.flush()
        time.sleep(0.15)
    w.stdin.close()
    assert w.wait(10) == 0
    out = _read(logs, since=marks[2], until=marks[4])
    assert out == b"marker 2\nmarker 3\n"
    assert _read(logs) == b"".join(f"marker {i}\n".encode() for i in range(6))
    assert _read(logs, tail=2) == b"marker 4\nmarker 5\n"
    stamped = _read(logs, tail=1, timestamps=True).decode()
    assert stamped.endswith(" [3] marker 5\n") and stamped[:2] == "20" and stamped[26] == "Z"


def test_runs_and_instances_merge_in_time_order(logs):
    for instance, line in (("1", b"old\n"), ("2", b"new\n"), ("1", b"old again\n")):
        w = _writer(logs / instance, 1 << 20, 4 << 20)
        w.communicate(line, 10)
        time.sleep(0.01)
    assert _read(logs) == b"old\nnew\nold again\n"
    assert _read(logs, instance="1") == b"old\nold again\n"
    assert len(os.listdir(logs / "1")) == 2  # one file per run


def test_a_gigabyte_stays_within_its_cap_and_the_newest_lines_are_kept(logs):
    file_bytes, keep = 8 << 20, 32 << 20
    w = _writer(logs / "1", file_bytes, keep)
    line = b"x" * 1000 + b"\n"
    block = line * 1024
    for i in range(1024):  # 1 GiB
        w.stdin.write(block)
    w.stdin.write(b"the very last line\n")
    w.stdin.close()
    assert w.wait(300) == 0
    sizes = [os.path.getsize(p) for *_x, p in logfiles.files_of(str(logs))]
    assert sum(sizes) <= keep + file_bytes, sizes
    assert _read(logs, tail=1) == b"the very last line\n"
    assert (os.stat(logs / "1").st_mode & 0o777) == 0o750


def test_pruning_spares_a_file_a_writer_holds(logs):
    live = _writer(logs / "2", 1 << 20, 1 << 20)
    live.stdin.write(b"a" * 9000 + b"\n")
    live.stdin.flush()
    time.sleep(0.3)
    assert logfiles.prune(str(logs), 0) == 0  # it is held
    live.stdin.close()
    live.wait(10)
    assert logfiles.prune(str(logs), 0) > 0 and logfiles.files_of(str(logs)) == []


def _read(logs, instance="", since="", until="", tail=0, timestamps=False):
    argv = [sys.executable, "-I", "-S", "-B", logfiles.__file__, "read", f"--logs={logs}", f"--instance={instance}",
            f"--since={since}", f"--until={until}", f"--tail={tail}", *(["--timestamps"] if timestamps else [])]
    return subprocess.run(argv, capture_output=True, check=True, timeout=120).stdout
