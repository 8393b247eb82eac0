"""Ed25519 signatures of what goes off-site (the only module that imports `cryptography`).

The signing key is a PKCS#8 PEM file (`-----BEGIN PRIVATE KEY-----`) that the operator keeps
like the age identity (OFFSITE_SIGNING_KEY_FILE, mode 0600, outside STATE_DIR): made by
`toybox-backupd keys new --out FILE` or `openssl genpkey -algorithm ed25519 -out FILE`. Its
verify key is a short printable string, `ed25519:<base64 of the 32-byte public key>`, which is
all a restore on a new host needs (OFFSITE_VERIFY_KEYS).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .base import OffsiteError

PREFIX = "ed25519:"
VARIABLE = "OFFSITE_SIGNING_KEY_FILE"


def _encode(raw: bytes) -> str:
    return PREFIX + base64.b64encode(raw).decode("ascii")


def verify_key_problem(text: str) -> str | None:
    """None if `text` is a verify key (`ed25519:<base64 of 32 bytes>`), else what is wrong."""
    if not text.startswith(PREFIX):
        return f"{text[:24]!r} is not a verify key (ed25519:…, as `toybox-backupd check` prints it)"
    try:
        raw = base64.b64decode(text[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        return f"{text[:24]!r}… is not base64 after ed25519:"
    return None if len(raw) == 32 else f"{text[:24]!r}… does not hold a 32-byte Ed25519 key"


class SigningKey:
    """A loaded signing key: signs bytes, and says its verify key."""

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        self.verify_key = _encode(raw)

    def sign(self, message: bytes) -> str:
        """The base64 Ed25519 signature of `message`."""
        return base64.b64encode(self._key.sign(message)).decode("ascii")


def load(path: Path) -> SigningKey:
    """The signing key in `path`; OffsiteError naming OFFSITE_SIGNING_KEY_FILE otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise OffsiteError(f"{VARIABLE} {path} does not exist (make one: toybox-backupd keys new "
                           f"--out {path})") from None
    except OSError as exc:
        raise OffsiteError(f"{VARIABLE} {path} cannot be read: {exc.strerror} "
                           f"(uid {os.getuid()})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise OffsiteError(f"{VARIABLE} {path} holds no unencrypted PEM private key (make one: "
                           "toybox-backupd keys new --out FILE)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise OffsiteError(f"{VARIABLE} {path} holds a key that is not Ed25519")
    return SigningKey(key)


def new_key_file(path: Path) -> str:
    """Write a new signing key to `path` (mode 0600; never over an existing file); its verify
    key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise OffsiteError(f"{path} exists: not overwritten (a signing key in use must be kept; "
                           "give another file name)") from None
    except OSError as exc:
        raise OffsiteError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
        out.flush()
        os.fsync(out.fileno())
    return SigningKey(key).verify_key


def verifies(verify_key: str, message: bytes, signature: str) -> bool:
    """Whether `signature` (base64) is `verify_key`'s signature of `message`."""
    if verify_key_problem(verify_key) is not None:
        return False
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(verify_key[len(PREFIX):]))
        public.verify(base64.b64decode(signature, validate=True), message)
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True
