"""Least privilege on the servers: the agent writes only under its roots, and each environment
has a Unix user of its own whose folders other environments' users cannot read.

The agent's operations run in-process here on the real filesystem (no operator RPC sends a raw
write_file); the user and folder scripts run for real with useradd, chown and runuser.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import os
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.journal import Journal
from agent.operations import Operations
from agent.services import Supervisor
from controller.environments import naming, commands as ops
from protos import deployer_pb2 as pb
from tests.deploy_harness import service_users_base

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates users and changes owners")


# ---------------------------------------------------------------- write roots

@pytest.fixture
def fs(tmp_path):
    """Two write roots (a services root and an nginx folder) and a folder outside both."""
    srv, nginx, outside = tmp_path / "srv", tmp_path / "nginx", tmp_path / "outside"
    for folder in (srv, nginx, outside):
        folder.mkdir()
    (outside / "secret").write_bytes(b"untouched\n")
    operations = Operations(Journal(tmp_path / "state"), srv, Supervisor(tmp_path / "state"), (srv, nginx))
    return {"srv": srv, "nginx": nginx, "outside": outside, "ops": operations, "base": tmp_path}


def write(fs, path, content: bytes = b"written\n", mode: int = 0o600, owner: str = "") -> pb.OperationResult:
    async def run() -> pb.OperationResult:
        operation = pb.Operation(id=f"op-t-{secrets.token_hex(4)}", write_file=pb.WriteFileSpec(
            path=str(path), content=content, mode=mode, owner=owner))
        held, duplicate, rejection = fs["ops"].receive(operation)
        assert held is not None and not duplicate and not rejection
        await held.task
        return held.result
    return asyncio.run(run())


def outside_untouched(fs) -> None:
    assert sorted(p.name for p in fs["outside"].iterdir()) == ["secret"]
    assert (fs["outside"] / "secret").read_bytes() == b"untouched\n"
    leftovers = [p for p in fs["base"].rglob("*.tmp") if "state" not in p.parts]
    assert leftovers == []


def refused(result: pb.OperationResult, path, why: str) -> None:
    assert result.outcome == pb.REJECTED, result
    assert "\n" not in result.error and str(path) in result.error and why in result.error, result.error


def test_writes_under_a_root_atomically_with_mode_and_owner(fs):
    path = fs["srv"] / "auto-shop-prod-web" / "releases" / "1" / ".env"
    result = write(fs, path, b"A=1\n", owner="nobody")
    assert result.outcome == pb.EXITED and not result.error, result
    info = path.stat()
    assert path.read_bytes() == b"A=1\n" and oct(info.st_mode & 0o777) == "0o600"
    assert (info.st_uid, info.st_gid) == (pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
    assert write(fs, fs["nginx"] / "auto-shop-prod.conf", mode=0o644).outcome == pb.EXITED
    assert sorted(p.name for p in path.parent.iterdir()) == [".env"]  # no temp file left


@pytest.mark.parametrize("path, why", [
    ("srv/x", "not an absolute path"),
    ("{srv}/../outside/x", "'..' in the path"),
    ("{srv}/a/../../outside/secret", "'..' in the path"),
    ("{outside}/x", "outside the write roots"),
    ("{outside}/secret", "outside the write roots"),
    ("/etc/passwd-deployer-test", "outside the write roots"),
    ("{srv}", "outside the write roots"),       # a root itself is not a file in it
    ("{srv}/folder/", "not a file path"),
])
def test_refused_paths(fs, path, why):
    path = path.format(srv=fs["srv"], outside=fs["outside"])
    result = write(fs, path)
    refused(result, path, why)
    outside_untouched(fs)
    assert not Path("/etc/passwd-deployer-test").exists()


def test_a_symlinked_folder_leading_outside_is_refused(fs):
    (fs["srv"] / "link").symlink_to(fs["outside"])
    (fs["srv"] / "deep").mkdir()
    (fs["srv"] / "deep" / "up").symlink_to(fs["outside"], target_is_directory=True)
    for path in (fs["srv"] / "link" / "x", fs["srv"] / "link" / "secret",
                 fs["srv"] / "deep" / "up" / "new" / "x"):
        refused(write(fs, path), path, "leads to")
    outside_untouched(fs)
    assert not (fs["outside"] / "new").exists()


def test_a_symlink_in_place_of_the_file_is_refused_if_it_leads_outside(fs):
    link = fs["srv"] / "service.env"
    link.symlink_to(fs["outside"] / "secret")
    refused(write(fs, link), link, "symbolic link to")
    assert link.is_symlink()
    dangling = fs["srv"] / "dangling.env"
    dangling.symlink_to(fs["outside"] / "not-yet")
    refused(write(fs, dangling), dangling, "symbolic link to")
    outside_untouched(fs)


def test_links_that_stay_under_the_roots_are_replaced_or_followed_never_written_through(fs):
    real = fs["srv"] / "real.env"
    real.write_bytes(b"old\n")
    link = fs["srv"] / "link.env"
    link.symlink_to(real)
    assert write(fs, link, b"new\n").outcome == pb.EXITED
    assert not link.is_symlink() and link.read_bytes() == b"new\n" and real.read_bytes() == b"old\n"
    (fs["srv"] / "to-nginx").symlink_to(fs["nginx"])       # a folder link from one root into another
    assert write(fs, fs["srv"] / "to-nginx" / "auto-x.conf").outcome == pb.EXITED
    assert (fs["nginx"] / "auto-x.conf").read_bytes() == b"written\n"
    outside_untouched(fs)


def test_a_file_in_the_way_of_a_folder_fails_cleanly(fs):
    (fs["srv"] / "file").write_bytes(b"x")
    result = write(fs, fs["srv"] / "file" / "x")
    assert result.outcome == pb.FAILED_TO_START and "Not a directory" in result.error


# ---------------------------------------------------------------- configuration

def args(**kw) -> argparse.Namespace:
    base = dict(config=None, id="web-1", controller="127.0.0.1:7710", role=["computing"], capability=None,
                state_dir=None, services_root=None, heartbeat_interval=None, provide=None, service_driver=None,
                write_root=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_write_roots_default_to_the_services_root_and_the_provided_nginx_folder(tmp_path):
    config = config_mod.load(args(services_root="/srv/x"))
    assert config.write_roots == (Path("/srv/x"),)
    config = config_mod.load(args(provide=["nginx.conf_dir=/etc/nginx/conf.d"]))
    assert config.write_roots == (Path("/srv/services"), Path("/etc/nginx/conf.d"))
    config = config_mod.load(args(write_root=["/srv/a", "/etc/b"], provide=["nginx.conf_dir=/etc/c"]))
    assert config.write_roots == (Path("/srv/a"), Path("/etc/b"))
    path = tmp_path / "agent.yml"
    path.write_text("write_roots: [/srv/services, /etc/nginx/sites-enabled]\n")
    assert config_mod.load(args(config=str(path))).write_roots == (Path("/srv/services"),
                                                                   Path("/etc/nginx/sites-enabled"))


@pytest.mark.parametrize("yaml_text, error", [
    ("write_roots: /srv/services\n", "write_roots: expected a list of absolute folders"),
    ("write_roots: []\n", "write_roots: expected a list of absolute folders"),
    ("write_roots: [srv/services]\n", "write_roots: 'srv/services' is not an absolute folder"),
])
def test_bad_write_roots_are_refused_with_the_key(tmp_path, yaml_text, error):
    path = tmp_path / "agent.yml"
    path.write_text(yaml_text)
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.load(args(config=str(path)))
    assert str(caught.value) == f"{path}: {error}"


# ---------------------------------------------------------------- users and folders, for real

def sh(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=30)


@pytest.fixture
def users():
    """Two environments' users, removed afterwards whatever happens."""
    names = [naming.unix_user("lp", f"t{secrets.token_hex(3)}") for _ in range(2)]
    yield names
    for name in names:
        if sh(f"id -u {name}").returncode == 0:
            sh(f"pkill -KILL -u {name}; userdel {name}")
        if sh(f"getent group {name}").returncode == 0:
            sh(f"groupdel {name}")


@pytest.fixture
def root():
    base = service_users_base("deployer-lp-")
    (base / "srv").mkdir()
    yield base / "srv"
    shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_the_user_is_created_once_as_a_system_user_without_login(users):
    user = users[0]
    for _ in range(2):                                         # idempotent
        done = sh(ops.ensure_unix_user(user))
        assert done.returncode == 0, done.stderr
    entry = pwd.getpwnam(user)
    assert entry.pw_shell == "/usr/sbin/nologin" and entry.pw_dir == "/nonexistent"
    assert grp.getgrgid(entry.pw_gid).gr_name == user and entry.pw_uid < 1000
    sh(f"userdel {user}")                                      # the group outlived its user
    assert sh(f"groupadd --system {user}").returncode in (0, 9)
    done = sh(ops.ensure_unix_user(user))
    assert done.returncode == 0, done.stderr
    assert grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name == user


@needs_root
def test_service_folders_are_the_environments_and_closed_to_others(users, root):
    mine, other = users
    for user in users:
        assert sh(ops.ensure_unix_user(user)).returncode == 0
    service_dir = root / "auto-lp-x-web"
    release = service_dir / "releases" / "1"
    release.mkdir(parents=True)                                # as a checkout as root leaves it
    (release / "server.js").write_text("x\n")
    (release / "web").mkdir()
    (release / "hostname").symlink_to("/etc/hostname")         # a link in a repository
    (release / ".env").write_text("SECRET=1\n")
    os.chmod(release / ".env", 0o600)
    done = sh(ops.service_layout(str(service_dir), str(release), mine))
    assert done.returncode == 0, done.stderr
    uid, gid = pwd.getpwnam(mine).pw_uid, grp.getgrnam(mine).gr_gid

    def owner_mode(path: Path) -> tuple[int, int, str]:
        info = os.lstat(path)
        return info.st_uid, info.st_gid, oct(info.st_mode & 0o7777)

    assert owner_mode(service_dir) == (0, gid, "0o750")
    assert owner_mode(service_dir / "releases") == (0, gid, "0o750")
    assert owner_mode(service_dir / "logs") == (0, gid, "0o750")
    assert owner_mode(service_dir / "shared") == (uid, gid, "0o750")
    assert owner_mode(service_dir / ".home") == (uid, gid, "0o700")
    assert owner_mode(release)[:2] == (uid, gid) and owner_mode(release / "web")[:2] == (uid, gid)
    assert owner_mode(release / "hostname")[:2] == (uid, gid)
    assert os.stat("/etc/hostname").st_uid == 0                # the link itself changed, not its target
    assert as_user(mine, "touch", str(release / "web" / "built")).returncode == 0
    assert as_user(mine, "touch", str(service_dir / ".home" / "cache")).returncode == 0
    assert as_user(mine, "cat", str(release / ".env")).stdout == "SECRET=1\n"
    denied = as_user(mine, "touch", str(service_dir / "current"))   # only root rearranges the folder
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    for argv in (["cat", str(release / ".env")], ["ls", str(service_dir)]):
        denied = as_user(other, *argv)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, argv
    again = sh(ops.service_layout(str(service_dir), str(release), mine))
    assert again.returncode == 0, again.stderr


@needs_root
def test_a_services_root_the_user_cannot_reach_is_said_plainly(users, tmp_path):
    user = users[0]
    assert sh(ops.ensure_unix_user(user)).returncode == 0
    closed = tmp_path / "closed"                                # pytest's own folders are 0700
    closed.mkdir(mode=0o700)
    release = closed / "srv" / "auto-lp-x-web" / "releases" / "1"
    release.mkdir(parents=True)
    done = sh(ops.service_layout(str(release.parent.parent), str(release), user))
    assert done.returncode == 1
    assert done.stderr.strip() == (f"{user} cannot reach {release}: the folders above the services root must be "
                                   "open to other users (o+x)")


@needs_root
def test_the_user_goes_only_once_nothing_of_it_is_left(users, root):
    user = users[0]
    assert sh(ops.ensure_unix_user(user)).returncode == 0
    service_dir = root / "auto-lp-x-web"
    assert sh(ops.service_layout(str(service_dir), str(service_dir / "releases" / "1"), user)).returncode == 0
    kept = sh(ops.remove_unix_user(user, str(root)))
    assert kept.returncode == 1 and f"{service_dir} still belongs to {user}: the user is kept" in kept.stderr
    assert sh(f"id -u {user}").returncode == 0
    shutil.rmtree(service_dir)
    straggler = subprocess.Popen(["runuser", "-u", user, "--", "sleep", "300"], start_new_session=True)
    try:
        gone = sh(ops.remove_unix_user(user, str(root)))
        assert gone.returncode == 0, gone.stderr
        assert straggler.wait(10) != 0                         # ended with the user
    finally:
        if straggler.poll() is None:
            straggler.kill()
    assert sh(f"id -u {user}").returncode != 0 and sh(f"getent group {user}").returncode != 0
    assert sh(ops.remove_unix_user(user, str(root))).returncode == 0   # nothing left to do
