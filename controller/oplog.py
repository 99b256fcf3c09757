"""An operation's output on the controller's disk, exactly once and in order.

`output.log` holds stdout and stderr interleaved as produced (readable with `less`);
`streams.idx` lists, one `offset stream` line each, where the stream changes. Chunks are placed
by their byte offset, so a chunk resent after a reconnect is dropped or trimmed, never doubled.
"""

from __future__ import annotations

import bisect
import os
from collections import deque
from pathlib import Path

from protos import deployer_pb2 as pb


RECENT_BYTES = 8 << 20  # kept in memory so live followers are served without reading the file
RECENT_PIECES = 512


class OutputGap(Exception):
    """A chunk starts past what we have: bytes in between were never received."""


class OutputLog:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._fd = os.open(folder / "output.log", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.received = os.fstat(self._fd).st_size
        self._offsets: list[int] = []
        self._streams: list[int] = []
        self._load_index()
        self._idx = open(folder / "streams.idx", "a")
        self.synced = self.received
        self._recent: deque[tuple[int, int, bytes]] = deque()
        self._recent_bytes = 0

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
            self._idx.write(f"{self.received} {chunk.stream}\n")
            self._idx.flush()
            self._offsets.append(self.received)
            self._streams.append(chunk.stream)
        os.write(self._fd, data)
        self._recent.append((self.received, chunk.stream, data))
        self._recent_bytes += len(data)
        while self._recent_bytes > RECENT_BYTES or len(self._recent) > RECENT_PIECES:
            self._recent_bytes -= len(self._recent.popleft()[2])
        self.received += len(data)
        return len(data)

    def sync(self) -> int:
        """Make what was received durable; returns the offset it is safe to acknowledge."""
        received = self.received
        if received == self.synced:
            return self.synced  # nothing new since the last sync (often: no output at all)
        os.fsync(self._fd)
        os.fsync(self._idx.fileno())
        self.synced = max(self.synced, received)
        return self.synced

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
        self._idx.close()
