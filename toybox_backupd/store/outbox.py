"""Queries on the outbox (the state machine itself lives in notify).

One row per message and channel: `email` (an RFC 5322 message), `apprise` (a chat message as
JSON, one row per NOTIFY_URLS entry) or `ping` (a dead-man's-switch signal as JSON).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..core import redact
from ..core.basics import iso
from .base import StoreBase


class OutboxMixin(StoreBase):
    def outbox_add(self, *, run_id: int | None, message_id: str, subject: str, message: bytes,
                   recipients: list[str], now: datetime, channel: str = "email") -> int | None:
        """Queue a message as `pending`; None if its Message-ID is queued already."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO outbox(run_id, created_at, message_id, subject, message,"
                " recipients, status, attempts, next_try_at, channel)"
                " VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
                (run_id, iso(now), message_id, subject, message, ", ".join(recipients), iso(now),
                 channel))
            return int(cur.lastrowid or 0) if cur.rowcount else None

    def outbox_claim(self, now: datetime, lease_until: Any,
                     channel: str = "email") -> dict[str, Any] | None:
        """Take the channel's next due row (or an abandoned claim): mark it `sending` until
        `lease_until(recipient count)`; return the row as it was before, or None."""
        with self.tx() as db:
            row = db.execute(
                "SELECT id, run_id, created_at, message_id, message, recipients, status, attempts"
                " FROM outbox WHERE channel=? AND status IN ('pending', 'retrying', 'sending')"
                " AND next_try_at <= ? ORDER BY next_try_at, id LIMIT 1",
                (channel, iso(now))).fetchone()
            if row is None:
                return None
            claimed = dict(row)
            claimed["recipients"] = [part.strip() for part in row["recipients"].split(",")
                                     if part.strip()]
            db.execute("UPDATE outbox SET status='sending', attempts=attempts+1, next_try_at=?"
                       " WHERE id=?", (iso(lease_until(len(claimed["recipients"]))), row["id"]))
        return claimed

    def outbox_sent(self, outbox_id: int, now: datetime, note: str | None) -> None:
        with self.tx() as db:
            db.execute("UPDATE outbox SET status='sent', sent_at=?, last_error=? WHERE id=?",
                       (iso(now), redact.redact(note) if note else None, outbox_id))

    def outbox_failed(self, outbox_id: int, status: str, next_try: datetime, error: str) -> None:
        """A failed attempt: `retrying` at `next_try`, or `given_up`."""
        with self.tx() as db:
            db.execute("UPDATE outbox SET status=?, next_try_at=?, last_error=? WHERE id=?",
                       (status, iso(next_try), redact.redact(error), outbox_id))

    def outbox_trim(self, before: datetime) -> None:
        """Drop the bodies of messages finished before `before` (the rows stay)."""
        with self.tx() as db:
            db.execute("UPDATE outbox SET message=X'' WHERE status IN ('sent', 'given_up')"
                       " AND created_at < ? AND length(message) > 0", (iso(before),))

    def mail_status(self, run_id: int) -> str | None:
        """The state of a run's email for `history`: sent, pending, retrying (n), ..."""
        row = self.db.execute(
            "SELECT status, attempts FROM outbox WHERE run_id=? AND channel='email'"
            " ORDER BY id DESC LIMIT 1",
            (run_id,)).fetchone()
        if row is None:
            return None
        return str(row["status"]) if row["status"] != "retrying" else f"retrying ({row['attempts']})"

    def outbox_waiting(self, since: datetime) -> list[dict[str, Any]]:
        """Messages not delivered yet (pending, retrying, sending) and those given up that
        were queued after `since`, oldest first: what `status` lists as needing attention."""
        rows = self.db.execute(
            "SELECT id, run_id, channel, created_at, subject, status, attempts, next_try_at,"
            " last_error FROM outbox WHERE status IN ('pending', 'retrying', 'sending')"
            " OR (status='given_up' AND created_at >= ?) ORDER BY id", (iso(since),)).fetchall()
        return [dict(row) for row in rows]
