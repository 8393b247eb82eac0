"""Shared basics: errors, what a run looks like to a tier, results, and formatting.

A leaf: nothing here imports the rest of the package, so every module may import it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover - types only
    from pathlib import Path


# errors ---------------------------------------------------------------------------------------
class ToyboxError(Exception):
    """A failure already put in words an operator can act on: shown as it is, no traceback."""


class JobError(ToyboxError):
    """A backup, restore or verify step failed; the message says what and why."""


class TimeLimitReached(JobError):
    """A restore ran past its time limit and was stopped (what it replaces is kept)."""


class CatalogError(ToyboxError):
    """No usable restore point for the request; nothing was changed."""


class Unverifiable(ToyboxError):
    """An artifact could not be checked right now (e.g. the database container is stopped);
    that says nothing about the artifact itself."""


class DiskFullError(ToyboxError, OSError):
    """The backup directory ran out of space while writing; the partial file is removed."""

    def __init__(self, directory: Path | str, code: int = errno.ENOSPC):
        OSError.__init__(self, code, f"no space left in {directory}")
        self.directory = directory

    def __str__(self) -> str:
        return (f"the backup directory is full (no space left in {self.directory}); the partial "
                "file was removed and older backups are untouched")


class Cancelled(Exception):
    """The run was ended from outside: its time limit, or an abort signal."""

    def __init__(self, reason: str, status: str):
        super().__init__(reason)
        self.status = status


def describe_unexpected(exc: BaseException) -> str:
    """One line for an exception nobody put in words (not yet redacted: callers redact)."""
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    return f"{exc.__class__.__name__}: {text}"


# what a tier sees of a run --------------------------------------------------------------------
Say = Callable[[str], None]
"""A callback that shows one line to the operator (the CLI prints it; others may log it)."""



def silent(_line: str) -> None:
    """A `Say` that shows nothing."""


Confirm = Callable[[str], bool] | None
"""Asked before anything is replaced; None means "do not ask" (--yes)."""


@dataclass
class TierResult:
    """What a tier's backup made: bytes written, artifact paths, details for the run row."""

    bytes: int = 0
    artifacts: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class RunContext(Protocol):
    """One run as a tier sees it (runner.Run implements it)."""

    settings: Any
    store: Any
    run_id: int
    job: Any
    trigger: str
    targets: list[str]
    details: dict[str, Any]

    @property
    def log(self) -> Any: ...
    def check(self) -> None: ...
    def on_cancel(self, callback: Callable[[], None]) -> AbstractContextManager[None]: ...
    def note(self, **details: Any) -> None: ...


# time -----------------------------------------------------------------------------------------
def utcnow() -> datetime:
    """Now, aware, in UTC."""
    return datetime.now(UTC)


def iso(moment: datetime | None = None) -> str:
    """UTC ISO-8601 with microseconds: the store's one time format."""
    return (moment or utcnow()).astimezone(UTC).isoformat(timespec="microseconds")


def parse_iso(text: str | None) -> datetime | None:
    """The inverse of `iso`; None for None or empty."""
    return datetime.fromisoformat(text) if text else None


LOCAL_FORMATS = {
    "seconds": "%Y-%m-%d %H:%M:%S %Z",   # a moment: "2026-01-26 17:45:03 JST"
    "minutes": "%Y-%m-%d %H:%M %Z",
    "subject": "%Y-%m-%d %H:%M",          # in an email's subject, after the target
    "weekday": "%a %Y-%m-%d %H:%M %Z",   # a schedule slot: "Mon 2026-01-26 17:45 JST"
    "table": "%Y-%m-%d %H:%M:%S",        # a column whose header names the zone
    "stamp": "%Y%m%d-%H%M%S",            # in file names
}


def local_time(moment: datetime | None, zone: tzinfo, style: str = "seconds") -> str:
    """`moment` in `zone`, in one of LOCAL_FORMATS; "-" for None."""
    if moment is None:
        return "-"
    return moment.astimezone(zone).strftime(LOCAL_FORMATS[style])


# sizes and durations ---------------------------------------------------------------------------
def human(size: float | None) -> str:
    """Bytes in binary units: "512 B", "1.5 MiB"; "-" for None."""
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def duration_text(seconds: float | None) -> str:
    """A run's duration: "4.2 s", "3 min 07 s", "1 h 05 min"; "-" for None."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def ago(delta: timedelta) -> str:
    """An age, coarser as it grows: "45 s", "12 min", "3.5 h", "2.0 days"."""
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 2 * 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


BACKOFF_MINUTES = (1, 2, 5, 10, 30, 60)  # then every 60 minutes


def backoff(attempts: int) -> timedelta:
    """Wait after the `attempts`-th failed attempt: 1, 2, 5, 10, 30, 60, 60, ... minutes
    (emails and off-site copies are retried so, across restarts, until done)."""
    return timedelta(minutes=BACKOFF_MINUTES[min(max(attempts, 1), len(BACKOFF_MINUTES)) - 1])
