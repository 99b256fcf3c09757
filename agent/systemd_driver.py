"""The systemd service driver, used where systemd is PID 1: each service process is an instance
of a template unit `auto-<app>-<env>-<service>@.service`, so systemd supervises it and it survives
any restart of the agent. Its output goes where the built-in supervisor puts it, the file the
operation names (`logs/<code instance>.log` of the service), which systemd opens in append mode;
`deployctl logs` reads the same file whichever driver runs.

The template is the same for every service of the deployer; what differs per process (working
folder, command, the operation's variables, where its `.env` is) is in a per-instance environment
file under the agent's state folder (0600), the agent's own, read by systemd itself, and the log
file in a per-instance drop-in. The release's
`.env` is never an `EnvironmentFile=`: systemd would read it as root, following links. The
launcher (agent/launcher.py) reads it, already as the service's user, and enters the working
folder as that user. The instance name is the driver's process key (`<code instance>-<port>`),
since a code instance can run twice during a blue/green restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from protos import deployer_pb2 as pb

from common import envfile
from agent import limits, logfiles
from agent.slices import UNIT_DIR, scope_argv, slice_name, slice_unit  # noqa: F401 - also this driver's API
from agent.executor import StartError, launcher_python, launcher_script

STARTUP_WATCH_S = 0.3
OLD_UNIT_DIR = Path("/etc/systemd/system")


def template_unit(env_dir: Path, user: str = "", slice_name: str = "", python: str = "",
                  launcher: str = "", exits: str = "") -> str:
    """The template of one service (`%p` = name, `%i` = instance), run as `user` if given: every
    process of a service runs as the same user, its environment's, in its environment's slice
    (its limits) with a /tmp of its own and no way to gain privileges.

    `${NAME}` hands the variable to the launcher as exactly one argument, spaces and all; `$$`
    keeps a literal `$` for the shell.
    """
    run_as = f"User={user}\nGroup={user}\n" if user else ""
    # How the process ended, to the agent at once (`+`: as root, whatever User= says).
    told = (f"ExecStopPost=+{_word(python or launcher_python())} -I -S -B {_word(exit_note_script())} "
            f"{_word(exits)} %p %i\n") if exits else ""
    python = python or launcher_python()
    launcher = launcher or launcher_script()
    if slice_name:
        run_as += f"Slice={slice_name}\n" + HARDENING
    return f"""[Unit]
Description=%p instance %i (started by the deployer agent)

[Service]
Type=simple
{run_as}EnvironmentFile={env_dir}/%p@%i.env
ExecStart={_word(python)} -I -S -B {_word(launcher)} --cwd=${{DEPLOYER_CWD}} --env-file=${{DEPLOYER_ENV_FILE}} \\
  --keep=${{DEPLOYER_KEEP}} -- /bin/sh -c ${{DEPLOYER_COMMAND}}
{told}KillMode=control-group
TimeoutStopSec=10
Restart=no
"""


def _word(path: str) -> str:
    """A path as one word of a unit's command line: `%` is a specifier there."""
    path = path.replace("%", "%%")
    return envfile.quote(path) if any(c.isspace() or c in "\"'\\;$" for c in path) else path


# What a tenant's process never needs; ProtectSystem=full leaves the services root writable.
HARDENING = """PrivateTmp=yes
NoNewPrivileges=yes
ProtectSystem=full
ProtectHome=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
"""


def log_dropin(log_path: str, fifo: str = "") -> str:
    """The instance's drop-in: its output into the FIFO its log writer reads (stamped files in the
    service's `logs/<instance>/`, as under the supervisor), or, without one, appended to the
    operation's log file. Paths come from the controller and the agent, and are still checked."""
    for path in (log_path, fifo):
        if path and (not path.startswith("/") or any(c in path for c in "\n\r\0")):
            raise StartError(f"invalid log path {path[:80]!r}")
    path = log_path.replace("%", "%%")
    if fifo:
        pipe = fifo.replace("%", "%%")
        return f"[Service]\n# log: {path}\nStandardOutput=file:{pipe}\nStandardError=file:{pipe}\n"
    return f"[Service]\nStandardOutput=append:{path}\nStandardError=append:{path}\n"


def dropin_log_path(text: str) -> str:
    """Pure: the log file a drop-in written by log_dropin names."""
    for line in text.splitlines():
        for prefix in ("StandardOutput=append:", "# log: "):
            if line.startswith(prefix):
                return line.removeprefix(prefix).replace("%%", "%")
    return ""


def instance_env(spec: pb.ServiceStartSpec) -> str:
    """The agent's own file for one instance: the operation's variables (they win over the
    `.env`) and what the launcher needs; nothing of the release is read here."""
    values = dict(spec.env)
    values["DEPLOYER_CWD"] = spec.cwd
    values["DEPLOYER_ENV_FILE"] = spec.env_file
    values["DEPLOYER_KEEP"] = ",".join(sorted(spec.env))
    values["DEPLOYER_COMMAND"] = " ".join(spec.argv[2:]) if spec.argv[:2] == ["sh", "-c"] else \
        " ".join(envfile.quote(a) for a in spec.argv)
    return "".join(f"{name}={envfile.quote(value)}\n" for name, value in sorted(values.items()))


def booted() -> bool:
    """sd_booted(3): systemd is the init system."""
    return Path("/run/systemd/system").is_dir()


def exit_note_script() -> str:
    return str(Path(__file__).resolve().with_name("exitnote.py"))


def parse_note(data: bytes) -> pb.ServiceExited | None:
    """Pure: what an ExecStopPost note says, as the supervisor would say it (None if not one)."""
    try:
        note = json.loads(data)
        name, instance = str(note["name"]), str(note["instance"])
    except (ValueError, KeyError, TypeError):
        return None
    code, status = str(note.get("code", "")), str(note.get("status", ""))
    if code == "exited" and status.lstrip("-").isdigit():
        return pb.ServiceExited(name=name, instance=instance, exit_code=int(status), at=time.time())
    signals = {s.name.removeprefix("SIG"): int(s) for s in signal.Signals}
    if code in ("killed", "dumped"):
        number = int(status) if status.isdigit() else signals.get(status, 0)
        return pb.ServiceExited(name=name, instance=instance, signal=number, at=time.time())
    return pb.ServiceExited(name=name, instance=instance, exit_code=-1, at=time.time())


class SystemdDriver:
    name = "systemd"

    def __init__(self, state_dir: Path, unit_dir: Path = UNIT_DIR) -> None:
        self.env_dir = state_dir / "services"
        self.env_dir.mkdir(parents=True, exist_ok=True)
        self.unit_dir = unit_dir
        self.exits = state_dir / "exits.sock"
        self.stopping: set[str] = set()   # units stopped on an order: their end is not news
        self.writers: list[subprocess.Popen] = []  # log writers this agent started, reaped as they end
        self.on_exit = None               # called with pb.ServiceExited when a process ends unasked

    async def watch(self) -> None:
        """Hear each instance's ExecStopPost note and say the ends nobody ordered."""
        self.exits.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        sock.bind(str(self.exits))
        os.chmod(self.exits, 0o600)
        loop = asyncio.get_running_loop()
        heard = asyncio.Event()
        loop.add_reader(sock.fileno(), heard.set)
        try:
            while True:
                await heard.wait()
                heard.clear()
                while True:
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        break
                    self._noted(data)
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()

    def _noted(self, data: bytes) -> None:
        exited = parse_note(data)
        if exited is None or self.on_exit is None:
            return
        unit = f"{exited.name}@{exited.instance}"
        # Stopped on an order (under way, or done: its environment file is gone with it).
        if unit in self.stopping or not (self.env_dir / f"{unit}.env").exists():
            return
        self.on_exit(exited)

    def retire_old_units(self, old_dir: Path = OLD_UNIT_DIR) -> list[str]:
        """Earlier agents wrote their units to /etc/systemd/system, where they would hide the
        runtime ones: those files, and only those (the deployer's description in a file named
        `auto-*`), are removed once at start. The processes they run are not touched."""
        removed = []
        for path in sorted(old_dir.glob("auto-*")):
            if path.suffix not in (".service", ".slice") or not path.is_file() or path.is_symlink():
                continue
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError):
                continue
            if re.search(r"^Description=.*\((started|written) by the deployer agent\)$", text, re.M):
                path.unlink()
                removed.append(path.name)
        if removed:
            subprocess.run(["systemctl", "daemon-reload"], capture_output=True, timeout=120)
        return removed

    async def _systemctl(self, *args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            "systemctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        return proc.returncode, out.decode(errors="replace").strip()

    def _dropin(self, name: str, instance: str) -> Path:
        return self.unit_dir / f"{name}@{instance}.service.d" / "deployer-log.conf"

    def _fifo(self, name: str, instance: str) -> Path:
        return self.env_dir / f"{name}@{instance}.log-pipe"

    def _log_writer(self, spec: pb.ServiceStartSpec) -> subprocess.Popen | None:
        """The instance's log writer (agent/logfiles.py, as under the supervisor), reading a FIFO
        in the agent's own folder that systemd opens as the output of the unit's commands: started
        first, in a session of its own so it outlives the agent; it ends once the instance is
        stopped and its FIFO removed."""
        self.writers = [w for w in self.writers if w.poll() is None]
        if not spec.log_dir:
            return None
        fifo = self._fifo(spec.name, spec.instance)
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        read_end = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)  # both ends: see logfiles.write
        try:
            writer = subprocess.Popen(
                logfiles.writer_argv(spec.log_dir, spec.log_file_bytes or logfiles.FILE_BYTES,
                                     spec.log_keep_bytes or logfiles.KEEP_BYTES, until_unlinked=True),
                stdin=read_end, stdout=subprocess.DEVNULL, cwd="/", env={"PATH": "/usr/bin:/bin"},
                start_new_session=True, close_fds=True)
        finally:
            os.close(read_end)
        self.writers.append(writer)
        return writer

    async def _install(self, spec: pb.ServiceStartSpec, fifo: str = "") -> None:
        """The template, the environment's slice and the instance's drop-in, then one reload."""
        limits = spec.limits if spec.HasField("limits") else None
        files = {self.unit_dir / f"{spec.name}@.service":
                 template_unit(self.env_dir, spec.user, slice_name(limits.group) if limits else "",
                               exits=str(self.exits)),
                 self._dropin(spec.name, spec.instance): log_dropin(spec.log_path, fifo)}
        if limits is not None:
            files[self.unit_dir / slice_name(limits.group)] = slice_unit(limits)
        changed = False
        for path, content in files.items():
            if not path.exists() or path.read_text() != content:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
                changed = True
        if changed:
            code, out = await self._systemctl("daemon-reload")
            if code != 0:
                raise StartError(f"systemctl daemon-reload: {out}")

    async def start(self, op_id: str, spec: pb.ServiceStartSpec) -> pb.OperationResult:
        if not os.path.isdir(spec.cwd):
            raise StartError(f"working directory {spec.cwd} does not exist")
        Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
        writer = self._log_writer(spec)
        try:
            await self._install(spec, str(self._fifo(spec.name, spec.instance)) if writer else "")
        except BaseException:
            if writer is not None:
                writer.kill()
            raise
        env_path = self.env_dir / f"{spec.name}@{spec.instance}.env"
        fd = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(instance_env(spec))
        unit = f"{spec.name}@{spec.instance}.service"
        code, out = await self._systemctl("start", unit)
        if code != 0:
            if writer is not None and writer.poll() is None:
                writer.kill()  # systemd never opened its FIFO: nothing would ever end it
            return pb.OperationResult(op_id=op_id, outcome=pb.FAILED_TO_START, error=f"systemctl start {unit}: {out}")
        await asyncio.sleep(STARTUP_WATCH_S)
        code, state = await self._systemctl("is-active", unit)
        if state != "active":
            return pb.OperationResult(op_id=op_id, outcome=pb.FAILED_TO_START,
                                      error=f"{unit} is {state} (see {spec.log_dir or spec.log_path})")
        return pb.OperationResult(op_id=op_id, outcome=pb.EXITED)

    async def stop(self, op_id: str, spec: pb.ServiceStopSpec) -> pb.OperationResult:
        unit = f"{spec.name}@{spec.instance}.service"
        self.writers = [w for w in self.writers if w.poll() is None]  # reaped as they end
        self.stopping.add(f"{spec.name}@{spec.instance}")
        try:
            code, out = await self._systemctl("stop", unit)
            (self.env_dir / f"{spec.name}@{spec.instance}.env").unlink(missing_ok=True)
            self._fifo(spec.name, spec.instance).unlink(missing_ok=True)
        finally:
            self.stopping.discard(f"{spec.name}@{spec.instance}")
        dropin = self._dropin(spec.name, spec.instance)
        dropin.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            dropin.parent.rmdir()
        return pb.OperationResult(op_id=op_id, outcome=pb.EXITED, error="" if code == 0 else out)

    def list(self, prefix: str, group: str = "") -> list[dict]:
        """Known instances, from their environment files; liveness from systemd."""
        out = []
        for path in sorted(self.env_dir.glob(f"{prefix}*@*.env")):
            name, _, instance = path.stem.partition("@")
            unit = f"{name}@{instance}.service"
            show = subprocess.run(["systemctl", "show", unit, "-p", "ActiveState,MainPID,MemoryCurrent,CPUUsageNSec,Result,ExecMainStatus,"
                                  "ExecMainStartTimestampMonotonic"],
                                  capture_output=True, text=True).stdout
            props = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
            try:
                log_path = dropin_log_path(self._dropin(name, instance).read_text())
            except OSError:
                log_path = ""
            entry = {"name": name, "instance": instance, "pid": int(props.get("MainPID") or 0),
                     "alive": props.get("ActiveState") == "active", "log_path": log_path}
            started = props.get("ExecMainStartTimestampMonotonic", "")
            if started.isdigit() and int(started):  # when it started, for the controller's stable_after
                entry["started_at"] = time.time() - (time.monotonic() - int(started) / 1e6)
            if props.get("MemoryCurrent", "").isdigit():
                entry["rss_bytes"] = int(props["MemoryCurrent"])
            if props.get("CPUUsageNSec", "").isdigit():
                entry["cpu_s"] = int(props["CPUUsageNSec"]) / 1e9
            use = slice_use(group) if group else {}
            if use:
                entry["limits_use"] = use
            if props.get("Result") == "oom-kill":
                entry["error"] = limits.oom_message(use.get("memory_max_bytes", 0))
            elif props.get("Result") == "signal" and props.get("ExecMainStatus") == "9":
                # On cgroup v1 systemd cannot tell the kernel's out-of-memory kill from another.
                entry["error"] = "killed by signal 9"
            out.append(entry)
        return out


def slice_use(group: str) -> dict:
    """The environment's slice against its limits, as systemd accounts it."""
    show = subprocess.run(["systemctl", "show", slice_name(group), "-p",
                           "MemoryCurrent,MemoryPeak,MemoryMax,CPUUsageNSec,CPUQuotaPerSecUSec,TasksCurrent,TasksMax"],
                          capture_output=True, text=True).stdout
    return parse_slice_use(dict(line.split("=", 1) for line in show.splitlines() if "=" in line))


def parse_slice_use(props: dict[str, str]) -> dict:
    """Pure: `systemctl show` properties of a slice in the form agent/limits.py reports."""
    def number(name: str) -> int | None:
        value = props.get(name, "")
        return int(value) if value.isdigit() and int(value) < 1 << 63 else None

    quota = props.get("CPUQuotaPerSecUSec", "")
    seconds = float(quota[:-1]) if quota.endswith("s") and quota[:-1].replace(".", "").isdigit() else \
        float(quota[:-2]) / 1000 if quota.endswith("ms") and quota[:-2].replace(".", "").isdigit() else 0
    out = {"memory_bytes": number("MemoryCurrent"), "memory_peak_bytes": number("MemoryPeak"),
           "memory_max_bytes": number("MemoryMax") or 0, "cpu_max": seconds,
           "cpu_s": number("CPUUsageNSec") / 1e9 if number("CPUUsageNSec") is not None else None,
           "processes": number("TasksCurrent"), "processes_max": number("TasksMax") or 0}
    return {k: v for k, v in out.items() if v is not None}
