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


def parse_token(text: str) -> OperatorToken:
    parts = text.strip().split(".")
    if (len(text) > 200 or len(parts) != 4 or parts[0] != TOKEN_PREFIX or not all(parts[1:])
            or not all(c in "0123456789abcdef" for c in parts[1])):
        raise CredentialRefused("malformed operator token (expected dpo1.ID.SECRET.CA-FINGERPRINT "
                                "from `deployctl operator-token create`)")
    return OperatorToken(parts[1], parts[2], parts[3])
