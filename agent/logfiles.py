"""Service logs on disk: one writer process per service run stamps each line it reads and
rotates by size; readers select lines by time.

Layout (in a service's `logs` folder, root's and the environment group's):
    logs/<instance>/<run start>.<seq>.log
One folder per instance (a code instance number, `redis-<n>`), one file per run, a new file
(`seq` + 1) each time the current one reaches its size. A record is one line of the file:

    2026-12-02T22:40:01.123456Z␠<bytes of one line of output>\\n
    2026-12-02T22:40:01.123456Z~<bytes that were not followed by a newline>\\n

so the output is byte-exact once the stamp (and, after `~`, the added newline) is taken off. A
line longer than MAX_PIECE, or left without its newline for PAUSE_S, is written in pieces marked
`~`. The stamp is when the first byte of the line was read. Stamps of UTC in one fixed width
compare as strings, which is all a reader needs.

The writer keeps the service's folder under `--keep` bytes by removing the oldest files, never
one a writer still holds (an exclusive `flock` on its current file). It runs as root, from the
agent's own folder, in a session of its own outside the service's process group and limits, and
reads only bytes from its standard input: nothing of the tenant is opened, parsed or run.

Standard library only: run as `python3 -I -S -B logfiles.py write|read …`.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import os
import re
import select
import stat
import sys
import time
from collections import deque
from datetime import datetime, timezone

STAMP_LEN = 27            # 2026-12-02T22:40:01.123456Z
MAX_PIECE = 16 * 1024     # longest piece of a line in one record
PAUSE_S = 1.0             # a partial line waiting longer than this is written as it is
READ_BYTES = 64 * 1024
FILE_RE = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z)\.(\d{4,})\.log$")
INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FOLLOW_EVERY_S = 0.2
FILE_BYTES, KEEP_BYTES = 10 << 20, 100 << 20   # when the controller does not say


def stamp(now: float | None = None) -> bytes:
    moment = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()


def run_name(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


# ---------------------------------------------------------------- records (pure)

class Stamper:
    """Cuts a byte stream into records; `feed` and `flush` return the bytes to write."""

    def __init__(self) -> None:
        self.pending = b""
        self.pending_at = b""   # the stamp of the pending line's first byte
        self.pending_since = 0.0

    def feed(self, data: bytes, at: bytes, now: float) -> bytes:
        if not data:
            return b""
        lines = data.split(b"\n")
        rest = lines.pop()
        out = []
        if lines:
            first = self.pending + lines[0]
            out.append(self._pieces(first, self.pending_at if self.pending else at, True))
            out.extend(self._pieces(line, at, True) for line in lines[1:])
            self.pending = b""
        if rest:
            if not self.pending:
                self.pending_at, self.pending_since = at, now
            self.pending += rest
            if len(self.pending) >= MAX_PIECE:
                cut = len(self.pending) - len(self.pending) % MAX_PIECE
                out.append(self._pieces(self.pending[:cut], self.pending_at, False))
                self.pending = self.pending[cut:]
                self.pending_at, self.pending_since = at, now
        return b"".join(out)

    def flush(self) -> bytes:
        """The pending part of a line, as it is (it had no newline yet)."""
        if not self.pending:
            return b""
        out = self._pieces(self.pending, self.pending_at, False)
        self.pending = b""
        return out

    @staticmethod
    def _pieces(line: bytes, at: bytes, ended: bool) -> bytes:
        if len(line) <= MAX_PIECE:
            return at + (b" " if ended else b"~") + line + b"\n"
        chunks = [line[i:i + MAX_PIECE] for i in range(0, len(line), MAX_PIECE)]
        marks = [b"~"] * (len(chunks) - 1) + [b" " if ended else b"~"]
        return b"".join(at + mark + chunk + b"\n" for mark, chunk in zip(marks, chunks))


def parse(record: bytes) -> tuple[bytes, bytes] | None:
    """(stamp, original bytes) of one record with its newline; None for anything else."""
    if len(record) < STAMP_LEN + 2 or record[STAMP_LEN:STAMP_LEN + 1] not in (b" ", b"~") \
            or record[STAMP_LEN - 1:STAMP_LEN] != b"Z" or not record.endswith(b"\n"):
        return None
    body = record[STAMP_LEN + 1:]
    return record[:STAMP_LEN], body if record[STAMP_LEN] == 32 else body[:-1]


# ---------------------------------------------------------------- the writer

def _open_new(folder: str, run: str, seq: int, gid: int) -> int:
    fd = os.open(os.path.join(folder, f"{run}.{seq:04d}.log"),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.fchown(fd, 0, gid)
    return fd


def _own_folder(folder: str) -> int:
    """The instance's folder, made if need be: a real folder of root's in a folder of root's,
    with the group of the service's `logs` folder (which lets the environment read it)."""
    parent = os.path.dirname(folder)
    info = os.lstat(parent)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o002:
        raise OSError(f"{parent} is not a folder of root's")
    try:
        os.mkdir(folder, 0o750)
    except FileExistsError:
        pass
    mine = os.lstat(folder)
    if not stat.S_ISDIR(mine.st_mode) or mine.st_uid != 0:
        raise OSError(f"{folder} is not a folder of root's")
    os.chown(folder, 0, info.st_gid)
    os.chmod(folder, 0o750)
    return info.st_gid


def files_of(logs: str, instance: str = "", every: bool = False) -> list[tuple[str, str, int, str]]:
    """(instance, run, seq, path) of the log files of a service's `logs` folder, oldest first:
    one instance's, the code instances' or (`every`) all."""
    out = []
    try:
        names = [instance] if instance else os.listdir(logs)
    except OSError:
        return out
    for name in names:
        if not INSTANCE_RE.match(name) or (not instance and not every and not name.isdigit()):
            continue  # without an instance named, the code instances (a dedicated Redis is apart)
        folder = os.path.join(logs, name)
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                continue
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            if m := FILE_RE.match(entry):
                out.append((name, m.group(1), int(m.group(2)), os.path.join(folder, entry)))
    out.sort(key=lambda f: (f[1], f[2], f[0]))
    return out


def prune(logs: str, keep: int) -> int:
    """Remove the oldest files of `logs` while it holds more than `keep` bytes; a file a writer
    still holds stays. Returns the bytes removed."""
    sized = []
    for _instance, _run, _seq, path in files_of(logs, every=True):
        try:
            sized.append((path, os.lstat(path).st_size))
        except OSError:
            continue
    total, removed = sum(size for _p, size in sized), 0
    for path, size in sized:
        if total <= keep:
            break
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            os.unlink(path)
            total -= size
            removed += size
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


UNLINKED_CHECK_S = 1.0


def write(folder: str, file_bytes: int, keep: int, source: int = 0, until_unlinked: bool = False) -> None:
    """Stamp what `source` gives until its end; with `until_unlinked`, `source` is a FIFO this
    process also holds for writing (so no writer ever waits for a reader, nor does its end look
    like the end of the output), and the writer stops once the FIFO's name is gone."""
    gid = _own_folder(folder)
    logs = os.path.dirname(folder)
    started = time.time()
    run, seq = run_name(started), 1
    while True:
        try:
            fd = _open_new(folder, run, seq, gid)
            break
        except FileExistsError:
            started += 1e-6
            run = run_name(started)
    prune(logs, keep)
    stamper, size = Stamper(), 0
    while True:
        waiting = PAUSE_S if stamper.pending else UNLINKED_CHECK_S if until_unlinked else None
        ready, _w, _x = select.select([source], [], [], waiting)
        now = time.time()
        if not ready and until_unlinked and os.fstat(source).st_nlink == 0:
            ready, chunk = [], b""  # stopped: the agent removed the FIFO
            data = stamper.flush()
        elif not ready:
            data = stamper.flush()
            chunk = None
        else:
            try:
                chunk = os.read(source, READ_BYTES)
            except (InterruptedError, BlockingIOError):  # a FIFO (the systemd driver's) woke us early
                continue
            data = stamper.feed(chunk, stamp(now), now) if chunk else stamper.flush()
            if stamper.pending and now - stamper.pending_since >= PAUSE_S:
                data += stamper.flush()
        if data:
            os.write(fd, data)
            size += len(data)
            if size >= file_bytes:
                os.close(fd)
                seq, size = seq + 1, 0
                fd = _open_new(folder, run, seq, gid)
                prune(logs, keep)
        if chunk == b"":
            os.close(fd)
            return


# ---------------------------------------------------------------- readers

def _records(path: str, since: bytes, until: bytes, instance: str):
    """(stamp, instance, original bytes) of a file's records within [since, until)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    with os.fdopen(fd, "rb") as f:
        for record in f:
            parsed = parse(record)
            if parsed is None:
                continue
            at, body = parsed
            if since and at < since:
                continue
            if until and at >= until:
                return
            yield at, instance, body


def select_records(files: list[tuple[str, str, int, str]], since: bytes = b"", until: bytes = b"",
                   tail: int = 0):
    """The records of `files` in one time order (runs that overlapped, such as two instances
    during a switch, are merged by stamp); only the last `tail` if `tail`."""
    if since:
        files = [f for f in files if _last_write(f[3]) >= _seconds(since)]
    if tail and not since:
        # The newest files until they hold enough lines; a file's lines are its records.
        chosen, count = [], 0
        for f in reversed(files):
            chosen.append(f)
            count += _count_lines(f[3])
            if count >= tail:
                break
        files = sorted(chosen, key=lambda f: (f[1], f[2], f[0]))
    merged = heapq.merge(*(_records(f[3], since, until, f[0]) for f in files), key=lambda r: r[0])
    return deque(merged, maxlen=tail) if tail else merged


def _last_write(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def _seconds(at: bytes) -> float:
    return datetime.strptime(at.decode(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp() - 1


def shown(record: tuple[bytes, str, bytes], timestamps: bool) -> bytes:
    at, instance, body = record
    if not timestamps:
        return body
    return at + b" [" + instance.encode() + b"] " + body + (b"" if body.endswith(b"\n") else b"\n")


def read(logs: str, instance: str, since: bytes, until: bytes, tail: int, follow: bool,
         timestamps: bool, out=None) -> None:
    out = out or sys.stdout.buffer
    files = files_of(logs, instance)
    if not files and (legacy := _legacy(logs, instance)):
        # Written before stamped logs, or by the systemd driver: the file as it is.
        if since or until:
            print(f"{legacy} has no stamps (written by an older agent): "
                  "--since and --until need stamped logs", file=sys.stderr)
            raise SystemExit(1)
        _read_legacy(logs, instance, legacy, tail or 20, follow, out)
        return
    for record in select_records(files, since, until, tail):
        out.write(shown(record, timestamps))
    out.flush()
    if not follow:
        return
    # From the end of what exists now: new lines of these files, and files that appear later
    # (a restart, a rotation, a new instance).
    offsets = {f[3]: _size(f[3]) for f in files}
    while True:
        time.sleep(FOLLOW_EVERY_S)
        wrote = False
        for f in files_of(logs, instance):
            path = f[3]
            offset = offsets.get(path, 0)
            if _size(path) <= offset:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as fh:
                fh.seek(offset)
                for record in fh:
                    if not record.endswith(b"\n"):
                        break  # the writer is mid-line: read it whole next time
                    offset += len(record)
                    parsed = parse(record)
                    if parsed is not None and (not until or parsed[0] < until):
                        out.write(shown((parsed[0], f[0], parsed[1]), timestamps))
                        wrote = True
            offsets[path] = offset
        if wrote:
            out.flush()


def _read_legacy(logs: str, instance: str, path: str, tail: int, follow: bool, out) -> None:
    """The last lines of an unstamped file; following, the newest such file as new ones appear
    (a redeploy's instance)."""
    with open(path, "rb") as f:
        data = f.read()
        offset = len(data)
    out.write(b"".join(data.splitlines(keepends=True)[-tail:]))
    out.flush()
    while follow:
        time.sleep(FOLLOW_EVERY_S)
        newest = _legacy(logs, instance)
        if newest and newest != path:
            path, offset = newest, 0
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        if data:
            offset += len(data)
            out.write(data)
            out.flush()


def _legacy(logs: str, instance: str) -> str:
    """The newest unstamped `<instance>.log` of a service (of a code instance unless named)."""
    try:
        names = [f"{instance}.log"] if instance else [n for n in os.listdir(logs)
                                                      if n.endswith(".log") and n[:-4].isdigit()]
    except OSError:
        return ""
    found = [os.path.join(logs, n) for n in names if os.path.isfile(os.path.join(logs, n))]
    return max(found, key=_last_write, default="")


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


# ---------------------------------------------------------------- how the agent runs them

def _python() -> str:
    return sys.executable or "/usr/bin/python3"


def writer_argv(folder: str, file_bytes: int, keep: int, until_unlinked: bool = False) -> list[str]:
    return [_python(), "-I", "-S", "-B", os.path.abspath(__file__), "write", f"--dir={folder}",
            f"--file-bytes={int(file_bytes)}", f"--keep={int(keep)}",
            *(["--until-unlinked"] if until_unlinked else [])]


def read_exec(spec, services_root):
    """The exec that prints what a LogReadSpec asks for; StartError if its folder is not a
    service's `logs` folder under the services root (the controller names it, still checked)."""
    from protos import deployer_pb2 as pb
    from agent.executor import StartError
    root = os.path.abspath(str(services_root))
    logs = spec.logs
    if (not logs.startswith(root + "/") or os.path.normpath(logs) != logs or os.path.basename(logs) != "logs"
            or logs.count("/") != root.count("/") + 2):
        raise StartError(f"not a service's logs folder: {logs[:120]!r}")
    if spec.instance and not INSTANCE_RE.match(spec.instance):
        raise StartError(f"invalid instance {spec.instance[:40]!r}")
    for at in (spec.since, spec.until):
        if at and not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", at):
            raise StartError(f"invalid time {at[:40]!r}")
    argv = [_python(), "-I", "-S", "-B", os.path.abspath(__file__), "read", f"--logs={logs}",
            f"--instance={spec.instance}", f"--since={spec.since}", f"--until={spec.until}",
            f"--tail={spec.tail}", *(["--follow"] if spec.follow else []),
            *(["--timestamps"] if spec.timestamps else [])]
    return pb.ExecSpec(argv=argv, cwd="/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="logfiles")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--dir", required=True)
    w.add_argument("--file-bytes", type=int, required=True)
    w.add_argument("--keep", type=int, required=True)
    w.add_argument("--until-unlinked", action="store_true")
    r = sub.add_parser("read")
    r.add_argument("--logs", required=True)
    r.add_argument("--instance", default="")
    r.add_argument("--since", default="")
    r.add_argument("--until", default="")
    r.add_argument("--tail", type=int, default=0)
    r.add_argument("--follow", action="store_true")
    r.add_argument("--timestamps", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "write":
        write(args.dir, max(args.file_bytes, 4096), max(args.keep, 2 * args.file_bytes),
              until_unlinked=args.until_unlinked)
        return 0
    if args.instance and not INSTANCE_RE.match(args.instance):
        print(f"invalid instance {args.instance[:40]!r}", file=sys.stderr)
        return 2
    try:
        read(args.logs, args.instance, args.since.encode(), args.until.encode(), args.tail,
             args.follow, args.timestamps)
    except (BrokenPipeError, KeyboardInterrupt):
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
