"""Disk-backed output spool: every byte an operation prints, kept until the controller acks it.

Output is appended to segment files as framed records and the sender reads it back from disk, so
the agent's memory stays bounded however fast a command writes or however long the controller is
away. A record is `seq, offset, stream, length` followed by the bytes; segments are named by the
output offset they start at, and a segment is deleted once the controller has acked past its end.
Once an ack reaches into the segment being written, a new one is started (when everything is acked,
or the segment has grown past ROTATE_BYTES), so output the controller already has never pins the
disk.

A write that fails (most often: the disk is full) never stops the command and never raises: the
bytes are counted as lost and dropped, and a write is tried again once acks free a segment, or a
second later. When one succeeds, a line on stderr marks the gap in the output ("… bytes of output
lost here …"), so what is kept stays in order and an operator sees where and how much is missing;
`loss_note()` says it for the operation's result.
"""

from __future__ import annotations

import os
import struct
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("agent")
_HEADER = struct.Struct(">QQBI")  # seq, offset, stream, length
SEGMENT_BYTES = 8 << 20
RECENT_BYTES = 8 << 20  # output kept in memory too, so a sender keeping up never reads it back
RECENT_RECORDS = 512
ROTATE_BYTES = 256 << 10  # an acked part this large is worth a new segment, so it can be deleted
PIECE_BYTES = 64 << 10  # what does not fit in one write is tried again in pieces this large
RETRY_S = 1.0  # after a failed write, output is dropped this long (or until acks free segments)
_STDERR = 2


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

    def __init__(self, folder: Path, op_id: str = "") -> None:
        self.folder = folder
        self.op_id = op_id or folder.parent.name
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
        self._last_byte = b"\n"
        self.lost_bytes = 0        # output dropped because it could not be written
        self.loss_error = ""       # why, the first time
        self._gap = 0              # bytes lost since the last byte kept (not yet marked)
        self._retry_at = 0.0
        self._broken = False       # a torn write could not be undone: nothing more is kept
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

    def append(self, stream: int, data: bytes) -> Record | None:
        """Keep the output; returns the last record kept, or None if none could be. What could not
        be written is counted in `lost_bytes`."""
        if self._gap and time.monotonic() < self._retry_at:
            self._lose(data)
            return None
        last, kept = None, 0
        if records := self._write(*self._note(), (stream, data)):  # a gap's note: both or neither
            last, kept = records[-1], len(data)
        elif len(data) > PIECE_BYTES:
            # The disk may still take a part: keep as much as fits, in order.
            while kept < len(data):
                records = self._write(*self._note(), (stream, data[kept:kept + PIECE_BYTES]))
                if not records:
                    break
                last, kept = records[-1], kept + len(records[-1].data)
                self._resumed()
        if last is not None:
            self._resumed()
        if kept < len(data):
            self._lose(data[kept:])
        return last

    def _note(self) -> list[tuple[int, bytes]]:
        return [self._gap_note()] if self._gap else []

    def _resumed(self) -> None:
        if self._gap:
            log.warning("op.output_resumed", op_id=self.op_id, lost_bytes=self._gap)
            self._gap = 0

    def _write(self, *items: tuple[int, bytes]) -> list[Record]:
        """Write records in one go; on failure none is kept (a torn one is cut off) and []."""
        if self._broken:
            return []
        records, frames, offset = [], [], self.end
        for seq, (stream, data) in enumerate(items, self.next_seq):
            records.append(Record(seq, offset, stream, data))
            frames += [_HEADER.pack(seq, offset, stream, len(data)), data]
            offset += len(data)
        try:
            if self._fd is None or self._segment_size >= SEGMENT_BYTES:
                self._open_segment(new=self._fd is not None or not self._segments)
            written = os.writev(self._fd, frames)
            if written < sum(map(len, frames)):
                raise OSError(28, os.strerror(28))  # ENOSPC: a short write means a full disk
        except OSError as exc:
            self._undo_torn_write()
            if not self.loss_error:
                self.loss_error = f"cannot write the output spool in {self.folder}: {exc.strerror}"
            return []
        self._segment_size += written
        self.end = offset
        self.next_seq += len(records)
        self._last_byte = records[-1].data[-1:]
        for record in records:
            self._recent.append(record)
            self._recent_bytes += len(record.data)
        while self._recent_bytes > RECENT_BYTES or len(self._recent) > RECENT_RECORDS:
            self._recent_bytes -= len(self._recent.popleft().data)
        return records

    def _undo_torn_write(self) -> None:
        """Cut a partly written record off the segment, so the next one starts on a boundary."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._segment_size)
        except OSError:
            self._broken = True  # readers stop before the torn record; nothing is appended after it

    def _lose(self, data: bytes) -> None:
        if not self.lost_bytes:
            log.error("op.output_lost", op_id=self.op_id, error=self.loss_error, kept_bytes=self.end,
                      then="output is dropped and counted until a write succeeds again")
        self.lost_bytes += len(data)
        self._gap += len(data)
        self._retry_at = time.monotonic() + RETRY_S

    def _gap_note(self) -> tuple[int, bytes]:
        """The stderr line that marks where output was lost, and how much."""
        newline = "" if self._last_byte == b"\n" else "\n"
        return _STDERR, (f"{newline}[deployer-agent: {self._gap} bytes of output lost here: "
                         f"{self.loss_error}]\n").encode()

    def seal(self) -> None:
        """The operation has ended: mark a gap left at the end if the disk has room now; close."""
        if self._gap and self._write(self._gap_note()):
            self._gap = 0
        self.close()

    def loss_note(self) -> str:
        """One line for the operation's result about output that could not be kept, or ''."""
        if not self.lost_bytes:
            return ""
        where = ("each gap is marked in the output" if not self._gap else
                 f"the last {self._gap} bytes are missing after the end of the recorded output")
        return f"output incomplete: {self.lost_bytes} bytes could not be kept ({self.loss_error}); {where}"

    def _open_segment(self, new: bool) -> None:
        """Open the last segment for appending, or first create a segment starting at `end`."""
        path = self.folder / _segment_name(self.end if new else self._segments[-1])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        if new and (not self._segments or self._segments[-1] != self.end):
            self._segments.append(self.end)
        self._segment_size = os.fstat(fd).st_size

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
        if self._fd is not None and self._segments and self._segments[-1] < offset:
            if offset >= self.end:
                # All acked: free it all at once, then start an empty segment (it keeps `end`).
                os.close(self._fd)
                self._fd = None
                for start in self._segments:
                    (self.folder / _segment_name(start)).unlink(missing_ok=True)
                self._segments, self._cursor = [], (-1, 0, 0)
                self._retry_at = 0.0  # room again: the next output is kept
                try:
                    self._open_segment(new=True)
                except OSError:
                    pass  # the next write creates it
                return
            if self._segment_size >= ROTATE_BYTES:
                try:
                    self._open_segment(new=True)  # the acked part can go once the rest is acked
                except OSError:
                    pass  # no room even for an empty file: a later ack rotates
        while len(self._segments) > 1 and self._segments[1] <= offset:
            (self.folder / _segment_name(self._segments[0])).unlink(missing_ok=True)
            self._segments.pop(0)
            self._cursor = (-1, 0, 0)
            self._retry_at = 0.0

    def discard(self) -> None:
        self.close()
        for start in self._segments:
            (self.folder / _segment_name(start)).unlink(missing_ok=True)
        self._segments = []
