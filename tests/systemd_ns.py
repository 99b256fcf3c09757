"""A bare systemd of the tests' own, so the systemd service driver runs for real on a machine
whose PID 1 is not systemd: PID 1 of a private PID and mount namespace, with private `/run`,
`/tmp` and `/var/tmp`, and never the machine's default target.

Booting a default target there would start the machine's own services (its MariaDB, its nginx) a
second time, and systemd-tmpfiles would empty the host's /tmp. So systemd starts a target of
ours that wants nothing, and every unit the machine has installed to start at boot is masked in
the namespace's own /run (a mask there hides nothing of the host). The folders given to `start`
(the checkout the tests run from, MariaDB's socket folder) stay shared through the private mounts.

Everything the tests then run inside (`command`) sees this systemd as PID 1: agents choose the
systemd driver, units, slices and scopes are real, and every pid is the namespace's. Stopping it
(kill -9 of its PID 1) ends every process it holds.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

TARGET = "deployer-tests.target"   # how the sweep (tests/sweep.py) recognises a leftover one
# The tests' temporary folders in there (TMPDIR): services run with PrivateTmp=, so a services root
# under /tmp or /var/tmp would be out of their sight.
TMPDIR = "/run/tests"

_SETUP = r"""
set -e
keep=$(mktemp -d /dev/shm/deployer-tests-keep.XXXXXX)
for d in "$@"; do mkdir -p "$keep$d"; mount --bind "$d" "$keep$d"; done
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
for d in "$@"; do mkdir -p "$d"; mount --move "$keep$d" "$d"; done
find "$keep" -depth -type d -empty -delete 2>/dev/null || true
mkdir -p /run/systemd/system
mkdir -m 1777 /run/tests
for u in systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service \
         systemd-tmpfiles-clean.service systemd-tmpfiles-clean.timer systemd-remount-fs.service \
         systemd-sysctl.service systemd-modules-load.service systemd-udevd.service \
         systemd-udev-trigger.service systemd-binfmt.service systemd-random-seed.service \
         systemd-journald.service systemd-journald.socket systemd-journald-dev-log.socket \
         $(ls /etc/systemd/system/*.wants/ /lib/systemd/system/*.wants/ 2>/dev/null \
           | grep -E '\.(service|timer|socket|mount|path)$' | sort -u); do
  ln -sf /dev/null "/run/systemd/system/$u"
done
printf '[Unit]\nDescription=the deployer tests (nothing else)\nDefaultDependencies=no\n' \
  > /run/systemd/system/TARGET
exec /lib/systemd/systemd --system --unit=TARGET
""".replace("TARGET", TARGET)


def leftovers() -> list[int]:
    """PIDs (host's view) of test systemds still running."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline[:1] == [b"/lib/systemd/systemd"] and f"--unit={TARGET}".encode() in cmdline:
                found.append(int(entry.name))
    return found


def enter(pid: int, cwd: str = "/") -> list[str]:
    """The argv prefix that runs a command inside the namespace of `pid`, in folder `cwd`."""
    return ["nsenter", "-t", str(pid), "-m", "-p", f"--wd={cwd}", "--"]


def start(keep: list[str], log: Path | None = None, timeout: float = 30) -> int:
    """Start one and wait until it runs; its PID 1 as the host sees it."""
    before = set(leftovers())
    out = open(log, "ab") if log else subprocess.DEVNULL
    subprocess.Popen(["setsid", "unshare", "--pid", "--fork", "--mount", "--mount-proc",
                      "--propagation", "private", "sh", "-c", _SETUP, "sh", *keep],
                     stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in set(leftovers()) - before:
            state = subprocess.run([*enter(pid), "systemctl", "is-system-running"],
                                   capture_output=True, text=True).stdout.strip()
            if state in ("running", "degraded"):
                return pid
        time.sleep(0.2)
    for pid in set(leftovers()) - before:
        stop(pid)
    raise RuntimeError(f"a bare systemd did not come up within {timeout:g}s"
                       + (f" (see {log})" if log else ""))


def stop(pid: int) -> None:
    """End it and all it holds; then the cgroups its slices left behind, if empty."""
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for hierarchy in Path("/sys/fs/cgroup").glob("*/"):
        for top in ("system.slice", "user.slice", "init.scope", "auto.slice"):
            folder = hierarchy / top
            if folder.is_dir():
                subprocess.run(["find", str(folder), "-depth", "-type", "d", "-exec", "rmdir", "{}", ";"],
                               capture_output=True)
