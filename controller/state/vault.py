"""Secrets at rest: values sealed with Fernet under a key kept in the store (`secrets.key`, 0600).

Sealed are declared secrets, generated database and Redis passwords, and the payload of
operations not yet finished (their `.env` contents, SQL on stdin, …). Opening a sealed value
happens here and nowhere else. The key protects what leaves the store without it — a copy of
`deployer.db`, a backup of the database alone, a page left in its WAL — not a reader of the
whole store: back the key up with the database, since without it the sealed values are lost.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from common import errors


class VaultError(errors.Broken):
    """The key is missing or wrong; the message says which file and what to do."""


class Vault:
    def __init__(self, key: bytes, path: Path | None = None) -> None:
        try:
            self._fernet = Fernet(key)
        except ValueError:
            raise VaultError(f"{path or 'the key'} is not a valid key (32 url-safe base64 bytes)") from None
        self.path = path

    @classmethod
    def for_store(cls, path: Path, create: bool) -> "Vault":
        """The store's key; made (0600) when `create`, i.e. before anything was sealed."""
        try:
            return cls(path.read_bytes().strip(), path)
        except FileNotFoundError:
            if not create:
                raise VaultError(f"{path} is missing: the secrets sealed in the database cannot be "
                                 "read without it; restore it from the backup of this store") from None
        key = Fernet.generate_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return cls(key, path)

    def seal(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def open(self, token: bytes) -> bytes:
        try:
            return self._fernet.decrypt(token)
        except InvalidToken:
            raise VaultError(f"a sealed value does not open with {self.path or 'this key'}: "
                             "the key does not belong to this database") from None

    def seal_text(self, text: str) -> str:
        return self.seal(text.encode()).decode()

    def open_text(self, token: str) -> str:
        return self.open(token.encode()).decode()
