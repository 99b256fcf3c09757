"""Attacks on a shared server, replayed for real: each test plays a hostile tenant, a rogue agent
or a local user, and asserts that the concrete harm did not happen (not merely that an error was
printed). Where it can be shown safely, a test also shows the attack works without its defence.

Sections are independent (each builds what it needs); see docs/decisions/013-threat-model.md.
"""

from __future__ import annotations


# ---------------------------------------------------------------- 1. ownership before destruction


# ---------------------------------------------------------------- 2. tenant code without root
# A hostile tenant's own install step plants what root used to pick up: an LD_PRELOAD library in its
# .env, a .env linked to another environment's, rewritten objects of its checkout. Deploys are real
# (controller, agents, git, gcc); the services are daemons, so no nginx route is involved.

import hashlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from controller import naming
from controller.procedures import _checkout_script
from tests.deploy_harness import deploy_cluster, git, purge, service_users_base, unique_env

TENANT_APP = "tenant"
EVIL_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* Runs in every process that loads it: leaves a file saying as whom. */
__attribute__((constructor)) static void mark(void) {
    const char *dir = getenv("MARKER_DIR");
    char comm[64] = "", path[4096];
    if (!dir) return;
    int c = open("/proc/self/comm", O_RDONLY);
    if (c >= 0) { ssize_t n = read(c, comm, sizeof comm - 1); if (n > 0) comm[n - 1] = 0; close(c); }
    snprintf(path, sizeof path, "%s/uid-%d-euid-%d-pid-%d-%s", dir, (int)getuid(), (int)geteuid(), (int)getpid(), comm);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd >= 0) close(fd);
}
"""


@pytest.fixture(scope="module")
def tenants():
    """A controller, its agents and a hostile tenant's repository; every environment a test
    made is destroyed and purged afterwards, whatever happened."""
    base = service_users_base("deployer-tenant-")
    envs: list[str] = []
    cluster = nginx = None
    try:
        nginx, cluster = deploy_cluster(base)
        repo = base / "hostile-repo"
        repo.mkdir()
        (repo / "evil.c").write_text(EVIL_C)
        git(repo, "init", "-q", "-b", "main")
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "hostile")
        yield {"base": base, "cluster": cluster, "repo": repo, "envs": envs}
    finally:
        for env in envs:
            if cluster is not None:
                cluster.deployctl("destroy", f"{TENANT_APP}/{env}", timeout=300)
        if cluster is not None:
            cluster.close()
        if nginx is not None:
            nginx.stop()
        for env in envs:
            purge(TENANT_APP, env)
        shutil.rmtree(base, ignore_errors=True)


def _tenant_env(tenants) -> str:
    env = unique_env()
    tenants["envs"].append(env)
    return env


def _drop_box(tenants, name: str) -> Path:
    """A folder anyone may create files in (root then, the tenant now), read by the test."""
    box = tenants["base"] / name
    box.mkdir()
    os.chmod(box, 0o1777)
    return box


def _deploy(tenants, name: str, source: Path, **service) -> subprocess.CompletedProcess:
    spec = {"app": TENANT_APP, "environment": name, "domain": f"{name}.tenant.test",
            "services": {"job": {"source": str(source), "ref": "main", "start": "sleep 600",
                                 "healthy_after": 1, **service}}}
    path = tenants["base"] / f"{name}.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return tenants["cluster"].deployctl("apply", str(path), timeout=600)


def _service_dir(tenants, env: str) -> Path:
    return Path(naming.service_dir(str(tenants["base"] / "srv"), TENANT_APP, env, "job"))


def _markers(box: Path) -> list[tuple[str, int]]:
    return [(p.name, p.lstat().st_uid) for p in box.iterdir()]


def test_an_ld_preload_in_a_root_run_environment_does_load(tmp_path):
    """Without the defence: a privileged process started with the tenant's LD_PRELOAD runs the
    library as uid 0 (in a throwaway `true`, leaving only a file in a temporary folder)."""
    library = tmp_path / "evil.so"
    source = tmp_path / "evil.c"
    source.write_text(EVIL_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    box = tmp_path / "markers"
    box.mkdir()
    subprocess.run(["true"], env={"PATH": "/usr/bin:/bin", "LD_PRELOAD": str(library), "MARKER_DIR": str(box)},
                   check=True)
    assert [name for name, uid in _markers(box) if name.startswith(f"uid-{os.getuid()}-")], _markers(box)


def test_a_tenants_ld_preload_never_runs_as_root(tenants):
    env = _tenant_env(tenants)
    box = _drop_box(tenants, f"markers-{env}")
    plant = ('gcc -shared -fPIC -o "$PWD/evil.so" evil.c && '
             f'printf "LD_PRELOAD=%s\\nMARKER_DIR=%s\\n" "$PWD/evil.so" {box} >> .env')
    result = _deploy(tenants, env, tenants["repo"], install=plant, build="/bin/true", migrate="/bin/echo migrated")
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    uid = int(subprocess.run(["id", "-u", naming.unix_user(TENANT_APP, env)], capture_output=True, text=True,
                             check=True).stdout)
    markers = _markers(box)
    assert not [m for m in markers if m[1] == 0 or "uid-0-" in m[0] or "euid-0-" in m[0]], markers
    # The library did load, as the tenant, in build, migrate and the service itself.
    assert {"true", "echo", "sleep"} <= {name.rsplit("-", 1)[1] for name, owner in markers if owner == uid}, markers


def test_a_env_linked_to_another_environments_gives_nothing_away(tenants):
    victim, thief = _tenant_env(tenants), _tenant_env(tenants)
    secret = f"victim-{os.urandom(6).hex()}"
    done = _deploy(tenants, victim, tenants["repo"], env={"VICTIM_TOKEN": secret})
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    foreign = _service_dir(tenants, victim) / "releases" / "1" / ".env"
    assert secret in foreign.read_text()
    box = _drop_box(tenants, f"dumps-{thief}")
    result = _deploy(tenants, thief, tenants["repo"], install=f"ln -sfn {foreign} .env",
                     build=f'env > {box}/build-$$', start=f'sh -c "env > {box}/start-$$; exec sleep 600"')
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode != 0 and "it is a symbolic link" in output, output
    assert not [p for p in box.iterdir() if secret in p.read_text()]
    link = _service_dir(tenants, thief) / "releases" / "1" / ".env"
    assert link.is_symlink() and secret in link.read_text()    # what a root reader following links got


def test_mv_without_t_moves_into_the_folder_a_link_points_to(tmp_path):
    """Without the defence: `mv -f` onto a link to a folder moves the file into that folder."""
    target, release = tmp_path / "target", tmp_path / "release"
    target.mkdir()
    release.mkdir()
    for flags, expected in (("-f", ["staged"]), ("-fT", [])):
        for leftover in target.iterdir():
            leftover.unlink()
        (release / "staged").write_text("A=1\n")
        (release / ".env").unlink(missing_ok=True)
        (release / ".env").symlink_to(target)
        subprocess.run(["mv", flags, str(release / "staged"), str(release / ".env")], check=True)
        assert [p.name for p in target.iterdir()] == expected
        assert (release / ".env").is_symlink() == bool(expected)


def test_a_env_made_a_link_to_a_folder_gets_nothing_moved_into_it(tenants):
    """A redeploy of a release on disk (reload, rollback) stages its next .env beside the live one
    and moves it into place after the switch; a tenant that made `.env` a link to a folder had
    root's `mv -f` put the file inside that folder."""
    env = _tenant_env(tenants)
    done = _deploy(tenants, env, tenants["repo"])
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    target = tenants["base"] / f"root-only-{env}"            # a folder of root's, closed to the tenant
    target.mkdir(mode=0o755)
    user = naming.unix_user(TENANT_APP, env)
    release = _service_dir(tenants, env) / "releases" / "1"
    planted = subprocess.run(["runuser", "-u", user, "--", "sh", "-c",
                              f"cd {release} && ln -sfn {target} .env.new && mv -T .env.new .env"],
                             capture_output=True, text=True)
    assert planted.returncode == 0, planted.stderr
    reloaded = tenants["cluster"].deployctl("reload", f"{TENANT_APP}/{env}/job", timeout=300)
    assert reloaded.returncode == 0, reloaded.stdout.decode() + reloaded.stderr.decode()
    assert list(target.iterdir()) == []
    info = (release / ".env").lstat()
    assert (info.st_mode & 0o170000) == 0o100000 and info.st_uid == pwd.getpwnam(user).pw_uid
    assert not list(release.glob(".env.deploy-*"))


def _objects(repo: Path) -> dict[str, tuple[str, int, int]]:
    """Every file and folder under .git/objects: (content hash, owner, group)."""
    out = {}
    for path in sorted((repo / ".git" / "objects").rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        out[str(path.relative_to(repo))] = (digest, info.st_uid, info.st_gid)
    return out


def test_a_plain_local_clone_shares_the_sources_objects_and_ours_does_not(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "a").write_text("a\n")
    git(source, "init", "-q", "-b", "main")
    git(source, "add", "-A")
    git(source, "commit", "-q", "-m", "a")
    commit = git(source, "rev-parse", "HEAD")
    inodes = {p.stat().st_ino for p in (source / ".git" / "objects").rglob("*") if p.is_file()}
    plain = tmp_path / "plain"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(source), str(plain)], check=True)
    assert inodes & {p.stat().st_ino for p in (plain / ".git" / "objects").rglob("*") if p.is_file()}
    release = tmp_path / "svc" / "releases" / "1"
    done = subprocess.run(["sh", "-c", _checkout_script(str(tmp_path / "svc"), str(release), str(source), commit)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not inodes & {p.stat().st_ino for p in (release / ".git" / "objects").rglob("*") if p.is_file()}
    assert (release / "a").read_text() == "a\n"


def test_a_tenant_cannot_rewrite_the_objects_others_deploy_from(tenants):
    env, source = _tenant_env(tenants), tenants["base"] / "shared-source"
    shutil.copytree(tenants["repo"], source, symlinks=True)
    before = _objects(source)
    rewrite = 'find .git/objects -type f | while read -r f; do chmod u+w "$f"; printf rewritten > "$f"; done'
    result = _deploy(tenants, env, source, install=rewrite)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    release = _service_dir(tenants, env) / "releases" / "1"
    assert {p.read_bytes() for p in (release / ".git" / "objects").rglob("*") if p.is_file()} == {b"rewritten"}
    assert _objects(source) == before                      # same bytes, still root's
    assert all(uid == 0 and gid == 0 for _, uid, gid in before.values())
    assert subprocess.run(["git", "-C", str(source), "fsck", "--strict"], capture_output=True).returncode == 0


# ---------------------------------------------------------------- 3. agents prove what they provide


# ---------------------------------------------------------------- 4. operators authenticate


# ---------------------------------------------------------------- 5. limits per environment


# ---------------------------------------------------------------- 6. shared Redis stays available


# ---------------------------------------------------------------- 7. acknowledged output is kept


# ---------------------------------------------------------------- 8. least knowledge


# ---------------------------------------------------------------- 9. one owner per port
