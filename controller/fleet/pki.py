"""The controller's own certificate authority, enrolment tokens and the certificates it issued.

Files live in STORE/pki (0700): ca.key and server.key are 0600. Agents get certificates only by
redeeming a single-use, expiring token (only a hash of its secret is stored) with a CSR; the
controller keeps every certificate it issued, and accepts an agent's certificate only if it is
one of them and not revoked: a list of what is allowed, not of what is forbidden.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.tls import (ROLE_URI, SERVER_NAME, Identity, Token, TlsError, fingerprint, identity, parse_token,
                       write_atomic)

from controller.state.db import Database
from controller.state.trust import EnrolmentRows
from common import errors

CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_LIFETIME = datetime.timedelta(days=397)
SERVER_RENEW_BEFORE = datetime.timedelta(days=30)
DEFAULT_AGENT_TTL_S = 30 * 86400.0
MAX_TOKEN_TTL_S = 7 * 86400.0


class PkiError(errors.Broken):
    """The CA on disk cannot be used; the message says why in one line."""


class EnrolmentRefused(errors.Refused):
    """The token or request cannot buy a certificate; the message says why in one line."""


class RenewedTooSoon(EnrolmentRefused):
    """An agent asked for certificates faster than any renewal schedule would."""


def _due(server_cert: x509.Certificate) -> bool:
    """The server certificate is within SERVER_RENEW_BEFORE of its end."""
    return server_cert.not_valid_after_utc - _now() <= SERVER_RENEW_BEFORE


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Authority:
    """The CA (made once, kept for ten years) and the controller's server certificate."""

    def __init__(self, folder: Path, names: list[str] = ()) -> None:
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        self.ca_key, self.ca_cert = self._load_or_create_ca()
        self.ca_pem = _pem(self.ca_cert)
        self.fingerprint = fingerprint(self.ca_pem)
        self.server_names = [SERVER_NAME, *names]
        # (generation, key PEM, certificate): replaced whole, so a reader never pairs a key with
        # another certificate; gRPC asks for it from its own threads, hence the lock for renewal.
        key_pem, cert = self._load_or_create_server(self.server_names)
        self._server = (0, key_pem, cert)
        self._server_lock = threading.Lock()
        self._next_try = 0.0  # after a failed renewal, not before this (time.monotonic())

    @property
    def server_cert(self) -> x509.Certificate:
        return self._server[2]

    def server_identity(self) -> tuple[int, bytes, bytes]:
        """(generation, key PEM, certificate chain) of one same server certificate; the
        generation grows with each renewal."""
        generation, key_pem, cert = self._server
        return generation, key_pem, _pem(cert) + self.ca_pem

    def _load_or_create_ca(self):
        key_path, cert_path = self.folder / "ca.key", self.folder / "ca.crt"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
        if key_path.exists() or cert_path.exists():
            # Never make a new CA over half of the old one: every agent would be locked out.
            missing = cert_path if key_path.exists() else key_path
            raise PkiError(f"{missing} is missing while the rest of the CA is there: restore it from a "
                           "backup (a new CA would mean enrolling every agent again)")
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deployer controller CA"),
                          x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(8))])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + CA_LIFETIME)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA384()))
        write_atomic(key_path, _key_pem(key), 0o600)
        write_atomic(cert_path, _pem(cert), 0o644)
        return key, cert

    def _load_or_create_server(self, names: list[str]):
        key_path, cert_path = self.folder / "server.key", self.folder / "server.crt"
        if key_path.exists() and cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                       .value.get_values_for_type(x509.DNSName))
            key_pem = key_path.read_bytes()
            # A crash between writing the key and the certificate leaves a pair that does not
            # match: make a new one rather than serve nothing.
            matches = _spki(serialization.load_pem_private_key(key_pem, None).public_key()) == _spki(cert.public_key())
            if not _due(cert) and matches and set(names) <= have and cert.issuer == self.ca_cert.subject:
                return key_pem, cert
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
                .issuer_name(self.ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + SERVER_LIFETIME)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName(n) for n in dict.fromkeys(names)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self.ca_key, hashes.SHA384()))
        key_pem = _key_pem(key)
        write_atomic(key_path, key_pem, 0o600)
        write_atomic(cert_path, _pem(cert), 0o644)
        return key_pem, cert

    def refresh_server(self) -> int:
        """Renew the server certificate once it is within SERVER_RENEW_BEFORE of its end, so a
        controller that runs for more than a year never presents an expired one; the generation.
        Safe from any thread; a failed renewal is tried again a minute later, not at every
        handshake, and the current certificate serves meanwhile."""
        if not _due(self.server_cert) or time.monotonic() < self._next_try:
            return self._server[0]
        with self._server_lock:
            if _due(self.server_cert) and time.monotonic() >= self._next_try:   # not renewed meanwhile
                try:
                    key_pem, cert = self._load_or_create_server(self.server_names)
                except Exception:
                    self._next_try = time.monotonic() + 60
                    raise
                self._server = (self._server[0] + 1, key_pem, cert)
            return self._server[0]

    def sign(self, csr_pem: bytes, agent_id: str, roles: list[str], ttl_s: float) -> x509.Certificate:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise EnrolmentRefused("the certificate request is not a PEM CSR") from None
        if not csr.is_signature_valid:
            raise EnrolmentRefused("the certificate request's signature is invalid")
        key = csr.public_key()
        if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size >= 256
                or isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048):
            raise EnrolmentRefused("the certificate request's key is too weak (EC P-256+ or RSA 2048+)")
        now = _now()
        not_after = min(now + datetime.timedelta(seconds=ttl_s), self.ca_cert.not_valid_after_utc)
        # Backdated for clocks that lag a little, but by a small part of its life only: the agent
        # renews after two thirds of not_before..not_after.
        backdate = datetime.timedelta(seconds=min(300.0, ttl_s / 10))
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)]))
                .issuer_name(self.ca_cert.subject).public_key(key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - backdate).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(ROLE_URI + r) for r in roles]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.ca_key, hashes.SHA256()))


# What `used_by` holds for a token spent by a revocation: never an agent id, which has no brackets.
REVOKED_TOKEN = "(revoked)"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Issued:
    agent_id: str
    roles: tuple[str, ...]
    not_after: float
    revoked: float | None
    issued_at: float = 0.0


class Enrolment:
    """Tokens and certificates: what the controller issued, and what it still accepts."""

    def __init__(self, db: Database, authority: Authority, agent_ttl_s: float = DEFAULT_AGENT_TTL_S) -> None:
        if not 1 <= agent_ttl_s <= 825 * 86400:
            raise PkiError(f"--agent-cert-ttl {agent_ttl_s:g}: between 1 s and 825 days")
        self.db = db
        self.rows = EnrolmentRows(db)
        self.authority = authority
        self.agent_ttl_s = agent_ttl_s
        self.issued: dict[str, Issued] = {}
        for row in self.rows.certificates():
            self.issued[row["serial"]] = Issued(row["agent_id"], tuple(json.loads(row["roles"])),
                                                row["not_after"], row["revoked"], row["issued"])

    # ---------------------------------------------------------------- tokens

    def create_token(self, roles: list[str], ttl_s: float, agent_id: str = "", provides: list[str] = (),
                     address: str = "") -> tuple[Token, float]:
        """A token that enrols one agent with these roles (in its certificate) and grants it what
        it may provide and its address (kept here, and changeable without enrolling again)."""
        if not roles:
            raise ValueError("a token needs at least one role")
        if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"a token's ttl must be between 1 s and {MAX_TOKEN_TTL_S / 86400:.0f} days")
        token = Token(secrets.token_hex(6), secrets.token_urlsafe(24), self.authority.fingerprint)
        created = time.time()
        self.rows.add_token(token.token_id, _hash(token.secret), sorted(set(roles)), agent_id, created,
                            created + ttl_s, sorted(set(provides)), address)
        return token, created + ttl_s

    def tokens(self, every: bool = False) -> list[dict]:
        """What an operator may know of the tokens: never the secret part, nor its hash. Without
        `every`, only those that can still be used."""
        now = time.time()
        listed = []
        for row in self.rows.tokens():
            state = ("revoked" if row["used_by"] == REVOKED_TOKEN else "used" if row["used"] is not None
                     else "expired" if row["expires"] < now else "open")
            if every or state == "open":
                listed.append({"id": row["id"], "roles": json.loads(row["roles"]),
                               "provides": json.loads(row["provides"]), "address": row["address"],
                               "agent_id": row["agent_id"], "created": row["created"],
                               "expires": row["expires"], "state": state, "used": row["used"],
                               "used_by": row["used_by"] if state == "used" else None})
        return listed

    def revoke_token(self, token_id: str) -> None:
        """Spend a token nobody has used yet, so that it enrols nothing."""
        row = self.rows.token(token_id)
        if row is None:
            raise LookupError(f"unknown enrolment token {token_id!r}")
        if row["used_by"] == REVOKED_TOKEN:
            return  # already so: revoking twice is not an error
        if not self.rows.spend(token_id, time.time(), REVOKED_TOKEN):
            raise ValueError(f"enrolment token {token_id} was already used by agent {row['used_by']}: "
                             f"revoke the agent instead (deployctl agents revoke {row['used_by']})")

    def enroll(self, token_text: str, agent_id: str, csr_pem: bytes) -> tuple[x509.Certificate, Issued]:
        """Redeem a token for a certificate; the token is spent even if signing then fails."""
        try:
            token = parse_token(token_text)
        except TlsError as exc:
            raise EnrolmentRefused(str(exc)) from None
        row = self.rows.token(token.token_id)
        if row is None or not hmac.compare_digest(row["secret_sha256"], _hash(token.secret)):
            raise EnrolmentRefused(f"unknown enrolment token {token.token_id}")
        if row["used_by"] == REVOKED_TOKEN:
            raise EnrolmentRefused(f"enrolment token {token.token_id} was revoked")
        if row["used"] is not None:
            raise EnrolmentRefused(f"enrolment token {token.token_id} was already used "
                                   f"(by {row['used_by']}): tokens are single-use")
        if row["expires"] < time.time():
            raise EnrolmentRefused(f"enrolment token {token.token_id} has expired")
        if row["agent_id"] and row["agent_id"] != agent_id:
            raise EnrolmentRefused(f"enrolment token {token.token_id} is for agent {row['agent_id']}, "
                                   f"not {agent_id}")
        if not row["agent_id"] and self.expires(agent_id) > time.time():
            # An open token must not buy the identity of an agent that already has one.
            raise EnrolmentRefused(f"agent {agent_id} is already enrolled: revoke it first, or replace it "
                                   f"with a token made for it (deployctl token create --agent {agent_id})")
        if not self.rows.spend(token.token_id, time.time(), agent_id):
            raise EnrolmentRefused(f"enrolment token {token.token_id} was already used: tokens are single-use")
        if row["agent_id"]:
            self.revoke(agent_id)  # a token made for this id replaces whatever it held before
        issued = self._issue(csr_pem, agent_id, json.loads(row["roles"]))
        # What the token grants replaces any earlier grant of this id: the operator who made it
        # said what this host provides.
        self.db.save_grant(agent_id, json.loads(row["provides"]), row["address"])
        return issued

    def renew(self, ident: Identity, csr_pem: bytes) -> tuple[x509.Certificate, Issued]:
        issued = self.issued.get(ident.serial)
        if issued is None or issued.revoked:
            raise EnrolmentRefused("this certificate is not valid any more")
        # At most three valid certificates per agent: the one its live link was opened with, the
        # newest one (on its disk, in case the agent dies before saving the next) and the new one.
        now = time.time()
        mine = {serial: other for serial, other in self.issued.items()
                if other.agent_id == issued.agent_id and not other.revoked}
        # An agent renews after two thirds of a lifetime; one asking again within a tenth of it
        # (at most 10 minutes) is looping or hostile, and each answer would be a signature and a
        # row. A tenth, so an agent that lost its newest certificate in a crash still renews
        # well before the one it holds expires.
        last = max((other.issued_at for other in mine.values()), default=0.0)
        wait = last + min(self.agent_ttl_s / 10, 600.0) - now
        if wait > 0:
            raise RenewedTooSoon(f"agent {issued.agent_id} got a certificate {now - last:.0f} s ago; "
                                 f"ask again in {wait:.0f} s")
        keep = {ident.serial, max(mine, key=lambda serial: mine[serial].not_after)}
        for serial, other in mine.items():
            if serial not in keep:
                other.revoked = now
                self.rows.revoke_certificate(serial, now)
        return self._issue(csr_pem, issued.agent_id, list(issued.roles))

    def _issue(self, csr_pem: bytes, agent_id: str, roles: list[str]) -> tuple[x509.Certificate, Issued]:
        try:
            cert = self.authority.sign(csr_pem, agent_id, roles, self.agent_ttl_s)
        except EnrolmentRefused:
            raise
        except Exception as exc:  # an odd CSR must not surface as an internal error
            raise EnrolmentRefused(f"cannot sign this certificate request: {type(exc).__name__}") from None
        ident = identity(cert)
        issued = Issued(agent_id, tuple(roles), ident.not_after, None, time.time())
        self.rows.add_certificate(ident.serial, agent_id, roles, issued.issued_at, ident.not_after)
        self.issued[ident.serial] = issued
        return cert, issued

    # ---------------------------------------------------------------- checks and revocation

    def accepted(self, ident: Identity) -> str:
        """Why a (CA-verified) agent certificate is not accepted, or '' if it is."""
        issued = self.issued.get(ident.serial)
        if issued is None:
            return "this certificate was not issued by this controller"
        if issued.revoked:
            return f"the certificate of agent {issued.agent_id} was revoked"
        if issued.agent_id != ident.agent_id:
            return "the certificate's identity does not match what was issued"
        return ""

    def revoke(self, agent_id: str) -> int:
        now = time.time()
        count = 0
        for serial, issued in self.issued.items():
            if issued.agent_id == agent_id and not issued.revoked:
                issued.revoked = now
                count += 1
        self.rows.revoke_certificates_of(agent_id, now)
        # Tokens made for that agent and not yet used are spent too: revoked means revoked.
        self.rows.spend_tokens_for(agent_id, now, REVOKED_TOKEN)
        return count

    def expires(self, agent_id: str) -> float:
        """The furthest expiry among the agent's valid certificates (0: none)."""
        return max((i.not_after for i in self.issued.values()
                    if i.agent_id == agent_id and not i.revoked), default=0.0)

    def revoked(self, agent_id: str) -> bool:
        mine = [i for i in self.issued.values() if i.agent_id == agent_id]
        return bool(mine) and all(i.revoked for i in mine)
