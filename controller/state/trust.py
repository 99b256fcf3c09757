"""The rows behind trust: enrolment tokens and agent certificates (used by fleet/pki.py) and
operator tokens (fleet/access.py). Only hashes of secrets are stored; the rules (who may enrol,
when a token is spent, what revoking reaches) live with their users."""

from __future__ import annotations

import json
import sqlite3

from controller.state.db import Database


class EnrolmentRows:
    """Tables `tokens` and `certificates`."""

    def __init__(self, db: Database) -> None:
        self.conn = db.conn

    def add_token(self, token_id: str, secret_sha256: str, roles: list[str], agent_id: str, created: float,
                  expires: float, provides: list[str], address: str) -> None:
        self.conn.execute(
            "INSERT INTO tokens (id, secret_sha256, roles, agent_id, created, expires, provides, address) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (token_id, secret_sha256, json.dumps(roles), agent_id, created, expires, json.dumps(provides), address))

    def tokens(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM tokens ORDER BY created").fetchall()

    def token(self, token_id: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()

    def spend(self, token_id: str, when: float, by: str) -> bool:
        """Mark a token used, unless it already is; whether this call spent it."""
        return bool(self.conn.execute("UPDATE tokens SET used = ?, used_by = ? WHERE id = ? AND used IS NULL",
                                      (when, by, token_id)).rowcount)

    def spend_tokens_for(self, agent_id: str, when: float, by: str) -> None:
        self.conn.execute("UPDATE tokens SET used = ?, used_by = ? WHERE agent_id = ? AND used IS NULL",
                          (when, by, agent_id))

    def certificates(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM certificates").fetchall()

    def add_certificate(self, serial: str, agent_id: str, roles: list[str], issued: float, not_after: float) -> None:
        self.conn.execute(
            "INSERT INTO certificates (serial, agent_id, roles, issued, not_after) VALUES (?,?,?,?,?)",
            (serial, agent_id, json.dumps(roles), issued, not_after))

    def revoke_certificate(self, serial: str, when: float) -> None:
        self.conn.execute("UPDATE certificates SET revoked = ? WHERE serial = ?", (when, serial))

    def revoke_certificates_of(self, agent_id: str, when: float) -> None:
        self.conn.execute("UPDATE certificates SET revoked = ? WHERE agent_id = ? AND revoked IS NULL",
                          (when, agent_id))


class OperatorTokenRows:
    """Table `operator_tokens`."""

    def __init__(self, db: Database) -> None:
        self.conn = db.conn

    def add(self, token_id: str, secret_sha256: str, role: str, label: str, created: float, expires: float,
            created_by: str) -> None:
        self.conn.execute(
            "INSERT INTO operator_tokens (id, secret_sha256, role, label, created, expires, created_by) "
            "VALUES (?,?,?,?,?,?,?)", (token_id, secret_sha256, role, label, created, expires, created_by))

    def get(self, token_id: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM operator_tokens WHERE id = ?", (token_id,)).fetchone()

    def all(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM operator_tokens ORDER BY created").fetchall()

    def made_from(self, token_id: str) -> list[str]:
        """The token and every token made with it (and so on) that is not revoked yet."""
        rows = self.conn.execute(
            """WITH RECURSIVE made(id) AS (
                   SELECT ? UNION SELECT t.id FROM operator_tokens t JOIN made ON t.created_by = made.id)
               SELECT o.id FROM operator_tokens o JOIN made ON o.id = made.id WHERE o.revoked IS NULL""",
            (token_id,)).fetchall()
        return [r["id"] for r in rows]

    def revoke(self, ids: list[str], when: float) -> None:
        self.conn.executemany("UPDATE operator_tokens SET revoked = ? WHERE id = ? AND revoked IS NULL",
                              [(when, i) for i in ids])
