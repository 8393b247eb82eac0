"""What the targets share: the error they raise and the record of an object they stored.

Defined here rather than in `target.py` (which re-exports both) because `target.open_target`
imports the targets, and the targets must not import it back (no import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ...core.basics import ToyboxError


class OffsiteError(ToyboxError):
    """The target cannot be used right now; the message says why in plain words (no secret)."""


@dataclass(frozen=True)
class Stored:
    """One object as written and verified by `Target.put`."""

    key: str
    size: int  # bytes stored (the ciphertext when encrypted)
    sha256: str  # of the stored bytes
    verified_by: str  # how the copy was checked end to end: "etag", "read-back"
    etag: str | None = None  # the server's ETag (S3), for cheap checks later
    retain_until: datetime | None = None  # Object Lock retain-until date, if any
