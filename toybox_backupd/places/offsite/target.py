"""What every off-site target does (S3-compatible storage, a directory), and how to open one.

Keys are relative to the target's root (the prefix of `s3://bucket/prefix`, the directory of
`file:///mnt/nas/toybox`) and use `/`; a target refuses a key that is absolute or has `..`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from typing import BinaryIO, Protocol

from ...core.settings import Settings
from .base import OffsiteError, Stored

__all__ = ["OffsiteError", "Stored", "Target", "open_target"]


class Target(Protocol):
    url: str  # for messages: OFFSITE_URL (holds no secret)

    def put(self, key: str, source: BinaryIO, *, retain_until: datetime | None = None) -> Stored:
        """Stream `source` (read to its end, never seeked) to `key`, replacing what is there,
        with bounded memory; verify it end to end before returning. Raises OffsiteError."""
        ...

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A stream of the object's bytes. Raises OffsiteError (also when it is missing)."""
        ...

    def check(self, stored: Stored) -> str | None:
        """None if the object still is what `stored` describes, else what is wrong. Cheap
        where the store keeps checksums (size and ETag), else by streaming its sha256."""
        ...

    def delete(self, key: str) -> bool:
        """Delete `key`; False if it was not there. Raises OffsiteError (e.g. retained by an
        Object Lock until a date)."""
        ...

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys under `prefix` (relative to the root), in no particular order."""
        ...

    def probe(self) -> None:
        """List, put and delete a small probe object (S3: start and abort a multipart upload
        too); OffsiteError in plain words if any fails (endpoint unreachable, bucket missing,
        access denied, clock skew, bad key)."""
        ...

    def clean_up(self) -> list[str]:
        """Remove from the store what puts cut short left there (S3: unfinished multipart
        uploads, recorded in STATE_DIR; `put` does it first too); the keys cleaned. Raises
        OffsiteError."""
        ...

    def lock_until(self, days: int, now: datetime) -> datetime | None:
        """The retain-until date for a new object kept `days` if the bucket has Object Lock
        enabled, else None (always None for a directory)."""
        ...


def open_target(settings: Settings) -> Target | None:
    """The target OFFSITE_URL names, or None when off-site copies are off."""
    url = settings.offsite_url
    if not url:
        return None
    if url.startswith("s3://"):
        from .s3 import S3Target
        return S3Target(settings)
    from .directory import DirectoryTarget
    return DirectoryTarget(settings)
