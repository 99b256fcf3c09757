"""Limits per environment: every process of an environment runs in that environment's cgroup
(memory, CPU, process count) and sees a /tmp of the environment's own. Where systemd is PID 1 it
owns the cgroup tree, and the group is the environment's slice (ScopeLeaf, agent/systemd_driver.py).

The invariant: a tenant's command never runs outside its group, not even for an instant. The
process joins the group itself, as root, before it executes anything of the tenant's (a small
`sh` launcher writes `0` to each `cgroup.procs`, then executes the user switch), so a fork bomb is
bounded from its first fork. Nothing of Python runs in the child (see agent/executor.py on vfork).

Layout, all under a parent of ours (`deployer`) in each hierarchy:
  <hierarchy>/deployer/auto-<app>-<env>/            the limits of the environment on this host
  <hierarchy>/deployer/auto-<app>-<env>/<leaf>/     one process tree: an operation or a service
A leaf per process tree gives an exact out-of-memory count for it (the kernel counts a kill in
the victim's own memory cgroup), lets whatever is left of it be killed at the end even if it
left its process group, and is what cgroup v2 requires anyway (no processes in inner groups).

One module, though a little long: cgroup v1, v2 and systemd's slices carry the same invariant and
are kept side by side so that a change to one is seen against the others.
"""

from __future__ import annotations

import os
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from protos import deployer_pb2 as pb

from agent.slices import UNIT_DIR, LimitError, check_names, scope_argv, slice_name, slice_unit

PARENT = "deployer"
MOUNTS = Path("/proc/self/mounts")
PERIOD_US = 100_000
V1_CONTROLLERS = ("memory", "cpu", "pids")
V1_OPTIONAL = ("cpuacct",)  # CPU time, where the kernel mounts it apart from cpu
RMDIR_TRIES = 20


@dataclass(frozen=True)
class Layout:
    """Where the kernel mounts what we need: v1 (a mount point per controller) or v2 (one)."""

    version: int
    mounts: tuple[tuple[str, str], ...]  # (controller, mount point); v2: (("", root),)

    def points(self) -> dict[str, str]:
        return dict(self.mounts)


def parse_mounts(text: str, v2_controllers: str = "") -> Layout | None:
    """The layout from /proc/self/mounts; `v2_controllers` is the v2 root's cgroup.controllers.

    v1 wins where it has memory, cpu and pids (a hybrid host binds them to v1, leaving its v2 mount
    without controllers); otherwise v2, if it offers them."""
    v1: dict[str, str] = {}
    v2 = ""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point, fstype, options = fields[1], fields[2], fields[3].split(",")
        if fstype == "cgroup":
            for controller in V1_CONTROLLERS + V1_OPTIONAL:
                if controller in options:
                    v1.setdefault(controller, point)
        elif fstype == "cgroup2" and not v2:
            v2 = point
    if all(c in v1 for c in V1_CONTROLLERS):
        return Layout(1, tuple(sorted(v1.items())))
    if v2 and all(c in v2_controllers.split() for c in V1_CONTROLLERS):
        return Layout(2, (("", v2),))
    return None


def detect() -> Layout | None:
    try:
        text = MOUNTS.read_text()
    except OSError:
        return None
    v2 = next((f.split()[1] for f in text.splitlines() if len(f.split()) > 2 and f.split()[2] == "cgroup2"), "")
    controllers = _read(f"{v2}/cgroup.controllers") if v2 else ""
    return parse_mounts(text, controllers)


def group_dirs(layout: Layout, group: str, leaf: str = "") -> dict[str, str]:
    """controller → folder of the environment's group (or of one of its leaves)."""
    check_names(group, leaf)
    tail = f"/{PARENT}/{group}" + (f"/{leaf}" if leaf else "")
    return {controller: point.rstrip("/") + tail for controller, point in layout.mounts}


def limit_values(layout: Layout, limits: pb.Limits) -> list[tuple[str, str, str]]:
    """(controller, file, value) to write in the environment's group, in this order. The file
    names are the kernel's; a value of none means no limit."""
    memory, cpu, processes = limits.memory_bytes, limits.cpu, limits.processes
    quota = int(cpu * PERIOD_US) if cpu > 0 else 0
    if layout.version == 1:
        return [
            ("memory", "memory.limit_in_bytes", str(memory) if memory else "-1"),
            # Swap counted in too: a limit that spills into swap would not bound anything.
            ("memory", "memory.memsw.limit_in_bytes", str(memory) if memory else "-1"),
            ("cpu", "cpu.cfs_period_us", str(PERIOD_US)),
            ("cpu", "cpu.cfs_quota_us", str(quota) if quota else "-1"),
            ("cpu", "cpu.shares", str(max(2, min(262144, round(1024 * cpu)))) if cpu > 0 else "1024"),
            ("pids", "pids.max", str(processes) if processes else "max"),
        ]
    return [
        ("", "memory.max", str(memory) if memory else "max"),
        ("", "memory.swap.max", "0" if memory else "max"),
        ("", "cpu.max", f"{quota if quota else 'max'} {PERIOD_US}"),
        ("", "cpu.weight", str(max(1, min(10000, round(100 * cpu)))) if cpu > 0 else "100"),
        ("", "pids.max", str(processes) if processes else "max"),
    ]


SHARED_TMP = ("/tmp", "/var/tmp")  # world-writable folders every tenant would otherwise share


def launcher(procs_files: list[str], argv: list[str], tmp_dir: str = "",
             over: tuple[str, ...] = SHARED_TMP) -> list[str]:
    """`argv` started by a root `sh` that first moves itself into the leaf (each of
    `procs_files`), then, with `tmp_dir`, into a mount namespace of its own where `tmp_dir` is
    mounted over each folder of `over`. `argv` (the user switch and the command) executes in
    place: same pid, same session."""
    q = shlex.quote
    steps = [f"echo 0 > {q(path)}" for path in procs_files]
    if tmp_dir and over:
        inner = " && ".join([*(f'mount --bind "$0" {q(folder)}' for folder in over), 'exec "$@"'])
        steps.append(f"exec unshare --mount --propagation private -- /bin/sh -c {q(inner)} {q(tmp_dir)} \"$@\"")
    else:
        steps.append('exec "$@"')
    return ["/bin/sh", "-c", " && ".join(steps), "deployer-limits", *argv]


def oom_kills(text: str) -> int:
    """The `oom_kill` count of memory.oom_control (v1) or memory.events (v2)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def oom_message(memory_bytes: int) -> str:
    return f"killed by the kernel: out of memory (limit {_mib(memory_bytes)})" if memory_bytes else \
        "killed by the kernel: out of memory"


def _mib(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 and n % (1 << 30) == 0 else f"{n / (1 << 20):g} MiB"


# ---------------------------------------------------------------- acting on the kernel's files

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        if os.path.islink(path) or not os.path.isdir(path):
            raise LimitError(f"{path} is not a folder") from None


@dataclass
class Leaf:
    """One process tree's place in its environment's group, made ready before it starts."""

    layout: Layout
    group: str
    leaf: str
    memory_bytes: int = 0

    def dirs(self) -> dict[str, str]:
        return group_dirs(self.layout, self.group, self.leaf)

    def procs_files(self) -> list[str]:
        return sorted({f"{d}/cgroup.procs" for d in self.dirs().values()})  # co-mounted: one folder

    def oom_kills(self) -> int:
        memory = self.dirs()["memory" if self.layout.version == 1 else ""]
        name = "memory.oom_control" if self.layout.version == 1 else "memory.events"
        return oom_kills(_read(f"{memory}/{name}"))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for folder in self.dirs().values():
            found.update(int(p) for p in _read(f"{folder}/cgroup.procs").split() if p.isdigit())
        return sorted(found)

    def release(self) -> None:
        """Kill what is left of the tree (even what left its process group) and remove the leaf."""
        for _ in range(RMDIR_TRIES):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            left = False
            for folder in self.dirs().values():
                try:
                    os.rmdir(folder)
                except FileNotFoundError:
                    pass
                except OSError:
                    left = True
            if not left:
                return
            time.sleep(0.05)


def prepare(limits: pb.Limits, leaf: str, layout: Layout | None = None) -> Leaf:
    """Make the environment's group (with its limits as given now) and an empty leaf in it."""
    check_names(limits.group, leaf)
    layout = layout or detect()
    if layout is None:
        raise LimitError("no cgroup hierarchy with memory, cpu and pids is mounted: limits cannot be applied")
    points = layout.points()
    try:
        if layout.version == 2:
            root = points[""].rstrip("/")
            for folder in (root, f"{root}/{PARENT}", f"{root}/{PARENT}/{limits.group}"):
                if folder != root:
                    _mkdir(folder)
                _write(f"{folder}/cgroup.subtree_control", "+memory +cpu +pids")
        else:
            for point in points.values():
                _mkdir(f"{point.rstrip('/')}/{PARENT}")
                _mkdir(f"{point.rstrip('/')}/{PARENT}/{limits.group}")
        groups = group_dirs(layout, limits.group)
        _write_limits(layout, groups, limits)
        for folder in group_dirs(layout, limits.group, leaf).values():
            _mkdir(folder)
    except OSError as exc:
        raise LimitError(f"cannot apply the limits of {limits.group}: {exc.strerror} ({exc.filename})") from None
    return Leaf(layout, limits.group, leaf, limits.memory_bytes)


@dataclass
class Confined:
    """A command made ready to run in its environment's limits."""

    argv: list[str]
    env: dict[str, str]   # added to the command's environment
    leaf: "Leaf | ScopeLeaf"


def confine(limits: pb.Limits, leaf: str, argv: list[str], uid: int = -1, gid: int = -1,
            layout: Layout | None = None) -> Confined:
    """`argv` (already switching to the tenant's user) wrapped so it joins `leaf` of the
    environment's group before it executes, with the environment's own /tmp."""
    if layout is None and systemd_booted():
        prepared: Leaf | ScopeLeaf = ScopeLeaf(limits, leaf)
        argv = prepared.prepare(argv)
    else:
        prepared = prepare(limits, leaf, layout)
    env: dict[str, str] = {}
    tmp, over = "", ()
    if limits.tmp_dir:
        tmp = private_tmp(limits.tmp_dir, limits.group, uid, gid)
        env["TMPDIR"] = tmp
        # A services root under /tmp (test clusters) would vanish behind a mount over /tmp, and with
        # it the release the command runs from: that folder is left shared, and TMPDIR still points
        # the command at its own.
        over = tuple(folder for folder in SHARED_TMP if not _under(tmp, folder))
    return Confined(launcher(prepared.procs_files(), argv, tmp, over), env, prepared)


def systemd_booted() -> bool:
    """sd_booted(3): then systemd owns the cgroup tree, and limits go through its slices."""
    return os.path.isdir("/run/systemd/system")


@dataclass
class ScopeLeaf:
    """Where systemd is PID 1: the process tree is a transient scope in the environment's slice."""

    limits: pb.Limits
    leaf: str
    memory_bytes: int = 0

    @property
    def unit(self) -> str:
        return f"{self.limits.group}-{self.leaf}.scope".replace("@", "-")

    def prepare(self, argv: list[str]) -> list[str]:
        import subprocess
        check_names(self.limits.group, self.leaf)
        path, content = UNIT_DIR / slice_name(self.limits.group), slice_unit(self.limits)
        try:
            if not path.exists() or path.read_text() != content:
                path.write_text(content)
                subprocess.run(["systemctl", "daemon-reload"], check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise LimitError(f"cannot write the slice of {self.limits.group}: {exc}") from None
        return scope_argv(self.limits, self.unit.removesuffix(".scope"), argv)

    def procs_files(self) -> list[str]:
        return []  # systemd-run places the process before it executes the command

    def oom_kills(self) -> int:
        return 0  # the scope is gone with its result once it ends (--collect)

    def release(self) -> None:
        import subprocess
        subprocess.run(["systemctl", "stop", self.unit], capture_output=True, timeout=60)


def private_tmp(path: str, group: str, uid: int, gid: int) -> str:
    """The environment's /tmp: `<folder of root's, 0711>/<group>`, the user's own, 0700. The user
    cannot swap a link in for it, since only root can change the folder that holds it."""
    if not path.startswith("/") or ".." in path.split("/") or os.path.basename(path) != group:
        raise LimitError(f"invalid tmp folder {path[:120]!r} for {group}")
    parent = os.path.dirname(path)
    for folder, mode, owner in ((parent, 0o711, (0, 0)), (path, 0o700, (uid, gid))):
        try:
            os.mkdir(folder, mode)
            if owner != (-1, -1):
                os.chown(folder, *owner, follow_symlinks=False)
        except FileExistsError:
            pass
        except OSError as exc:
            raise LimitError(f"cannot make {folder}: {exc.strerror}") from None
        info = os.lstat(folder)
        if not os.path.isdir(folder) or os.path.islink(folder) or \
                (folder == parent and (info.st_uid != 0 or info.st_mode & 0o022)):
            raise LimitError(f"{folder} is not a folder of root's that only root can change")
    return path


def _under(path: str, folder: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip("/") + "/")


def finish(leaf: Leaf, result: pb.OperationResult) -> None:
    """After the tree has ended: say so if the kernel killed any of it for memory, then remove it."""
    try:
        if leaf.oom_kills():
            note = oom_message(leaf.memory_bytes)
            result.error = f"{note}; {result.error}" if result.error else note
    finally:
        leaf.release()


def _write_limits(layout: Layout, groups: dict[str, str], limits: pb.Limits) -> None:
    for controller, name, value in limit_values(layout, limits):
        path = f"{groups[controller]}/{name}"
        if name.startswith(("memory.memsw.", "memory.swap.")) and not os.path.exists(path):
            continue  # no swap accounting in this kernel: nothing to spill into either
        try:
            _write(path, value)
        except OSError:
            if name != "memory.limit_in_bytes":
                raise
            # Raising the limit above the current memory+swap one: that one goes first.
            _write(f"{groups[controller]}/memory.memsw.limit_in_bytes", value)
            _write(path, value)


def usage(limits_group: str, layout: Layout | None = None) -> dict:
    """What the environment's group uses now, against its limits (absent: unknown)."""
    check_names(limits_group)
    layout = layout or detect()
    if layout is None:
        return {}
    dirs = group_dirs(layout, limits_group)
    if not os.path.isdir(next(iter(dirs.values()))):
        return {}
    return parse_usage(layout, {(c, name): _read(f"{d}/{name}") for c, d in dirs.items()
                                for name in _USAGE_FILES[layout.version].get(c, ())})


_USAGE_FILES = {
    1: {"memory": ("memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.limit_in_bytes",
                   "memory.failcnt"),
        "cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us"), "cpuacct": ("cpuacct.usage",),
        "pids": ("pids.current", "pids.max", "pids.peak")},
    2: {"": ("memory.current", "memory.peak", "memory.max", "memory.events", "cpu.max", "cpu.stat",
             "pids.current", "pids.max", "pids.peak")},
}
_UNLIMITED = 1 << 62  # v1 shows "no limit" as a huge page-rounded number


def parse_usage(layout: Layout, files: dict[tuple[str, str], str]) -> dict:
    """Pure: the use of a group from the text of its files, keyed (controller, file name)."""
    def number(controller: str, name: str) -> int | None:
        text = files.get((controller, name), "").strip()
        return int(text) if text.lstrip("-").isdigit() else None

    out: dict = {}
    if layout.version == 1:
        out["memory_bytes"] = number("memory", "memory.usage_in_bytes")
        out["memory_peak_bytes"] = number("memory", "memory.max_usage_in_bytes")
        limit = number("memory", "memory.limit_in_bytes")
        out["memory_max_bytes"] = limit if limit is not None and limit < _UNLIMITED else 0
        out["memory_limit_hits"] = number("memory", "memory.failcnt")
        quota, period = number("cpu", "cpu.cfs_quota_us"), number("cpu", "cpu.cfs_period_us")
        out["cpu_max"] = quota / period if quota and quota > 0 and period else 0
        usage_ns = number("cpuacct", "cpuacct.usage")
        out["cpu_s"] = usage_ns / 1e9 if usage_ns is not None else None
        controller = "pids"
    else:
        out["memory_bytes"] = number("", "memory.current")
        out["memory_peak_bytes"] = number("", "memory.peak")
        out["memory_max_bytes"] = number("", "memory.max") or 0
        out["oom_kills"] = oom_kills(files.get(("", "memory.events"), ""))
        quota, _, period = files.get(("", "cpu.max"), "").strip().partition(" ")
        out["cpu_max"] = int(quota) / int(period) if quota.isdigit() and period.strip().isdigit() else 0
        stat = dict(line.split(" ", 1) for line in files.get(("", "cpu.stat"), "").splitlines() if " " in line)
        out["cpu_s"] = int(stat["usage_usec"]) / 1e6 if stat.get("usage_usec", "").isdigit() else None
        controller = ""
    out["processes"] = number(controller, "pids.current")
    out["processes_peak"] = number(controller, "pids.peak")
    out["processes_max"] = number(controller, "pids.max") or 0
    return {k: v for k, v in out.items() if v is not None}
