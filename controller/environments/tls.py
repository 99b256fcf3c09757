"""HTTPS for an environment: the operator's certificate and key (two of its secrets), checked
before any router is touched (decision 035). Pure: no I/O."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

from common import errors


class TlsError(errors.BadInput):
    """A certificate or key that cannot serve the environment's names; `part` is where the spec
    names it ("certificate", "key", or "" for the pair)."""

    def __init__(self, message: str, part: str = "") -> None:
        super().__init__(message)
        self.part = part


def _covers(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):  # a wildcard stands for exactly one label
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def check_pair(certificate_pem: str, key_pem: str, names: tuple[str, ...],
               now: datetime.datetime | None = None) -> datetime.datetime:
    """Why the pair cannot serve `names`, raised as one line (never quoting the key); else the
    certificate's end of validity."""
    try:
        chain = x509.load_pem_x509_certificates(certificate_pem.encode())
    except ValueError:
        raise TlsError("the certificate is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        raise TlsError("the key is not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, public):
        raise TlsError("the key is not the certificate's: they are not a pair")
    try:
        sans = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        dns = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    missing = [n for n in names if not any(_covers(p, n) for p in dns)]
    if missing:
        raise TlsError(f"the certificate does not cover {', '.join(missing)} (it names "
                       f"{', '.join(dns) or 'no DNS name'})")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc <= now:
        raise TlsError(f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    if leaf.not_valid_before_utc > now:
        raise TlsError(f"the certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    return leaf.not_valid_after_utc


def pair_of(certificate: str, key: str, stored: dict[str, str], env_key: str,
            names: tuple[str, ...]) -> tuple[str, str]:
    """The certificate and key the secrets named `certificate` and `key` hold, once both are set,
    a pair, and cover every name; else a TlsError naming the secret to set."""
    for part, name in (("certificate", certificate), ("key", key)):
        if not stored.get(name):
            raise TlsError(f"secret {name} is not set: deployctl secret set {env_key} {name} < FILE", part)
    check_pair(stored[certificate], stored[key], names)
    return stored[certificate], stored[key]
