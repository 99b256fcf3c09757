"""Faults for integration tests: a link that turns into a black hole, a small disk, log timelines."""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import threading
from datetime import datetime
from pathlib import Path


class BlackHoleProxy:
    """A TCP proxy between agents and the controller that can stop forwarding without closing.

    `pause()` is a black hole: no byte moves in either direction and no socket is closed, so both
    ends see nothing but silence (their kernels keep buffering until the windows fill). New
    connections are accepted and held silent as well. `resume()` lets everything held flow on,
    as when a route comes back; `reset()` instead ends every connection with a reset, as a
    middlebox that forgot them would, and forwards new ones normally.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.flowing = threading.Event()
        self.flowing.set()
        self.lock = threading.Lock()
        self.links: list[_Link] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            link = _Link(client, server)
            with self.lock:
                if self.closed:
                    link.reset()
                    return
                self.links.append(link)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(link, src, dst), daemon=True).start()

    def _pipe(self, link: "_Link", src: socket.socket, dst: socket.socket) -> None:
        # Never block in recv() for long: a socket closed while another thread sits in recv() on
        # it stays open until that call returns, and its reset would not go out.
        try:
            while not link.dead:
                if not self.flowing.wait(0.1):
                    continue  # paused: stop reading, so the sender's buffers fill up
                if not select.select([src], [], [], 0.1)[0]:
                    continue
                data = src.recv(1 << 16)
                if not data:
                    break
                while not self.flowing.wait(0.1):  # a read that raced with pause() is held too
                    if link.dead:
                        return
                if link.dead:
                    return
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket closed meanwhile
            return
        link.close()

    def pause(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def reset(self) -> None:
        """End every connection with a reset (RST), then forward again."""
        with self.lock:
            links, self.links = self.links, []
        for link in links:
            link.reset()
        self.flowing.set()

    def close(self) -> None:
        with self.lock:
            self.closed = True
        self.listener.close()
        self.reset()


class _Link:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.sockets = (client, server)
        self.dead = False

    def close(self) -> None:
        self.dead = True
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def reset(self) -> None:
        self.dead = True
        for s in self.sockets:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass


class Tmpfs:
    """A small tmpfs on `path` (created if needed): `with Tmpfs(…)`, or mount() and unmount()."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        self.size = size

    def mount(self) -> "Tmpfs":
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs", str(self.path)],
                       check=True, capture_output=True)
        return self

    def unmount(self) -> None:
        # Lazy: a process that still has a file open there does not keep the mount busy.
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)

    def __enter__(self) -> "Tmpfs":
        return self.mount()

    def __exit__(self, *exc) -> None:
        self.unmount()

    def fill(self, name: str = "filler") -> int:
        """Take every free byte; returns how many were taken."""
        taken = 0
        block = b"\0" * 4096
        with open(self.path / name, "wb", buffering=0) as f:
            while True:
                try:
                    taken += f.write(block) or 0
                except OSError:
                    return taken

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize


def can_mount_tmpfs(base: Path) -> bool:
    try:
        with Tmpfs(base / "probe-tmpfs", "64k"):
            return True
    except (subprocess.CalledProcessError, OSError):
        return False


def log_records(path: Path, since_line: int = 0) -> list[dict]:
    """The JSON records of a log (controller or agent), from line `since_line` on."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines()[since_line:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def log_events(path: Path, name: str, since_line: int = 0) -> list[dict]:
    """The records of one event (`agent.connected`, …), from line `since_line` on."""
    return [record for record in log_records(path, since_line) if record.get("event") == name]


def log_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def timestamp(record: dict) -> float:
    """A log record's time (ISO 8601, UTC) as seconds since the epoch."""
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def max_in_window(times: list[float], window: float) -> int:
    """The largest number of the times that fall within any interval of length `window`."""
    times = sorted(times)
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] > window:
            start += 1
        best = max(best, end - start + 1)
    return best
