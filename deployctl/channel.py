"""How deployctl dials the TCP operator listener: TLS verified against the controller's CA, and the
operator token on every call. The token comes from the environment or a private file, never from
the command line (every user of the host can read a process's arguments).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc

from common.tls import SERVER_NAME, TlsError, fetch_ca, split_address

from common.credentials import CredentialRefused, parse_token
from common import errors

TOKEN_ENV = "DEPLOYER_OPERATOR_TOKEN"
CA_ENV = "DEPLOYER_CA"


class ChannelError(errors.DeployerError):
    """The channel cannot be set up; one line, and whether it is the operator's usage (2) or the
    controller that cannot be reached (3)."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def read_token(token_file: str | None, environ=os.environ) -> str:
    """The operator token ('' if none is given): `--token-file` first, then the environment."""
    if token_file:
        path = Path(token_file)
        try:
            mode = path.stat().st_mode
            if mode & 0o077:
                raise ChannelError(f"--token-file {path} is open to other users (mode {stat.filemode(mode)}): "
                                   f"run `chmod 600 {path}`")
            text = path.read_text().strip()
        except OSError as exc:
            raise ChannelError(f"--token-file {path}: cannot read: {exc.strerror}") from None
        if not text:
            raise ChannelError(f"--token-file {path} is empty")
        return text
    return environ.get(TOKEN_ENV, "").strip()


def read_ca(address: str, ca_file: str | None, token: str, environ=os.environ) -> bytes:
    """The CA to verify the controller against: `--ca-file` / $DEPLOYER_CA, or the CA the
    controller presents if its fingerprint is the one the token carries (nothing trusted on
    first use)."""
    ca_file = ca_file or environ.get(CA_ENV)
    if ca_file:
        try:
            return Path(ca_file).read_bytes()
        except OSError as exc:
            raise ChannelError(f"--ca-file {ca_file}: cannot read: {exc.strerror}") from None
    if not token:
        raise ChannelError(f"--controller {address} needs an operator token: set ${TOKEN_ENV} or give "
                           "--token-file PATH (deployctl operator-token create, on the controller)")
    try:
        parsed = parse_token(token)
        host, port = split_address(address)
        return fetch_ca(host, port, parsed.ca_fingerprint, port_name="the controller's operator port")
    except CredentialRefused as exc:
        raise ChannelError(str(exc)) from None
    except TlsError as exc:
        raise ChannelError(str(exc), unreachable="cannot reach" in str(exc)) from None


def secure_channel(address: str, token: str, ca_pem: bytes, options: list) -> grpc.Channel:
    """A TLS channel that checks the controller's certificate against `ca_pem` under the name
    only the controller's own certificate carries, and sends `authorization: Bearer TOKEN`."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(address, credentials,
                               options=[*options, ("grpc.ssl_target_name_override", SERVER_NAME)])
