"""The operator token's format (`dpo1.ID.SECRET.CA-FINGERPRINT`), read by deployctl and by the
controller's door; what a token may do, and the store of their hashes, are the controller's
(controller/fleet/access.py)."""

from __future__ import annotations

from dataclasses import dataclass
from common import errors

TOKEN_PREFIX = "dpo1"


class CredentialRefused(errors.Unauthenticated):
    """No usable credential: the caller is not authenticated. One line, safe to show to anyone."""


@dataclass(frozen=True)
class OperatorToken:
    token_id: str
    secret: str
    ca_fingerprint: str  # lets deployctl verify the controller without a CA file

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.token_id}.{self.secret}.{self.ca_fingerprint}"


def split_token(text: str, prefix: str) -> tuple[str, str, str] | None:
    """`PREFIX.ID.SECRET.CA-FINGERPRINT` (an operator's dpo1, an agent's enrolment dpt1) as
    (id, secret, fingerprint), or None when it is not one."""
    parts = text.strip().split(".")
    if (len(text) > 200 or len(parts) != 4 or parts[0] != prefix or not all(parts[1:])
            or not all(c in "0123456789abcdef" for c in parts[1])):
        return None
    return parts[1], parts[2], parts[3]


def parse_token(text: str) -> OperatorToken:
    parts = split_token(text, TOKEN_PREFIX)
    if parts is None:
        raise CredentialRefused("malformed operator token (expected dpo1.ID.SECRET.CA-FINGERPRINT "
                                "from `deployctl operator-token create`)")
    return OperatorToken(*parts)
