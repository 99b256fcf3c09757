"""The launcher: a command for another user gets its `.env`, its folder and its command only once it
runs as that user, and a privileged process never sees the loader's variables.

The pure parts are tested directly; the rest starts real commands through the agent's executor
as a real system user (setpriv, useradd), as the agent does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import executor, launcher
from agent.journal import Journal
from agent.operations import Operations
from agent.services import Supervisor
from controller.environments import naming, commands as ops
from protos import deployer_pb2 as pb
from tests.deploy_harness import service_users_base

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates users and switches to them")


# ---------------------------------------------------------------- pure parts

@pytest.mark.parametrize("name, is_unsafe", [
    ("LD_PRELOAD", True), ("LD_LIBRARY_PATH", True), ("LD_AUDIT", True), ("LD_ANYTHING_NEW", True),
    ("GCONV_PATH", True), ("MALLOC_CHECK_", True), ("MALLOC_ARENA_MAX", True), ("GLIBC_TUNABLES", True),
    ("LOCPATH", True), ("NLSPATH", True), ("HOSTALIASES", True), ("RES_OPTIONS", True), ("TMPDIR", True),
    ("PATH", False), ("HOME", False), ("LANG", False), ("PORT", False), ("OLD_PRELOAD", False),
])
def test_unsafe_names_follow_glibcs_list_for_set_id_programs(name, is_unsafe):
    assert launcher.unsafe(name) is is_unsafe


def test_a_privileged_environment_carries_unsafe_variables_under_other_names():
    env = executor.carried({"PATH": "/bin", "LD_PRELOAD": "/x.so", "TMPDIR": "/t", "PORT": "1"})
    assert env == {"PATH": "/bin", "DEPLOYER_CARRIED_LD_PRELOAD": "/x.so", "DEPLOYER_CARRIED_TMPDIR": "/t",
                   "PORT": "1"}
    assert not any(launcher.unsafe(name) for name in env)


def test_the_launcher_gives_carried_names_back_only_once_it_is_not_root(tmp_path):
    inherited = {"PATH": "/bin", "DEPLOYER_CARRIED_LD_PRELOAD": "/x.so"}
    assert launcher.environment(inherited, "", set(), uid=1234) == {"PATH": "/bin", "LD_PRELOAD": "/x.so"}
    assert launcher.environment(inherited, "", set(), uid=0) == {"PATH": "/bin"}


def test_the_env_file_never_overrides_the_operations_own_variables(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=1\nPATH=/mine\nA=from-file\nLD_PRELOAD=/evil.so\n")
    got = launcher.environment({"PATH": "/bin", "PORT": "20001"}, str(env_file), {"PORT"}, os.getuid())
    assert got["PORT"] == "20001" and got["PATH"] == "/mine" and got["A"] == "from-file"
    if os.getuid() == 0:                                  # root takes nothing unsafe from a file
        assert "LD_PRELOAD" not in got


@pytest.mark.parametrize("make, why", [
    (lambda p, other: p.symlink_to(other), "it is a symbolic link"),
    (lambda p, other: os.mkfifo(p), "not a regular file"),          # would block a plain open()
    (lambda p, other: p.mkdir(), "not a regular file"),
    (lambda p, other: p.write_bytes(b"A=" + b"x" * launcher.MAX_ENV_BYTES), "larger than"),
    (lambda p, other: p.write_bytes(b"A=1\nB=\0\n"), "NUL byte"),
    (lambda p, other: (p.write_text("A=1\n"), os.link(p, p.with_name("second"))), "a single link"),
])
def test_an_env_file_is_checked_before_it_is_read(tmp_path, make, why):
    if why == "a single link" and os.getuid() != 0:
        pytest.skip("the single-link rule is root's")
    other = tmp_path / "other.env"
    other.write_text("SECRET=foreign\n")
    path = tmp_path / ".env"
    make(path, other)
    with pytest.raises(launcher.LaunchError) as caught:
        launcher.read_env_file(str(path))
    assert why in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_commands_for_another_user_start_through_setpriv_and_the_launcher_from_root_folder():
    nobody = pwd.getpwnam("nobody")
    launch = executor.prepare(["sh", "-c", "exec node server.js"], nobody, "/srv/x/releases/3/web",
                              "/srv/x/releases/3/.env", {"PORT": "20001", "LD_PRELOAD": "/op.so"})
    try:
        if os.getuid() == nobody.pw_uid:
            pytest.skip("runs as nobody")
        setpriv, python = shutil.which("setpriv", path=executor.BASE_PATH), executor.launcher_python()
        assert launch.argv == [
            setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--init-groups", "--no-new-privs", "--",
            python, "-I", "-S", "-B", executor.launcher_script(), f"--status-fd={launch.child_status}",
            "--cwd=/srv/x/releases/3/web", "--env-file=/srv/x/releases/3/.env", "--keep=LD_PRELOAD,PORT",
            "--", "sh", "-c", "exec node server.js"]
        assert launch.cwd == "/" and launch.pass_fds == (launch.child_status,)
        assert launch.env["DEPLOYER_CARRIED_LD_PRELOAD"] == "/op.so" and "LD_PRELOAD" not in launch.env
        assert launch.env["HOME"] == nobody.pw_dir and launch.env["PORT"] == "20001"
    finally:
        launch.close()


def test_root_commands_without_an_env_file_start_as_they_are(tmp_path):
    launch = executor.prepare(["true"], None, str(tmp_path), "", {"A": "1"})
    assert (launch.argv, launch.cwd, launch.pass_fds, launch.env["A"]) == (["true"], str(tmp_path), (), "1")
    with pytest.raises(executor.StartError, match="working directory /nonexistent does not exist"):
        executor.prepare(["true"], None, "/nonexistent", "", {})


@needs_root
def test_root_reads_no_env_file_of_another_owner(tmp_path):
    path = tmp_path / ".env"
    path.write_text("A=1\n")
    os.chown(path, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(launcher.LaunchError, match="belongs to uid"):
        launcher.read_env_file(str(path))


# ---------------------------------------------------------------- for real, as a user

@pytest.fixture
def tenant():
    """A system user of a test environment and a folder it owns, both removed afterwards."""
    user = naming.unix_user("lx", f"t{secrets.token_hex(3)}")
    base = service_users_base("deployer-launch-")
    try:
        assert subprocess.run(["sh", "-c", ops.ensure_unix_user(user)], capture_output=True).returncode == 0
        entry = pwd.getpwnam(user)
        home = base / "home"
        home.mkdir()
        os.chown(home, entry.pw_uid, entry.pw_gid)
        yield {"user": user, "entry": entry, "home": home, "base": base}
    finally:
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def run(tmp_path, argv, **spec) -> pb.OperationResult:
    """An exec operation through the agent's operations, as the agent runs it."""
    operations = Operations(Journal(tmp_path / "state"), tmp_path, Supervisor(tmp_path / "state"))

    async def go() -> pb.OperationResult:
        operation = pb.Operation(id=f"op-t-{secrets.token_hex(4)}", exec=pb.ExecSpec(argv=argv, **spec))
        held, _, _ = operations.receive(operation)
        await held.task
        return held.result
    return asyncio.run(go())


def env_of(home: Path) -> dict[str, str]:
    lines = (home / "env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def owned_env_file(tenant, text: str) -> Path:
    path = tenant["home"] / ".env"
    path.write_text(text)
    os.chown(path, tenant["entry"].pw_uid, tenant["entry"].pw_gid)
    os.chmod(path, 0o600)
    return path


@needs_root
def test_a_user_gets_its_env_file_and_its_own_loader_variables(tenant, tmp_path):
    env_file = owned_env_file(tenant, "A=from-file\nPORT=9\nLD_LIBRARY_PATH=/opt/tenant/lib\n")
    result = run(tmp_path, ["sh", "-c", 'env > "$HOME/env"; grep SigIgn /proc/self/status > "$HOME/sigign"; id -u > "$HOME/uid"'],
                    user=tenant["user"], cwd=str(tenant["home"]), env_file=str(env_file),
                    env={"HOME": str(tenant["home"]), "PORT": "20001", "LD_BIND_NOW": "1"})
    assert result.outcome == pb.EXITED and result.exit_code == 0, result
    env = env_of(tenant["home"])
    assert env["A"] == "from-file" and env["PORT"] == "20001"          # the operation's own win
    assert env["LD_LIBRARY_PATH"] == "/opt/tenant/lib" and env["LD_BIND_NOW"] == "1"
    assert not any(name.startswith("DEPLOYER_CARRIED_") for name in env)
    assert (tenant["home"] / "uid").read_text().strip() == str(tenant["entry"].pw_uid)
    # None of the signals Python ignores (SIGPIPE, SIGXFSZ) stays ignored for the command; others
    # depend on what started the agent (a reserved real-time signal, say) and are not the launcher's.
    ignored = int((tenant["home"] / "sigign").read_text().split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)), hex(ignored)


@needs_root
def test_a_linked_env_file_is_refused_and_nothing_runs(tenant, tmp_path):
    foreign = tenant["base"] / "foreign.env"             # readable by the user: only the link is wrong
    foreign.write_text("SECRET=foreign-value\n")
    os.chmod(foreign, 0o644)
    link = tenant["home"] / ".env"
    link.symlink_to(foreign)
    result = run(tmp_path, ["sh", "-c", 'env > "$HOME/env"'], user=tenant["user"], cwd=str(tenant["home"]),
                    env_file=str(link), env={"HOME": str(tenant["home"])})
    assert result.outcome == pb.FAILED_TO_START and result.error == f"refused {link}: it is a symbolic link"
    assert not (tenant["home"] / "env").exists()


@needs_root
def test_the_working_folder_is_entered_as_the_user(tenant, tmp_path):
    closed = tenant["base"] / "closed"                  # root may enter it, the user may not
    closed.mkdir(mode=0o700)
    link = tenant["home"] / "web"
    link.symlink_to(closed)
    result = run(tmp_path, ["sh", "-c", "pwd > /dev/null"], user=tenant["user"], cwd=str(link))
    assert result.outcome == pb.FAILED_TO_START
    assert result.error == f"cannot enter working directory {link}: Permission denied"


@needs_root
def test_what_cannot_start_is_said_in_one_line(tenant, tmp_path):
    result = run(tmp_path, ["no-such-command-xyz"], user=tenant["user"], cwd=str(tenant["home"]))
    assert result.outcome == pb.FAILED_TO_START and result.error == "command not found: no-such-command-xyz"
    other = tenant["base"] / "other.env"                 # readable, but someone else's
    other.write_text("A=1\n")
    os.chmod(other, 0o644)
    os.chown(other, pwd.getpwnam("nobody").pw_uid, -1)
    result = run(tmp_path, ["true"], user=tenant["user"], cwd=str(tenant["home"]), env_file=str(other))
    assert result.outcome == pb.FAILED_TO_START and "belongs to uid" in result.error


@needs_root
def test_root_with_an_env_file_takes_nothing_unsafe_from_it(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("A=1\nLD_PRELOAD=/nonexistent/evil.so\nGCONV_PATH=/tmp\n")
    out = tmp_path / "env"
    result = run(tmp_path, ["sh", "-c", f"env > {out}"], env_file=str(env_file))
    assert result.outcome == pb.EXITED and result.exit_code == 0, result
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert env["A"] == "1" and "LD_PRELOAD" not in env and "GCONV_PATH" not in env


@needs_root
def test_the_supervisor_starts_services_through_the_launcher(tenant, tmp_path):
    env_file = owned_env_file(tenant, "A=service\n")
    supervisor = Supervisor(tmp_path / "state")
    spec = pb.ServiceStartSpec(name="auto-lx-t-web", instance="1-1", argv=["sh", "-c", 'env > "$HOME/env"; exec sleep 30'],
                               cwd=str(tenant["home"]), env={"HOME": str(tenant["home"])}, env_file=str(env_file),
                               user=tenant["user"], log_path=str(tmp_path / "logs" / "1.log"))

    async def go():
        first = await supervisor.start("op-s-1", spec)
        await supervisor.stop("op-s-2", pb.ServiceStopSpec(name=spec.name, instance=spec.instance))
        env_file.unlink()
        env_file.symlink_to("/etc/hostname")
        spec.instance = "1-2"
        with pytest.raises(executor.StartError) as refused:
            await supervisor.start("op-s-3", spec)
        return first, refused.value
    first, refused = asyncio.run(go())
    assert first.outcome == pb.EXITED and not first.error, first
    assert env_of(tenant["home"])["A"] == "service"
    assert str(refused) == f"refused {env_file}: it is a symbolic link"
    assert supervisor.list("auto-lx-t-web") == []


def test_the_launcher_is_published_where_every_user_can_read_it():
    """The agent's own folder may be closed to other users (a checkout in a private home): a
    root agent runs a root-owned copy, named by its content, that every user can read."""
    import subprocess
    script = executor.launcher_script()
    folder = os.path.dirname(script)
    assert folder.startswith(executor.PUBLIC_DIR + "/launcher-")
    for name in ("launcher.py", "envfile.py"):
        info = os.lstat(os.path.join(folder, name))
        assert info.st_uid == 0 and info.st_mode & 0o777 == 0o644
        source = executor.LAUNCHER if name == "launcher.py" else executor.ENVFILE
        assert open(os.path.join(folder, name), "rb").read() == open(source, "rb").read()
    assert os.lstat(folder).st_uid == 0 and os.lstat(folder).st_mode & 0o777 == 0o755
    read = subprocess.run(["runuser", "-u", "nobody", "--", "cat", script], capture_output=True)
    assert read.returncode == 0, read.stderr


@needs_root
def test_a_tenant_command_cannot_gain_privileges_through_set_id_programs(tenant, tmp_path):
    """crontab, at or su would hand work to a daemon outside the environment's limits (or to
    another user): with no_new_privs their set-id bit does nothing for the tenant's processes."""
    result = run(tmp_path, ["sh", "-c", 'grep NoNewPrivs /proc/self/status > "$HOME/nnp"'], user=tenant["user"],
                 cwd=str(tenant["home"]), env={"HOME": str(tenant["home"])})
    assert result.outcome == pb.EXITED and result.exit_code == 0, result
    assert (tenant["home"] / "nnp").read_text().split() == ["NoNewPrivs:", "1"]
