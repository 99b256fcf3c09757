"""The launcher: runs as the user a command is for, reads that user's `.env`, then executes it.

Run isolated (`python3 -I -S -B launcher.py …`) and already switched to the user, so that nothing
of the tenant (its `.env`, its folders) is read or entered while root, and the tenant's variables
(`LD_PRELOAD` and the like) only ever reach its own uid. Standard library only, and `envfile.py`
from beside this file: the interpreter may be the system's, not the agent's virtualenv.

Protocol with the agent (agent/executor.py): the status descriptor gets `ready` as soon as the
launcher runs, then either one line saying why the command could not start (exit 127), or nothing
more: it is close-on-exec, so end of file after `ready` means the command was executed.
"""

from __future__ import annotations

import os
import signal
import stat
import sys

READY = b"ready\n"
MAX_ENV_BYTES = 1 << 20
LAUNCH_FAILED = 127

# The dynamic loader's variables and others glibc drops for set-id programs (its unsecvars.h),
# by name and by prefix: a privileged process must never see them, a tenant's own may.
UNSAFE_NAMES = frozenset((
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
    "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR", "TZDIR",
))
UNSAFE_PREFIXES = ("LD_", "MALLOC_")
# How the agent hands such a variable of an operation past the privileged steps to the user's side.
CARRIED = "DEPLOYER_CARRIED_"

try:
    from common import envfile
except ImportError:  # run as a script, isolated: nothing but the standard library is on the path
    import importlib.util
    _here = os.path.dirname(os.path.abspath(__file__))
    # Published, it sits beside its launcher; in a checkout, in common/.
    _path = next(p for p in (os.path.join(_here, "envfile.py"), os.path.join(_here, "..", "common", "envfile.py"))
                 if os.path.isfile(p))
    _spec = importlib.util.spec_from_file_location("deployer_envfile", _path)
    envfile = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(envfile)


class LaunchError(Exception):
    """The command cannot be started; the message is one line for the operator."""


def unsafe(name: str) -> bool:
    return name in UNSAFE_NAMES or name.startswith(UNSAFE_PREFIXES)


def read_env_file(path: str) -> dict[str, str]:
    """The variables of `path`, opened without following a link and checked before reading: a
    regular file, at most MAX_ENV_BYTES, owned by the reader or by root; root reads only root's
    own file with a single name (a hard link could be anyone's file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise LaunchError(f"refused {path}: it is a symbolic link") from None
        raise LaunchError(f"cannot read environment file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        uid = os.getuid()
        if not stat.S_ISREG(info.st_mode):
            raise LaunchError(f"refused {path}: not a regular file")
        if info.st_uid not in (uid, 0):
            raise LaunchError(f"refused {path}: it belongs to uid {info.st_uid}, not to uid {uid} or root")
        if uid == 0 and (info.st_uid != 0 or info.st_nlink != 1):
            raise LaunchError(f"refused {path}: root reads only a file of its own with a single link")
        if info.st_size > MAX_ENV_BYTES:
            raise LaunchError(f"refused {path}: larger than {MAX_ENV_BYTES} bytes")
        chunks, size = [], 0
        while size <= MAX_ENV_BYTES:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_ENV_BYTES:
            raise LaunchError(f"refused {path}: larger than {MAX_ENV_BYTES} bytes")
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if b"\0" in data:
        raise LaunchError(f"refused {path}: it contains a NUL byte")
    return envfile.parse(data.decode("utf-8", "surrogateescape"))


def environment(inherited: dict[str, str], env_file: str, keep: set[str], uid: int) -> dict[str, str]:
    """What the command gets: the inherited variables (carried ones under their own names again,
    unless still root), then the `.env` without overriding `keep`; root takes no unsafe one from it."""
    env = {}
    for name, value in inherited.items():
        if name.startswith(CARRIED):
            if uid != 0:
                env[name[len(CARRIED):]] = value
        else:
            env[name] = value
    if env_file:
        for name, value in read_env_file(env_file).items():
            if name in keep or not name or (uid == 0 and unsafe(name)):
                continue
            env[name] = value
    return env


def _options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    options, i = {}, 0
    while i < len(argv) and argv[i] != "--":
        name, _, value = argv[i].partition("=")
        if not name.startswith("--") or name[2:] not in ("status-fd", "cwd", "env-file", "keep"):
            raise LaunchError(f"launcher: unknown option {argv[i]!r}")
        options[name[2:]] = value
        i += 1
    command = argv[i + 1:]
    if not command:
        raise LaunchError("launcher: no command")
    return options, command


def _report(fd: int, data: bytes) -> None:
    if fd >= 0:
        try:
            os.write(fd, data)
        except OSError:
            pass


def main(argv: list[str]) -> int:
    status = -1
    try:
        options, command = _options(argv)
        status = int(options.get("status-fd") or -1)
        if status >= 0:
            os.set_inheritable(status, False)  # closed by the exec: that is the success signal
        _report(status, READY)
        keep = set(filter(None, options.get("keep", "").split(",")))
        env = environment(dict(os.environ), options.get("env-file", ""), keep, os.getuid())
        cwd = options.get("cwd", "")
        if cwd:
            try:
                os.chdir(cwd)  # only now, as the user: a link in the path leads where it may go
            except FileNotFoundError:
                raise LaunchError(f"working directory {cwd} does not exist") from None
            except OSError as exc:
                raise LaunchError(f"cannot enter working directory {cwd}: {exc.strerror}") from None
        # Python ignores these; an executed program must not inherit that.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvpe(command[0], command, env)
        except FileNotFoundError:
            raise LaunchError(f"command not found: {command[0]}") from None
        except PermissionError:
            raise LaunchError(f"permission denied: {command[0]}") from None
        except (OSError, ValueError) as exc:
            raise LaunchError(f"cannot start {command[0]}: {getattr(exc, 'strerror', None) or exc}") from None
    except LaunchError as exc:
        message = str(exc).replace("\n", " ")[:1000]
        _report(status, message.encode(errors="replace") + b"\n")
        print(message, file=sys.stderr)  # for a reader that stopped waiting, and a service's log
        return LAUNCH_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
