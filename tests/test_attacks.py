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


# ---------------------------------------------------------------- 3. agents prove what they provide


# ---------------------------------------------------------------- 4. operators authenticate


# ---------------------------------------------------------------- 5. limits per environment


# ---------------------------------------------------------------- 6. shared Redis stays available


# ---------------------------------------------------------------- 7. acknowledged output is kept


# ---------------------------------------------------------------- 8. least knowledge


# ---------------------------------------------------------------- 9. one owner per port
