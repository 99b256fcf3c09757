"""Process handling, in one place: start a command in its own process group, capture its output
into the spool, enforce timeout and cancellation, and measure what it used.

Exit is observed through a pidfd and the child is left a zombie until its group has been cleaned
up: while the zombie holds the pid, the process group id cannot be reused, so the final
`killpg(SIGKILL)` of leftovers can never hit an unrelated process. Nothing an operation starts
outlives it (a service is started by the service driver, not by `exec`).

One module, though long: the order of fork, group, pidfd, reaping and the final kill is one
invariant, and splitting it would spread that order over files.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import hashlib
import os
import posixpath
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from protos import deployer_pb2 as pb

from agent import launcher
from common import envfile
from common.redact import Patterns, Redactor
from agent import limits
from agent.spool import Spool
from common import errors

DEFAULT_GRACE_S = 5.0
LINGER_S = 2.0  # how long output may still come after the main process has exited
_F_SETPIPE_SZ = 1031
_READ_BYTES = 1 << 20
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class StartError(errors.Failed):
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


LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")
ENVFILE = envfile.__file__  # the one module the launcher loads, published beside it
# Where a root agent publishes the launcher for every user to read: the agent's own folder may
# be closed to them (a checkout in a private home). Named by content, so versions never mix.
PUBLIC_DIR = "/run/deployer"


def limits_confine(name: str, spec: pb.Limits, argv: list[str],
                   user: pwd.struct_passwd | None) -> limits.Confined:
    """`argv` made to start inside its environment's limits, under the process tree's `name`."""
    try:
        return limits.confine(spec, name, argv, *((user.pw_uid, user.pw_gid) if user else (-1, -1)))
    except limits.LimitError as exc:
        raise StartError(str(exc)) from None


def confine_env(launch: "Launch", confined: limits.Confined) -> dict[str, str]:
    """The variables the limits add (TMPDIR), carried past the privileged steps to the launcher
    like the operation's own when the command goes through it."""
    return carried(confined.env) if launch.status >= 0 else dict(confined.env)


@functools.lru_cache(maxsize=1)
def launcher_script() -> str:
    """The launcher's path, readable by every user: a root-owned copy (with the envfile module it
    loads from beside itself) under PUBLIC_DIR when run as root, else the file itself."""
    if os.geteuid() != 0:
        return LAUNCHER
    files = {name: open(path, "rb").read() for name, path in (("launcher.py", LAUNCHER), ("envfile.py", ENVFILE))}
    digest = hashlib.sha256(b"\0".join(files[name] for name in sorted(files))).hexdigest()[:16]
    folder = os.path.join(PUBLIC_DIR, f"launcher-{digest}")
    try:
        os.makedirs(PUBLIC_DIR, mode=0o755, exist_ok=True)
        info = os.lstat(PUBLIC_DIR)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
            raise OSError(f"{PUBLIC_DIR} is not a folder only root can change")
        if not _published(folder, files):
            staging = tempfile.mkdtemp(prefix=".launcher-", dir=PUBLIC_DIR)
            for name, data in files.items():
                with open(os.path.join(staging, name), "xb") as out:
                    out.write(data)
                os.chmod(os.path.join(staging, name), 0o644)
            os.chmod(staging, 0o755)
            try:
                os.rename(staging, folder)
            except OSError:  # another agent of this host published it meanwhile
                shutil.rmtree(staging, ignore_errors=True)
            if not _published(folder, files):
                raise OSError(f"{folder} does not hold this agent's launcher")
    except OSError as exc:
        raise StartError(f"cannot publish the launcher under {PUBLIC_DIR}: {exc}") from None
    return os.path.join(folder, "launcher.py")


def _published(folder: str, files: dict[str, bytes]) -> bool:
    for name, data in files.items():
        path = os.path.join(folder, name)
        try:
            info = os.lstat(path)
            with open(path, "rb") as f:
                if not stat.S_ISREG(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022 or f.read() != data:
                    return False
        except OSError:
            return False
    return True
# spawn() waits in the event loop, so briefly; the launcher also says why on stderr, so a late
# failure still shows in the output (exit 127).
LAUNCH_WAIT_S = 2.0


@dataclass
class Launch:
    """How one command is started. A command for another user, or one that reads a `.env`, goes
    through the launcher (agent/launcher.py): the agent switches user first, with an environment
    it made itself, and the launcher reads the `.env`, enters the working folder and executes."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    status: int = -1        # our end of the launcher's status pipe
    child_status: int = -1  # the launcher's end

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.child_status,) if self.child_status >= 0 else ()

    def close(self) -> None:
        for fd in (self.status, self.child_status):
            if fd >= 0:
                os.close(fd)
        self.status = self.child_status = -1


def base_env(user: pwd.struct_passwd | None) -> dict[str, str]:
    """A small, predictable environment: the agent's own variables never leak into commands."""
    env = {"PATH": BASE_PATH, "LANG": "C.UTF-8"}
    if user is not None:
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    else:
        env["HOME"] = os.environ.get("HOME", "/root")
    return env


def carried(env: dict[str, str]) -> dict[str, str]:
    """`env` as a privileged process may see it: the loader's variables (and the like) renamed,
    so that only the launcher, once it runs as the user, gives them their names back."""
    return {(launcher.CARRIED + name if launcher.unsafe(name) else name): value for name, value in env.items()}


def launcher_python() -> str:
    """An interpreter every user can run: the system's python3 (the agent's own may sit in a
    folder only root can enter, such as a virtualenv under /root)."""
    return shutil.which("python3", path=BASE_PATH) or sys.executable


def prepare(argv: list[str], user: pwd.struct_passwd | None, cwd: str, env_file: str,
            extra) -> Launch:
    """The command line, environment and folder to start `argv` with, as `user` if given.

    setpriv switches user and then executes the launcher in place (same pid, same process group).
    Popen(user=...) would switch in Python's child instead, and then Python forks rather than
    vforks: the child of a fork runs gRPC's fork handlers, which can abort it before it executes.
    """
    extra = dict(extra)
    env = {**base_env(user), **extra}
    switching = user is not None and user.pw_uid != os.getuid()
    if not switching and not env_file:
        if not os.path.isdir(cwd):
            raise StartError(f"working directory {cwd} does not exist")
        return Launch(argv, env, cwd)
    setpriv = shutil.which("setpriv", path=BASE_PATH)
    if switching and setpriv is None:
        raise StartError("setpriv (util-linux) is needed to run commands as another user")
    script = launcher_script()
    status, child_status = os.pipe2(os.O_CLOEXEC)
    command = [launcher_python(), "-I", "-S", "-B", script, f"--status-fd={child_status}", f"--cwd={cwd}",
               f"--env-file={env_file}", f"--keep={','.join(sorted(extra))}", "--", *argv]
    if switching:
        # --no-new-privs: no set-id program (crontab, at, su…) lifts the tenant out of its limits
        # or its user; what it starts stays in the process tree the agent accounts for.
        command = [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--no-new-privs",
                   "--", *command]
        env = carried(env)
    return Launch(command, env, "/", status, child_status)


def started(launch: Launch, proc: subprocess.Popen, wait_s: float = LAUNCH_WAIT_S) -> None:
    """Wait until the launcher has executed the command; StartError with its reason if it could
    not (the process has then ended and been reaped). A launcher slower than `wait_s` is taken as
    started: the command's own timeout still holds."""
    if launch.status < 0:
        return
    os.close(launch.child_status)
    launch.child_status = -1
    data, deadline = b"", time.monotonic() + wait_s
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            if not select.select([launch.status], [], [], remaining)[0]:
                return
            chunk = os.read(launch.status, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        launch.close()
    if data == launcher.READY:
        return
    try:
        code = proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        code = None
    if data.startswith(launcher.READY):
        raise StartError(data[len(launcher.READY):].decode(errors="replace").strip())
    raise StartError(f"the launcher did not run (exit {code}): {launcher_script()} and {launcher_python()} "
                     "must be open to every user")


def spawn(op_id: str, spec: pb.ExecSpec, default_cwd: str, spool: Spool,
          on_output: Callable[[], None], redact: Patterns | None = None) -> Run:
    """Start the command; raise StartError with a one-line reason if it cannot start.
    Its stdout and stderr each go through their own redactor of `redact` before the spool."""
    if not spec.argv:
        raise StartError("empty command")
    user = resolve_user(spec.user) if spec.user else None
    launch = prepare(list(spec.argv), user, spec.cwd or default_cwd, spec.env_file, spec.env)
    leaf = None
    if spec.HasField("limits"):  # joined before the command executes: see agent/limits.py
        try:
            confined = limits_confine(op_id, spec.limits, launch.argv, user)
        except StartError:
            launch.close()
            raise
        launch.argv, leaf = confined.argv, confined.leaf
        launch.env.update(confine_env(launch, confined))
    try:
        proc = subprocess.Popen(
            launch.argv, cwd=launch.cwd, env=launch.env, start_new_session=True, close_fds=True,
            pass_fds=launch.pass_fds, stdin=subprocess.PIPE if spec.stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        launch.close()
        raise StartError(f"command not found: {launch.argv[0]}") from None
    except PermissionError:
        launch.close()
        raise StartError(f"permission denied: {launch.argv[0]}") from None
    except OSError as exc:
        launch.close()
        raise StartError(f"cannot start {launch.argv[0]}: {exc.strerror}") from None
    try:
        started(launch, proc)
    except StartError:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        raise
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


class Refused(errors.Failed):
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
