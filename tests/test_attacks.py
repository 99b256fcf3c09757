"""Attacks on a shared server, replayed for real: each test plays a hostile tenant, a rogue agent
or a local user, and asserts that the concrete harm did not happen (not merely that an error was
printed). Where it can be shown safely, a test also shows the attack works without its defence.

Sections are independent (each builds what it needs); see docs/decisions/013-threat-model.md.
"""

from __future__ import annotations


# ---------------------------------------------------------------- 1. ownership before destruction
# A controller finds names of its namespace taken: leftovers of an earlier store, another
# controller on the same server. It must move past them and never drop, reset or overwrite them.
import json as _own_json  # noqa: E402
import shutil as _own_shutil  # noqa: E402
import subprocess as _own_subprocess  # noqa: E402

import pytest as _own_pytest  # noqa: E402
import yaml as _own_yaml  # noqa: E402

from tests.deploy_harness import (deploy_cluster as _own_cluster, example_repo as _own_repo,  # noqa: E402
                                  http_get as _own_get, mysql as _own_mysql, new_commit as _own_commit,
                                  purge as _own_purge, redis as _own_redis, service_users_base as _own_base,
                                  unique_env as _own_env)

_OWN_INSTALL = "npm ci --omit=dev --no-audit --no-fund --prefer-offline"


@_own_pytest.fixture(scope="module")
def owned_world():
    base = _own_base("deployer-ownership-")
    nginx, cluster = _own_cluster(base)
    envs: list[str] = []
    try:
        yield {"base": base, "nginx": nginx, "cluster": cluster, "repo": _own_repo(base), "envs": envs}
    finally:
        cluster.close()
        nginx.stop()
        for env in envs:
            _own_purge("shop", env)
        _own_shutil.rmtree(base, ignore_errors=True)


def _own_spec(world, tmp_path, env: str, **web) -> str:
    service = {"path": "/", "source": str(world["repo"]), "ref": "main", "root": "web", "install": _OWN_INSTALL,
               "build": "npm run build", "migrate": "node migrate.js", "start": "node server.js",
               "health": "/health", "uses": ["mysql", "redis"], **web}
    path = tmp_path / f"{env}.yml"
    path.write_text(_own_yaml.safe_dump({"app": "shop", "environment": env, "domain": f"{env}.shop.test",
                                         "services": {"web": service}}, sort_keys=False))
    return str(path)


def _leftovers(env: str) -> None:
    """What an earlier controller left under this environment's names: a database with rows,
    MariaDB users, a Redis ACL user with a password and keys of its own."""
    db = f"auto-shop-{env}-web-1"
    _own_mysql(f"CREATE DATABASE `{db}` COMMENT 'deployer someoneelse000000000 n0'; "
               f"CREATE TABLE `{db}`.orders (id INT PRIMARY KEY, item TEXT); "
               f"INSERT INTO `{db}`.orders VALUES (1, 'kept'), (2, 'also kept'); "
               f"CREATE USER '{db}'@'%' IDENTIFIED BY 'their-password-1'; "
               f"GRANT ALL ON `{db}`.* TO '{db}'@'%'; "
               f"CREATE USER 'auto-shop-{env}-web-2'@'%' IDENTIFIED BY 'their-password-2'")
    _own_redis("ACL", "SETUSER", db, "on", ">their-redis-password", f"~{db}:*", "+@all")
    _own_redis("SET", f"{db}:cart", "theirs")


def _fingerprint(env: str) -> str:
    """Everything of the leftovers, for a byte-for-byte comparison."""
    db = f"auto-shop-{env}-web-1"
    return "\n".join([
        _own_mysql(f"SHOW CREATE DATABASE `{db}`"),
        _own_mysql(f"CHECKSUM TABLE `{db}`.orders EXTENDED; SELECT * FROM `{db}`.orders ORDER BY id"),
        _own_mysql(f"SELECT User, Host, Priv FROM mysql.global_priv WHERE User IN ('{db}', 'auto-shop-{env}-web-2') "
                   "ORDER BY User"),
        _own_mysql(f"SHOW GRANTS FOR '{db}'@'%'"),
        _own_redis("ACL", "GETUSER", db),
        _own_redis("GET", f"{db}:cart"),
    ])


def _tree(folder) -> list:
    return sorted((str(p.relative_to(folder)), p.lstat().st_mode, p.lstat().st_uid, p.lstat().st_gid,
                   p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
                  for p in [folder, *folder.rglob("*")])


def test_a_failed_deploy_leaves_what_it_collided_with_byte_for_byte(owned_world, tmp_path):
    env = _own_env()
    owned_world["envs"].append(env)
    cluster = owned_world["cluster"]
    _leftovers(env)
    before = _fingerprint(env)
    spec = _own_spec(owned_world, tmp_path, env, install="echo failing on purpose >&2; exit 1")
    result = cluster.deployctl("apply", spec, timeout=600)
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 1, out
    assert f"database auto-shop-{env}-web-1 exists and is not this deployer's: left untouched" in out
    assert f"Redis ACL user auto-shop-{env}-web-1 exists and is not this deployer's: left untouched" in out
    assert "install failed" in out
    assert _fingerprint(env) == before
    # What this deploy made (mysql 3: 1 and 2 were taken; redis 2) went in its undo.
    assert _own_mysql(f"SHOW DATABASES LIKE 'auto-shop-{env}-web-%'").split() == [f"auto-shop-{env}-web-1"]
    assert sorted(u for u in _own_redis("ACL", "USERS").split() if env in u) == [f"auto-shop-{env}-web-1"]
    ledger = _own_json.loads(cluster.deployctl("ledger", f"shop/{env}", "web", "--json").stdout)["web"]
    status = {(i["component"], i["number"]): i["status"] for i in ledger["instances"]}
    assert status == {("code", 1): "failed", ("mysql", 1): "taken", ("mysql", 2): "taken",
                      ("mysql", 3): "failed", ("redis", 1): "taken", ("redis", 2): "failed"}


def test_a_deploy_moves_past_taken_names_and_verify_leaves_them_alone(owned_world, tmp_path):
    env = _own_env()
    owned_world["envs"].append(env)
    cluster = owned_world["cluster"]
    _leftovers(env)
    before = _fingerprint(env)
    spec = _own_spec(owned_world, tmp_path, env)
    result = cluster.deployctl("apply", spec, timeout=600)
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, out
    assert "mysql 1 stays used, mysql 2 is next" in out and "mysql 2 stays used, mysql 3 is next" in out
    status, body = _own_get(owned_world["nginx"].port, "/", host=f"{env}.shop.test")
    assert status == 200, body
    env_file = (cluster.agents["computing-1"].services_root / f"auto-shop-{env}-web" / "current" / ".env").read_text()
    assert f"DB_NAME=auto-shop-{env}-web-3" in env_file and f"REDIS_PREFIX=auto-shop-{env}-web-2:" in env_file
    assert _fingerprint(env) == before

    # Foreign things are reported and left alone: they are not this environment's drift.
    verify = cluster.deployctl("verify", f"shop/{env}", timeout=120)
    said = verify.stdout.decode()
    assert verify.returncode == 0, said + verify.stderr.decode()
    assert f"mysql: database auto-shop-{env}-web-1 is not this deployer's (marked by deployer someoneelse" in said
    assert f"redis: ACL user auto-shop-{env}-web-1 is unknown to the ledger: left alone" in said

    # A release folder someone left where the next number would go is moved past, untouched.
    root = cluster.agents["computing-1"].services_root / f"auto-shop-{env}-web"
    stray = root / "releases" / "2"
    stray.mkdir()
    (stray / "notes.txt").write_text("not the deployer's")
    stray_before = _tree(stray)
    _own_commit(owned_world["repo"], f"next for {env}")
    again = cluster.deployctl("apply", spec, timeout=600)
    assert again.returncode == 0, again.stdout.decode() + again.stderr.decode()
    assert b"code 2 stays used, code 3 is next" in again.stdout
    assert _tree(stray) == stray_before
    assert _own_get(owned_world["nginx"].port, "/", host=f"{env}.shop.test")[0] == 200

    # Destroying with its data goes only for what is ours.
    purged = cluster.deployctl("destroy", f"shop/{env}", "--purge-data", "--yes", timeout=300)
    assert purged.returncode == 0, purged.stdout.decode() + purged.stderr.decode()
    assert _fingerprint(env) == before
    assert _own_mysql(f"SHOW DATABASES LIKE 'auto-shop-{env}-web-%'").split() == [f"auto-shop-{env}-web-1"]


def test_a_service_folder_or_unix_user_not_ours_is_refused_with_one_line(owned_world, tmp_path):
    env = _own_env()
    owned_world["envs"].append(env)
    cluster = owned_world["cluster"]
    folder = cluster.agents["computing-1"].services_root / f"auto-shop-{env}-web"
    (folder / "releases" / "1").mkdir(parents=True)
    (folder / "shared").mkdir()
    (folder / "shared" / "upload.bin").write_bytes(b"\x00their data\xff")
    (folder / "current").symlink_to(folder / "releases" / "1")
    before = _tree(folder)
    result = cluster.deployctl("apply", _own_spec(owned_world, tmp_path, env), timeout=600)
    err = result.stderr.decode()
    assert result.returncode == 1
    assert f"web: folder failed: folder {folder} exists and is not this deployer's" in err, err
    assert _tree(folder) == before
    assert _own_mysql(f"SHOW DATABASES LIKE 'auto-shop-{env}-%'") == ""

    user = f"auto-shop-{env}"
    _own_shutil.rmtree(folder)
    _own_subprocess.run(["useradd", "--system", "--no-create-home", "--comment", "made by hand", user], check=True)
    passwd = _own_subprocess.run(["getent", "passwd", user], capture_output=True).stdout
    result = cluster.deployctl("apply", _own_spec(owned_world, tmp_path, env), timeout=600)
    assert result.returncode == 1
    assert f"web: user failed: Unix user {user} exists and is not this deployer's (comment 'made by hand')" \
        in result.stderr.decode()
    assert _own_subprocess.run(["getent", "passwd", user], capture_output=True).stdout == passwd
    assert [p.name for p in folder.iterdir()] == [".deployer-owner"]  # ours, made before the user was refused




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

from controller.environments import naming
from controller.environments.commands import checkout_script as _checkout_script
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
    plant = ["runuser", "-u", user, "--", "sh", "-c", f"cd {release} && ln -sfn {target} .env.new && mv -T .env.new .env"]
    # A sealed release (decision 033) is root's: the tenant cannot even make the link.
    refused = subprocess.run(plant, capture_output=True, text=True)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    # Replayed on a release deployed before releases were sealed, still the user's.
    subprocess.run(["chown", "-hR", f"{user}:{user}", str(release)], check=True)
    planted = subprocess.run(plant, capture_output=True, text=True)
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
import queue
import shutil
import sqlite3
import threading
from pathlib import Path

import grpc
import yaml

from common import tls
from controller.environments import naming
from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc
from tests.deploy_harness import deploy_cluster, example_repo, purge, service_users_base, unique_env, wait_http_ok
from tests.harness import wait_for

ROGUE = "a-rogue-1"  # sorts before every genuine agent: the one picked first when it matched
# Passes `nginx -t` once inside a proxy_pass, and adds a server that answers for everyone.
BREAKOUT = ("127.0.0.1:1/; } } server { listen 80; location / { return 200 owned; } } "
            "server { location /x { proxy_pass http://127.0.0.1")


class RogueLink:
    """An agent stream with a genuine certificate and a hostile hello; keeps all it is sent."""

    def __init__(self, controller, key: bytes, cert: bytes, settings: dict[str, str]) -> None:
        ca = (controller.store / "pki" / "ca.crt").read_bytes()
        self.channel = grpc.secure_channel(
            controller.address, grpc.ssl_channel_credentials(ca, key, cert),
            options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)])
        self.outgoing: queue.Queue = queue.Queue()
        self.outgoing.put(pb.AgentMessage(hello=pb.Hello(
            agent_id=ROGUE, roles=["daemons"], capabilities=["mysql", "nginx", "redis"], version="rogue",
            heartbeat_interval_s=3600, settings=settings)))  # no heartbeats needed while the test runs
        self.received: list = []
        self.status = None
        self.done = threading.Event()
        self.call = pb_grpc.AgentGatewayStub(self.channel).Connect(iter(self.outgoing.get, None), timeout=900)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.received.append(message)
        except grpc.RpcError as exc:
            self.status = (exc.code(), exc.details() or "")
        self.done.set()

    def welcomed(self) -> bool:
        return any(m.WhichOneof("msg") == "welcome" for m in self.received)

    def close(self) -> None:
        self.outgoing.put(None)
        self.call.cancel()
        self.channel.close()


def _enrol_rogue(controller) -> tuple[bytes, bytes]:
    """Enrolled as an operator would enrol a daemons host: a token for the role, nothing granted."""
    ca = (controller.store / "pki" / "ca.crt").read_bytes()
    key, csr = tls.new_key_and_csr(ROGUE)
    with grpc.secure_channel(controller.enroll_address, grpc.ssl_channel_credentials(ca),
                               options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)]) as channel:
        reply = pb_grpc.EnrollmentStub(channel).Enroll(pb.EnrollRequest(
            token=controller.token(("daemons",), agent_id=ROGUE), agent_id=ROGUE, csr_pem=csr), timeout=10)
    return key, reply.certificate_pem


def test_a_rogue_agent_gets_no_work_no_password_and_no_line_in_nginx():
    """An agent enrolled for daemons claims mysql, redis and nginx, with settings of its own. Its
    nginx syntax is refused at the hello; its well-formed claims are ignored: a real deploy with
    it connected sends it nothing, and the router's real nginx file holds nothing it said.
    (tests/test_grants.py shows the same hello picked, and its address passing nginx -t, without
    the checks.)"""
    base = service_users_base("deployer-attack3-")
    nginx, cluster = deploy_cluster(base)
    env, rogue = unique_env(), None
    try:
        key, cert = _enrol_rogue(cluster.controller)
        for hostile in ({"address": BREAKOUT}, {"nginx.listen": "80; include /etc/shadow"},
                        {"mysql.host": "db.example\n"}, {"redis.port": "6379 ; FLUSHALL"}):
            refused = RogueLink(cluster.controller, key, cert, hostile)
            assert refused.done.wait(20), "the hostile hello was not answered"
            code, details = refused.status
            refused.close()
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("setting ")
            assert "\n" not in details and not refused.welcomed()
        assert ROGUE not in cluster.agents_json()  # nothing of it was recorded

        rogue_conf = base / "rogue-nginx"
        rogue = RogueLink(cluster.controller, key, cert, {
            "address": "10.66.66.66", "mysql.host": "10.66.66.66", "mysql.port": "3306",
            "redis.host": "10.66.66.66", "redis.port": "6379", "nginx.conf_dir": str(rogue_conf),
            "nginx.listen": "6666", "nginx.test": "true", "nginx.reload": "true"})
        wait_for(rogue.welcomed, 20, what="the rogue's welcome (it is a genuine daemons agent)")
        listed = cluster.agents_json()[ROGUE]
        assert listed["state"] == "connected" and listed["capabilities"] == [] and listed["granted"] == []
        assert set(listed["claimed"]) == {"mysql", "nginx", "redis"}
        assert listed["address"] == "127.0.0.1" and not listed["address_granted"]  # its link's, not its word
        assert any(e["agent_id"] == ROGUE for e in cluster.controller.events("agent.claims_ignored"))

        repo = example_repo(base)
        spec = base / "environment.yml"
        spec.write_text(yaml.safe_dump({"app": "shop", "environment": env, "domain": f"{env}.shop.test",
                                          "services": {"web": {
                                              "path": "/", "source": str(repo), "ref": "main", "root": "web",
                                              "install": "npm ci --omit=dev --no-audit --no-fund --prefer-offline",
                                              "build": "npm run build", "migrate": "node migrate.js",
                                              "start": "node server.js", "health": "/health",
                                              "uses": ["mysql", "redis"]}}}))
        done = cluster.deployctl("apply", str(spec), timeout=600)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        wait_http_ok(nginx.port, "/", f"{env}.shop.test")

        # No operation reached it, by its stream or in the controller's records.
        assert rogue.status is None, rogue.status
        assert [m.WhichOneof("msg") for m in rogue.received] == ["welcome"]
        db = sqlite3.connect(cluster.controller.store / "deployer.db")
        assert db.execute("SELECT COUNT(*) FROM operations WHERE agent_id = ?", (ROGUE,)).fetchone()[0] == 0
        hosts = {row[0] for row in db.execute("SELECT host FROM instances WHERE env_key = ?", (f"shop/{env}",))}
        assert hosts == {"computing-1"}
        # The passwords made for the deploy went to the genuine providers, never to it.
        service = naming.service_dir(str(base / "srv"), "shop", env, "web")
        dotenv = next(Path(service).glob("releases/*/.env")).read_text()
        passwords = [line.split("=", 1)[1] for line in dotenv.splitlines() if line.startswith("DB_PASSWORD=")]
        assert passwords and len(passwords[0]) >= 20
        assert all(passwords[0].encode() not in m.SerializeToString() for m in rogue.received)
        assert "10.66.66.66" not in dotenv
        # The router's real nginx file: routes to the web service's host as the link shows it, and
        # holds no text the rogue sent; the rogue's own nginx folder was never written.
        conf = (nginx.conf_dir / naming.nginx_file("shop", env)).read_text()
        assert "proxy_pass http://127.0.0.1:" in conf and f"listen {nginx.port};" in conf
        assert all(text not in conf for text in ("10.66.66.66", "6666", "owned", "rogue"))
        assert conf.count("server {") == 1
        assert not rogue_conf.exists()
    finally:
        if rogue is not None:
            rogue.close()
        cluster.close()
        nginx.stop()
        purge("shop", env)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- 4. operators authenticate
#
# A local user of the controller host who is not root (or any tenant process there) reaches the
# TCP operator port. Without a credential it gets UNAUTHENTICATED; with a read token it can look
# but not change; only an operate token enrols agents or runs commands, until it is revoked. The
# attack without the defence (an unauthenticated caller reaching SubmitExec through a door with
# no token check) is shown in tests/test_operator_access.py, not by a flag that would turn the
# check off here.

import json
import os
import pwd
import secrets
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness import ROOT, Cluster, free_port

# The user cannot run the test's interpreter (it may live under /root, which only root may enter):
# it runs the system's Python of the same version with the same packages, read-only.
_OP_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
_OP_RAW_ATTACK = """
import json, os, socket, sys
import grpc
from protos import deployer_pb2 as pb, deployer_pb2_grpc as pb_grpc
address, ca_file, socket_path = sys.argv[1:4]
out = {"uid": os.getuid(), "euid": os.geteuid()}
def codes(channel):
    stub, found = pb_grpc.OperatorStub(channel), {}
    for name, call, request in (
            ("CreateToken", stub.CreateToken, pb.TokenRequest(roles=["computing"], ttl_s=600)),
            ("SubmitExec", stub.SubmitExec, pb.SubmitExecRequest(
                target=pb.Target(all=True), exec=pb.ExecSpec(argv=["id"])))):
        try:
            call(request, timeout=10)
            found[name] = "OK"
        except grpc.RpcError as exc:
            found[name] = exc.code().name
    return found
tls = grpc.ssl_channel_credentials(open(ca_file, "rb").read())
out["tls"] = codes(grpc.secure_channel(address, tls, options=[
    ("grpc.ssl_target_name_override", "deployer-controller")]))
out["plain"] = codes(grpc.insecure_channel(address))
try:
    socket.socket(socket.AF_UNIX).connect(socket_path)
    out["socket"] = "connected"
except OSError as exc:
    out["socket"] = type(exc).__name__
print(json.dumps(out))
"""


class _OpLocalUser:
    """A throwaway Unix user (not root, no groups) with a private home, running deployctl."""

    def __init__(self) -> None:
        self.name = f"dtest-op-{secrets.token_hex(4)}"
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                            "--shell", "/usr/sbin/nologin", self.name], check=True, capture_output=True)
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.home = Path(tempfile.mkdtemp(prefix="dtest-op-home-"))
        shutil.chown(self.home, self.uid, self.gid)

    def write_private(self, name: str, text: str) -> Path:
        path = self.home / name
        path.write_text(text)
        shutil.chown(path, self.uid, self.gid)
        path.chmod(0o600)
        return path

    def run(self, argv: list[str], **env: str) -> subprocess.CompletedProcess:
        path = ":".join([*site.getsitepackages(), str(ROOT)])
        return subprocess.run(
            [_OP_PYTHON, *argv], cwd=self.home, user=self.uid, group=self.gid, extra_groups=[],
            env={"PATH": "/usr/bin:/bin", "HOME": str(self.home), "PYTHONPATH": path,
                 "PYTHONDONTWRITEBYTECODE": "1", "NO_COLOR": "1", **env},
            capture_output=True, text=True, timeout=60)

    def deployctl(self, address: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        return self.run(["-m", "deployctl.cli", "--controller", address, *args], **env)

    def remove(self) -> None:
        subprocess.run(["userdel", self.name], capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="module")
def op_setup(tmp_path_factory):
    """A controller serving operators on loopback TCP, one connected agent, a local user."""
    if os.geteuid() != 0:
        pytest.skip("creates a Unix user")
    if not Path(_OP_PYTHON).exists():
        pytest.skip(f"{_OP_PYTHON} is needed to run a process as another user")
    base = tmp_path_factory.mktemp("operators")
    cluster = Cluster(base)
    address = f"127.0.0.1:{free_port()}"
    cluster.controller.extra_args = ("--operator-listen", address)
    user = None
    try:
        cluster.controller.start()
        cluster.add_agent("op-web-1")
        cluster.wait_connected("op-web-1")
        user = _OpLocalUser()
        ca = Path(user.home / "ca.crt")
        ca.write_bytes((cluster.controller.store / "pki" / "ca.crt").read_bytes())  # public
        ca.chmod(0o644)
        yield cluster, user, address, str(ca)
    finally:
        if user is not None:
            user.remove()
        cluster.close()


def _op_harm(cluster) -> tuple[int, list[str]]:
    """(enrolment tokens ever made, operations ever sent): what an attacker would have added."""
    listed = cluster.deployctl("token", "list", "--all", "--json")
    assert listed.returncode == 0, listed.stderr
    folder = cluster.controller.store / "operations"
    return len(json.loads(listed.stdout)), sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _op_token(cluster, role: str) -> str:
    made = cluster.deployctl("operator-token", "create", "--role", role, "--label", f"test {role}")
    assert made.returncode == 0, made.stderr
    return made.stdout.decode().strip()


def _op_one_line(done, code: int, *words: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deployctl: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_a_local_user_without_credentials_cannot_enrol_or_run_commands(op_setup):
    cluster, user, address, ca = op_setup
    marker = cluster.base / "op-pwned-anonymous"
    before = _op_harm(cluster)

    raw = user.run(["-c", _OP_RAW_ATTACK, address, ca, str(cluster.controller.socket)])
    assert raw.returncode == 0, raw.stderr
    seen = json.loads(raw.stdout)
    assert seen["uid"] != 0 and seen["euid"] != 0
    assert seen["tls"] == {"CreateToken": "UNAUTHENTICATED", "SubmitExec": "UNAUTHENTICATED"}
    assert seen["plain"] == {"CreateToken": "UNAVAILABLE", "SubmitExec": "UNAVAILABLE"}   # TLS only
    assert seen["socket"] == "PermissionError"                        # the 0600 socket in a 0700 store

    for args in (("token", "create", "--role", "computing"),
                 ("exec", "--agent", "op-web-1", "--", "touch", str(marker))):
        _op_one_line(user.deployctl(address, *args), 2, "needs an operator token")
        _op_one_line(user.deployctl(address, *args, DEPLOYER_CA=ca), 4,
                     "the controller refused the credential (no operator token")
        forged = "dpo1.0123456789ab.guessed-secret.x"
        _op_one_line(user.deployctl(address, *args, DEPLOYER_CA=ca, DEPLOYER_OPERATOR_TOKEN=forged), 4,
                     "the controller refused the credential (unknown operator token")
    assert _op_harm(cluster) == before and not marker.exists()
    assert cluster.controller.events("rpc.unauthenticated")


def test_a_read_credential_looks_but_changes_nothing(op_setup):
    cluster, user, address, ca = op_setup
    token = _op_token(cluster, "read")
    marker = cluster.base / "op-pwned-reader"
    before = _op_harm(cluster)

    # The token alone is enough: deployctl pins the CA whose fingerprint it carries.
    agents = user.deployctl(address, "agents", "--json", DEPLOYER_OPERATOR_TOKEN=token)
    assert agents.returncode == 0, agents.stderr
    assert [a["id"] for a in json.loads(agents.stdout)] == ["op-web-1"]
    for args, method in ((("token", "create", "--role", "computing"), "CreateToken"),
                         (("exec", "--agent", "op-web-1", "--", "touch", str(marker)), "SubmitExec"),
                         (("operator-token", "create", "--role", "operate"), "CreateOperatorToken"),
                         (("agents", "revoke", "op-web-1"), "RevokeAgent")):
        _op_one_line(user.deployctl(address, *args, DEPLOYER_OPERATOR_TOKEN=token), 4,
                     "not permitted", f"{method} needs the operate role")
    assert _op_harm(cluster) == before and not marker.exists()
    assert cluster.agents_json()["op-web-1"]["state"] == "connected"


def test_an_operate_credential_works_until_it_is_revoked(op_setup):
    cluster, user, address, ca = op_setup
    token = _op_token(cluster, "operate")
    loose = user.write_private("loose-token", token)
    loose.chmod(0o644)
    _op_one_line(user.deployctl(address, "--token-file", str(loose), "agents"), 2, "open to other users")
    token_file = user.write_private("token", token)
    marker = cluster.base / "op-by-operator"
    tokens_before, _ = _op_harm(cluster)

    done = user.deployctl(address, "--token-file", str(token_file), "--ca-file", ca,
                          "exec", "--agent", "op-web-1", "--", "touch", str(marker))
    assert done.returncode == 0, done.stderr
    assert marker.exists()
    made = user.deployctl(address, "--token-file", str(token_file), "token", "create", "--role", "computing")
    assert made.returncode == 0 and made.stdout.startswith("dpt1."), made.stderr
    assert _op_harm(cluster)[0] == tokens_before + 1
    assert [e["method"] for e in cluster.controller.events("operator.call")][-2:] == ["SubmitExec", "CreateToken"]

    token_id = token.split(".")[1]
    assert cluster.deployctl("operator-token", "revoke", token_id).returncode == 0
    again = cluster.base / "op-after-revocation"
    _op_one_line(user.deployctl(address, "--token-file", str(token_file), "exec", "--agent", "op-web-1",
                                "--", "touch", str(again)), 4, f"operator token {token_id} was revoked")
    assert not again.exists()


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
from controller.environments import naming as _naming, commands as _ops
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
        peak, host_forks, refused, host_refused = 0, 0, 0, []
        while not bomb.task.done():
            try:
                peak = max(peak, int(_Path(f"{leaf}/pids.current").read_text()))
                # "max N": forks the kernel refused for the limit (counted where the fork failed
                # or where the limit is, depending on the kernel)
                refused = max([refused] + [int(_Path(f"{d}/pids.events").read_text().split()[1])
                                           for d in (leaf, group_dir)])
            except (OSError, ValueError, IndexError):
                pass
            # The host still forks while the bomb runs: this very test does, and is never refused
            # (how many times it gets to depends on how busy the machine is, not on the bomb).
            try:
                host_forks += _subprocess.run(["true"]).returncode == 0
            except OSError as exc:  # EAGAIN: the bomb would have taken the host's processes
                host_refused.append(exc)
            await _asyncio.sleep(0.02)
        await bomb.task
        return bomb, peak, host_forks, refused, host_refused

    started = _time.monotonic()
    bomb, peak, host_forks, refused, host_refused = _asyncio.run(attack())
    assert 32 <= peak <= 64, (peak, bomb.result)  # it did fork up to its limit, and no further
    assert refused > 0                      # the kernel said no to the forks beyond it
    assert host_forks >= 1 and host_refused == []
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
                # restart: never, so the killed process stays dead for status to show why
                "services": {"web": {"path": "/", "source": str(repo), "ref": "main", "restart": "never",
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
        _subprocess.run(["mariadb"], input=f"DROP DATABASE IF EXISTS `{name}`; DROP USER IF EXISTS '{name}'@'%';".encode(),
                        capture_output=True)


# ---------------------------------------------------------------- 6. shared Redis stays available

import socket
import subprocess
import time

from controller.environments import commands as operations
from tests.harness import free_port, wait_for

# The ACL rule users were made with before scripts were refused: the attack's baseline.
_ACL_WITH_SCRIPTS = ("ACL SETUSER {user} reset on >{password} ~{prefix}* resetchannels -@all "
                     "+@connection +@read +@write +@keyspace +@transaction +@scripting -@dangerous "
                     "-select -move -scan -randomkey -dbsize -function -script|flush -script|kill "
                     "-script|debug -client|tracking -client|caching -client|getredir\n")
_RUNAWAY = "while true do end"


class _PrivateRedis:
    """A redis-server of the test's own (never the shared one: a runaway script would freeze every
    test on it), on a free port; its `default` user is the admin. A script counts as busy after
    100 ms instead of 5 s, so the freeze shows at once."""

    def __init__(self, folder) -> None:
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(folder), "--busy-reply-threshold", "100",
             "--enable-debug-command", "yes"],  # so that it is the ACL that refuses DEBUG
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.admin("PING") == b"PONG", what="the private redis-server")

    def admin(self, *args: str, stdin: bytes = b"") -> bytes:
        done = subprocess.run(["redis-cli", "-p", str(self.port), *args], input=stdin,
                              capture_output=True, timeout=10)
        return done.stdout.strip()

    def user(self, rule: bytes) -> None:
        assert self.admin(stdin=rule) == b"OK", rule

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            # SHUTDOWN NOSAVE is the only way out of a script that has written (Redis 7.0).
            self.admin("SHUTDOWN", "NOSAVE")
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # `default` was turned off: no admin left to ask
                self.proc.kill()
                self.proc.wait()


def _redis_call(port: int, user: str, password: str, *args: str, timeout: float = 1.0) -> bytes:
    """One command as `user` on a fresh connection: its reply's first line (+OK, -NOPERM …), or
    raises socket.timeout when the server does not answer within `timeout`."""
    def resp(*words: str) -> bytes:
        return b"".join([f"*{len(words)}\r\n".encode()]
                        + [f"${len(w.encode())}\r\n".encode() + w.encode() + b"\r\n" for w in words])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(resp("AUTH", user, password) + resp(*args))
        reader = conn.makefile("rb")
        auth = reader.readline()
        assert auth == b"+OK\r\n", auth
        return reader.readline().rstrip(b"\r\n")


def _tenant(name: str) -> tuple[str, str, str]:
    return f"auto-{name}-prod-web-1", f"auto-{name}-prod-web-1:", f"pw-{name}-0123456789abcdef"


_OLD_RULE = ("ACL SETUSER {user} reset on >{password} ~{prefix}* resetchannels -@all +@connection +@read +@write "
             "+@keyspace +@transaction -@scripting -@dangerous -select -move -copy -scan -randomkey -dbsize -wait -lcs "
             "-client|tracking -client|caching -client|getredir\n")


def test_a_prefix_tenant_gets_what_clients_send_at_connect_and_pub_sub_on_its_own_channels_only(tmp_path):
    """What ioredis, node-redis, redis-py, bull and rq send at connect (INFO, CLIENT SETNAME) and
    pub/sub work for a `prefix` user; another tenant's channels, and the lists of channels, do not.
    A user made with the earlier rule gets the same by the additive widening a redeploy sends."""
    redis = _PrivateRedis(tmp_path / "redis")
    listener = None
    try:
        (user, prefix, password), (other, other_prefix, other_password) = _tenant("evil"), _tenant("shop")
        redis.user(operations.redis_create_user(user, prefix, password))
        redis.user(operations.redis_create_user(other, other_prefix, other_password))
        old_user, old_prefix, old_password = _tenant("old")
        redis.user(_OLD_RULE.format(user=old_user, prefix=old_prefix, password=old_password).encode())
        assert _redis_call(redis.port, old_user, old_password, "INFO").startswith(b"-NOPERM")   # the earlier rule
        redis.user(operations.redis_widen_user(old_user, old_prefix))
        # The neighbour listens on its own channel: nothing the tenant does may reach it.
        listener = socket.create_connection(("127.0.0.1", redis.port), timeout=5)
        listener.sendall(f"AUTH {other} {other_password}\r\nSUBSCRIBE {other_prefix}news\r\n".encode())
        heard = listener.makefile("rb")
        assert heard.readline() == b"+OK\r\n" and heard.readline() == b"*3\r\n"
        assert [heard.readline() for _ in range(5)][-1] == b":1\r\n"       # subscribe, the channel, 1
        for name, pfx, pw in ((user, prefix, password), (old_user, old_prefix, old_password)):
            assert _redis_call(redis.port, name, pw, "INFO", "server").startswith(b"$")
            assert _redis_call(redis.port, name, pw, "CLIENT", "SETNAME", "bull") == b"+OK"
            assert _redis_call(redis.port, name, pw, "SUBSCRIBE", pfx + "jobs") == b"*3"
            assert _redis_call(redis.port, name, pw, "PSUBSCRIBE", pfx + "*") == b"*3"
            assert _redis_call(redis.port, name, pw, "PUBLISH", pfx + "jobs", "x") == b":0"
            for refused in (["SUBSCRIBE", other_prefix + "news"], ["PUBLISH", other_prefix + "news", "forged"],
                            ["PSUBSCRIBE", "*"], ["PSUBSCRIBE", "auto-*"], ["PUBSUB", "CHANNELS"],
                            ["PUBSUB", "NUMSUB", other_prefix + "news"], ["CLIENT", "LIST"], ["KEYS", "*"],
                            ["GET", other_prefix + "k"]):
                assert _redis_call(redis.port, name, pw, *refused).startswith(b"-NOPERM"), (name, refused)
        # The neighbour heard nothing: its next message is the one it publishes to itself.
        assert _redis_call(redis.port, other, other_password, "PUBLISH", other_prefix + "news", "own") == b":1"
        assert heard.readline() == b"*3\r\n"
        assert [heard.readline() for _ in range(6)] == [b"$7\r\n", b"message\r\n", f"${len(other_prefix) + 4}\r\n".encode(),
                                                        f"{other_prefix}news\r\n".encode(), b"$3\r\n", b"own\r\n"]
    finally:
        if listener is not None:
            listener.close()
        redis.shutdown()


def test_a_tenants_runaway_script_is_refused_and_the_neighbour_keeps_its_answers(tmp_path):
    redis = _PrivateRedis(tmp_path / "redis")
    runaway = None
    try:
        (user, prefix, password), neighbour = _tenant("evil"), _tenant("shop")
        redis.user(operations.redis_create_user(user, prefix, password))
        redis.user(operations.redis_create_user(*neighbour))
        refused = [_redis_call(redis.port, user, password, "EVAL", _RUNAWAY, "0"),
                   _redis_call(redis.port, user, password, "EVAL", f"redis.call('SET', KEYS[1], 1) {_RUNAWAY}",
                               "1", prefix + "k"),
                   _redis_call(redis.port, user, password, "FUNCTION", "LOAD",
                               f"#!lua name=evil\nredis.register_function('spin', function() {_RUNAWAY} end)"),
                   _redis_call(redis.port, user, password, "FCALL", "spin", "0")]
        assert all(reply.startswith(b"-NOPERM") for reply in refused), refused
        for harmful in (["KEYS", "*"], ["DEBUG", "SLEEP", "2"], ["CLIENT", "PAUSE", "2000"], ["MONITOR"],
                        ["WAIT", "1", "0"], ["SORT", prefix + "k"], ["LCS", prefix + "a", prefix + "b"],
                        ["SCRIPT", "KILL"]):
            assert _redis_call(redis.port, user, password, *harmful).startswith(b"-NOPERM"), harmful
        started = time.monotonic()
        assert _redis_call(redis.port, neighbour[0], neighbour[2], "PING") == b"+PONG"
        assert time.monotonic() - started < 1.0
        # The tenant's ordinary commands still work.
        assert _redis_call(redis.port, user, password, "SET", prefix + "k", "v") == b"+OK"

        # Without the defence: the rule users had before lets the script run, and it holds the
        # server for everyone; neither the tenant nor the admin can stop it, only SHUTDOWN NOSAVE.
        old_user, old_prefix, old_password = _tenant("old")
        redis.user(_ACL_WITH_SCRIPTS.format(user=old_user, prefix=old_prefix, password=old_password).encode())
        runaway = socket.create_connection(("127.0.0.1", redis.port), timeout=5)
        runaway.sendall(f"AUTH {old_user} {old_password}\r\n".encode())
        assert runaway.makefile("rb").readline() == b"+OK\r\n"
        script = f"redis.call('SET', KEYS[1], 1) {_RUNAWAY}"
        runaway.sendall(b"*4\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n$1\r\n1\r\n$%d\r\n%s\r\n"
                        % (len(script), script.encode(), len(old_prefix) + 1, (old_prefix + "k").encode()))
        time.sleep(0.3)
        busy = _redis_call(redis.port, neighbour[0], neighbour[2], "PING")
        assert busy.startswith(b"-BUSY"), busy
        assert _redis_call(redis.port, old_user, old_password, "SCRIPT", "KILL").startswith(b"-NOPERM")
        assert redis.admin("SCRIPT", "KILL").startswith(b"UNKILLABLE")
        redis.shutdown()
        assert redis.proc.returncode is not None
    finally:
        if runaway is not None:
            runaway.close()
        redis.shutdown()


def test_verify_warns_of_a_shared_redis_whose_default_user_needs_no_password(tmp_path):
    """Read from a real server's ACL LIST, as verify gathers it: an open `default` user is a
    warning (verify still passes: it is the server's set-up, not drift), and a tenant user made
    with the old rule, which still allows scripts, is a finding repair fixes."""
    from controller.environments import verify
    redis = _PrivateRedis(tmp_path / "redis")
    try:
        redis.user(operations.redis_create_user(*_tenant("shop")))
        old_user, old_prefix, old_password = _tenant("old")
        redis.user(_ACL_WITH_SCRIPTS.format(user=old_user, prefix=old_prefix, password=old_password).encode())
        inspect = f"redis-cli -p {redis.port} ACL LIST | sed -E 's/ [#>][^ ]*//g'"  # as verify runs it

        def gathered() -> verify.Facts:
            facts = verify.Facts()
            verify.read_acl_list(subprocess.run(["sh", "-c", inspect], capture_output=True, text=True,
                                                check=True).stdout, facts)
            return facts
        facts = gathered()
        assert facts.redis_users == {"auto-shop-prod-web-1": "~auto-shop-prod-web-1:*",
                                     old_user: f"~{old_prefix}*"}
        assert facts.redis_scripting == {old_user}
        assert verify.warnings(facts) == [
            "redis: the default user needs no password: any tenant can log in as it and bypass the ACL "
            "namespaces (see deploy/redis-acl.md)"]

        # Closed as deploy/redis-acl.md says: no warning any more.
        assert redis.admin(stdin=b"ACL SETUSER admin on >admin-password ~* &* +@all\n") == b"OK"
        assert redis.admin(stdin=b"ACL SETUSER default off\n") == b"OK"
        inspect = f"redis-cli -p {redis.port} --user admin --pass admin-password --no-auth-warning ACL LIST " \
                  "| sed -E 's/ [#>][^ ]*//g'"
        assert gathered().redis_default_open is False and verify.warnings(gathered()) == []
        assert redis.admin("--user", "admin", "--pass", "admin-password", "--no-auth-warning",
                           stdin=b"ACL SETUSER default on\n") == b"OK"  # so that it can be shut down
    finally:
        redis.shutdown()


def test_a_warning_is_shown_but_does_not_make_verify_fail(capsys):
    import json as json_mod
    from types import SimpleNamespace
    from deployctl import cli

    class Stub:
        def FollowJob(self, ref):
            events = [{"event": "warning", "line": "redis: the default user needs no password: …"},
                      {"event": "job.finished", "state": "succeeded", "summary": "no drift"}]
            return [SimpleNamespace(json=json_mod.dumps(e)) for e in events]
    counts: dict = {}
    assert cli.follow_job(Stub(), "job-1", verbose=False, counts=counts) == cli.EXIT_OK
    assert counts == {}  # so `deployctl verify` exits 0, and `make demo` passes
    assert "warning: redis: the default user needs no password" in capsys.readouterr().err


# ---------------------------------------------------------------- 7. acknowledged output is kept

import time

import pytest

from tests.fault_harness import Tmpfs, can_mount_tmpfs
from tests.harness import Cluster, wait_for

# Prints a part, waits for a file, prints the next part, and so on: the test fills the controller's
# disk between parts. Lines are numbered, so a lost or shifted byte shows.
_PARTS = ("import os, sys, time\n"
          "def part(n, lines):\n"
          "    sys.stdout.write(''.join(f'{n}:{i:06d} ' + 'o' * 90 + '\\n' for i in range(lines)))\n"
          "    sys.stdout.flush()\n"
          "def wait(path):\n"
          "    while not os.path.exists(path): time.sleep(0.02)\n"
          "part(1, 2000)\n"
          "wait(sys.argv[1]); part(2, 20000)\n"
          "open(sys.argv[2], 'w').close()\n"
          "wait(sys.argv[3]); part(3, 2000)\n")


def _parts(*sizes: tuple[int, int]) -> bytes:
    return "".join(f"{n}:{i:06d} " + "o" * 90 + "\n" for n, lines in sizes for i in range(lines)).encode()


def test_output_the_controllers_full_disk_refused_is_sent_again_and_whole(tmp_path):
    """The controller's whole store is a small disk that fills while a command prints 2 MB: the
    bytes its disk does not take are never acknowledged, the agent keeps them and sends them again
    once there is room, and the output is whole, byte for byte. (Before, the controller ignored a
    short write: it acknowledged bytes it never wrote, and every later offset was shifted.)"""
    if not can_mount_tmpfs(tmp_path):
        pytest.skip("needs root to mount a small tmpfs")
    disk = Tmpfs(tmp_path / "store", "16m").mount()
    cluster = Cluster(tmp_path)
    try:
        cluster.controller.start()
        cluster.add_agent("computing-1")
        cluster.wait_connected("computing-1")
        go, printed, go2 = tmp_path / "go", tmp_path / "printed", tmp_path / "go2"
        cli = cluster.deployctl_bg("exec", "--agent", "computing-1", "--", "python3", "-c", _PARTS,
                                   str(go), str(printed), str(go2))
        first = _parts((1, 2000))
        op_id = wait_for(lambda: [o for o in cluster.op_ids()
                                   if len(cluster.output(o)) >= len(first)], what="part 1 received")[0]
        disk.fill()
        go.touch()
        wait_for(lambda: cluster.controller.events("op.output_refused"), what="the controller refusing")
        wait_for(printed.exists, what="part 2 printed")
        time.sleep(3)  # a few rounds of the agent sending again into a disk still full
        held = len(cluster.output(op_id))
        assert len(first) <= held < len(first) + len(_parts((2, 20000)))
        (disk.path / "filler").unlink()
        go2.touch()
        record = cluster.wait_finished(op_id, timeout=60)
        assert record["result"]["outcome"] == "exited" and record["result"]["exit_code"] == 0, record
        assert record["result"]["error"] == ""
        expected = _parts((1, 2000), (2, 20000), (3, 2000))
        assert cluster.output(op_id) == expected
        out, err = cli.communicate(timeout=60)
        assert cli.returncode == 0, err
        assert out.replace(b"computing-1 | ", b"") == expected
        assert b"computing-1: the controller cannot write the output in " in err, err
        refused = cluster.controller.events("op.output_refused")
        assert len(refused) == 1 and refused[0]["error"] == "No space left on device", refused
        assert cluster.controller.events("op.output_kept_again")
        assert not cluster.controller.events("op.output_gap")
        assert not cluster.controller.events("op.output_incomplete")
        print(f"held {held} of {len(expected)} bytes while the disk was full; sessions: "
              f"{len(cluster.controller.events('agent.connected'))}")
    finally:
        cluster.close()
        disk.unmount()



def test_a_result_the_full_disk_refused_is_asked_for_again(tmp_path, monkeypatch):
    """In-process: the store cannot record a result (its database is full) — the agent is asked
    to send it again instead of the session ending, and the result is taken when it comes back."""
    import asyncio
    import sqlite3

    from controller.state.db import Database
    from controller.state.ledger import Ledger
    from controller.fleet.dispatcher import Dispatcher
    from controller.fleet.registry import Registry
    from protos import deployer_pb2 as pb

    async def scenario() -> None:
        db = Database(tmp_path / "deployer.db")
        registry = Registry(db, 60)
        dispatcher = Dispatcher(db, registry, tmp_path, Ledger(db))
        session = registry.attach(pb.Hello(agent_id="web-1", roles=["computing"]), "test")
        op = dispatcher.submit("web-1", pb.Operation(id="op-20260101T000000-00000001",
                                                     exec=pb.ExecSpec(argv=["echo", "hi"])))
        dispatcher.on_output(session, pb.OutputChunk(op_id=op.id, offset=0, stream=pb.STDOUT, data=b"hi\n"))
        result = pb.OperationResult(op_id=op.id, outcome=pb.EXITED, output_bytes=3)
        full = sqlite3.OperationalError("database or disk is full")
        monkeypatch.setattr(db, "finish", lambda *a: (_ for _ in ()).throw(full))
        await dispatcher.on_result(session, result)
        acks = [m.ack for m in drain(session) if m.WhichOneof("msg") == "ack"]
        assert [(a.offset, a.resend, a.result) for a in acks] == [(3, True, False)]  # the output is safe: only the result again
        assert not op.finished and "database or disk is full" in op.note
        monkeypatch.undo()
        await dispatcher.on_result(session, result)
        acks = [m.ack for m in drain(session) if m.WhichOneof("msg") == "ack"]
        assert [(a.offset, a.resend, a.result) for a in acks] == [(3, False, True)]
        assert op.finished and db.operation(op.id).state == "finished"
        dispatcher.close()

    def drain(session) -> list:
        out = []
        while not session.outbox.empty():
            out.append(session.outbox.get_nowait())
        return out

    asyncio.run(scenario())

# ---------------------------------------------------------------- 8. least knowledge

import asyncio
import subprocess
import sys

import pytest

from controller.state import knowledge
from controller.fleet import operations as fleet_ops
from controller.state.db import Database
from controller.fleet.dispatcher import Dispatcher
from controller.state.ledger import Ledger
from controller.state.jobs import Job
from controller.state.knowledge import EnvFacts, Kind, Scope
from controller.environments import data, routing
from controller.environments.context import JobContext
from controller.environments.data import Deployment
from controller.fleet.registry import Registry
from controller.environments.spec import spec_from_dict
from protos import deployer_pb2 as pb
from tests.harness import ROOT, Cluster, wait_for

SHOP = EnvFacts(secrets=frozenset({"shop-token", "shop-token-before"}),
                passwords={("web", "mysql", 1): "shop-mysql-1", ("web", "redis", 2): "shop-redis-2"},
                hosts={("web", "code", 3): "web-1", ("web", "mysql", 1): "db-1", ("web", "redis", 2): "db-2"})
BLOG = EnvFacts(secrets=frozenset({"blog-token"}), passwords={("api", "redis", 1): "blog-redis-1"},
                hosts={("api", "code", 1): "web-2", ("api", "redis", 1): "db-1"})
FACTS = {"shop/prod": SHOP, "blog/prod": BLOG}


@pytest.mark.parametrize("scope, agent, expected", [
    (Scope.tenant("shop/prod"), "web-1",
     ["shop-mysql-1", "shop-redis-2", "shop-token", "shop-token-before"]),
    (Scope.route("shop/prod"), "router-1", []),
    (Scope.data("shop/prod", ("web", "redis", 2)), "db-2", ["shop-redis-2"]),
    (Scope.data("shop/prod"), "db-1", []),                     # a drop or an inspection sets none
    (Scope.agent(), "web-1", ["shop-mysql-1", "shop-redis-2", "shop-token", "shop-token-before"]),
    (Scope.agent(), "db-1", ["blog-redis-1", "shop-mysql-1"]),  # data only: its passwords, no secret
    (Scope.agent(), "web-3", []),
], ids=["tenant", "route", "data-create", "data-drop", "agent-code", "agent-data", "agent-empty"])
def test_an_operation_carries_only_the_secrets_its_kind_may_reveal(scope, agent, expected):
    relevant = {k: v for k, v in FACTS.items() if agent in v.hosts.values()} if scope.kind is Kind.AGENT else FACTS
    assert knowledge.values(scope, agent, relevant) == expected


@pytest.mark.parametrize("scope", [Scope.tenant("shop/prod"), Scope.route("shop/prod"), Scope.agent(),
                                   Scope.data("shop/prod"), Scope.data("shop/prod", ("web", "redis", 2),
                                                                       ("web", "mysql", 1))])
def test_a_scope_is_kept_with_its_operation_and_read_back_the_same(scope):
    assert Scope.decode(scope.encode()) == scope
    assert Scope.decode("shop/prod") == Scope.tenant("shop/prod")  # rows from before kinds
    assert Scope.decode(None) == Scope.agent()


class _Wire:
    """A controller's dispatcher and a job's runner in-process, with agents whose sessions record
    every operation as it leaves (with its redact list) and answer it at once with success."""

    def __init__(self, base) -> None:
        self.db = Database(base / "deployer.db")
        self.registry = Registry(self.db, 60)
        self.ledger = Ledger(self.db)
        self.dispatcher = Dispatcher(self.db, self.registry, base, self.ledger)
        self.sent: list[tuple[str, pb.Operation]] = []
        self.base = base

    def connect(self, agent_id: str, **settings: str) -> None:
        capabilities = sorted({key.split(".")[0] for key in settings})
        self.registry.grant(agent_id, capabilities, "")  # as the operator would, at enrolment
        session = self.registry.attach(pb.Hello(agent_id=agent_id, roles=["computing"], capabilities=capabilities,
                                                settings=settings, services_root=str(self.base / "srv")), "test")
        original = session.send

        def send(message: pb.ControllerMessage) -> None:
            original(message)
            if message.WhichOneof("msg") == "operation":
                self.sent.append((agent_id, message.operation))
                asyncio.get_running_loop().create_task(self.dispatcher.on_result(session, pb.OperationResult(
                    op_id=message.operation.id, outcome=pb.EXITED)))
        session.send = send

    def context(self, spec: dict) -> JobContext:
        job = Job(self.base, self.db, f"job-{len(self.sent)}-{id(spec)}", f"{spec['app']}/{spec['environment']}", "apply")
        return JobContext(job, spec_from_dict(spec), self.dispatcher, self.registry, self.ledger)

    def carried(self) -> list[tuple[str, list[str]]]:
        out = [(agent, sorted(op.redact)) for agent, op in self.sent]
        self.sent.clear()
        return out


def _shop_spec() -> dict:
    return {"version": 1, "app": "shop", "environment": "prod", "domain": "shop.test",
            "services": {"web": {"path": "/", "source": "/nowhere.git", "ref": "main", "start": "node server.js",
                                 "health": "/health", "uses": ["redis"], "secrets": ["SHOP_TOKEN"]}}}


def test_each_kind_of_operation_leaves_with_exactly_its_secrets(tmp_path):
    """Through the real procedures and dispatcher, captured as the operations leave for the agent."""
    async def scenario() -> None:
        wire = _Wire(tmp_path)
        wire.connect("web-1")
        wire.connect("router-1", **{"nginx.conf_dir": str(tmp_path / "nginx")})
        wire.connect("db-1", **{"redis.port": "6379"})
        ledger = wire.ledger
        ledger.set_secret("shop/prod", "SHOP_TOKEN", "shop-token-value")
        ledger.set_secret("blog/prod", "BLOG_TOKEN", "blog-token-value")
        ledger.add_instance("blog/prod", "api", "code", 1, host="web-1", status="live")
        ledger.add_instance("blog/prod", "api", "redis", 1, host="db-1", status="live")
        ledger.save_password("blog/prod", "api", "redis", 1, "blog-redis-password")
        ledger.add_instance("shop/prod", "web", "code", 1, host="web-1", port=20001, status="live")
        ctx = wire.context(_shop_spec())
        d = Deployment(ctx.spec.service("web"), wire.registry.agents["web-1"], str(tmp_path / "srv/x"))

        # data: creating the Redis user carries the password it sets, and nothing else.
        values = await data.redis(ctx, d, {"redis": 1}, True)
        password = ledger.password("shop/prod", "web", "redis", 1)
        assert values["REDIS_URL"].endswith(f":{password}@127.0.0.1:6379")
        assert wire.carried() == [("db-1", [password])]
        # tenant: a step that runs the environment's code carries its secrets and passwords.
        await ctx.sh(d.host, "npm ci", "web", "install")
        assert wire.carried() == [("web-1", sorted(["shop-token-value", password]))]
        # route: writing and switching the route carries none.
        await routing.switch_route(ctx, "web")
        assert wire.carried() == [("router-1", []), ("router-1", [])]
        # agent: an operator's exec carries the secrets of environments whose code is there, and
        # of those with only data there, the passwords of that data.
        await wire.dispatcher.execute("db-1", fleet_ops.exec_op(fleet_ops.new_op_id(), ["true"]))
        assert wire.carried() == [("db-1", sorted(["blog-redis-password", password]))]
        await wire.dispatcher.execute("web-1", fleet_ops.exec_op(fleet_ops.new_op_id(), ["true"]))
        assert wire.carried() == [("web-1", sorted(["blog-token-value", "blog-redis-password",
                                                     "shop-token-value", password]))]
        # Sent again after a controller restart, an operation keeps its kind: the store keeps the
        # scope, never the list.
        route = pb.Operation(id=fleet_ops.new_op_id(), write_file=pb.WriteFileSpec(path="/x", content=b"x"))
        tenant = fleet_ops.exec_op(fleet_ops.new_op_id(), ["true"])
        wire.dispatcher.submit("router-2", route, scope=Scope.route("shop/prod"))
        wire.dispatcher.submit("router-2", tenant, environment="shop/prod")
        assert b"shop-token-value" not in (tmp_path / "deployer.db").read_bytes()
        wire.dispatcher.close()
        wire.dispatcher = Dispatcher(wire.db, wire.registry, tmp_path, wire.ledger)
        wire.connect("router-2")
        wire.dispatcher.on_hello(wire.registry.session("router-2"), pb.Hello(agent_id="router-2"))
        assert wire.carried() == [("router-2", []), ("router-2", sorted(["shop-token-value", password]))]
        wire.dispatcher.close()

    asyncio.run(scenario())



def _journal(agent) -> list[pb.Operation]:
    """The operations an agent holds in its journal with their payload (finished ones are cut
    down to their id once the controller has their result)."""
    out = []
    for accepted in (agent.state_dir / "operations").glob("*/accepted"):
        operation = pb.Operation()
        try:
            operation.ParseFromString(accepted.read_bytes())
        except Exception:  # noqa: BLE001 (being replaced at this instant: read it next time)
            continue
        if operation.WhichOneof("kind"):
            out.append(operation)
    return out


def test_a_route_switch_reaches_the_router_without_any_secret(tmp_path):
    """A real deploy, held while nginx reloads: the route switch the router holds in its journal
    carries no secret, while an operator's exec on the same agent, where the code is, carries the
    environment's secret and passwords."""
    import secrets as secrets_mod
    import shutil
    import sqlite3

    from controller.state.vault import Vault
    from tests.deploy_harness import Nginx, example_repo, purge, service_users_base, unique_env
    from tests.test_deploy import web_service, write_spec

    base = service_users_base("deployer-knowledge-")
    gate = base / "gate"
    nginx = Nginx(base).start()
    cluster = Cluster(base)
    env = unique_env()
    try:
        cluster.controller.start()
        held = f"sh -c 'while [ ! -e {gate} ]; do sleep 0.05; done; {nginx.base_cmd} -s reload'"
        agent = cluster.add_agent("computing-1", ["computing"], provides={
            **nginx.settings(), "nginx.reload": held, "mysql.host": "127.0.0.1", "mysql.port": "3306",
            "redis.host": "127.0.0.1", "redis.port": "6379"})
        cluster.wait_connected("computing-1")
        token = "tok-" + secrets_mod.token_urlsafe(18)
        set_secret = subprocess.run([sys.executable, "-m", "deployctl.cli", "secret", "set", f"shop/{env}",
                                     "SHOP_TOKEN"], input=token.encode(), capture_output=True, env=cluster.env(),
                                    cwd=ROOT)
        assert set_secret.returncode == 0, set_secret.stderr
        spec = write_spec(tmp_path, env, {"web": web_service(example_repo(base), secrets=["SHOP_TOKEN"])})
        apply = cluster.deployctl_bg("apply", str(spec))

        def switching() -> list[pb.Operation]:
            return [op for op in _journal(agent) if "nginx rejected the new configuration" in "".join(op.exec.argv)]
        switch = wait_for(switching, timeout=600, every=0.2, what="the route switch held by its reload")[0]
        adhoc = cluster.deployctl_bg("exec", "--agent", "computing-1", "--", "sh", "-c",
                                     f"while [ ! -e {gate} ]; do sleep 0.05; done")
        operator = wait_for(lambda: [op for op in _journal(agent) if op.exec.argv[:1] == ["sh"]
                                     and op.exec.argv[-1].startswith("while [ ! -e")], what="the exec held")[0]
        vault = Vault.for_store(cluster.controller.store / "secrets.key", create=False)
        with sqlite3.connect(f"file:{cluster.controller.store / 'deployer.db'}?mode=ro", uri=True) as db:
            passwords = [vault.open_text(row[0]) for row in
                         db.execute("SELECT password FROM credentials WHERE env_key=?", (f"shop/{env}",))]
        assert len(passwords) == 2  # mysql 1 and redis 1
        assert list(switch.redact) == []
        assert sorted(operator.redact) == sorted([token, *passwords])
        gate.touch()
        out, err = apply.communicate(timeout=120)
        assert apply.returncode == 0, out.decode() + err.decode()
        assert adhoc.wait(60) == 0
    finally:
        gate.touch()
        cluster.close()
        nginx.stop()
        purge("shop", env)
        shutil.rmtree(base, ignore_errors=True)

# ---------------------------------------------------------------- 9. one owner per port
import subprocess

from tests.harness import PY, ROOT, Cluster, free_port, free_port_pair, wait_for


def test_a_second_controller_on_a_taken_port_exits_and_the_first_keeps_its_agents(tmp_path):
    """Before, gRPC's SO_REUSEPORT let the second bind the agent port too, and the kernel shared
    the agents' connections between two CAs (tests/test_grants.py shows the bind succeeding
    without the option)."""
    operator_port = free_port()
    (tmp_path / "first").mkdir()
    first = Cluster(tmp_path / "first")
    first.controller.extra_args = ("--operator-listen", f"127.0.0.1:{operator_port}")
    try:
        first.controller.start()
        for agent_id in ("computing-1", "computing-2"):
            first.add_agent(agent_id)
        first.wait_connected("computing-1", "computing-2")
        connected = len(first.controller.events("agent.connected"))
        c = first.controller
        attempts = [
            (lambda: ["--listen", c.address], f"agents on {c.address}"),
            (lambda: ["--listen", f"127.0.0.1:{free_port_pair()}", "--enroll-listen", c.enroll_address],
             f"enrolment on {c.enroll_address}"),
            (lambda: ["--listen", f"127.0.0.1:{free_port_pair()}", "--operator-listen", f"127.0.0.1:{operator_port}"],
             f"operators on 127.0.0.1:{operator_port}"),
            (lambda: ["--listen", f"localhost:{c.port}"], f"127.0.0.1:{c.port} is already taken"),
            (lambda: ["--listen", f"127.0.0.1:{free_port_pair()}", "--socket", str(c.socket)],
             f"the operator socket {c.socket} is served by another process"),
        ]
        for number, (args, named) in enumerate(attempts):
            for again in range(5):
                second = tmp_path / f"second-{number}-{again}"
                second.mkdir()
                done = subprocess.run([PY, "-m", "controller.daemon", "--store", str(second / "store"),
                                       "--log-file", str(second / "controller.log"), *args()],
                                      cwd=ROOT, capture_output=True, text=True, timeout=60)
                # A port found free a moment ago may be taken by then by someone else on this
                # shared machine (a test run beside this one): that attempt says nothing; try again.
                if named in done.stderr or "is already taken" not in done.stderr:
                    break
            assert done.returncode == 2, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and named in lines[0], done.stderr
            assert "taken" in lines[0] or "served by another process" in lines[0]

        # The first still serves: its socket answers, its agents are connected and run work, and an
        # agent that dials again lands on it.
        assert c.socket.exists() and c.proc.poll() is None
        first.wait_connected("computing-1", "computing-2")
        first.agents["computing-2"].stop()
        first.agents["computing-2"].start()
        wait_for(lambda: len(c.events("agent.connected")) > connected, 30, what="computing-2 back on the first")
        first.wait_connected("computing-1", "computing-2")
        done = first.deployctl("exec", "--all", "--", "echo", "still-here")
        assert done.returncode == 0 and done.stdout.count(b"still-here") == 2, done.stderr
    finally:
        first.close()


# ---------------------------------------------------------------- 13. kept releases (decision 033)
# A tenant's next release, or any process of its environment, tries to change the release a
# rollback would run; and a tenant looks for another environment's files through the sharing.
import os as _rel_os  # noqa: E402

from controller.environments.naming import unix_user as _rel_user  # noqa: E402


def _rel_as(user: str, script: str) -> _own_subprocess.CompletedProcess:
    return _own_subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "sh", "-c", script],
                               capture_output=True, text=True)


def test_a_next_install_cannot_change_the_kept_release_and_nothing_is_shared_between_environments(owned_world,
                                                                                                    tmp_path):
    cluster, repo = owned_world["cluster"], owned_world["repo"]
    env, other = _own_env(), _own_env()
    owned_world["envs"] += [env, other]
    first = cluster.deployctl("apply", _own_spec(owned_world, tmp_path, env), timeout=600)
    assert first.returncode == 0, first.stderr.decode()
    root = cluster.agents["computing-1"].services_root
    kept = root / f"auto-shop-{env}-web" / "releases" / "1"
    before = _tree(kept)
    # Release 2's install (the tenant's own command, as its user, in releases/2/web) attacks release 1.
    _own_commit(repo, "v2")
    attack = ("for f in $(find ../../1 -type f | head -200); do echo pwned >> \"$f\" 2>/dev/null; done; "
              "rm -rf ../../1/web/node_modules 2>/dev/null; mv ../../1/web/server.js ../../1/web/x 2>/dev/null; "
              "ln -sf /etc/passwd ../../1/web/evil 2>/dev/null; chmod -R a+w ../../1 2>/dev/null; " + _OWN_INSTALL)
    second = cluster.deployctl("apply", _own_spec(owned_world, tmp_path, env, install=attack), timeout=600)
    assert second.returncode == 0, second.stderr.decode()
    # Every name, mode, owner and byte of the rollback target as it was; only its .env, the user's
    # own and rewritten at every start of the release, is left out.
    def code(tree):
        return [entry for entry in tree if not entry[0].startswith(".env")]
    assert code(_tree(kept)) == code(before)
    # ... and the two releases share their dependencies' files: one inode, which nobody can write.
    module = next(p for p in (kept / "web" / "node_modules").rglob("*.js") if p.stat().st_size >= 4096)
    twin = root / f"auto-shop-{env}-web" / "releases" / "2" / module.relative_to(kept)
    assert module.stat().st_ino == twin.stat().st_ino and module.stat().st_uid == 0
    user = _rel_user("shop", env)
    assert _rel_as(user, f"cat {module} > /dev/null").returncode == 0
    assert _rel_as(user, f"echo pwned >> {twin}").returncode != 0
    # Another environment deploying the same code shares nothing with this one, and this tenant
    # cannot read that environment's release.
    third = cluster.deployctl("apply", _own_spec(owned_world, tmp_path, other), timeout=600)
    assert third.returncode == 0, third.stderr.decode()
    theirs = root / f"auto-shop-{other}-web" / "releases" / "1" / module.relative_to(kept)
    assert theirs.read_bytes() == module.read_bytes() and theirs.stat().st_ino != module.stat().st_ino
    assert _rel_as(user, f"cat {theirs}").returncode != 0
    rolled = cluster.deployctl("rollback", f"shop/{env}/web", "--to", "1", timeout=600)
    assert rolled.returncode == 0, rolled.stderr.decode()
    assert _own_get(owned_world["nginx"].port, "/health", f"{env}.shop.test")[0] == 200
    # The rollback ran the release as it was deployed (only its .env was written anew).
    assert code(_tree(kept)) == code(before) and _rel_os.path.isdir(kept / "web" / "node_modules")
