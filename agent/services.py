"""The built-in service driver: a small supervisor for long-running service processes.

Services run detached in their own session, with output appended to their log file. Their state
(pid, start time, command) is kept in `<state_dir>/services/`, so a restarted agent adopts the
services that are still running. The driver never restarts anything on its own: a service that
dies stays dead until the controller says otherwise. It only says so at once (`on_exit`), for its
own children as they are reaped and for adopted ones as soon as their pid is gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import structlog

from protos import deployer_pb2 as pb

from agent import limits, logfiles
from agent.executor import StartError, confine_env, limits_confine, prepare, resolve_user, started

log = structlog.get_logger("agent")
DEFAULT_GRACE_S = 10.0
STARTUP_WATCH_S = 0.3  # a process that dies this fast did not start
SERVICE_LAUNCH_WAIT_S = 10.0


def _key(name: str, instance: str) -> str:
    return f"{name}@{instance}"


class Supervisor:
    name = "supervisor"

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "services"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping: set[str] = set()   # ended on an order: not news
        self.told: set[tuple[str, int]] = set()  # (key, pid) whose end was said
        self.on_exit = None               # called with pb.ServiceExited when a process ends unasked
        self.writers: list[subprocess.Popen] = []  # log writers, reaped as they end

    def _ended(self, key: str, state: dict, returncode: int | None) -> None:
        """Say once that a service ended without an order (`returncode` as Popen has it: -N for
        signal N; None when not known, for an adopted process)."""
        if key in self.stopping or (key, state.get("pid")) in self.told or self.on_exit is None:
            return
        self.told.add((key, state.get("pid")))
        code, sig = (-1, 0) if returncode is None else (0, -returncode) if returncode < 0 else (returncode, 0)
        self.on_exit(pb.ServiceExited(name=state.get("name", ""), instance=state.get("instance", ""),
                                      exit_code=code, signal=sig, at=time.time()))

    async def watch(self, every: float = 0.25) -> None:
        """Adopted services (started before this agent did) are no children to reap: their end
        is seen when their pid is gone."""
        while True:
            await asyncio.sleep(every)
            self.writers = [w for w in self.writers if w.poll() is None]
            for path in list(self.folder.glob("*.json")):
                key = path.stem
                if key in self.children or key in self.stopping:
                    continue
                state = self._load(key)
                if state and (key, state.get("pid")) not in self.told and not self.alive(state):
                    self._ended(key, state, None)

    def _state_path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def _load(self, key: str) -> dict | None:
        try:
            return json.loads(self._state_path(key).read_text())
        except (FileNotFoundError, ValueError):
            return None

    @staticmethod
    def alive(state: dict) -> bool:
        """Still the same process we started (a reused pid is not)."""
        try:
            proc = psutil.Process(state["pid"])
            return (abs(proc.create_time() - state["create_time"]) < 0.05
                    and proc.status() != psutil.STATUS_ZOMBIE)
        except (psutil.Error, KeyError):
            return False

    async def start(self, op_id: str, spec: pb.ServiceStartSpec) -> pb.OperationResult:
        key = _key(spec.name, spec.instance)
        previous = self._load(key)
        if previous and self.alive(previous):
            return pb.OperationResult(op_id=op_id, outcome=pb.EXITED,
                                      error=f"{key} already running (pid {previous['pid']})")
        user = resolve_user(spec.user) if spec.user else None
        launch = prepare(list(spec.argv), user, spec.cwd, spec.env_file, spec.env)
        confined = None
        if spec.HasField("limits"):
            _release(spec.limits.group, key)  # of an earlier process under this key, and its counts
            try:
                confined = limits_confine(key, spec.limits, launch.argv, user)
            except StartError:
                launch.close()
                raise
            launch.argv = confined.argv
            launch.env.update(confine_env(launch, confined))
        logfile = self._log_sink(spec)
        try:
            proc = subprocess.Popen(launch.argv, cwd=launch.cwd, env=launch.env, stdin=subprocess.DEVNULL,
                                    stdout=logfile, stderr=logfile, start_new_session=True,
                                    close_fds=True, pass_fds=launch.pass_fds)
        except FileNotFoundError:
            launch.close()
            raise StartError(f"command not found: {launch.argv[0]}") from None
        except OSError as exc:
            launch.close()
            raise StartError(f"cannot start {launch.argv[0]}: {exc.strerror}") from None
        finally:
            os.close(logfile)
        await asyncio.to_thread(started, launch, proc, SERVICE_LAUNCH_WAIT_S)  # a slow launcher blocks no one
        self.children[key] = proc
        state = {"name": spec.name, "instance": spec.instance, "pid": proc.pid,
                 "create_time": psutil.Process(proc.pid).create_time(), "argv": list(spec.argv),
                 "cwd": spec.cwd, "log_path": spec.log_path, "started_at": time.time()}
        if confined is not None:
            state["limits"] = {"group": spec.limits.group, "memory_bytes": spec.limits.memory_bytes}
        self._state_path(key).write_text(json.dumps(state))
        asyncio.get_running_loop().create_task(self._reap(key, proc))
        await asyncio.sleep(STARTUP_WATCH_S)
        if proc.poll() is not None:
            why = _oom(state) or f"exited at once with code {proc.returncode}"
            return pb.OperationResult(op_id=op_id, outcome=pb.FAILED_TO_START,
                                      error=f"{key} {why} (see {spec.log_dir or spec.log_path})")
        log.info("service.started", service=key, pid=proc.pid)
        return pb.OperationResult(op_id=op_id, outcome=pb.EXITED)

    def _log_sink(self, spec: pb.ServiceStartSpec) -> int:
        """Where the service's output goes: the pipe to a log writer of its own (a process apart,
        so it outlives this agent like the service does), or an appended file."""
        if not spec.log_dir:
            Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
            return os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            writer = subprocess.Popen(logfiles.writer_argv(spec.log_dir, spec.log_file_bytes or logfiles.FILE_BYTES,
                                                           spec.log_keep_bytes or logfiles.KEEP_BYTES),
                                      stdin=read_end, stdout=subprocess.DEVNULL, cwd="/", env={"PATH": "/usr/bin:/bin"},
                                      start_new_session=True, close_fds=True)
        except OSError as exc:
            os.close(write_end)
            raise StartError(f"cannot start the log writer: {exc.strerror}") from None
        finally:
            os.close(read_end)
        self.writers.append(writer)
        return write_end

    async def _reap(self, key: str, proc: subprocess.Popen) -> None:
        """Our own children must be waited for, or they linger as zombies."""
        while proc.poll() is None:
            await asyncio.sleep(0.1)
        if self.children.get(key) is proc:
            del self.children[key]
        log.info("service.exited", service=key, pid=proc.pid, code=proc.returncode)
        state = self._load(key)
        if state and state.get("pid") == proc.pid:
            self._ended(key, state, proc.returncode)

    async def stop(self, op_id: str, spec: pb.ServiceStopSpec) -> pb.OperationResult:
        key = _key(spec.name, spec.instance)
        state = self._load(key)
        if state is None or not self.alive(state):
            if state is not None and state.get("limits"):  # its leader died: what it forked is still in its leaf
                await asyncio.to_thread(_release, state["limits"]["group"], key)
            self._state_path(key).unlink(missing_ok=True)
            return pb.OperationResult(op_id=op_id, outcome=pb.EXITED, error=f"{key} was not running")
        pgid = state["pid"]
        self.stopping.add(key)
        try:
            return await self._stop(op_id, spec, key, state, pgid)
        finally:
            self.stopping.discard(key)

    async def _stop(self, op_id: str, spec: pb.ServiceStopSpec, key: str, state: dict, pgid: int) -> pb.OperationResult:
        _killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + (spec.grace_s or DEFAULT_GRACE_S)
        while self.alive(state) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        killed = self.alive(state)
        _killpg(pgid, signal.SIGKILL)
        if state.get("limits"):  # what left the process group is still in the group's leaf
            await asyncio.to_thread(_release, state["limits"]["group"], key)
        self._state_path(key).unlink(missing_ok=True)
        log.info("service.stopped", service=key, pid=pgid, killed=killed)
        return pb.OperationResult(op_id=op_id, outcome=pb.EXITED,
                                  error="did not stop on SIGTERM: killed" if killed else "")

    def list(self, prefix: str, group: str = "") -> list[dict]:
        out = []
        use = _group_use(group)
        for path in sorted(self.folder.glob("*.json")):
            state = self._load(path.stem)
            if state is None or not state.get("name", "").startswith(prefix):
                continue
            entry = {k: state.get(k) for k in ("name", "instance", "pid", "started_at", "log_path")}
            entry["alive"] = self.alive(state)
            if entry["alive"]:
                try:
                    proc = psutil.Process(state["pid"])
                    tree = [proc, *proc.children(recursive=True)]
                    entry["rss_bytes"] = sum(p.memory_info().rss for p in tree)
                    entry["cpu_s"] = sum(sum(p.cpu_times()[:2]) for p in tree)
                except psutil.Error:
                    pass
            elif why := _oom(state):
                entry["error"] = why
            if use:
                entry["limits_use"] = use
            out.append(entry)
        return out


def _leaf(group: str, key: str) -> limits.Leaf:
    layout = limits.detect()
    if layout is None:
        raise StartError("no cgroup hierarchy with memory, cpu and pids is mounted")
    return limits.Leaf(layout, group, key)


def _release(group: str, key: str) -> None:
    try:
        _leaf(group, key).release()
    except (StartError, limits.LimitError):
        pass  # nothing was made there: confining the next process reports why


def _oom(state: dict) -> str:
    """Why a service of limited memory died, if the kernel killed it for memory; else ""."""
    confined = state.get("limits")
    if not confined:
        return ""
    try:
        killed = _leaf(confined["group"], _key(state["name"], state["instance"])).oom_kills()
    except (StartError, limits.LimitError):
        return ""
    return limits.oom_message(confined.get("memory_bytes", 0)) if killed else ""


def _group_use(group: str) -> dict:
    if not group:
        return {}
    try:
        return limits.usage(group)
    except limits.LimitError:
        return {}


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
