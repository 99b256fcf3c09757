"""An operation's output on the controller's disk, exactly once and in order.

`output.log` holds stdout and stderr interleaved as produced (readable with `less`);
`streams.idx` lists, one `offset stream` line each, where the stream changes. Chunks are placed
by their byte offset, so a chunk resent after a reconnect is dropped or trimmed, never doubled.

`received` counts only bytes the disk took: a write that is short or fails (a full disk) keeps
what fit and raises `OutputRefused`, and an fsync that fails takes back everything since the last
good one, since the kernel may have dropped those pages. So an offset acknowledged from `sync()`
is always on disk, and the agent, asked to, sends the rest again.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections import deque
from pathlib import Path

from protos import deployer_pb2 as pb
from common import errors


RECENT_BYTES = 8 << 20  # kept in memory so live followers are served without reading the file
RECENT_PIECES = 512


class OutputGap(errors.Broken):
    """A chunk starts past what we have: bytes in between were never received."""


class OutputRefused(errors.Broken, OSError):
    """The disk did not take (all of) a chunk; nothing past `received` is kept."""


class OutputLog:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        # Written with pwrite at `received`, not O_APPEND: after a failed write the file's end is
        # not trusted, `received` is.
        self._fd = os.open(folder / "output.log", os.O_RDWR | os.O_CREAT, 0o600)
        self.received = os.fstat(self._fd).st_size
        self._offsets: list[int] = []
        self._streams: list[int] = []
        self._load_index()
        self._idx = os.open(folder / "streams.idx", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._idx_size = os.fstat(self._idx).st_size
        self.synced = self.received
        self._recent: deque[tuple[int, int, bytes]] = deque()
        self._recent_bytes = 0

    def text(self) -> str:
        """All the output received, stdout and stderr as they interleaved, as text (a fact's input)."""
        return (self.folder / "output.log").read_text(errors="replace")

    def _load_index(self) -> None:
        path = self.folder / "streams.idx"
        if not path.exists():
            return
        lines = []
        for line in path.read_text().splitlines():
            try:
                offset, stream = (int(x) for x in line.split())
            except ValueError:
                break  # a line torn by a crash
            if offset >= self.received:
                break  # recorded just before its data, which never came
            lines.append(line)
            self._offsets.append(offset)
            self._streams.append(stream)
        path.write_text("".join(line + "\n" for line in lines))

    def write(self, chunk: pb.OutputChunk) -> int:
        """Add what is new in the chunk; returns how many bytes were new."""
        data = chunk.data
        end = chunk.offset + len(data)
        if end <= self.received:
            return 0
        if chunk.offset > self.received:
            raise OutputGap(f"chunk at {chunk.offset} but only {self.received} bytes received")
        data = data[self.received - chunk.offset:]
        if not self._streams or self._streams[-1] != chunk.stream:
            self._append_index(self.received, chunk.stream)
        try:
            written = os.pwrite(self._fd, data, self.received)
        except OSError as exc:
            raise OutputRefused(exc.errno, exc.strerror) from None
        kept = data[:written]
        if kept:
            self._recent.append((self.received, chunk.stream, kept))
            self._recent_bytes += len(kept)
            while self._recent_bytes > RECENT_BYTES or len(self._recent) > RECENT_PIECES:
                self._recent_bytes -= len(self._recent.popleft()[2])
            self.received += len(kept)
        if written < len(data):
            # A short write: the disk is full. What fit is kept and counted, nothing after it.
            raise OutputRefused(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)

    def _append_index(self, offset: int, stream: int) -> None:
        """Record a change of stream before its data, whole or not at all (a torn line would
        hide every later one)."""
        line = f"{offset} {stream}\n".encode()
        try:
            written = os.write(self._idx, line)
        except OSError as exc:
            raise OutputRefused(exc.errno, exc.strerror) from None
        if written < len(line):
            self._cut_index(self._idx_size)
            raise OutputRefused(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._idx_size += written
        self._offsets.append(offset)
        self._streams.append(stream)

    def _cut_index(self, size: int) -> None:
        try:
            os.ftruncate(self._idx, size)
        except OSError:
            pass  # a torn last line is dropped when the index is read back
        self._idx_size = size

    def sync(self) -> int:
        """Make what was received durable; returns the offset it is safe to acknowledge. If the
        disk fails to, what came since the last sync is given up (OutputRefused)."""
        received = self.received
        if received == self.synced:
            return self.synced  # nothing new since the last sync (often: no output at all)
        try:
            os.fsync(self._fd)
            os.fsync(self._idx)
        except OSError as exc:
            self._take_back(self.synced)
            raise OutputRefused(exc.errno, exc.strerror) from None
        self.synced = max(self.synced, received)
        return self.synced

    def _take_back(self, offset: int) -> None:
        """Forget everything from `offset` on, so it is received (and written) again."""
        try:
            os.ftruncate(self._fd, offset)
        except OSError:
            pass  # the next write at `offset` overwrites it; `received` says where the output ends
        self.received = offset
        if self._offsets and self._offsets[-1] >= offset:
            while self._offsets and self._offsets[-1] >= offset:
                self._offsets.pop()
                self._streams.pop()
            lines = "".join(f"{o} {s}\n" for o, s in zip(self._offsets, self._streams)).encode()
            self._cut_index(0)
            try:
                self._idx_size = os.write(self._idx, lines)
            except OSError:
                pass  # read back, the index stops at what it lost; the output stays whole
        while self._recent and self._recent[-1][0] >= offset:
            self._recent_bytes -= len(self._recent.pop()[2])
        if self._recent and self._recent[-1][0] + len(self._recent[-1][2]) > offset:
            start, stream, data = self._recent.pop()
            self._recent_bytes -= len(data) - (offset - start)
            self._recent.append((start, stream, data[:offset - start]))

    def read(self, offset: int, max_bytes: int = 1 << 20) -> list[tuple[int, int, bytes]]:
        """(offset, stream, data) pieces from `offset`, split where the stream changes."""
        if self._recent and self._recent[0][0] <= offset < self.received:
            return self._read_recent(offset, max_bytes)
        end = min(self.received, offset + max_bytes)
        pieces = []
        while offset < end:
            i = bisect.bisect_right(self._offsets, offset) - 1
            stream = self._streams[i] if i >= 0 else pb.STDOUT
            stop = self._offsets[i + 1] if i + 1 < len(self._offsets) else end
            stop = min(stop, end)
            data = os.pread(self._fd, stop - offset, offset)
            if not data:
                break
            pieces.append((offset, stream, data))
            offset += len(data)
        return pieces

    def _read_recent(self, offset: int, max_bytes: int) -> list[tuple[int, int, bytes]]:
        """The fast path for live followers; adjacent pieces of one stream are joined."""
        runs: list[tuple[int, int, list[bytes]]] = []
        total = 0
        for start, stream, data in self._recent:
            if start + len(data) <= offset:
                continue
            if total >= max_bytes:
                break
            if start < offset:
                data, start = data[offset - start:], offset
            data = data[:max_bytes - total]
            if runs and runs[-1][1] == stream:
                runs[-1][2].append(data)
            else:
                runs.append((start, stream, [data]))
            total += len(data)
        return [(start, stream, b"".join(parts)) for start, stream, parts in runs]

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._idx)
