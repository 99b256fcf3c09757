"""Disk-backed output spool: every byte an operation prints, kept until the controller acks it.

Output is appended to segment files as framed records and the sender reads it back from disk, so
the agent's memory stays bounded however fast a command writes or however long the controller is
away. A record is `seq, offset, stream, length` followed by the bytes; segments are named by the
output offset they start at, and a segment is deleted once the controller has acked past its end.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path

_HEADER = struct.Struct(">QQBI")  # seq, offset, stream, length
SEGMENT_BYTES = 8 << 20
RECENT_BYTES = 8 << 20  # output kept in memory too, so a sender keeping up never reads it back
RECENT_RECORDS = 512


class SpoolError(OSError):
    """The spool could not be written or read (most often: the disk is full)."""


@dataclass(frozen=True)
class Record:
    seq: int
    offset: int
    stream: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


def _segment_name(start: int) -> str:
    return f"seg-{start:020d}"


class Spool:
    """Append-only output of one operation; `end` is the offset after the last byte written."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._segments: list[int] = sorted(
            int(p.name[4:]) for p in folder.glob("seg-*") if p.name[4:].isdigit()
        )
        self.end = 0
        self.next_seq = 0
        self._fd: int | None = None
        self._segment_size = 0
        self._cursor = (-1, 0, 0)  # (offset, segment index, file position) after the last read
        self._recent: deque[Record] = deque()
        self._recent_bytes = 0
        self._recover()

    def _recover(self) -> None:
        """Find the end of what is on disk, dropping a record torn by a crash mid-write."""
        if not self._segments:
            return
        last = self.folder / _segment_name(self._segments[-1])
        good = 0
        self.end = self._segments[-1]
        with open(last, "rb") as f:
            while True:
                header = f.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    break
                seq, offset, _stream, length = _HEADER.unpack(header)
                if len(f.read(length)) < length:
                    break
                good = f.tell()
                self.end = offset + length
                self.next_seq = seq + 1
        os.truncate(last, good)

    def append(self, stream: int, data: bytes) -> Record:
        record = Record(self.next_seq, self.end, stream, data)
        try:
            if self._fd is None or self._segment_size >= SEGMENT_BYTES:
                self._open_segment()
            os.writev(self._fd, [_HEADER.pack(record.seq, record.offset, stream, len(data)), data])
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot write output spool in {self.folder}: {exc.strerror}") from exc
        self._segment_size += _HEADER.size + len(data)
        self.end = record.end
        self.next_seq += 1
        self._recent.append(record)
        self._recent_bytes += len(data)
        while self._recent_bytes > RECENT_BYTES or len(self._recent) > RECENT_RECORDS:
            self._recent_bytes -= len(self._recent.popleft().data)
        return record

    def _open_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        if not self._segments or self._segment_size >= SEGMENT_BYTES:
            self._segments.append(self.end)
            self._segment_size = 0
        path = self.folder / _segment_name(self._segments[-1])
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segment_size = os.fstat(self._fd).st_size

    def close(self) -> None:
        self._recent.clear()
        self._recent_bytes = 0
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, offset: int, max_bytes: int = 1 << 20) -> list[Record]:
        """Output from `offset` on, as records of one stream each (adjacent records merged).

        The first record is trimmed to start exactly at `offset`. Sequential readers resume where
        the previous call stopped without rescanning the segment.
        """
        if self._recent and self._recent[0].offset <= offset < self.end:
            return self._read_recent(offset, max_bytes)
        out: list[Record] = []
        total = 0
        index, position = self._locate(offset)
        while index is not None and index < len(self._segments) and total < max_bytes:
            try:
                f = open(self.folder / _segment_name(self._segments[index]), "rb")
            except FileNotFoundError:
                break
            with f:
                f.seek(position)
                while total < max_bytes:
                    header = f.read(_HEADER.size)
                    if len(header) < _HEADER.size:
                        break
                    seq, start, stream, length = _HEADER.unpack(header)
                    if start + length <= offset:
                        f.seek(length, os.SEEK_CUR)
                        continue
                    data = f.read(length)
                    if len(data) < length:
                        break  # a record still being written: read it next time
                    if start < offset:
                        data = data[offset - start:]
                        start = offset
                    if out and out[-1].stream == stream and out[-1].end == start:
                        last = out[-1]
                        out[-1] = Record(last.seq, last.offset, stream, last.data + data)
                    else:
                        out.append(Record(seq, start, stream, data))
                    total += len(data)
                    offset = start + len(data)
                    self._cursor = (offset, index, f.tell())
            index += 1
            position = 0
        return out

    def _read_recent(self, offset: int, max_bytes: int) -> list[Record]:
        """The fast path: records still in memory (those before `offset` are dropped), adjacent
        records of one stream joined into one."""
        while self._recent and self._recent[0].end <= offset:
            self._recent_bytes -= len(self._recent.popleft().data)
        runs: list[tuple[Record, list[bytes]]] = []
        total = 0
        for record in self._recent:
            if total >= max_bytes:
                break
            data = record.data[offset - record.offset:] if record.offset < offset else record.data
            if runs and runs[-1][0].stream == record.stream:
                runs[-1][1].append(data)
            else:
                runs.append((Record(record.seq, max(offset, record.offset), record.stream, b""), [data]))
            total += len(data)
        return [Record(r.seq, r.offset, r.stream, b"".join(parts)) for r, parts in runs]

    def _locate(self, offset: int) -> tuple[int | None, int]:
        if self._cursor[0] == offset and self._cursor[1] < len(self._segments):
            return self._cursor[1], self._cursor[2]
        candidates = [i for i, start in enumerate(self._segments) if start <= offset]
        if candidates:
            return candidates[-1], 0
        return (0 if self._segments else None), 0

    def release_below(self, offset: int) -> None:
        """Delete whole segments that end at or before `offset` (the controller has them)."""
        while len(self._segments) > 1 and self._segments[1] <= offset:
            (self.folder / _segment_name(self._segments[0])).unlink(missing_ok=True)
            self._segments.pop(0)
            self._cursor = (-1, 0, 0)

    def discard(self) -> None:
        self.close()
        for start in self._segments:
            (self.folder / _segment_name(start)).unlink(missing_ok=True)
        self._segments = []
