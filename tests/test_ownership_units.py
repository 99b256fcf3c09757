"""Ownership builders against the real thing: guarded creates leave a taken name untouched, and
identity-checked drops remove only what carries the recorded mark or password."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from controller.environments import ownership
from controller.environments.verify import Facts, foreign
from controller.environments.spec import spec_from_dict
from tests.deploy_harness import mysql, purge_names, redis

OWNER = "ownerAAAAAAAAAAAAAAAAA"
OTHER = "ownerBBBBBBBBBBBBBBBBB"


def sh(script: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], input=stdin, capture_output=True)


@pytest.fixture
def names():
    """Names of our own under auto-, removed at the end whatever happened."""
    tag = "auto-own" + secrets.token_hex(3)
    yield {"database": f"{tag}-web-1", "user": f"{tag}-web-1", "tag": tag}
    purge_names(tag)


def test_marks_name_their_owner():
    assert ownership.marked_by(ownership.instance_mark(OWNER, "n1")) == OWNER
    assert ownership.marked_by(ownership.owner_mark(OWNER)) == OWNER
    assert ownership.marked_by("") is None and ownership.marked_by("made by hand") is None
    assert ownership.owner_id("x" * 43) == "x" * ownership.OWNER_LENGTH


def test_a_taken_database_is_left_byte_for_byte_and_only_the_marked_one_is_dropped(names):
    from controller.environments import commands as ops
    db, user = names["database"], names["user"]
    create = ownership.mysql_create_guarded("mariadb --batch", db, user)
    mark = ownership.instance_mark(OWNER, "n1")
    made = sh(create, ops.mysql_create(db, user, "pw-one-123456", mark=mark))
    assert made.returncode == 0, made.stderr
    mysql(f"CREATE TABLE `{db}`.t (v TEXT); INSERT INTO `{db}`.t VALUES ('kept')")
    before = mysql(f"CHECKSUM TABLE `{db}`.t; SELECT User, authentication_string FROM mysql.user WHERE User='{user}'")

    again = sh(create, ops.mysql_create(db, user, "pw-two-123456", mark=ownership.instance_mark(OWNER, "n2")))
    assert again.returncode == ownership.TAKEN
    assert f"database {db} exists and is not this deployer's: left untouched" in again.stderr.decode()
    assert f"MariaDB user {user} exists" in again.stderr.decode()

    # Another creation's mark, another password: nothing goes.
    drop = sh("mariadb --batch", ownership.mysql_drop_owned(db, ownership.instance_mark(OWNER, "n2"), user,
                                                             "pw-two-123456"))
    assert drop.returncode == 0, drop.stderr
    assert b"not this deployer's: left untouched" in drop.stdout
    assert mysql(f"CHECKSUM TABLE `{db}`.t; SELECT User, authentication_string FROM mysql.user "
                 f"WHERE User='{user}'") == before

    drop = sh("mariadb --batch", ownership.mysql_drop_owned(db, mark, user, "pw-one-123456"))
    assert drop.returncode == 0, drop.stderr
    assert f"database {db}: dropped".encode() in drop.stdout and f"MariaDB user {user}: dropped".encode() in drop.stdout
    assert mysql(f"SHOW DATABASES LIKE '{db}'") == "" and mysql(f"SELECT User FROM mysql.user WHERE User='{user}'") == ""


def test_an_unmarked_database_is_never_dropped(names):
    db = names["database"]
    mysql(f"CREATE DATABASE `{db}`")
    drop = sh("mariadb --batch", ownership.mysql_drop_owned(db, "", names["user"], "x"))
    assert drop.returncode == 0 and b"left untouched" in drop.stdout
    assert mysql(f"SHOW DATABASES LIKE '{db}'").strip() == db


def test_a_taken_redis_user_is_left_and_only_the_recorded_password_deletes_it(names):
    from controller.environments import commands as ops
    from controller.environments.commands import redis_admin

    user = names["user"]
    create = ownership.redis_create_guard("redis-cli", user) + redis_admin("redis-cli")
    made = sh(create, ops.redis_create_user(user, user + ":", "pw-one-123456"))
    assert made.returncode == 0, made.stderr
    before = redis("ACL", "GETUSER", user)
    again = sh(create, ops.redis_create_user(user, user + ":", "pw-two-123456"))
    assert again.returncode == ownership.TAKEN
    assert f"Redis ACL user {user} exists and is not this deployer's: left untouched" in again.stderr.decode()
    drop = sh(ownership.redis_drop_owned("redis-cli", user), ownership.redis_drop_stdin("pw-two-123456"))
    assert drop.returncode == 0 and b"left untouched" in drop.stdout
    assert redis("ACL", "GETUSER", user) == before
    drop = sh(ownership.redis_drop_owned("redis-cli", user), ownership.redis_drop_stdin("pw-one-123456"))
    assert drop.returncode == 0 and b"dropped" in drop.stdout, drop.stderr
    assert redis("ACL", "GETUSER", user).strip() == ""
    # the hash came on standard input, never in the script
    assert ownership.redis_password_hash("pw-one-123456") not in ownership.redis_drop_owned("redis-cli", user)


def tree(folder: Path) -> list[tuple[str, int, bytes]]:
    return sorted((str(p.relative_to(folder)), p.lstat().st_mode, p.read_bytes() if p.is_file() else b"")
                  for p in [folder, *folder.rglob("*")])


def test_service_folders_are_claimed_only_when_absent_or_ours(tmp_path):
    folder = tmp_path / "srv" / "auto-shop-x-web"
    assert sh(ownership.claim_service_folder(str(folder), OWNER, legacy=False)).returncode == 0
    assert (folder / ownership.FOLDER_MARK).read_text() == f"deployer {OWNER}\n"
    assert sh(ownership.claim_service_folder(str(folder), OWNER, legacy=False)).returncode == 0
    refused = sh(ownership.claim_service_folder(str(folder), OTHER, legacy=True))
    assert refused.returncode == ownership.TAKEN and b"left untouched" in refused.stderr

    foreign_folder = tmp_path / "srv" / "auto-shop-x-api"
    (foreign_folder / "releases" / "1").mkdir(parents=True)
    (foreign_folder / "releases" / "1" / "data").write_text("theirs")
    before = tree(foreign_folder)
    assert sh(ownership.claim_service_folder(str(foreign_folder), OWNER, legacy=False)).returncode == ownership.TAKEN
    gone = sh(ownership.if_folder_ours(str(foreign_folder), OWNER, 'rm -rf -- "$d"'))
    assert gone.returncode == 0 and b"left untouched" in gone.stdout
    assert tree(foreign_folder) == before
    # made before folders had marks, and the ledger says we ran there: given the mark
    assert sh(ownership.claim_service_folder(str(foreign_folder), OWNER, legacy=True)).returncode == 0
    assert sh(ownership.if_folder_ours(str(foreign_folder), OWNER, 'rm -rf -- "$d"')).returncode == 0
    assert not foreign_folder.exists()


def test_an_existing_release_folder_is_taken(tmp_path):
    release = tmp_path / "releases" / "1"
    assert sh(ownership.absent(str(release)) + "echo go").stdout == b"go\n"
    release.mkdir(parents=True)
    taken = sh(ownership.absent(str(release)) + "rm -rf " + str(release))
    assert taken.returncode == ownership.TAKEN and release.exists()


def test_a_destroy_keeps_only_a_services_redis_data_and_a_purge_takes_the_empty_folder(tmp_path):
    from controller.environments import commands as ops
    folder = tmp_path / "auto-shop-x-web"
    for part in ("releases/1/.env", "logs/1.log", "data/redis-1/appendonly.aof"):
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        (folder / part).write_text("x")
    (folder / ownership.FOLDER_MARK).write_text(ownership.owner_mark(OWNER) + "\n")
    keep = sh(ownership.if_folder_ours(str(folder), OWNER, ops.remove_all_but_data()))
    assert keep.returncode == 0, keep.stderr
    assert [name for name, _, _ in tree(folder)] == [".", ownership.FOLDER_MARK, "data", "data/redis-1",
                                                     "data/redis-1/appendonly.aof"]
    assert (folder.stat().st_uid, folder.stat().st_mode & 0o777) == (0, 0o700)  # its user can go
    # Nothing but an empty data folder: a purge's last step removes the folder; otherwise it stays.
    assert sh(ownership.if_folder_ours(str(folder), OWNER, ops.remove_if_only_data())).returncode == 0
    assert folder.exists()
    (folder / "data" / "redis-1" / "appendonly.aof").unlink()
    (folder / "data" / "redis-1").rmdir()
    assert sh(ownership.if_folder_ours(str(folder), OWNER, ops.remove_if_only_data())).returncode == 0
    assert not folder.exists()
    # Without data, a destroy removes it whole.
    (folder / "releases").mkdir(parents=True)
    (folder / ownership.FOLDER_MARK).write_text(ownership.owner_mark(OWNER) + "\n")
    assert sh(ownership.if_folder_ours(str(folder), OWNER, ops.remove_all_but_data())).returncode == 0
    assert not folder.exists()


def test_a_kept_redis_folder_given_to_a_new_user_does_not_hand_over_a_file_it_hard_links(tmp_path):
    """The attack: while it owned its data folder, the tenant hard-linked a file of root's into it
    (on a file system where protected_hardlinks is off, /etc/shadow). When a later deploy gives
    the kept folder to the environment's (new) user, that file must stay root's."""
    import os
    from controller.environments import commands as ops
    folder = tmp_path / "auto-shop-x-web"
    data = folder / "data" / "redis-1"
    data.mkdir(parents=True)
    (data / "appendonly.aof").write_text("the tenant's own data")
    precious = tmp_path / "roots-file"
    precious.write_text("root's")
    os.link(precious, data / "linked")
    (data / "pointer").symlink_to(precious)
    done = sh(ops.redis_server_reown(str(folder), str(data), "daemon"))
    assert done.returncode == 0, done.stderr
    daemon = __import__("pwd").getpwnam("daemon").pw_uid
    assert precious.stat().st_uid == 0                      # neither through the hard link
    assert (data / "pointer").lstat().st_uid == daemon      # nor through the symbolic one
    assert (data / "appendonly.aof").stat().st_uid == daemon and data.stat().st_uid == daemon


def test_route_files_are_rewritten_only_when_ours(tmp_path):
    from controller.environments import commands as ops
    conf = tmp_path / "auto-shop-x.conf"
    write = f"echo new > {conf}"
    assert sh(ownership.route_guard(str(conf), OWNER, "shop/x", False, write)).returncode == 0
    conf.write_bytes(ops.nginx_config("shop/x", "x.test", "80", [], ownership.route_owner_line(OWNER)))
    assert sh(ownership.route_guard(str(conf), OWNER, "shop/x", False, "true")).returncode == 0
    assert sh(ownership.route_guard(str(conf), OTHER, "shop/x", True, write)).returncode == ownership.TAKEN
    legacy = ops.nginx_config("shop/x", "x.test", "80", [])
    conf.write_bytes(legacy)
    assert sh(ownership.route_guard(str(conf), OWNER, "shop/x", False, write)).returncode == ownership.TAKEN
    assert conf.read_bytes() == legacy
    assert sh(ownership.route_guard(str(conf), OWNER, "shop/x", True, write)).returncode == 0


def test_unix_users_without_our_mark_are_refused_and_kept():
    from controller.environments import commands as ops
    user = "auto-own" + secrets.token_hex(3)
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--comment", "someone else", user], check=True)
        before = subprocess.run(["getent", "passwd", user], capture_output=True).stdout
        refused = sh(ownership.unix_user_guard(user, OWNER, legacy=True) + ops.ensure_unix_user(user, "x"))
        assert refused.returncode == ownership.TAKEN
        assert f"Unix user {user} exists and is not this deployer's".encode() in refused.stderr
        kept = sh(ownership.if_unix_user_ours(user, OWNER, f"userdel {user}", legacy=True))
        assert kept.returncode == 0 and b"left untouched" in kept.stdout
        assert subprocess.run(["getent", "passwd", user], capture_output=True).stdout == before
        subprocess.run(["userdel", user], check=True)
        made = sh(ownership.unix_user_guard(user, OWNER, legacy=False)
                  + ops.ensure_unix_user(user, ownership.owner_mark(OWNER)))
        assert made.returncode == 0, made.stderr
        assert f":deployer {OWNER}:".encode() in subprocess.run(["getent", "passwd", user], capture_output=True).stdout
        assert sh(ownership.unix_user_guard(user, OWNER, legacy=False) + "exit 9").returncode == 0
        assert sh(ownership.if_unix_user_ours(user, OWNER, f"userdel {user}")).returncode == 0
        assert subprocess.run(["id", "-u", user], capture_output=True).returncode != 0
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)


def test_foreign_things_are_reported_not_judged():
    spec = spec_from_dict({"app": "shop", "environment": "x", "domain": "x.test", "services": {
        "web": {"path": "/", "source": "/r", "ref": "main", "start": "true", "health": "/"}}})
    facts = Facts(folders={"h": ["/srv/auto-shop-x-web", "/srv/auto-shop-x-api", "/srv/auto-shop-x-old"]},
                  folder_marks={"/srv/auto-shop-x-web": f"deployer {OWNER}", "/srv/auto-shop-x-api": "",
                                "/srv/auto-shop-x-old": f"deployer {OTHER}"},
                  databases={"auto-shop-x-web-1", "auto-shop-x-web-2", "auto-other-y-web-1"},
                  database_marks={"auto-shop-x-web-1": f"deployer {OTHER} n", "auto-shop-x-web-2": f"deployer {OWNER} n"},
                  mysql_users={"auto-shop-x-web-1"}, redis_users={"auto-shop-x-web-1": "~auto-shop-x-web-1:*"})
    claimed = {"folders": {"auto-shop-x-web"}, "databases": {"auto-shop-x-web-2"}, "redis": set(), "nginx": set(),
               "mysql_users": set()}
    assert foreign(spec, OWNER, facts, claimed) == [
        "h: folder /srv/auto-shop-x-api is not this deployer's (no mark): left alone",
        f"h: folder /srv/auto-shop-x-old is not this deployer's (marked by deployer {OTHER}): left alone",
        f"mysql: database auto-shop-x-web-1 is not this deployer's (marked by deployer {OTHER}): left alone",
        "mysql: user auto-shop-x-web-1 is unknown to the ledger: left alone",
        "redis: ACL user auto-shop-x-web-1 is unknown to the ledger: left alone",
    ]


def test_repair_resets_a_redis_user_only_if_its_password_is_the_recorded_one(names):
    from controller.environments import commands as ops
    from controller.environments.commands import redis_admin

    user = names["user"]
    reset = ownership.redis_reset_owned("redis-cli", user) + redis_admin("redis-cli")

    def stdin(password: str) -> bytes:
        return ownership.redis_drop_stdin(password) + ops.redis_create_user(user, user + ":", password)

    assert sh(reset, stdin("pw-one-123456")).returncode == 0  # missing: made again
    redis("ACL", "SETUSER", user, "~elsewhere:*")              # its pattern drifted: reset it
    assert sh(reset, stdin("pw-one-123456")).returncode == 0
    assert f"~{user}:*" in redis("ACL", "GETUSER", user)
    before = redis("ACL", "GETUSER", user)
    taken = sh(reset, stdin("pw-two-123456"))                  # someone else's now: left alone
    assert taken.returncode == ownership.TAKEN and b"left untouched" in taken.stderr
    assert redis("ACL", "GETUSER", user) == before
