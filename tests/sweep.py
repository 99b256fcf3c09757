"""Sweep what an earlier test run left behind when it was killed before its clean-ups ran.

Everything the tests make carries the tests' own mark, which no real environment and no
`make demo` uses: an environment (or app) name `t` + 6 hex digits (`unique_env`), so names like
`auto-shop-t1a2b3c-web-1`, `auto-lp-t1a2b3c`, `auto-t1a2b3c-e-s-1:`; temporary folders
`/tmp/deployer-*` and pytest's own. Only those are touched.

Several runs at once (two checkouts on one machine) must not sweep each other: every run holds a
shared lock on `LOCK` for its whole life, and sweeps only if it can take the lock exclusively
first, that is when no other run is alive.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
import signal
import subprocess
from pathlib import Path

LOCK = Path("/tmp/deployer-tests.lock")
TEST_NAME = re.compile(r"^auto-([a-z0-9]+-)?t[0-9a-f]{6}(?=$|[-:])")
TEST_FOLDERS = ("/tmp/deployer-", f"/tmp/pytest-of-{pwd.getpwuid(os.getuid()).pw_name}/")


def hold(sweep_first: bool = True) -> tuple[int, str]:
    """Take the run's shared lock (waiting while another run sweeps), with `sweep_first` sweeping
    before if no other run holds it. Returns the lock's file descriptor (kept open for the run's
    life) and a line saying what was swept, or ""."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    swept: list[str] = []
    if sweep_first:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another run is alive: what looks left over may be its own
        else:
            swept = sweep()
    fcntl.flock(fd, fcntl.LOCK_SH)
    if not swept:
        return fd, ""
    return fd, (f"swept what an earlier test run left: {'; '.join(swept[:20])}"
                + (f" and {len(swept) - 20} more" if len(swept) > 20 else ""))


def sweep() -> list[str]:
    swept: list[str] = []
    for step in (_systemds, _networks, _processes, _mounts, _unix_users, _databases, _redis, _folders):
        try:
            swept += step()
        except (OSError, subprocess.SubprocessError) as exc:
            swept.append(f"could not sweep {step.__name__.strip('_')}: {exc}")
    return swept


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout


def _ours(cmdline: str) -> bool:
    return any(folder in cmdline for folder in TEST_FOLDERS)


def _processes() -> list[str]:
    """Controllers, agents and nginx started from a test's folder, and everything run as a test
    environment's user. Never this process or its parents (a run's own pytest)."""
    mine = set()
    pid = os.getpid()
    while pid > 1:
        mine.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    users = {p.pw_uid for p in pwd.getpwall() if TEST_NAME.match(p.pw_name)}
    swept = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            uid = entry.stat().st_uid
        except OSError:
            continue
        test_daemon = _ours(cmdline) and any(x in cmdline for x in ("controller.daemon", "agent.main", "nginx"))
        if cmdline.startswith("pebble"):  # an ACME test server (tests/acme_harness.py) runs in a test's folder
            try:
                test_daemon = _ours(os.readlink(entry / "cwd") + "/")
            except OSError:
                pass
        if test_daemon or uid in users:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                swept.append(f"process {entry.name}: {cmdline[:80]}")
            except OSError:
                pass
    return swept


def _systemds() -> list[str]:
    """A bare systemd of a systemd pass (tests/systemd_ns.py), with everything it holds."""
    from tests import systemd_ns
    swept = []
    for pid in systemd_ns.leftovers():
        systemd_ns.stop(pid)
        swept.append(f"the test systemd {pid} and all it ran")
    return swept


def _mounts() -> list[str]:
    swept = []
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1]
        if any(target.startswith(folder) for folder in TEST_FOLDERS):
            if subprocess.run(["umount", "-l", target], capture_output=True).returncode == 0:
                swept.append(f"mount {target}")
    return swept


def _unix_users() -> list[str]:
    swept = []
    for entry in pwd.getpwall():
        if TEST_NAME.match(entry.pw_name):
            if subprocess.run(["userdel", "--force", entry.pw_name], capture_output=True).returncode == 0:
                swept.append(f"Unix user {entry.pw_name}")
    for line in Path("/etc/group").read_text().splitlines():
        name = line.split(":", 1)[0]
        if TEST_NAME.match(name):
            subprocess.run(["groupdel", name], capture_output=True)
    return swept


def _mysql(sql: str) -> str:
    return _run("mariadb", "--batch", "--skip-column-names", "-e", sql)


def _databases() -> list[str]:
    swept = []
    for name in _mysql("SHOW DATABASES LIKE 'auto-%'").split():
        if TEST_NAME.match(name):
            _mysql(f"DROP DATABASE `{name}`")
            swept.append(f"database {name}")
    for line in _mysql("SELECT User, Host FROM mysql.user WHERE User LIKE 'auto-%'").splitlines():
        user, host = line.split("\t")
        if TEST_NAME.match(user):
            _mysql(f"DROP USER '{user}'@'{host}'")
            swept.append(f"MariaDB user {user}")
    return swept


def _redis() -> list[str]:
    swept = []
    for user in _run("redis-cli", "ACL", "USERS").split():
        if TEST_NAME.match(user):
            _run("redis-cli", "ACL", "DELUSER", user)
            swept.append(f"Redis ACL user {user}")
    keys = [k for k in _run("redis-cli", "--scan", "--pattern", "auto-*").splitlines() if TEST_NAME.match(k)]
    for start in range(0, len(keys), 500):
        _run("redis-cli", "UNLINK", *keys[start:start + 500])
    if keys:
        swept.append(f"{len(keys)} Redis keys")
    return swept


def _networks() -> list[str]:
    """The test hosts' namespaces (with whatever still runs in them: a data host's MariaDB, an
    agent) and links (tests/netns.py)."""
    from tests import netns
    swept = []
    for name in netns.leftovers():
        if Path(f"/run/netns/{name}").exists():
            for pid in _run("ip", "netns", "pids", name).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        netns.remove(name)
        swept.append(f"network {name}")
    return swept


def _folders() -> list[str]:
    swept = []
    for folder in Path("/tmp").glob("deployer-*"):
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(f"folder {folder}")
    return swept
