"""Secrets sealed in the store, and redact lists that travel with operations but are never stored."""

from __future__ import annotations

import asyncio
import sqlite3
import stat

import pytest

from controller.state import db as db_mod
from controller.state.db import Database
from controller.fleet.dispatcher import Dispatcher
from controller.state.ledger import RETIRED_KEPT, Ledger
from controller.fleet.registry import Registry
from controller.state.vault import VaultError
from protos import deployer_pb2 as pb

SECRET = "declared-secret-Q7vX"
PASSWORD = "generated-password-9kLm"
ENV_FILE = f"SESSION_KEY={SECRET}\nDB_PASSWORD={PASSWORD}\n".encode()


def store_bytes(folder) -> bytes:
    """Every byte of the database, its WAL and anything else in the store."""
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_a_new_store_seals_secrets_and_keeps_its_key_private(tmp_path):
    db = Database(tmp_path / "deployer.db")
    key = tmp_path / "secrets.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ledger = Ledger(db)
    ledger.set_secret("shop/prod", "SESSION_KEY", SECRET)
    ledger.save_password("shop/prod", "web", "mysql", 1, PASSWORD)
    db.insert_operation(pb.Operation(id="op-1", write_file=pb.WriteFileSpec(path="/x/.env", content=ENV_FILE)),
                        "web-1", ["write_file"], str(tmp_path / "ops"), "shop/prod")
    assert ledger.secrets("shop/prod") == {"SESSION_KEY": SECRET}
    assert ledger.password("shop/prod", "web", "mysql", 1) == PASSWORD
    assert db.operation("op-1").spec.write_file.content == ENV_FILE
    for value in (SECRET, PASSWORD):
        assert value.encode() not in store_bytes(tmp_path)
    db.close()
    again = Database(tmp_path / "deployer.db")           # the same key is used again
    assert Ledger(again).secrets("shop/prod") == {"SESSION_KEY": SECRET}


def _old_store(path, version: int) -> None:
    """A database as a controller before sealing left it, with plaintext rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for number, script in enumerate(db_mod.MIGRATIONS[:version], start=1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    conn.execute("INSERT INTO secrets VALUES ('shop/prod', 'SESSION_KEY', ?)", (SECRET,))
    conn.execute("INSERT INTO credentials VALUES ('shop/prod', 'web', 'mysql', 1, ?)", (PASSWORD,))
    op = pb.Operation(id="op-1", write_file=pb.WriteFileSpec(path="/x/.env", content=ENV_FILE))
    conn.execute("INSERT INTO operations (id, agent_id, kind, summary, spec, state, created) "
                 "VALUES ('op-1', 'web-1', 'write_file', '[]', ?, 'sent', 0)", (op.SerializeToString(),))
    conn.close()


def test_the_migration_seals_plaintext_rows_and_leaves_no_copy(tmp_path):
    version = db_mod.SEALED_VERSION - 1
    assert all(isinstance(m, str) for m in db_mod.MIGRATIONS[:version])
    _old_store(tmp_path / "deployer.db", version)
    assert SECRET.encode() in store_bytes(tmp_path)
    db = Database(tmp_path / "deployer.db")
    ledger = Ledger(db)
    assert ledger.secrets("shop/prod") == {"SESSION_KEY": SECRET}
    assert ledger.password("shop/prod", "web", "mysql", 1) == PASSWORD
    assert db.open_operations()[0].spec.write_file.content == ENV_FILE
    for value in (SECRET, PASSWORD):
        assert value.encode() not in store_bytes(tmp_path)


def test_the_migration_leaves_no_copy_of_large_values_either(tmp_path):
    """Values that span overflow pages, which the sealing frees whole: VACUUM rebuilds the file,
    and secure_delete zeroes what is freed, so that either one alone leaves no copy (with both
    turned off in a scratch copy, this test fails)."""
    big = "pem-" + "K" * 20000
    version = db_mod.SEALED_VERSION - 1
    conn = sqlite3.connect(tmp_path / "deployer.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for number, script in enumerate(db_mod.MIGRATIONS[:version], start=1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    for i in range(50):
        conn.execute("INSERT INTO secrets VALUES ('shop/prod', ?, ?)", (f"KEY_{i}", f"{big}-{i:02d}"))
    conn.close()
    assert b"KKKKKKKKKK-07" in store_bytes(tmp_path)
    db = Database(tmp_path / "deployer.db")
    assert Ledger(db).secrets("shop/prod")["KEY_7"] == f"{big}-07"
    db.close()
    assert b"KKKKKKKKKK" not in store_bytes(tmp_path)


def test_a_sealed_store_without_its_key_says_so(tmp_path):
    Ledger(Database(tmp_path / "deployer.db")).set_secret("shop/prod", "K", SECRET)
    (tmp_path / "secrets.key").unlink()
    with pytest.raises(VaultError, match="secrets.key is missing"):
        Database(tmp_path / "deployer.db")


def test_redact_values_by_environment_or_by_agent(tmp_path):
    ledger = Ledger(Database(tmp_path / "deployer.db"))
    for env, host in (("shop/prod", "web-1"), ("shop/dev", "web-2"), ("blog/prod", "web-1")):
        ledger.set_secret(env, "KEY", f"{env}-secret")
        ledger.save_password(env, "web", "mysql", 1, f"{env}-password")
        ledger.add_instance(env, "web", "code", 1, host=host)
    ledger.add_instance("shop/dev", "web", "mysql", 1, host="db-1")
    assert ledger.redact_values("shop/prod", "web-2") == ["shop/prod-password", "shop/prod-secret"]
    assert ledger.redact_values(None, "web-1") == ["blog/prod-password", "blog/prod-secret",
                                                  "shop/prod-password", "shop/prod-secret"]
    assert ledger.redact_values(None, "db-1") == ["shop/dev-password"]  # data there, not code
    ledger.set_status("blog/prod", "web", "code", 1, "removed")
    assert ledger.redact_values(None, "web-1") == ["shop/prod-password", "shop/prod-secret"]


def test_a_secret_set_again_stays_redacted_in_its_former_values(tmp_path):
    db = Database(tmp_path / "deployer.db")
    ledger = Ledger(db)
    for n in range(13):
        ledger.set_secret("shop/prod", "KEY", f"value-{n:02d}")
    ledger.set_secret("shop/prod", "KEY", "value-12")               # the same value: nothing retired
    ledger.set_secret("shop/dev", "KEY", "dev-value")
    assert ledger.secrets("shop/prod") == {"KEY": "value-12"}
    kept = [f"value-{n:02d}" for n in range(13 - 1 - RETIRED_KEPT, 13)]  # the last ten former, and now
    assert ledger.redact_values("shop/prod", "web-1") == kept
    assert ledger.redact_values("shop/dev", "web-1") == ["dev-value"]
    for n in range(13):                                              # sealed, like the current one
        assert f"value-{n:02d}".encode() not in store_bytes(tmp_path)


class FakeSession:
    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.sent: list[pb.ControllerMessage] = []

    def send(self, message: pb.ControllerMessage) -> None:
        self.sent.append(message)


def test_the_redact_list_goes_to_the_agent_and_nowhere_else(tmp_path):
    async def main():
        db = Database(tmp_path / "deployer.db")
        dispatcher = Dispatcher(db, Registry(db, 60), tmp_path, Ledger(db))
        Ledger(db).set_secret("shop/prod", "SESSION_KEY", SECRET)
        op = pb.Operation(id="op-1", exec=pb.ExecSpec(argv=["sh", "-c", f"echo {SECRET}"]))
        dispatcher.submit("web-1", op, environment="shop/prod")      # not connected: it waits
        row = db.operation("op-1")
        assert row.environment == "shop/prod" and not row.spec.redact
        assert SECRET not in " ".join(row.summary)
        session = FakeSession("web-1")
        dispatcher.on_hello(session, pb.Hello(agent_id="web-1"))
        [message] = session.sent
        assert list(message.operation.redact) == [SECRET]
        dispatcher.close()
        db.close()
        assert SECRET.encode() not in store_bytes(tmp_path)

    asyncio.run(main())


def test_ledger_transactions_nest(tmp_path):
    ledger = Ledger(Database(tmp_path / "deployer.db"))
    with ledger.transaction():
        ledger.set_secret("shop/prod", "A", "value-a")          # its own transaction, nested
        with pytest.raises(RuntimeError):
            with ledger.transaction():
                ledger.set_secret("shop/prod", "B", "value-b")
                raise RuntimeError("undo only the inner one")
    assert ledger.secrets("shop/prod") == {"A": "value-a"}
    assert not ledger.conn.in_transaction
