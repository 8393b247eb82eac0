"""Queries on the off-site copies of artifacts (the copying itself lives in offsite/)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from ..core import redact
from ..core.basics import iso
from .base import StoreBase
from .records import Copy


class OffsiteMixin(StoreBase):
    def copy_pending(self, artifact_id: int, url: str, now: datetime) -> None:
        """Queue an artifact's copy to `url` (due now); a copy already done stays done."""
        with self.tx() as db:
            db.execute(
                "INSERT INTO offsite_copies(artifact_id, url, status, next_try_at)"
                " VALUES (?, ?, 'pending', ?) ON CONFLICT(artifact_id) DO UPDATE SET"
                " url=excluded.url, status='pending', next_try_at=excluded.next_try_at,"
                " deleted_at=NULL WHERE offsite_copies.status NOT IN ('ok')",
                (artifact_id, url, iso(now)))

    def copy_done(self, artifact_id: int, *, url: str, objects: list[dict[str, Any]],
                  recipients: list[str], now: datetime, retain_until: datetime | None) -> None:
        """The artifact and its companions are off-site, verified (insert or update)."""
        with self.tx() as db:
            db.execute(
                "INSERT INTO offsite_copies(artifact_id, url, status, objects, recipients,"
                " copied_at, verified_at, retain_until, last_error) VALUES"
                " (?, ?, 'ok', ?, ?, ?, ?, ?, NULL) ON CONFLICT(artifact_id) DO UPDATE SET"
                " url=excluded.url, status='ok', objects=excluded.objects,"
                " recipients=excluded.recipients, copied_at=excluded.copied_at,"
                " verified_at=excluded.verified_at, retain_until=excluded.retain_until,"
                " last_error=NULL, deleted_at=NULL",
                (artifact_id, url, json.dumps(objects), json.dumps(recipients), iso(now),
                 iso(now), iso(retain_until) if retain_until else None))

    def copy_failed(self, artifact_id: int, error: str, next_try: datetime) -> None:
        """A failed attempt: still pending, tried again at `next_try`."""
        with self.tx() as db:
            db.execute(
                "UPDATE offsite_copies SET status='pending', attempts=attempts+1,"
                " next_try_at=?, last_error=? WHERE artifact_id=?",
                (iso(next_try), redact.redact(error), artifact_id))

    def set_copy_status(self, artifact_id: int, status: str, now: datetime,
                        error: str | None = None) -> None:
        """`ok` (checked now), `corrupt` or `deleted`."""
        with self.tx() as db:
            db.execute(
                "UPDATE offsite_copies SET status=?, last_error=?,"
                " verified_at=CASE WHEN ?='ok' THEN ? ELSE verified_at END,"
                " deleted_at=CASE WHEN ?='deleted' THEN ? ELSE deleted_at END"
                " WHERE artifact_id=?",
                (status, redact.redact(error) if error else None, status, iso(now), status,
                 iso(now), artifact_id))

    def offsite_copy(self, artifact_id: int) -> Copy | None:
        row = self.db.execute("SELECT * FROM offsite_copies WHERE artifact_id=?",
                              (artifact_id,)).fetchone()
        return Copy.from_row(row) if row else None

    def offsite_copies(self, statuses: Iterable[str] = ("ok",)) -> list[Copy]:
        """Copies with one of `statuses`, by artifact id."""
        statuses = list(statuses)
        rows = self.db.execute(
            f"SELECT * FROM offsite_copies WHERE status IN ({','.join('?' * len(statuses))})"
            " ORDER BY artifact_id", statuses)
        return [Copy.from_row(row) for row in rows]

    def queue_uncopied(self, url: str, now: datetime) -> int:
        """Queue every kept local artifact that has no good copy at `url` (made before off-site
        was turned on, copied to an earlier OFFSITE_URL, or found corrupt there by `verify
        --offsite`); how many were queued."""
        with self.tx() as db:
            moved = db.execute(
                "UPDATE offsite_copies SET url=?, status='pending', attempts=0, next_try_at=?,"
                " objects='[]', last_error=NULL WHERE (url<>? OR status='corrupt') AND status<>'lost'"
                " AND artifact_id"
                " IN (SELECT id FROM artifacts WHERE status='ok')", (url, iso(now), url)).rowcount
            added = db.execute(
                "INSERT INTO offsite_copies(artifact_id, url, status, next_try_at)"
                " SELECT id, ?, 'pending', ? FROM artifacts WHERE status='ok' AND id NOT IN"
                " (SELECT artifact_id FROM offsite_copies)", (url, iso(now))).rowcount
        return int(moved or 0) + int(added or 0)

    def copies_due(self, now: datetime) -> list[Copy]:
        """Pending copies whose next attempt is due, oldest artifact first."""
        rows = self.db.execute(
            "SELECT * FROM offsite_copies WHERE status='pending' AND next_try_at <= ?"
            " ORDER BY artifact_id", (iso(now),))
        return [Copy.from_row(row) for row in rows]
