"""Peer tools (Ansible, pyinfra, plain ssh) set up on loopback hosts so the benchmark can compare them with deployer."""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
VENV_DIR = BENCH_DIR / ".venv-peers"
DEFAULT_WORKDIR = BENCH_DIR / ".work" / "ssh"

SSHD = Path("/usr/sbin/sshd")
SSH_PORT = 2222
MAX_HOSTS = 50  # the private sshds listen on 127.0.0.1 .. 127.0.0.MAX_HOSTS
# sshd holds at most 16 listen sockets (MAX_LISTEN_SOCKS, compiled in), and
# binding 0.0.0.0 would also expose root login on the non-loopback interfaces,
# so the 50 addresses are split over a few identical sshd processes.
SSHD_SHARDS = 4

ANSIBLE_CORE = "2.21.5"
# ansible-core >= 2.20 needs Python >= 3.12 on the controller; Debian 12 only
# ships 3.11, so without a newer interpreter we fall back to the last 3.11 line.
ANSIBLE_CORE_PY311 = "2.19.14"
PYINFRA = "3.10.0"

# Ansible's own default for ssh_args. Setting ANSIBLE_SSH_ARGS replaces it
# wholesale, so we repeat it to keep the default ControlPersist behaviour.
ANSIBLE_DEFAULT_SSH_ARGS = "-C -o ControlMaster=auto -o ControlPersist=60s"

SETUP_TIMEOUT = 900
RUN_TIMEOUT = 600


@dataclass(frozen=True)
class Peers:
    """Paths and versions of a ready set-up; the private sshds are running."""

    workdir: Path
    venv: Path
    ansible_core_version: str
    pyinfra_version: str
    python_version: str

    @property
    def ssh_config(self) -> Path:
        return self.workdir / "ssh_config"

    @property
    def key(self) -> Path:
        return self.workdir / "id_ed25519"

    @property
    def ansible_cp_dir(self) -> Path:
        return self.workdir / "ansible" / "cp"

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


@dataclass(frozen=True)
class Throughput:
    mbps: float  # 10**6 bytes per second
    cipher: str  # server->client cipher negotiated by default
    nbytes: int
    seconds: float


# --------------------------------------------------------------------------
# helpers


def _run(cmd: Sequence[str | Path], *, timeout: float = SETUP_TIMEOUT, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}")
    return proc


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    path.chmod(mode)
    return True


def _hosts(n: int) -> list[str]:
    if not 1 <= n <= MAX_HOSTS:
        raise ValueError(f"n must be within 1..{MAX_HOSTS}, got {n}")
    return [f"127.0.0.{i}" for i in range(1, n + 1)]


def _timed(cmd: Sequence[str | Path], env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=RUN_TIMEOUT)
    return time.perf_counter() - start, proc


# --------------------------------------------------------------------------
# packages


def _ensure_openssh() -> None:
    if SSHD.exists() and shutil.which("ssh") and shutil.which("ssh-keygen"):
        return
    if os.geteuid() != 0:
        raise RuntimeError("openssh-server/openssh-client missing and not root: install them first")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # A fresh install would otherwise start the system sshd on port 22, a
    # process we don't want; policy-rc.d exit 101 is Debian's "don't start".
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        _run(["apt-get", "update"], env=env)
        _run(["apt-get", "install", "-y", "--no-install-recommends", "openssh-server", "openssh-client"], env=env)
    finally:
        if added_policy:
            policy.unlink()


def _python_version(python: str | Path) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [str(python), "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except OSError:
        return None
    if out.returncode != 0:  # e.g. a pyenv shim for a version not selected
        return None
    major, minor = out.stdout.split()
    return int(major), int(minor)


def _pick_python() -> tuple[str, tuple[int, int]]:
    """Newest-Ansible-capable interpreter (>= 3.12) if any, else this one."""
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = [sys.executable]
    candidates += [p for p in (shutil.which(f"python3.{m}") for m in (12, 13, 14)) if p]
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/3.1[2-9]*/bin/python3"))
    found = [(c, v) for c in candidates if (v := _python_version(c))]
    modern = sorted((v, c) for c, v in found if v >= (3, 12))
    if modern:
        version, python = modern[0]  # the oldest >= 3.12: best supported by both tools
        return python, version
    return sys.executable, sys.version_info[:2]


def _installed_versions(venv: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m\n"
        "for d in ('ansible-core', 'pyinfra'):\n"
        "    try: print(d, m.version(d))\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return dict(line.split() for line in out.stdout.splitlines())


def _ensure_venv(venv: Path) -> tuple[str, str, str]:
    """Returns (python, ansible-core, pyinfra) versions installed in venv."""
    python, version = _pick_python()
    if _python_version(venv / "bin" / "python") != version:
        _run([python, "-m", "venv", "--clear", venv])
    ansible = ANSIBLE_CORE if version >= (3, 12) else ANSIBLE_CORE_PY311
    if ansible != ANSIBLE_CORE:
        print(f"peers: no Python >= 3.12 found, using ansible-core {ansible}", file=sys.stderr)
    wanted = {"ansible-core": ansible, "pyinfra": PYINFRA}
    if _installed_versions(venv) != wanted:
        pins = [f"{name}=={ver}" for name, ver in wanted.items()]
        _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins])
    return f"{version[0]}.{version[1]}", ansible, PYINFRA


# --------------------------------------------------------------------------
# ssh keys, configs and the private sshd


def _ensure_keys(workdir: Path) -> None:
    for name, comment in (("id_ed25519", "deployer-bench"), ("ssh_host_ed25519_key", "deployer-bench-host")):
        if not (workdir / name).exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", workdir / name])
    # from= keeps the key useless from anywhere but this machine's loopback.
    authorized = 'from="127.0.0.0/8" ' + (workdir / "id_ed25519.pub").read_text()
    _write_if_changed(workdir / "authorized_keys", authorized, 0o600)


def _shard_hosts(shard: int) -> list[str]:
    # Interleaved so that even a small N spreads over every listener.
    return _hosts(MAX_HOSTS)[shard::SSHD_SHARDS]


def _sshd_config(workdir: Path, shard: int) -> str:
    listen = "".join(f"ListenAddress {h}\n" for h in _shard_hosts(shard))
    return f"""\
# Private sshd {shard + 1}/{SSHD_SHARDS} for bench/peers.py; not the system one.
Port {SSH_PORT}
{listen}HostKey {workdir / "ssh_host_ed25519_key"}
PidFile {_pidfile(workdir, shard)}
AuthorizedKeysFile {workdir / "authorized_keys"}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
# The work tree may be group-writable; StrictModes would then refuse the key.
StrictModes no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
# N hosts connecting at once are N unauthenticated connections to these few
# sshds; the default 10:30:100 would start dropping them.
MaxStartups 200:30:300
MaxSessions 100
# Ansible copies its module over sftp by default.
Subsystem sftp internal-sftp
# Debian's bash sources ~/.bashrc for every ssh command when SHLVL < 2; here
# root's .bashrc runs `pyenv init` (~0.25 s), a cost of this machine rather
# than of the tools, paid several times per host by Ansible. SHLVL=1 skips it.
SetEnv SHLVL=1
"""


def _ssh_client_config(workdir: Path) -> str:
    return f"""\
# Client config shared by ssh, Ansible and pyinfra in bench/peers.py.
Host *
    Port {SSH_PORT}
    User root
    IdentityFile {workdir / "id_ed25519"}
    IdentitiesOnly yes
    BatchMode yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
"""


def _config_path(workdir: Path, shard: int) -> Path:
    return workdir / f"sshd_config.{shard}"


def _pidfile(workdir: Path, shard: int) -> Path:
    return workdir / f"sshd.{shard}.pid"


def _our_sshd_pid(workdir: Path, shard: int) -> int | None:
    """Pid of a private sshd listener, checked against /proc so a stale pidfile is ignored."""
    try:
        pid = int(_pidfile(workdir, shard).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return None
    return pid if str(_config_path(workdir, shard)) in cmdline else None


def _wait_listening(hosts: list[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for host in hosts:
        while True:
            try:
                socket.create_connection((host, SSH_PORT), timeout=1).close()
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"private sshd not listening on {host}:{SSH_PORT}") from exc
                time.sleep(0.05)


def _start_sshd(workdir: Path, shard: int) -> None:
    # Privilege separation dir; normally made by the init script we don't run.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    config = _config_path(workdir, shard)
    _run([SSHD, "-t", "-f", config])
    _run([SSHD, "-f", config, "-E", workdir / "sshd.log"])  # daemonises
    _wait_listening(_shard_hosts(shard))


def _check_login(workdir: Path) -> None:
    proc = subprocess.run(
        ["ssh", "-F", str(workdir / "ssh_config"), _hosts(MAX_HOSTS)[-1], "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        log = (workdir / "sshd.log").read_text() if (workdir / "sshd.log").exists() else ""
        raise RuntimeError(f"ssh login to the private sshd failed:\n{proc.stderr}\n{_tail(log)}")


def _ensure_gitignore() -> None:
    gitignore = BENCH_DIR / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    missing = [entry for entry in (".venv-peers/", ".work/") if entry not in lines]
    if missing:
        gitignore.write_text("\n".join(lines + missing) + "\n")


def ensure_peers(workdir: Path = DEFAULT_WORKDIR) -> Peers:
    """Idempotently install openssh, the peers' venv, keys and configs, and start the private sshds."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _ensure_gitignore()
    _ensure_openssh()
    python_version, ansible_version, pyinfra_version = _ensure_venv(VENV_DIR)
    _ensure_keys(workdir)
    _write_if_changed(workdir / "ssh_config", _ssh_client_config(workdir))
    for shard in range(SSHD_SHARDS):
        if _write_if_changed(_config_path(workdir, shard), _sshd_config(workdir, shard)):
            _stop_sshd(workdir, shard)  # a running sshd would keep the old config
        if _our_sshd_pid(workdir, shard) is None:
            _start_sshd(workdir, shard)
    _check_login(workdir)
    return Peers(workdir, VENV_DIR, ansible_version, pyinfra_version, python_version)


def _close_ansible_masters(cp_dir: Path) -> None:
    """Ends the ControlPersist master connections Ansible left behind."""
    for sock in cp_dir.glob("*"):
        if sock.is_socket():
            subprocess.run(
                ["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "bench-master"],
                capture_output=True,
                timeout=10,
            )


def _stat_fields(pid: int | str) -> list[str]:
    """State, ppid, ... of /proc/PID/stat; [] once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _alive(pid: int) -> bool:
    # A killed daemon stays a zombie until PID 1 reaps it, which here takes seconds.
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(entry.name)):
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [child for child, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def _kill_and_wait(pids: list[int], timeout: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def stop_peers(workdir: Path = DEFAULT_WORKDIR) -> None:
    """Stops the private sshds, their live sessions and Ansible's persisted ssh masters."""
    workdir = workdir.resolve()
    _close_ansible_masters(workdir / "ansible" / "cp")
    for shard in range(SSHD_SHARDS):
        _stop_sshd(workdir, shard)


def _stop_sshd(workdir: Path, shard: int) -> None:
    pid = _our_sshd_pid(workdir, shard)
    if pid is not None:
        # Killing the listener alone leaves its sessions and their commands running.
        _kill_and_wait(_descendants(pid))
        _kill_and_wait([pid])
    _pidfile(workdir, shard).unlink(missing_ok=True)


@functools.cache
def _default_peers() -> Peers:
    return ensure_peers(DEFAULT_WORKDIR)


# --------------------------------------------------------------------------
# the measurements


def _ansible_inventory(peers: Peers, n: int) -> Path:
    path = peers.workdir / f"ansible_inventory_{n}.ini"
    _write_if_changed(
        path,
        "\n".join(
            [
                "[bench]",
                *_hosts(n),
                "",
                "[bench:vars]",
                f"ansible_port={SSH_PORT}",
                "ansible_user=root",
                f"ansible_ssh_private_key_file={peers.key}",
                # Pinning it skips interpreter discovery (an extra round trip and a warning).
                "ansible_python_interpreter=/usr/bin/python3",
                "",
            ]
        ),
    )
    return path


def _ansible_env(peers: Peers) -> dict[str, str]:
    home = peers.workdir / "ansible"
    return {
        **os.environ,
        "ANSIBLE_HOME": str(home),  # keeps Ansible's local state out of ~/.ansible
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(peers.ansible_cp_dir),
        "ANSIBLE_SSH_ARGS": f"{ANSIBLE_DEFAULT_SSH_ARGS} -F {peers.ssh_config}",
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_NOCOLOR": "1",
        "LC_ALL": "C.UTF-8",  # ansible refuses to start under a non-UTF-8 locale
    }


def ansible_adhoc_true(n: int, *, cold: bool = False, peers: Peers | None = None) -> float:
    """Wall seconds of one `ansible all -m command -a true --forks n` over hosts 127.0.0.1..n.

    Ansible keeps its default ssh_args "-C -o ControlMaster=auto -o
    ControlPersist=60s": the first run opens one master ssh connection per host
    and leaves it up for 60 s after last use, so a run within 60 s of the
    previous one (warm) skips the TCP + key exchange + auth handshakes. With
    cold=True those masters are closed first, so the run pays them as a first
    run would. Pipelining stays off (Ansible's default), so each host still
    costs several ssh round trips: make a temp dir, sftp the module, run it,
    remove the dir.
    """
    peers = peers or _default_peers()
    if cold:
        _close_ansible_masters(peers.ansible_cp_dir)
    inventory = _ansible_inventory(peers, n)
    cmd: list[str | Path] = [peers.bin("ansible"), "all", "-i", inventory, "-m", "command", "-a", "true"]
    cmd += ["--forks", str(n)]
    seconds, proc = _timed(cmd, _ansible_env(peers), peers.workdir)
    output = proc.stdout + proc.stderr
    ok = len(re.findall(r"^\S+ \| CHANGED \| rc=0 >>", proc.stdout, re.MULTILINE))
    if proc.returncode != 0 or ok != n:
        raise RuntimeError(f"ansible: exit {proc.returncode}, {ok}/{n} hosts ok:\n{_tail(output)}")
    return seconds


def _pyinfra_inventory(peers: Peers, n: int) -> Path:
    path = peers.workdir / f"pyinfra_inventory_{n}.py"
    _write_if_changed(path, f"# generated by bench/peers.py\nhosts = {_hosts(n)!r}\n")
    return path


def pyinfra_exec_true(n: int, *, peers: Peers | None = None) -> float:
    """Wall seconds of one `pyinfra INVENTORY exec -y --parallel n -- true` over hosts 127.0.0.1..n.

    pyinfra (paramiko) keeps no connection between runs, so every run is cold.
    """
    peers = peers or _default_peers()
    # pyinfra's own default (accept-new) overrides the config file's
    # StrictHostKeyChecking and would append to the known hosts file.
    data = ["--data", f"ssh_config_file={peers.ssh_config}", "--data", "ssh_strict_host_key_checking=off"]
    cmd: list[str | Path] = [peers.bin("pyinfra"), _pyinfra_inventory(peers, n), "exec", "-y"]
    cmd += ["--parallel", str(n), *data, "--", "true"]
    seconds, proc = _timed(cmd, {**os.environ, "LC_ALL": "C.UTF-8"}, peers.workdir)
    output = proc.stdout + proc.stderr
    ok = _pyinfra_successes(output)
    if proc.returncode != 0 or ok != n:
        raise RuntimeError(f"pyinfra: exit {proc.returncode}, {ok}/{n} hosts ok:\n{_tail(output)}")
    return seconds


def _pyinfra_successes(output: str) -> int:
    # The results table: "Grand total  HOSTS  SUCCESS  ERROR  NO-CHANGE".
    match = re.search(r"^\s*Grand total\s+\d+\s+(\d+)", output, re.MULTILINE)
    return int(match[1]) if match else 0


def ssh_cat_throughput(nbytes: int, *, peers: Peers | None = None) -> Throughput:
    """MB/s (10**6 B/s) of `ssh 127.0.0.1 head -c nbytes /dev/zero`, counted on the client, with the default cipher."""
    peers = peers or _default_peers()
    # -v (it wins over the config's LogLevel) prints the negotiated cipher.
    cmd = ["ssh", "-v", "-F", str(peers.ssh_config), "127.0.0.1", f"head -c {nbytes} /dev/zero"]
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, bufsize=0)
        assert proc.stdout is not None
        received = _drain(proc.stdout.fileno())
        status = proc.wait(timeout=RUN_TIMEOUT)
        seconds = time.perf_counter() - start
        err.seek(0)
        debug = err.read()
    if status != 0 or received != nbytes:
        raise RuntimeError(f"ssh: exit {status}, got {received}/{nbytes} bytes:\n{_tail(debug)}")
    match = re.search(r"kex: server->client cipher: (\S+)", debug)
    return Throughput(nbytes / seconds / 1e6, match[1] if match else "unknown", nbytes, seconds)


def _drain(fd: int) -> int:
    buf = bytearray(1 << 20)  # reused: no allocation per read on the measured path
    total = 0
    while count := os.readv(fd, [buf]):
        total += count
    return total


# --------------------------------------------------------------------------
# command line


def _median(fn: Callable[[], float], runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def _report(peers: Peers, ns: list[int]) -> None:
    print(f"{'hosts':>5} {'runs':>4} {'ansible cold':>13} {'ansible warm':>13} {'pyinfra':>9}  (median wall s)")
    for n in ns:
        runs = 3 if n <= 10 else 1
        cold = _median(functools.partial(ansible_adhoc_true, n, cold=True, peers=peers), runs)
        ansible_adhoc_true(n, peers=peers)  # prime ControlPersist masters for the warm runs
        warm = _median(functools.partial(ansible_adhoc_true, n, peers=peers), runs)
        pyinfra = _median(functools.partial(pyinfra_exec_true, n, peers=peers), runs)
        print(f"{n:>5} {runs:>4} {cold:>13.3f} {warm:>13.3f} {pyinfra:>9.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="*", default=[], help="host counts to time Ansible and pyinfra on")
    parser.add_argument("--throughput-bytes", type=int, help="bytes to stream over ssh for throughput")
    parser.add_argument("--keep", action="store_true", help="leave the private sshds running")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    peers = ensure_peers(args.workdir)
    print(
        f"set-up {time.perf_counter() - start:.1f} s: ansible-core {peers.ansible_core_version}, "
        f"pyinfra {peers.pyinfra_version}, venv Python {peers.python_version}, "
        f"{SSHD_SHARDS} sshds on 127.0.0.1-{MAX_HOSTS}:{SSH_PORT}",
        flush=True,
    )
    try:
        if args.n:
            _report(peers, args.n)
        if args.throughput_bytes:
            # Single runs vary by +-15 % here (2 cores shared by ssh, sshd and head).
            runs = [ssh_cat_throughput(args.throughput_bytes, peers=peers) for _ in range(3)]
            t = sorted(runs, key=lambda r: r.mbps)[1]
            print(f"ssh throughput, median of 3: {t.mbps:.0f} MB/s ({t.seconds:.2f} s, cipher {t.cipher})")
    finally:
        if not args.keep:
            stop_peers(args.workdir)


if __name__ == "__main__":
    main()
