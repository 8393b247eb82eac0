"""age encryption of off-site copies (the only module that imports pyrage).

`encrypting(source, recipients)` gives a readable stream of age ciphertext: a thread runs
`pyrage.encrypt_io` from `source` into a pipe that the caller reads, so memory stays bounded
and the ciphertext can be streamed to a target. `decrypt` turns it back, with an identity file.
The ciphertext is the standard age format: `age -d -i key.txt` decrypts it without this tool.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyrage

from .base import OffsiteError

PIPE_BUFFER = 1024 * 1024
AGE_HEADER = b"age-encryption.org/v1\n"


def parse_recipients(recipients: list[str]) -> list[Any]:
    """pyrage recipients for `age1…` keys and `ssh-ed25519`/`ssh-rsa` public keys."""
    parsed = []
    for text in recipients:
        text = text.strip()
        try:
            if text.startswith("ssh-"):
                parsed.append(pyrage.ssh.Recipient.from_str(text))
            else:
                parsed.append(pyrage.x25519.Recipient.from_str(text))
        except pyrage.RecipientError as exc:
            raise OffsiteError(f"OFFSITE_AGE_RECIPIENTS: {text[:24]}… is not an age recipient "
                               f"(age1…, ssh-ed25519 or ssh-rsa public key): {exc}") from None
    if not parsed:
        raise OffsiteError("OFFSITE_AGE_RECIPIENTS names no recipient to encrypt for")
    return parsed


def load_identities(path: Path) -> list[Any]:
    """The identities in an age identity file (`AGE-SECRET-KEY-1…` lines) or an OpenSSH
    private key file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OffsiteError(f"AGE_IDENTITY_FILE {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise OffsiteError(f"AGE_IDENTITY_FILE {path} cannot be read: {reason} "
                           f"(uid {os.getuid()})") from None
    try:
        if "-----BEGIN OPENSSH PRIVATE KEY-----" in text:
            return [pyrage.ssh.Identity.from_buffer(text.encode())]
        identities = [pyrage.x25519.Identity.from_str(line.strip()) for line in text.splitlines()
                      if line.strip().upper().startswith("AGE-SECRET-KEY-1")]
    except pyrage.IdentityError as exc:
        raise OffsiteError(f"AGE_IDENTITY_FILE {path} holds a key that is not valid: {exc}") from None
    if not identities:
        raise OffsiteError(f"AGE_IDENTITY_FILE {path} holds no age identity (AGE-SECRET-KEY-1…) "
                           "and no OpenSSH private key")
    return identities


def decrypt(source: BinaryIO, dest: BinaryIO, identity_file: Path, *, what: str = "the object") -> None:
    """Decrypt the age ciphertext `source` into `dest` with the identities in `identity_file`."""
    identities = load_identities(identity_file)
    try:
        pyrage.decrypt_io(source, dest, identities)
    except pyrage.DecryptError as exc:
        if "no matching keys" in str(exc).lower():
            raise OffsiteError(f"this identity ({identity_file}) cannot decrypt {what}: it was "
                               "encrypted for other recipients") from None
        raise OffsiteError(f"cannot decrypt {what}: {exc} (is it an age-encrypted copy, and "
                           "complete?)") from None


class _Source:
    """`source` as pyrage reads it, remembering an exception of its own (so the reader sees
    the real cause, not pyrage's wrapping of it)."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            return self._source.read(size)
        except BaseException as exc:
            self.error = exc
            raise

    def readable(self) -> bool:
        return True


class _Ciphertext:
    """The read end of the pipe; at its end, the encrypting thread's failure is raised."""

    def __init__(self, pipe: BinaryIO, worker: _Encryptor) -> None:
        self._pipe, self._worker = pipe, worker

    def read(self, size: int | None = -1) -> bytes:
        data = self._pipe.read(-1 if size is None else size)
        if not data and size != 0:
            self._worker.finish()
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._pipe.close()


class _Encryptor(threading.Thread):
    def __init__(self, source: BinaryIO, recipients: list[Any], pipe: BinaryIO) -> None:
        super().__init__(name="age-encrypt", daemon=True)
        self._source = _Source(source)
        self._recipients, self._pipe = recipients, pipe
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            pyrage.encrypt_io(self._source, self._pipe, self._recipients)
        except BaseException as exc:
            self.error = self._source.error or exc
        finally:
            with contextlib.suppress(OSError):
                self._pipe.close()

    def finish(self) -> None:
        """Wait for the thread; raise what stopped it, if anything did."""
        self.join()
        error = self.error
        if error is None:
            return
        if isinstance(error, OffsiteError) or self._source.error is error:
            raise error
        raise OffsiteError(f"age encryption failed: {error}") from None


@contextlib.contextmanager
def encrypting(source: BinaryIO, recipients: list[str]) -> Iterator[BinaryIO]:
    """A readable stream of `source` encrypted with age for `recipients` (read it to its end
    to see a failure of the encryption or of `source`; leaving early stops the thread)."""
    parsed = parse_recipients(recipients)
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb", buffering=PIPE_BUFFER)
    writer = os.fdopen(write_fd, "wb", buffering=PIPE_BUFFER)
    worker = _Encryptor(source, parsed, writer)
    worker.start()
    try:
        yield _Ciphertext(reader, worker)  # type: ignore[misc]
    finally:
        reader.close()  # a writer blocked on a full pipe now gets EPIPE and ends
        worker.join()


def public_keys(identities: list[Any]) -> list[str]:
    """The `age1…` recipients of x25519 identities (an SSH identity's is not derivable here)."""
    return [str(identity.to_public()) for identity in identities
            if hasattr(identity, "to_public")]
