"""Email reports of every run: composed from the SQLite store, queued in the outbox, sent by SMTP.

after_run(settings, store, run_id)
    reads the closed run row (never in-memory state), renders a plain-text report with an HTML
    alternative, puts the complete RFC 5322 message in the `outbox` table, then sends what is
    due. Never raises, never blocks for long: mail never fails or holds up a backup.
flush_outbox(settings, store)
    sends what is due (the daemon calls it every minute or so); returns how many went out.
send_test(settings) / check_smtp(settings)
    for `toybox-backupd notify test` and `toybox-backupd check`: the SMTP conversation's outcome
    in plain words.

The outbox (one row per message, `status`):
    pending   queued, never tried
    sending   claimed by a sender; `next_try_at` is the end of its lease (see below)
    retrying  the last attempt failed (`last_error`); tried again at `next_try_at`
    sent      the server accepted it (`sent_at`; `last_error` may note refused recipients)
    given_up  failed for GIVE_UP_AFTER (or MAX_ATTEMPTS attempts); kept for the record

A sender claims a row in a write transaction before it talks to the server, so two processes
(the daemon and a CLI run) never send the same row at once. A claim is a lease: a row still
`sending` after its lease ended belongs to a process that died mid-send; it is sent again
(the message may or may not have been delivered: losing a failure report is worse than a
duplicate). The Message-ID is fixed when the message is queued (one per run and state
database), so a repeat is the same message to the receiver, and a run is never queued twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import smtplib
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

from . import logs, redact, smtp
from .basics import backoff, iso, parse_iso, utcnow
from .report import (
    compose_fallback,
    compose_problem,
    compose_run,
    compose_test,
    register_secrets,
)
from .settings import Settings
from .smtp import NotifyError
from .store import Run, Store

log = logs.get("toybox_backupd.notify")

# the clock: tests may replace it (or pass `now=` to flush_outbox)
clock: Callable[[], datetime] = utcnow

GIVE_UP_AFTER = timedelta(hours=48)
MAX_ATTEMPTS = 60
KEEP_BODIES = timedelta(days=30)  # sent/given-up messages keep their row, lose their body after


# public interface ----------------------------------------------------------------------------
def after_run(settings: Settings, store: Store, run_id: int) -> None:
    """Queue the email about run `run_id` (per NOTIFY_ON) and send what is due. Never raises."""
    if not settings.notify_email_to:
        return
    try:
        run = store.run(run_id)
        if run is None:
            log.warning("no such run, no email", run_id=run_id)
        elif run.status == "running":
            log.warning("the run is not finished, no email yet", run_id=run_id)
        elif wanted(settings, run):
            enqueue_run(settings, store, run)
    except Exception as exc:
        log.error("could not queue the run's email", run_id=run_id,
                  error=redact.redact(f"{exc.__class__.__name__}: {exc}"))
    flush_outbox(settings, store)


def flush_outbox(settings: Settings, store: Store, *, now: datetime | None = None,
                 budget: float | None = None) -> int:
    """Send the outbox messages that are due; return how many were sent. Never raises.

    Stops after `budget` seconds (default 2 × SMTP_TIMEOUT) or at the first failure to reach
    the server; what is left waits for the next call.
    """
    if not settings.notify_email_to:
        return 0
    try:
        return _flush(settings, store, now, budget if budget is not None
                      else 2.0 * settings.smtp_timeout)
    except Exception as exc:
        log.error("sending queued emails failed", error=redact.redact(f"{exc.__class__.__name__}: {exc}"))
        return 0


def send_test(settings: Settings) -> tuple[bool, str]:
    """Send a test email now (not through the outbox); say how the server answered."""
    register_secrets(settings)
    if not settings.notify_email_to:
        return False, "test email not sent: NOTIFY_EMAIL_TO is empty, so there is nobody to write to"
    if not settings.smtp_from:
        return False, "test email not sent: SMTP_FROM is not set (the sender address)"
    try:
        message = compose_test(settings)
        with smtp.connection(settings) as conn:
            refused = smtp.send(conn.client, settings, settings.notify_email_to, message.as_bytes())
            how = conn.description
    except NotifyError as exc:
        return False, redact.redact(f"test email NOT sent: {exc}")
    except Exception as exc:  # a bug, still said plainly
        return False, redact.redact(f"test email NOT sent: {exc.__class__.__name__}: {exc}")
    accepted = [rcpt for rcpt in settings.notify_email_to if rcpt not in refused]
    text = f"test email sent to {', '.join(accepted)} via {how}"
    if refused:
        text += "; refused by the server: " + smtp.refused_text(refused)
    return True, redact.redact(text)


def check_smtp(settings: Settings) -> str:
    """Connect, EHLO, STARTTLS/SSL, AUTH (if SMTP_USER), QUIT; a short description or NotifyError."""
    register_secrets(settings)
    with smtp.connection(settings) as conn:
        try:
            conn.client.noop()
        except Exception as exc:
            raise NotifyError(smtp.describe_error(exc, settings, "NOOP")) from None
        return conn.description


def wanted(settings: Settings, run: Run) -> bool:
    """NOTIFY_ON=all: every run. failure: every run that is not OK, and every catch-up run
    (a catch-up means a scheduled time was missed, which the operator should hear about)."""
    if settings.notify_on == "all":
        return True
    return run.status != "ok" or run.trigger == "catchup"


# the outbox ----------------------------------------------------------------------------------
def enqueue_run(settings: Settings, store: Store, run: Run) -> int | None:
    """Compose the run's email and queue it; None if this run's email is already queued."""
    now = clock()
    message_id = run_message_id(store, run.id)
    try:
        message = compose_run(settings, store, run, message_id=message_id, now=now)
    except Exception as exc:  # a report is better than none: fall back to the bare facts
        log.error("could not build the full report, sending a short one", run_id=run.id,
                  error=redact.redact(f"{exc.__class__.__name__}: {exc}"))
        message = compose_fallback(settings, run, message_id=message_id, now=now,
                                   problem=f"{exc.__class__.__name__}: {exc}")
    return enqueue(store, message, run_id=run.id, recipients=settings.notify_email_to, now=now)


def enqueue(store: Store, message: EmailMessage, *, run_id: int | None,
            recipients: list[str], now: datetime | None = None) -> int | None:
    """Queue `message`; None if a message with its Message-ID is queued already."""
    now = now or clock()
    outbox_id = store.outbox_add(run_id=run_id, message_id=str(message["Message-ID"]),
                                 subject=str(message["Subject"]), message=message.as_bytes(),
                                 recipients=recipients, now=now)
    if outbox_id is not None:
        log.info("email queued", outbox_id=outbox_id, run_id=run_id,
                 subject=str(message["Subject"]))
    return outbox_id


def enqueue_problem(settings: Settings, store: Store, lines: list[str], *, what: str,
                    source: str) -> int | None:
    """Queue the email about a settings problem; the same problems are emailed once per state
    database (a restart does not repeat them). Never raises."""
    if not settings.notify_email_to:
        return None
    try:
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
        message_id = (f"<toybox-backupd.settings-{digest}.{store.instance_id()[:16]}"
                      f"@{smtp.host_token()}>")
        message = compose_problem(settings, lines, what=what, source=source,
                                  message_id=message_id, now=clock())
        return enqueue(store, message, run_id=None, recipients=settings.notify_email_to)
    except Exception as exc:
        log.error("could not queue the email about the settings",
                  error=redact.redact(f"{exc.__class__.__name__}: {exc}"))
        return None


def run_message_id(store: Store, run_id: int) -> str:
    """One Message-ID per run and state database (the same on every retry)."""
    return f"<toybox-backupd.run-{run_id}.{store.instance_id()[:16]}@{smtp.host_token()}>"


def _lease(settings: Settings, recipients: int) -> timedelta:
    """How long a claimed row may stay `sending` before it counts as abandoned."""
    return timedelta(seconds=settings.smtp_timeout * (8 + recipients) + 60)


def _claim(settings: Settings, store: Store, now: datetime) -> dict[str, Any] | None:
    """Take the next due row (or an abandoned claim) for this process; None if none is due."""
    row = store.outbox_claim(now, lambda count: now + _lease(settings, count))
    if row is None:
        return None
    row["abandoned"] = row["status"] == "sending"
    row["attempts"] += 1
    if row["abandoned"]:
        log.warning("an earlier attempt to send this email was cut off; sending it again",
                    outbox_id=row["id"], message_id=row["message_id"])
    return row


def _record_sent(store: Store, row: dict[str, Any], now: datetime, note: str | None) -> None:
    if row["abandoned"]:
        note = "; ".join(filter(None, [note, "an earlier attempt was cut off while sending, so the "
                                             "server may have received this message twice "
                                             "(same Message-ID)"]))
    store.outbox_sent(row["id"], now, note)
    log.info("email sent", outbox_id=row["id"], run_id=row["run_id"], attempts=row["attempts"],
             recipients=", ".join(row["recipients"]))


def _record_failure(store: Store, row: dict[str, Any], now: datetime, error: str) -> None:
    error = redact.redact(error)
    created = parse_iso(row["created_at"]) or now
    attempts = int(row["attempts"])
    if attempts >= MAX_ATTEMPTS or now - created >= GIVE_UP_AFTER:
        hours = (now - created).total_seconds() / 3600
        error = f"gave up after {attempts} attempt(s) in {hours:.1f} h; last error: {error}"
        store.outbox_failed(row["id"], "given_up", now, error)
        log.error("email given up", outbox_id=row["id"], run_id=row["run_id"], error=error)
        return
    next_try = now + backoff(attempts)
    store.outbox_failed(row["id"], "retrying", next_try, error)
    log.warning("email not sent, will retry", outbox_id=row["id"], run_id=row["run_id"],
                attempts=attempts, next_try=iso(next_try), error=error)


def _flush(settings: Settings, store: Store, now: datetime | None, budget: float) -> int:
    register_secrets(settings)
    store.outbox_trim((now or clock()) - KEEP_BODIES)
    started = time.monotonic()
    sent = 0
    conn: smtp.Connection | None = None
    try:
        while time.monotonic() - started < budget:
            moment = now or clock()
            row = _claim(settings, store, moment)
            if row is None:
                break
            try:
                if conn is None:
                    conn = smtp.open_connection(settings)
                refused = smtp.send(conn.client, settings, row["recipients"], row["message"])
            except Exception as exc:
                error = (str(exc) if isinstance(exc, NotifyError)
                         else smtp.describe_error(exc, settings, "sending"))
                _record_failure(store, row, now or clock(), error)
                if conn is not None and _message_level(exc):
                    with contextlib.suppress(Exception):
                        conn.client.rset()
                    continue
                break  # the server is unreachable or unhappy: leave the rest for later
            note = None
            if refused:
                note = "refused by the server: " + smtp.refused_text(refused)
            _record_sent(store, row, now or clock(), note)
            sent += 1
    finally:
        if conn is not None:
            conn.close()
    return sent


def _message_level(exc: BaseException) -> bool:
    """A failure of this one message, after which the connection is still usable."""
    cause = exc.__cause__ if isinstance(exc, NotifyError) else exc
    return isinstance(cause, smtplib.SMTPRecipientsRefused | smtplib.SMTPSenderRefused
                      | smtplib.SMTPDataError)
