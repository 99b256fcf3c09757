"""Attacks on a shared server, replayed for real: each test plays a hostile tenant, a rogue agent
or a local user, and asserts that the concrete harm did not happen (not merely that an error was
printed). Where it can be shown safely, a test also shows the attack works without its defence.

Sections are independent (each builds what it needs); see docs/decisions/013-threat-model.md.
"""

from __future__ import annotations


# ---------------------------------------------------------------- 1. ownership before destruction


# ---------------------------------------------------------------- 2. tenant code without root


# ---------------------------------------------------------------- 3. agents prove what they provide


# ---------------------------------------------------------------- 4. operators authenticate


# ---------------------------------------------------------------- 5. limits per environment
# A tenant forks without end or eats memory: its environment's group (agent/limits.py) bounds it,
# from before its first instruction, and the host and the other tenants carry on.

import asyncio as _asyncio
import glob as _glob
import json as _json
import os as _os
import secrets as _secrets
import shutil as _shutil
import subprocess as _subprocess
import tempfile as _tempfile
import time as _time
from pathlib import Path as _Path

import pytest as _pytest

from agent import limits as _limits
from agent.journal import Journal as _Journal
from agent.operations import Operations as _Operations
from agent.services import Supervisor as _Supervisor
from controller import naming as _naming, operations as _ops
from protos import deployer_pb2 as _pb
from tests import deploy_harness as _dh

_needs_cgroups = _pytest.mark.skipif(_os.geteuid() != 0 or _limits.detect() is None,
                                     reason="needs root and a cgroup hierarchy with memory, cpu and pids")


def _kill_group(group: str) -> None:
    """Whatever is left in the environment's group is killed, and its cgroups removed."""
    for _ in range(50):
        pids = {int(p) for f in _glob.glob(f"/sys/fs/cgroup/**/deployer/{group}/**/cgroup.procs", recursive=True)
                for p in _Path(f).read_text().split()}
        for pid in pids:
            try:
                _os.kill(pid, 9)
            except ProcessLookupError:
                pass
        if not pids:
            break
        _time.sleep(0.05)
    _dh.remove_limits_group(group)


def _make_user(name: str) -> None:
    _subprocess.run(["sh", "-c", _ops.ensure_unix_user(name)], check=True, capture_output=True)


def _remove_user(name: str) -> None:
    _subprocess.run(["userdel", name], capture_output=True)
    _subprocess.run(["groupdel", name], capture_output=True)


@_pytest.fixture
def tenant_agent():
    """An agent's operations in this process, over a services root outside /tmp and /var/tmp (so a
    private /tmp can be mounted over both), and a fresh environment user; every process and group
    removed at the end."""
    base = _Path(_tempfile.mkdtemp(prefix="deployer-limits-", dir="/run"))
    _os.chmod(base, 0o711)
    srv = base / "srv"
    srv.mkdir(mode=0o711)
    user = f"auto-lim-{_secrets.token_hex(3)}"
    _make_user(user)
    operations = _Operations(_Journal(base / "state"), srv, _Supervisor(base / "state"))
    try:
        yield {"ops": operations, "srv": srv, "user": user}
    finally:
        _kill_group(user)
        _remove_user(user)
        _shutil.rmtree(base, ignore_errors=True)


def _limits_of(agent, memory: int = 64 << 20, processes: int = 64) -> _pb.Limits:
    return _ops.limits(memory, 1.0, processes, agent["user"], str(agent["srv"]))


async def _exec(agent, script: str, limits: _pb.Limits, timeout: float = 20, user: str = ""):
    operation = _pb.Operation(id=f"op-t-{_secrets.token_hex(4)}", exec=_pb.ExecSpec(
        argv=["sh", "-c", script], cwd=str(agent["srv"]), user=user or agent["user"], limits=limits,
        timeout_s=timeout, kill_grace_s=1))
    held, _, rejection = agent["ops"].receive(operation)
    assert held is not None and not rejection
    return held


def _output(held) -> str:
    return b"".join(r.data for r in held.spool.read(0, 1 << 24)).decode(errors="replace")


@_needs_cgroups
def test_a_fork_bomb_stays_within_its_environments_process_limit(tenant_agent):
    agent, limits = tenant_agent, _limits_of(tenant_agent, processes=64)
    pids_root = _limits.detect().points().get("pids", _limits.detect().points().get(""))
    group_dir = f"{pids_root}/deployer/{agent['user']}"

    async def attack():
        # Safety first: a harmless command must be inside its leaf before any bomb is started.
        probe = await _exec(agent, "cat /proc/self/cgroup", limits)
        await probe.task
        assert probe.result.outcome == _pb.EXITED and probe.result.exit_code == 0, probe.result
        assert f"/deployer/{agent['user']}/{probe.op_id}" in _output(probe), _output(probe)

        bomb = await _exec(agent, "bomb() { bomb | bomb & }; bomb; sleep 3", limits, timeout=4)
        leaf = f"{group_dir}/{bomb.op_id}"
        peak, host_forks, refused = 0, 0, 0
        while not bomb.task.done():
            try:
                peak = max(peak, int(_Path(f"{leaf}/pids.current").read_text()))
                # "max N": forks the kernel refused for the limit (counted where the fork failed
                # or where the limit is, depending on the kernel)
                refused = max([refused] + [int(_Path(f"{d}/pids.events").read_text().split()[1])
                                           for d in (leaf, group_dir)])
            except (OSError, ValueError, IndexError):
                pass
            # The host still forks while the bomb runs: this very test does.
            host_forks += _subprocess.run(["true"]).returncode == 0
            await _asyncio.sleep(0.02)
        await bomb.task
        return bomb, peak, host_forks, refused

    started = _time.monotonic()
    bomb, peak, host_forks, refused = _asyncio.run(attack())
    assert 32 <= peak <= 64, (peak, bomb.result)  # it did fork up to its limit, and no further
    assert refused > 0                      # the kernel said no to the forks beyond it
    assert host_forks > 10
    assert bomb.result.outcome in (_pb.TIMED_OUT, _pb.EXITED, _pb.SIGNALED), bomb.result
    assert not _os.path.exists(f"{group_dir}/{bomb.op_id}")        # the leaf is gone: nothing of it is left
    assert _Path(f"{group_dir}/pids.current").read_text().strip() == "0"
    assert _time.monotonic() - started < 30


@_needs_cgroups
def test_a_memory_hog_among_install_commands_is_killed_and_reported(tenant_agent):
    agent = tenant_agent

    async def attack():
        hog = await _exec(agent, "python3 -c 'import time; hog = b\"x\" * (1 << 30); time.sleep(30)'",
                          _limits_of(agent, memory=64 << 20))
        await hog.task
        return hog

    hog = _asyncio.run(attack())
    assert hog.result.exit_code == 137 or hog.result.signal == 9, hog.result
    assert hog.result.error == "killed by the kernel: out of memory (limit 64 MiB)", hog.result
    assert _subprocess.run(["true"]).returncode == 0


@_needs_cgroups
def test_a_tenant_sees_a_tmp_of_its_own(tenant_agent):
    agent = tenant_agent
    planted = f"planted-{_secrets.token_hex(4)}"

    async def plant():
        held = await _exec(agent, f"echo bait > /tmp/{planted} && ls /tmp && echo TMPDIR=$TMPDIR && "
                                  f"touch /var/tmp/{planted}.var 2>/dev/null; true", _limits_of(agent))
        await held.task
        return held

    held = _asyncio.run(plant())
    assert held.result.exit_code == 0, _output(held)
    assert not _os.path.exists(f"/tmp/{planted}")                     # not in the host's /tmp
    private = agent["srv"] / ".tmp" / agent["user"]
    assert (private / planted).read_text() == "bait\n"                # but in the environment's own
    assert f"TMPDIR={private}" in _output(held)
    assert not _os.path.exists(f"/var/tmp/{planted}.var") and (private / f"{planted}.var").exists()
    info = private.stat()
    assert oct(info.st_mode & 0o777) == "0o700" and info.st_uid != 0


_HOG_SERVER = """import http.server, os
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/hog":
            self.server.hog = b"x" * (1 << 30)  # far beyond its environment's memory
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok\\n")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
"""


@_needs_cgroups
@_pytest.mark.slow
def test_a_service_over_its_memory_limit_is_killed_and_reported_while_its_neighbour_serves(tmp_path):
    import yaml
    base = _dh.service_users_base("deployer-limits-")
    envs = [_dh.unique_env(), _dh.unique_env()]
    repo = base / "hog-repo"
    repo.mkdir()
    (repo / "server.py").write_text(_HOG_SERVER)
    _dh.git(repo, "init", "-q", "-b", "main")
    _dh.git(repo, "add", "-A")
    _dh.git(repo, "commit", "-q", "-m", "hog")
    nginx, cluster = _dh.deploy_cluster(base)
    try:
        for env in envs:
            spec = tmp_path / f"{env}.yml"
            spec.write_text(yaml.safe_dump({
                "app": "lim", "environment": env, "domain": f"{env}.lim.test",
                "limits": {"memory": "64M", "processes": 64, "cpu": 0.5},
                "services": {"web": {"path": "/", "source": str(repo), "ref": "main",
                                     "start": "python3 server.py", "health": "/health"}}}))
            applied = cluster.deployctl("apply", str(spec), timeout=300)
            assert applied.returncode == 0, applied.stdout.decode() + applied.stderr.decode()
        hog, neighbour = envs

        status = cluster.deployctl("status", f"lim/{hog}")
        assert status.returncode == 0, status.stderr
        text = status.stdout.decode()
        assert "limits of lim/" in text and "of 64.0 MiB" in text and "of 64" in text, text

        try:
            _dh.http_get(nginx.port, "/hog", host=f"{hog}.lim.test", timeout=10)
        except OSError:
            pass  # its process is killed mid-request: nginx may answer 502, or the line drops
        rows = []
        for _ in range(50):
            rows = _json.loads(cluster.deployctl("status", f"lim/{hog}", "--json").stdout)
            if rows[0]["process"] == "dead":
                break
            _time.sleep(0.1)
        assert rows[0]["process"] == "dead", rows
        assert rows[0]["error"] == "killed by the kernel: out of memory (limit 64 MiB)", rows
        assert rows[0]["limits"]["memory_bytes"] == 64 << 20
        assert rows[0]["use"]["memory_max_bytes"] == 64 << 20 and rows[0]["use"]["processes_max"] == 64, rows
        human = cluster.deployctl("status", f"lim/{hog}")
        assert human.returncode != 0  # not everything runs
        assert b"dead: killed by the kernel: out of memory (limit 64 MiB)" in human.stdout, human.stdout

        # The neighbour, and the host, never noticed.
        assert _dh.http_get(nginx.port, "/", host=f"{neighbour}.lim.test")[0] == 200
        assert _subprocess.run(["true"]).returncode == 0
        rows = _json.loads(cluster.deployctl("status", f"lim/{neighbour}", "--json").stdout)
        assert rows[0]["process"] == "running" and "error" not in rows[0], rows
    finally:
        cluster.close()
        nginx.stop()
        for env in envs:
            _kill_group(_naming.unix_user("lim", env))
            _dh.purge("lim", env)
        _shutil.rmtree(base, ignore_errors=True)



def test_a_tenant_cannot_take_every_connection_of_mariadb():
    """Its user has MAX_USER_CONNECTIONS: connections beyond it are refused, others still connect."""
    name = f"auto-lim-{_secrets.token_hex(3)}-web-1"
    password = _secrets.token_urlsafe(16)
    _subprocess.run(["mariadb"], input=_ops.mysql_create(name, name, password, 3), check=True, capture_output=True)
    hogs: list[_subprocess.Popen] = []
    try:
        client = ["mariadb", "--protocol=tcp", "-h127.0.0.1", f"-u{name}", name]
        env = {**_os.environ, "MYSQL_PWD": password}  # not in argv, which every user can read
        hogs = [_subprocess.Popen([*client, "-e", "SELECT SLEEP(20)"], env=env, stdout=_subprocess.DEVNULL,
                                  stderr=_subprocess.DEVNULL) for _ in range(3)]
        _dh.wait_for(lambda: _dh.mysql(f"SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                                       f"WHERE USER = '{name}'").strip() == "3", 10, what="three connections")
        refused = _subprocess.run([*client, "-e", "SELECT 1"], env=env, capture_output=True, text=True)
        assert refused.returncode != 0 and "max_user_connections" in refused.stderr, refused.stderr
        assert _dh.mysql("SELECT 1").strip() == "1"  # everyone else still gets in
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        _subprocess.run(["mariadb"], input=_ops.mysql_drop(name, name), capture_output=True)


# ---------------------------------------------------------------- 6. shared Redis stays available


# ---------------------------------------------------------------- 7. acknowledged output is kept


# ---------------------------------------------------------------- 8. least knowledge


# ---------------------------------------------------------------- 9. one owner per port
