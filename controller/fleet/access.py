"""Who may operate the controller: roles, what each operator method needs, and operator tokens.

Nothing here knows the transport: the gRPC door and any later operator API authenticate a
credential with `OperatorTokens.authenticate` and check it with `authorize`, by the method's
name. `read` looks at what the controller has recorded; `operate` may change anything, and so
owns the fleet (it runs commands as root on every agent). A method that makes the controller or
an agent act on what the caller sends (a spec's sources, a command) needs `operate`, even if it
changes nothing. Only a hash of a token's secret is stored.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Callable

from common.credentials import CredentialRefused, OperatorToken, parse_token  # noqa: F401 - the door reads tokens here
from common import errors
from controller.state.db import Database
from controller.state.trust import OperatorTokenRows


class Role(enum.Enum):
    READ = "read"
    OPERATE = "operate"


# Every operator method, by the role it needs; a test fails on one that is on neither list, or on
# both. Plan needs operate: the controller runs `git ls-remote` on the sources the caller names.
# Check needs operate: it also repairs, cleans and destroys.
NEEDS_READ = frozenset({
    "ListAgents", "Follow", "GetOperation", "FollowJob", "ListJobs", "ShowJob", "Ledger", "Status",
    "ServiceLogs", "ListTokens", "ListOperatorTokens", "Events", "Backups",
})
NEEDS_OPERATE = frozenset({
    "SubmitExec", "CancelOperations", "Plan", "Apply", "SetSecret", "Rollback", "Check",
    "CreateToken", "RevokeToken", "RevokeAgent", "GrantAgent", "CreateOperatorToken", "RevokeOperatorToken",
    "Backup",
})
METHODS = NEEDS_READ | NEEDS_OPERATE

DEFAULT_TTL_S = 30 * 86400.0
MAX_TTL_S = 366 * 86400.0
MAX_LABEL = 64


class NotPermitted(errors.Refused):
    """An authenticated caller whose role does not cover the method."""


@dataclass(frozen=True)
class Principal:
    """An authenticated operator: the token it used (or the socket), its role, its label."""

    token_id: str
    role: Role
    label: str = ""
    expires: float | None = None

    def __str__(self) -> str:
        return "the operator socket" if self is SOCKET else f"operator token {self.token_id}"


# The controller's 0600 Unix socket is itself the credential: whoever reaches it is the
# controller's own user (or root), who could read the store directly anyway.
SOCKET = Principal("", Role.OPERATE, "unix socket")


def needed_role(method: str) -> Role | None:
    if method in NEEDS_OPERATE:
        return Role.OPERATE
    if method in NEEDS_READ:
        return Role.READ
    return None


def authorize(principal: Principal, method: str) -> None:
    """Raise NotPermitted unless the principal's role covers the method (an unknown method is
    covered by no role)."""
    needed = needed_role(method)
    if needed is None:
        raise NotPermitted(f"{method} is not an operator method")
    if needed is Role.OPERATE and principal.role is not Role.OPERATE:
        raise NotPermitted(f"{method} needs the operate role; {principal} has {principal.role.value}")


def bearer(authorization: str | None) -> str:
    """The token in an `authorization: Bearer …` value."""
    if not authorization:
        raise CredentialRefused("no operator token; deployctl sends $DEPLOYER_OPERATOR_TOKEN or --token-file")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise CredentialRefused("the authorization header must be `Bearer dpo1…`")
    return token.strip()


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_label(label: str) -> str:
    if len(label) > MAX_LABEL or not label.isprintable():
        raise ValueError(f"--label: at most {MAX_LABEL} printable characters")
    return label


class OperatorTokens:
    """Operator tokens in the controller's database (table `operator_tokens`). A token made with
    another token never outlives it, and revoking a token revokes those it made: a stolen token
    cannot leave a spare behind."""

    def __init__(self, db: Database, ca_fingerprint: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.rows = OperatorTokenRows(db)
        self.ca_fingerprint = ca_fingerprint
        self.clock = clock

    def create(self, role: Role, ttl_s: float, label: str, by: Principal) -> tuple[OperatorToken, float]:
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"--ttl: between 1 s and {MAX_TTL_S / 86400:.0f} days")
        check_label(label)
        if role is Role.OPERATE and by.role is not Role.OPERATE:
            raise NotPermitted(f"{by} has the read role and cannot make an operate token")
        now = self.clock()
        expires = now + ttl_s if by.expires is None else min(now + ttl_s, by.expires)
        token = OperatorToken(secrets.token_hex(6), secrets.token_urlsafe(32), self.ca_fingerprint)
        self.rows.add(token.token_id, _hash(token.secret), role.value, label, now, expires, by.token_id)
        return token, expires

    def authenticate(self, text: str) -> Principal:
        """The principal a presented token stands for; CredentialRefused says why not."""
        token = parse_token(text)
        row = self.rows.get(token.token_id)
        if row is None or not hmac.compare_digest(row["secret_sha256"], _hash(token.secret)):
            raise CredentialRefused(f"unknown operator token {token.token_id}")
        if row["revoked"] is not None:
            raise CredentialRefused(f"operator token {token.token_id} was revoked")
        if row["expires"] <= self.clock():
            raise CredentialRefused(f"operator token {token.token_id} has expired")
        return Principal(row["id"], Role(row["role"]), row["label"], row["expires"])

    def listed(self, every: bool = False) -> list[dict]:
        """What anyone who may read may know: never the secret, nor its hash. Without `every`,
        only the tokens that can still be used."""
        now = self.clock()
        out = []
        for row in self.rows.all():
            state = "revoked" if row["revoked"] is not None else "expired" if row["expires"] <= now else "valid"
            if every or state == "valid":
                out.append({"id": row["id"], "role": row["role"], "label": row["label"],
                            "created": row["created"], "expires": row["expires"], "state": state,
                            "revoked": row["revoked"], "created_by": row["created_by"] or "socket"})
        return out

    def revoke(self, token_id: str) -> list[str]:
        """Revoke a token and every token made with it (and so on); the ids revoked now."""
        if self.rows.get(token_id) is None:
            raise LookupError(f"unknown operator token {token_id!r}")
        ids = self.rows.made_from(token_id)
        self.rows.revoke(ids, self.clock())
        return ids
