"""Process handling, in one place: start a command in its own process group, capture its output
into the spool, enforce timeout and cancellation, and measure what it used.

Exit is observed through a pidfd and the child is left a zombie until its group has been cleaned
up: while the zombie holds the pid, the process group id cannot be reused, so the final
`killpg(SIGKILL)` of leftovers can never hit an unrelated process. Nothing an operation starts
outlives it (a service is started by the service driver, not by `exec`).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import posixpath
import pwd
import shutil
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from protos import deployer_pb2 as pb

from .redact import Patterns, Redactor
from . import envfile, limits
from .spool import Spool

DEFAULT_GRACE_S = 5.0
LINGER_S = 2.0  # how long output may still come after the main process has exited
_F_SETPIPE_SZ = 1031
_READ_BYTES = 1 << 20
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class StartError(Exception):
    """The command could not be started; the message is one line for the operator."""


@dataclass
class Run:
    """A command in flight."""

    op_id: str
    proc: subprocess.Popen
    started: float
    on_output: Callable[[], None]
    spool: Spool
    stop_reason: str = ""            # "cancel" or "timeout" once we started stopping it
    stop_detail: str = ""
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    fds: dict[int, object] = field(default_factory=dict)  # open pipe fd → pipe
    # open pipe fd → (stream, its redactor): secrets are replaced before anything is spooled
    outputs: dict[int, tuple[int, Redactor]] = field(default_factory=dict)
    peak_rss: int = 0
    leaf: limits.Leaf | None = None  # its place in its environment's limits


def resolve_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise StartError(f"unknown user {name!r}") from None


def as_user(argv: list[str], user: pwd.struct_passwd | None, path: str) -> list[str]:
    """`argv` run as `user`, with the user's own groups; unchanged for no user or the agent's own.

    setpriv switches and then executes the command in place (same pid, same process group).
    Popen(user=...) would switch in Python's child instead, and then Python forks rather than
    vforks: the child of a fork runs gRPC's fork handlers, which can abort it before it executes.
    """
    if user is None or user.pw_uid == os.getuid():
        return argv
    if shutil.which(argv[0], path=path) is None:
        raise StartError(f"command not found: {argv[0]}")
    setpriv = shutil.which("setpriv", path=BASE_PATH)
    if setpriv is None:
        raise StartError("setpriv (util-linux) is needed to run commands as another user")
    return [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--", *argv]


def limits_confine(name: str, spec: pb.Limits, argv: list[str],
                   user: pwd.struct_passwd | None) -> limits.Confined:
    """`argv` made to start inside its environment's limits, under the process tree's `name`."""
    try:
        return limits.confine(spec, name, argv, *((user.pw_uid, user.pw_gid) if user else (-1, -1)))
    except limits.LimitError as exc:
        raise StartError(str(exc)) from None


def read_env_file(path: str) -> dict[str, str]:
    """The variables of a `.env` the controller wrote (see agent/envfile.py)."""
    try:
        with open(path) as f:
            return envfile.parse(f.read())
    except OSError as exc:
        raise StartError(f"cannot read environment file {path}: {exc.strerror}") from None


def build_env(extra, env_file: str, user: pwd.struct_passwd | None) -> dict[str, str]:
    """A small, predictable environment: the agent's own variables never leak into commands."""
    env = {"PATH": BASE_PATH, "LANG": "C.UTF-8"}
    if user is not None:
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    else:
        env["HOME"] = os.environ.get("HOME", "/root")
    if env_file:
        env.update(read_env_file(env_file))
    env.update(extra)
    return env


def spawn(op_id: str, spec: pb.ExecSpec, default_cwd: str, spool: Spool,
          on_output: Callable[[], None], redact: Patterns | None = None) -> Run:
    """Start the command; raise StartError with a one-line reason if it cannot start.
    Its stdout and stderr each go through their own redactor of `redact` before the spool."""
    if not spec.argv:
        raise StartError("empty command")
    cwd = spec.cwd or default_cwd
    if not os.path.isdir(cwd):
        raise StartError(f"working directory {cwd} does not exist")
    user = resolve_user(spec.user) if spec.user else None
    env = build_env(spec.env, spec.env_file, user)
    argv = as_user(list(spec.argv), user, env.get("PATH", BASE_PATH))
    leaf = None
    if spec.HasField("limits"):  # joined before the command executes: see agent/limits.py
        confined = limits_confine(op_id, spec.limits, argv, user)
        argv, leaf = confined.argv, confined.leaf
        env.update(confined.env)
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, start_new_session=True, close_fds=True,
            stdin=subprocess.PIPE if spec.stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        raise StartError(f"command not found: {spec.argv[0]}") from None
    except PermissionError:
        raise StartError(f"permission denied: {spec.argv[0]}") from None
    except OSError as exc:
        raise StartError(f"cannot start {spec.argv[0]}: {exc.strerror}") from None
    run = Run(op_id, proc, time.monotonic(), on_output, spool, leaf=leaf)
    if spec.stdin:
        threading.Thread(target=_feed, args=(proc.stdin, bytes(spec.stdin)), daemon=True).start()
    loop = asyncio.get_running_loop()
    for pipe, stream in ((proc.stdout, pb.STDOUT), (proc.stderr, pb.STDERR)):
        fd = pipe.fileno()
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, _READ_BYTES)  # fewer, larger reads under heavy output
        except OSError:
            pass
        os.set_blocking(fd, False)
        run.fds[fd] = pipe
        run.outputs[fd] = (stream, (redact or Patterns(())).redactor())
        loop.add_reader(fd, _drain, run, pipe, fd, stream)
    pidfd = os.pidfd_open(proc.pid)
    loop.add_reader(pidfd, _on_exit, run, pidfd)
    return run


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, OSError):
        pass


def _drain(run: Run, pipe, fd: int, stream: int) -> None:
    try:
        data = os.read(fd, _READ_BYTES)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if data:
        _spool(run, stream, run.outputs[fd][1].feed(data))
        return
    _close_stream(run, pipe, fd)


def _spool(run: Run, stream: int, data: bytes) -> None:
    if not data:
        return  # all of it held back by the redactor for now
    run.spool.append(stream, data)  # never raises: a full disk is counted and marked by the spool
    run.on_output()


def _close_stream(run: Run, pipe, fd: int) -> None:
    if fd not in run.fds:
        return
    asyncio.get_running_loop().remove_reader(fd)
    del run.fds[fd]
    pipe.close()
    stream, redactor = run.outputs.pop(fd)
    _spool(run, stream, redactor.flush())
    if not run.fds:
        run.eof.set()


def _on_exit(run: Run, pidfd: int) -> None:
    asyncio.get_running_loop().remove_reader(pidfd)
    os.close(pidfd)
    run.exited.set()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def request_stop(run: Run, reason: str, detail: str) -> None:
    """Cancel or time out: SIGTERM to the whole group now; `supervise` escalates to SIGKILL."""
    if run.stop_reason:
        return
    run.stop_reason, run.stop_detail = reason, detail
    _killpg(run.proc.pid, signal.SIGTERM)
    run.stop_requested.set()


async def supervise(run: Run, spec: pb.ExecSpec) -> pb.OperationResult:
    """Wait for the command to end (enforcing timeout and cancel grace) and build its result."""
    grace = spec.kill_grace_s or DEFAULT_GRACE_S
    timeout = spec.timeout_s or None
    sampler = asyncio.create_task(_sample_memory(run))
    try:
        await asyncio.wait_for(_first(run.exited, run.stop_requested), timeout)
    except asyncio.TimeoutError:
        request_stop(run, "timeout", f"timed out after {spec.timeout_s:g}s")
    if not run.exited.is_set():
        # Stopping: the group has its grace period, then whatever is left is killed.
        if not await _wait(run.exited, grace):
            _killpg(run.proc.pid, signal.SIGKILL)
            await run.exited.wait()
    # The main process is a zombie now, so its group id is still ours. Output may still come from
    # the rest of the group for a moment; then nothing of the group may survive the operation.
    if not await _wait(run.eof, grace if run.stop_reason else LINGER_S):
        _killpg(run.proc.pid, signal.SIGKILL)
        if not await _wait(run.eof, LINGER_S):
            for fd, pipe in list(run.fds.items()):  # held open by a process that left the group
                _close_stream(run, pipe, fd)
    sampler.cancel()
    _killpg(run.proc.pid, signal.SIGKILL)
    _pid, status, usage = os.wait4(run.proc.pid, 0)
    run.proc.returncode = os.waitstatus_to_exitcode(status)
    run.spool.close()
    result = _result(run, status, usage)
    if run.leaf is not None:  # "out of memory" rather than a bare signal 9; leftovers killed
        await asyncio.to_thread(limits.finish, run.leaf, result)
    return result


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    if event.is_set():
        return True
    if seconds <= 0:
        return False
    try:
        await asyncio.wait_for(event.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return False


SAMPLE_DELAYS_S = (0.02, 0.1, 0.3)  # then every 0.5 s


async def _sample_memory(run: Run) -> None:
    """Peak resident memory of the command's process tree, sampled.

    `wait4`'s ru_maxrss would be wrong here: Linux carries the forking agent's own high-water mark
    across exec. Per process VmHWM catches short peaks between samples; the sum of VmRSS over the
    tree catches many processes at once.
    """
    delays = iter(SAMPLE_DELAYS_S)
    while not run.exited.is_set():
        run.peak_rss = max(run.peak_rss, _tree_memory(run.proc.pid))
        await asyncio.sleep(next(delays, 0.5))


def _tree_memory(pid: int) -> int:
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0
    total = hwm = 0
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/status", "rb") as f:
                fields = dict(line.split(b":", 1) for line in f if line.startswith((b"VmRSS", b"VmHWM")))
        except OSError:
            continue
        total += int(fields.get(b"VmRSS", b"0 kB").split()[0]) * 1024
        hwm = max(hwm, int(fields.get(b"VmHWM", b"0 kB").split()[0]) * 1024)
    return max(total, hwm)


def _result(run: Run, status: int, usage) -> pb.OperationResult:
    result = pb.OperationResult(
        op_id=run.op_id,
        duration_s=time.monotonic() - run.started,
        peak_rss_bytes=run.peak_rss,
        cpu_s=usage.ru_utime + usage.ru_stime,
        output_bytes=run.spool.end,
    )
    if os.WIFSIGNALED(status):
        result.signal = os.WTERMSIG(status)
    else:
        result.exit_code = os.WEXITSTATUS(status)
    if run.stop_reason == "timeout":
        result.outcome, result.error = pb.TIMED_OUT, run.stop_detail
    elif run.stop_reason == "cancel":
        result.outcome, result.error = pb.CANCELLED, run.stop_detail
    elif os.WIFSIGNALED(status):
        result.outcome = pb.SIGNALED
    else:
        result.outcome = pb.EXITED
    return result


class Refused(Exception):
    """write_file will not write there; the message is one line naming the path."""


class _Symlink(Exception):
    """A folder on the way is a symbolic link."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def write_file(op_id: str, spec: pb.WriteFileSpec, roots=()) -> pb.OperationResult:
    """Atomic write under one of `roots`: temp file in the same folder, fsync, chown/chmod,
    rename, fsync the folder.

    The folder is opened one component at a time without following symbolic links, and the file
    is created and renamed relative to that open folder, so a link swapped in on the way (by a
    service user who owns a folder below a root) cannot send the write elsewhere. A symbolic link
    on the way is followed only if where it leads is under a root too. A link in place of the file
    itself is replaced by the rename, never written through.
    """
    started = time.monotonic()
    result = pb.OperationResult(op_id=op_id, outcome=pb.EXITED)
    try:
        uid, gid = _owner(spec.owner)
        folder, name = open_parent(spec.path, roots)
        try:
            _write_in(folder, name, op_id, spec, uid, gid, roots)
        finally:
            os.close(folder)
    except Refused as exc:
        result.outcome, result.error = pb.REJECTED, str(exc)
    except StartError as exc:
        result.outcome, result.error = pb.FAILED_TO_START, str(exc)
    except OSError as exc:
        result.outcome, result.error = pb.FAILED_TO_START, f"cannot write {spec.path}: {exc.strerror}"
    result.duration_s = time.monotonic() - started
    return result


def _owner(owner: str) -> tuple[int, int]:
    if not owner:
        return -1, -1
    user_name, _, group_name = owner.partition(":")
    user = resolve_user(user_name)
    if not group_name:
        return user.pw_uid, user.pw_gid
    import grp
    try:
        return user.pw_uid, grp.getgrnam(group_name).gr_gid
    except KeyError:
        raise StartError(f"unknown group {group_name!r}") from None


def open_parent(path: str, roots) -> tuple[int, str]:
    """An open descriptor of the folder that is to hold `path` (created if missing), and the file's
    name in it; Refused if `path` is not a file path under one of `roots`."""
    if not path.startswith("/"):
        raise Refused(f"refused to write {path!r}: not an absolute path")
    if ".." in path.split("/"):
        raise Refused(f"refused to write {path}: '..' in the path")
    if path.endswith(("/", "/.")):
        raise Refused(f"refused to write {path}: not a file path")
    parent, name = posixpath.split(posixpath.normpath(path))
    found = _root_of(parent, roots)
    if found is None:
        raise Refused(f"refused to write {path}: outside the write roots ({', '.join(map(str, roots))})")
    try:
        return _open_folder(*found), name
    except _Symlink:
        pass
    real = os.path.realpath(parent)
    found = _root_of(real, roots)
    if found is None:
        raise Refused(f"refused to write {path}: a symbolic link on the way leads to {real}, "
                      f"outside the write roots")
    try:
        return _open_folder(*found), name
    except _Symlink:
        raise Refused(f"refused to write {path}: its folder changed while it was checked") from None


def _root_of(folder: str, roots) -> tuple[str, str] | None:
    """(real path of the root, `folder` relative to it) for the deepest root holding `folder`."""
    best = None
    for root in roots:
        for form in {posixpath.normpath(str(root)), os.path.realpath(root)}:
            if folder == form or folder.startswith(form.rstrip("/") + "/"):
                if best is None or len(form) > best[2]:
                    best = (os.path.realpath(root), folder[len(form):].strip("/"), len(form))
    return best[:2] if best else None


def _open_folder(root: str, relative: str) -> int:
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in filter(None, relative.split("/")):
            try:
                child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                child = _open_child(part, fd)
            except OSError:
                child = _open_child(part, fd)
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_child(part: str, fd: int) -> int:
    """Open a folder entry without following it; a symbolic link raises _Symlink."""
    try:
        return os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
    except OSError:
        try:
            is_link = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        if is_link:
            raise _Symlink(part) from None
        raise


def _write_in(folder: int, name: str, op_id: str, spec: pb.WriteFileSpec, uid: int, gid: int, roots) -> None:
    try:
        current = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        current = None
    if current is not None and stat.S_ISLNK(current.st_mode):
        target = os.path.realpath(posixpath.join(os.readlink(f"/proc/self/fd/{folder}"), name))
        if _root_of(target, roots) is None:
            raise Refused(f"refused to write {spec.path}: it is a symbolic link to {target}, "
                          "outside the write roots")
    tmp = f".{name}.{op_id}.tmp"
    try:
        os.unlink(tmp, dir_fd=folder)  # left by an earlier attempt
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=folder)
    try:
        try:
            data = memoryview(spec.content)
            while data:
                data = data[os.write(fd, data):]
            if uid != -1:
                os.fchown(fd, uid, gid)  # before the mode: a chown clears set-id bits
            os.fchmod(fd, spec.mode or 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=folder)
        except OSError:
            pass
        raise
    os.fsync(folder)
