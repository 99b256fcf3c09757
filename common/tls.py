"""Certificates on the agent's side: its key, its certificate, the pinned CA, and enrolment.

The agent's private key is made here and never leaves the host: the controller only ever sees a
certificate signing request. Enrolment trusts nothing on the network: the token carries the
SHA-256 fingerprint of the controller's CA, and the CA is pinned only if it matches.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from common import errors
from common.credentials import split_token

# Agents check the controller's certificate against this name, whatever address they dial: the CA
# is private to one controller, and only the controller's own certificate carries the name.
SERVER_NAME = "deployer-controller"
ROLE_URI = "urn:deployer:role:"
TOKEN_PREFIX = "dpt1"


class TlsError(errors.Broken):
    """A one-line reason why enrolment or a certificate cannot be used."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is."""

    agent_id: str
    roles: tuple[str, ...]
    serial: str          # hex
    not_before: float
    not_after: float


def identity(cert: x509.Certificate) -> Identity:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return Identity(
        agent_id=str(names[0].value) if names else "",
        roles=tuple(u[len(ROLE_URI):] for u in uris if u.startswith(ROLE_URI)),
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


def identity_of(cert_pem: bytes) -> Identity:
    return identity(x509.load_pem_x509_certificate(cert_pem))


def fingerprint(cert_pem: bytes) -> str:
    """The SHA-256 of a certificate's DER, base64url without padding (43 characters)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return _b64(hashlib.sha256(der).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Token:
    token_id: str
    secret: str
    ca_fingerprint: str

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.token_id}.{self.secret}.{self.ca_fingerprint}"


def parse_token(text: str) -> Token:
    parts = split_token(text, TOKEN_PREFIX)
    if parts is None:
        raise TlsError("malformed enrolment token (expected dpt1.ID.SECRET.CA-FINGERPRINT from "
                       "`deployctl token create`)")
    return Token(*parts)


def new_key_and_csr(agent_id: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


class Credentials:
    """The files in the agent's TLS folder: agent.key (0600), agent.crt, ca.crt."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key_path = folder / "agent.key"
        self.cert_path = folder / "agent.crt"
        self.ca_path = folder / "ca.crt"

    def exists(self) -> bool:
        if self.folder.is_dir():
            self._finish_save()
        return self.key_path.exists() and self.cert_path.exists() and self.ca_path.exists()

    def load(self) -> tuple[bytes, bytes, bytes]:
        """(key, certificate, CA) as PEM; a save cut short by a crash is finished first."""
        self._finish_save()
        try:
            return self.key_path.read_bytes(), self.cert_path.read_bytes(), self.ca_path.read_bytes()
        except OSError as exc:
            raise TlsError(f"cannot read the agent's certificate in {self.folder}: {exc.strerror}") from None

    def identity(self) -> Identity:
        return identity(x509.load_pem_x509_certificate(self.load()[1]))

    def save(self, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> None:
        """Replace the pair (and the CA) so that a crash never leaves a key beside another key's
        certificate: every new file is written and synced under a `.next` name first, then they
        are renamed into place; `load` finishes renames a crash interrupted."""
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        staged = [(self.key_path, key_pem, 0o600), (self.ca_path, ca_pem, 0o644), (self.cert_path, cert_pem, 0o644)]
        for path, data, mode in staged:
            write_atomic(_next(path), data, mode)
        self._finish_save()

    def _finish_save(self) -> None:
        for path in (self.key_path, self.ca_path, self.cert_path):
            if _next(path).exists():
                os.replace(_next(path), path)


def _next(path: Path) -> Path:
    return path.with_name(f"{path.name}.next")


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` by a file with `data`, created with `mode`, synced before the rename."""
    # A name of its own: two writers of the same file never share (and steal) a temporary file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def renew_at(ident: Identity) -> float:
    """When to ask for a fresh certificate: once two thirds of its life have passed."""
    return ident.not_before + (ident.not_after - ident.not_before) * 2 / 3


def fetch_ca(host: str, port: int, expected_fingerprint: str, timeout: float = 10.0,
             port_name: str = "the enrolment port") -> bytes:
    """The controller's CA, taken from the chain its enrolment port (or another TLS port of it)
    presents, if and only if its fingerprint is the one in the token (the chain itself is not
    trusted)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=SERVER_NAME) as conn:
            chain_of = getattr(conn, "get_unverified_chain", None) or conn._sslobj.get_unverified_chain
            chain = [c.public_bytes() for c in chain_of() or []]
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot reach {port_name} {host}:{port}: {exc}") from None
    for pem in chain:
        pem_bytes = pem.encode() if isinstance(pem, str) else pem
        if fingerprint(pem_bytes) == expected_fingerprint:
            return pem_bytes
    raise TlsError(f"the controller at {host}:{port} does not present the CA named in the token "
                   "(wrong address, or a different controller)")


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TlsError(f"controller address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def expires_in(ident: Identity) -> datetime.timedelta:
    return datetime.datetime.fromtimestamp(ident.not_after, datetime.timezone.utc) - \
        datetime.datetime.now(datetime.timezone.utc)

def is_loopback(address: str) -> bool:
    """HOST:PORT on a loopback interface, or a Unix socket."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
