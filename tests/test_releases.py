"""Sealed, shared releases (agent/releases.py) on real files with a real Unix user: what the seal
makes root's and read-only, what it shares through the service's store, and the tenant's tricks
it does not fall for (a hard link to another's file, a write into a kept release)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys

import pytest

from agent.releases import main as releases_main, prune
from tests.deploy_harness import service_users_base, unique_env

BIG = b"0123456789abcdef" * 4096  # 64 KiB: shared


@pytest.fixture
def service():
    user = f"auto-rel-{unique_env()}"
    base = service_users_base("deployer-releases-")
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True)
    entry = pwd.getpwnam(user)
    folder = base / f"{user}-web"
    (folder / "releases").mkdir(parents=True)
    os.chown(folder, 0, entry.pw_gid)
    os.chown(folder / "releases", 0, entry.pw_gid)
    os.chmod(folder, 0o750)
    os.chmod(folder / "releases", 0o750)
    try:
        yield user, entry, folder
    finally:
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
        subprocess.run(["userdel", "--force", user], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def as_user(user: str, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "sh", "-c", script],
                          capture_output=True, text=True)


def release(user: str, entry, folder, n: int, extra: str = "") -> str:
    """A release as a tenant's install leaves it: every file its own."""
    r = folder / "releases" / str(n)
    r.mkdir()
    os.chown(r, entry.pw_uid, entry.pw_gid)
    big = folder / "big.src"
    big.write_bytes(BIG)
    os.chmod(big, 0o644)
    done = as_user(user, f"""set -e; cd {r}
mkdir -p node_modules/lib bin; cp {big} node_modules/lib/index.js; echo 'console.log(1)' > app.js
printf '#!/bin/sh\\necho hi\\n' > bin/run; chmod 755 bin/run; ln -s ../app.js node_modules/link.js
echo SECRET=1 > .env; chmod 600 .env; mkfifo pipe; {extra}""")
    assert done.returncode == 0, done.stderr
    return str(r)


def seal(folder, r: str, user: str) -> int:
    return releases_main(["seal", f"--release={r}", f"--store={folder}/store", f"--user={user}"])


def test_a_sealed_release_is_root_s_read_only_and_shares_its_files_with_the_kept_ones(service):
    user, entry, folder = service
    first, second = release(user, entry, folder, 1), release(user, entry, folder, 2)
    assert seal(folder, first, user) == 0 and seal(folder, second, user) == 0
    for r in (first, second):
        for path, dirs, files in os.walk(r):
            for name in dirs + files:
                info = os.lstat(os.path.join(path, name))
                if path == r and name == ".env":
                    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (entry.pw_uid, 0o600)  # still the user's
                    continue
                assert (info.st_uid, info.st_gid) == (0, entry.pw_gid), os.path.join(path, name)
                if not stat.S_ISLNK(info.st_mode):
                    assert not info.st_mode & 0o027, oct(info.st_mode)
        assert stat.S_IMODE(os.stat(f"{r}/bin/run").st_mode) == 0o750
        assert stat.S_IMODE(os.stat(f"{r}/app.js").st_mode) == 0o640
        assert not os.path.exists(f"{r}/pipe")
    one, two = os.stat(f"{first}/node_modules/lib/index.js"), os.stat(f"{second}/node_modules/lib/index.js")
    assert one.st_ino == two.st_ino and one.st_nlink == 3  # both releases and the store: one copy on disk
    assert os.stat(f"{first}/app.js").st_ino == os.stat(f"{second}/app.js").st_ino  # small ones too
    # The tenant reads and runs its release, and can change none of it.
    ran = as_user(user, f"cat {second}/node_modules/lib/index.js > /dev/null && {second}/bin/run")
    assert ran.returncode == 0 and ran.stdout == "hi\n", ran.stderr
    for attack in (f"echo pwned >> {first}/node_modules/lib/index.js", f"rm -rf {first}/node_modules",
                   f"mv {first}/app.js {first}/old.js", f"echo x > {first}/new.js", f"chmod 777 {first}/app.js",
                   f"echo pwned >> {folder}/store/$(ls {folder}/store | head -1)"):
        assert as_user(user, attack).returncode != 0, attack
    assert open(f"{first}/node_modules/lib/index.js", "rb").read() == BIG
    # Sealing again (a release checked out again by repair) changes nothing.
    assert seal(folder, first, user) == 0
    # A release removed: its store files stay while another release uses them, then go.
    shutil.rmtree(first)
    assert prune(f"{folder}/store")["removed"] == 0
    shutil.rmtree(second)
    # The big file, app.js and bin/run: each content once (the symlink and the .env were never shared).
    assert prune(f"{folder}/store") == {"removed": 3, "freed_bytes": len(BIG) + len("console.log(1)\n")
                                        + len("#!/bin/sh\necho hi\n")}


def test_a_hard_link_to_another_s_file_is_never_sealed_nor_copied(service, tmp_path, capsys):
    user, entry, folder = service
    # As protected_hardlinks would forbid it, the link is made by root here: what matters is
    # that the seal, meeting such a name in a release, leaves the other file as it was.
    private = tmp_path / "root-only"
    private.write_bytes(b"root's secret\n" * 400)
    os.chmod(private, 0o600)
    r = release(user, entry, folder, 1)
    os.link(private, f"{r}/node_modules/stolen")
    assert seal(folder, r, user) == 1
    assert "'stolen' is not the environment's own file" in capsys.readouterr().err
    info = os.stat(private)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o600)
    assert as_user(user, f"cat {r}/node_modules/stolen").returncode != 0


def test_a_hard_link_to_the_tenant_s_own_file_elsewhere_is_copied_apart(service):
    user, entry, folder = service
    outside = folder / "shared-file"
    outside.write_bytes(BIG)
    os.chown(outside, entry.pw_uid, entry.pw_gid)
    r = release(user, entry, folder, 1, extra=f"ln {outside} node_modules/linked")
    assert seal(folder, r, user) == 0
    assert os.stat(outside).st_uid == entry.pw_uid  # the tenant's file outside is still its own
    assert os.stat(f"{r}/node_modules/linked").st_ino != os.stat(outside).st_ino
    assert open(f"{r}/node_modules/linked", "rb").read() == BIG


def test_the_exec_names_only_a_service_s_own_folders(tmp_path):
    from agent.executor import StartError
    from agent.releases import seal_exec
    from protos import deployer_pb2 as pb
    root = str(tmp_path)
    ok = seal_exec(pb.ReleaseSealSpec(release=f"{root}/auto-a-b-web/releases/3", store=f"{root}/auto-a-b-web/store",
                                      user="auto-a-b"), root)
    assert ok.argv[0] == sys.executable and ok.argv[-3:] == [
        f"--release={root}/auto-a-b-web/releases/3", f"--store={root}/auto-a-b-web/store", "--user=auto-a-b"]
    for release, store, user in ((f"{root}/auto-a-b-web/releases/3", f"{root}/auto-x-y-web/store", "auto-a-b"),
                                 (f"{root}/auto-a-b-web/releases/../../etc", f"{root}/auto-a-b-web/store", "auto-a-b"),
                                 ("/etc/releases/1", "/etc/store", "auto-a-b"),
                                 (f"{root}/auto-a-b-web/releases/3", f"{root}/auto-a-b-web/store", "root")):
        with pytest.raises(StartError):
            seal_exec(pb.ReleaseSealSpec(release=release, store=store, user=user), root)


def test_a_writable_path_becomes_a_link_into_shared_and_nothing_else_is(service):
    user, entry, folder = service
    shared = folder / "shared"
    (shared / "tmp").mkdir(parents=True)
    os.chown(shared, entry.pw_uid, entry.pw_gid)
    os.chown(shared / "tmp", entry.pw_uid, entry.pw_gid)
    r = release(user, entry, folder, 1, extra="mkdir -p web/tmp && echo old > web/tmp/x")
    assert releases_main(["seal", f"--release={r}", f"--store={folder}/store", f"--user={user}",
                          f"--writable=web/tmp={shared}/tmp", f"--writable=web/new/cache={shared}/cache"]) == 0
    assert os.readlink(f"{r}/web/tmp") == f"{shared}/tmp" and os.lstat(f"{r}/web/tmp").st_uid == 0
    assert os.readlink(f"{r}/web/new/cache") == f"{shared}/cache"
    wrote = as_user(user, f"echo hello > {r}/web/tmp/y && cat {shared}/tmp/y")
    assert wrote.returncode == 0 and wrote.stdout == "hello\n", wrote.stderr
    assert as_user(user, f"echo no > {r}/web/other").returncode != 0


def test_a_root_file_whose_other_names_are_gone_is_refused_not_sealed(service, tmp_path):
    # The tenant's link is the only name left of a root file once its owner replaced it by a
    # rename (as passwd does for /etc/shadow): one name, root's, and still never the tenant's to read.
    user, entry, folder = service
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$old-hash:19000:0:99999:7:::\n")
    os.chmod(secret, 0o600)
    r = release(user, entry, folder, 1)
    os.link(secret, f"{r}/node_modules/shadow")
    fresh = tmp_path / "shadow.new"
    fresh.write_text("root:$6$new-hash\n")
    os.rename(fresh, secret)
    assert os.stat(f"{r}/node_modules/shadow").st_nlink == 1
    assert seal(folder, r, user) == 1
    assert as_user(user, f"cat {r}/node_modules/shadow").returncode != 0
    assert not [n for n in os.listdir(folder / "releases") if n.startswith(".")]  # nothing half-built left


def test_what_a_process_of_the_tenant_does_during_and_after_the_seal_changes_nothing(service):
    user, entry, folder = service
    r = release(user, entry, folder, 1, extra="mkdir -p busy && for i in $(seq 2000); do echo $i > busy/f$i; done")
    # A process of the environment keeps adding names while the seal runs, and another holds
    # a file of the release open for writing across it.
    adder = subprocess.Popen(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "sh", "-c",
                              f"i=0; while [ $i -lt 100000 ]; do i=$((i+1)); "
                              f"mkdir {r}/busy/d$i 2>/dev/null && echo x > {r}/busy/d$i/x 2>/dev/null; done"])
    holder = subprocess.Popen(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "/usr/bin/python3", "-c",
                               f"import time; f = open('{r}/app.js', 'r+'); print('open', flush=True); "
                               "time.sleep(3); f.seek(0); f.write('EVIL!!!'); f.flush(); print('wrote', flush=True)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "open\n"
    try:
        assert seal(folder, r, user) == 0
    finally:
        adder.kill()
        adder.wait()
    assert holder.stdout.readline() == "wrote\n"
    holder.wait()
    for path, dirs, files in os.walk(r):
        for name in dirs + files:
            info = os.lstat(os.path.join(path, name))
            if not (path == r and name == ".env"):  # a link's own mode is always 0777: its owner counts
                assert info.st_uid == 0 and (stat.S_ISLNK(info.st_mode) or not info.st_mode & 0o022), \
                    os.path.join(path, name)
    assert open(f"{r}/app.js").read() == "console.log(1)\n"  # the held descriptor wrote to the old file only
    for name in os.listdir(folder / "store"):
        assert b"EVIL" not in (folder / "store" / name).read_bytes()


def test_only_the_env_itself_stays_the_user_s_and_a_too_deep_tree_is_refused_cleanly(service):
    user, entry, folder = service
    r = release(user, entry, folder, 1, extra="echo 'module.exports = 1' > .env.js; echo A=2 > .env.deploy-7")
    assert seal(folder, r, user) == 0
    assert os.stat(f"{r}/.env.js").st_uid == 0 and os.stat(f"{r}/.env").st_uid == entry.pw_uid
    staged = os.stat(f"{r}/.env.deploy-7")  # staged for the next start of a release checked out again
    assert (staged.st_uid, stat.S_IMODE(staged.st_mode)) == (entry.pw_uid, 0o600)
    deep = release(user, entry, folder, 2, extra="d=.; for i in $(seq 150); do d=$d/x; done; mkdir -p $d")
    assert seal(folder, deep, user) == 1
    assert os.stat(deep).st_uid == entry.pw_uid  # left as it was: the deploy fails, nothing is half-sealed
    assert not [n for n in os.listdir(folder / "releases") if n.startswith(".")]
