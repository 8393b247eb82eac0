"""Email reports of every run: composed from the SQLite history, queued in the outbox, sent by SMTP.

after_run(settings, history, run_id)
    reads the closed run row (never in-memory state), renders a plain-text report with an HTML
    alternative, puts the complete RFC 5322 message in the `outbox` table, then sends what is
    due. Never raises, never blocks for long: mail never fails or holds up a backup.
flush_outbox(settings, history)
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
import email.policy
import email.utils
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

from . import logs, redact
from .history import History, Run, iso, parse_iso, utcnow
from .report import (
    compose_fallback,
    compose_run,
    compose_test,
    host_token,
    register_secrets,
)
from .settings import Settings

log = logs.get("toybox_backupd.notify")

# the clock: tests may replace it (or pass `now=` to flush_outbox)
clock: Callable[[], datetime] = utcnow

BACKOFF_MINUTES = (1, 2, 5, 10, 30, 60)  # then every 60 minutes
GIVE_UP_AFTER = timedelta(hours=48)
MAX_ATTEMPTS = 60
KEEP_BODIES = timedelta(days=30)  # sent/given-up messages keep their row, lose their body after
class NotifyError(Exception):
    """An SMTP problem, already in words an operator can act on (no secrets)."""


# public interface ----------------------------------------------------------------------------
def after_run(settings: Settings, history: History, run_id: int) -> None:
    """Queue the email about run `run_id` (per NOTIFY_ON) and send what is due. Never raises."""
    if not settings.notify_email_to:
        return
    try:
        run = history.run(run_id)
        if run is None:
            log.warning("no such run, no email", run_id=run_id)
        elif run.status == "running":
            log.warning("the run is not finished, no email yet", run_id=run_id)
        elif wanted(settings, run):
            enqueue_run(settings, history, run)
    except Exception as exc:
        log.error("could not queue the run's email", run_id=run_id,
                  error=redact.redact(f"{exc.__class__.__name__}: {exc}"))
    flush_outbox(settings, history)


def flush_outbox(settings: Settings, history: History, *, now: datetime | None = None,
                 budget: float | None = None) -> int:
    """Send the outbox messages that are due; return how many were sent. Never raises.

    Stops after `budget` seconds (default 2 × SMTP_TIMEOUT) or at the first failure to reach
    the server; what is left waits for the next call.
    """
    if not settings.notify_email_to:
        return 0
    try:
        return _flush(settings, history, now, budget if budget is not None
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
        with _connection(settings) as conn:
            refused = _send(conn.client, settings, settings.notify_email_to, message.as_bytes())
            how = conn.description
    except NotifyError as exc:
        return False, redact.redact(f"test email NOT sent: {exc}")
    except Exception as exc:  # a bug, still said plainly
        return False, redact.redact(f"test email NOT sent: {exc.__class__.__name__}: {exc}")
    accepted = [rcpt for rcpt in settings.notify_email_to if rcpt not in refused]
    text = f"test email sent to {', '.join(accepted)} via {how}"
    if refused:
        text += "; refused by the server: " + "; ".join(
            f"{rcpt} ({_smtp_reply(code, msg)})" for rcpt, (code, msg) in refused.items())
    return True, redact.redact(text)


def check_smtp(settings: Settings) -> str:
    """Connect, EHLO, STARTTLS/SSL, AUTH (if SMTP_USER), QUIT; a short description or NotifyError."""
    register_secrets(settings)
    with _connection(settings) as conn:
        try:
            conn.client.noop()
        except Exception as exc:
            raise NotifyError(describe_error(exc, settings, "NOOP")) from None
        return conn.description


def wanted(settings: Settings, run: Run) -> bool:
    """NOTIFY_ON=all: every run. failure: every run that is not OK, and every catch-up run
    (a catch-up means a scheduled time was missed, which the operator should hear about)."""
    if settings.notify_on == "all":
        return True
    return run.status != "ok" or run.trigger == "catchup"


# the outbox ----------------------------------------------------------------------------------
def enqueue_run(settings: Settings, history: History, run: Run) -> int | None:
    """Compose the run's email and queue it; None if this run's email is already queued."""
    now = clock()
    message_id = run_message_id(history, run.id)
    try:
        message = compose_run(settings, history, run, message_id=message_id, now=now)
    except Exception as exc:  # a report is better than none: fall back to the bare facts
        log.error("could not build the full report, sending a short one", run_id=run.id,
                  error=redact.redact(f"{exc.__class__.__name__}: {exc}"))
        message = compose_fallback(settings, run, message_id=message_id, now=now,
                                   problem=f"{exc.__class__.__name__}: {exc}")
    return enqueue(history, message, run_id=run.id, recipients=settings.notify_email_to, now=now)


def enqueue(history: History, message: EmailMessage, *, run_id: int | None,
            recipients: list[str], now: datetime | None = None) -> int | None:
    now = now or clock()
    with history.tx() as db:
        cur = db.execute(
            "INSERT OR IGNORE INTO outbox(run_id, created_at, message_id, subject, message,"
            " recipients, status, attempts, next_try_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?)",
            (run_id, iso(now), str(message["Message-ID"]), str(message["Subject"]),
             message.as_bytes(), ", ".join(recipients), iso(now)))
        if not cur.rowcount:
            return None
        outbox_id = int(cur.lastrowid or 0)
    log.info("email queued", outbox_id=outbox_id, run_id=run_id, subject=str(message["Subject"]))
    return outbox_id


def run_message_id(history: History, run_id: int) -> str:
    """One Message-ID per run and state database (the same on every retry)."""
    return f"<toybox-backupd.run-{run_id}.{_instance(history)}@{host_token()}>"


def backoff(attempts: int) -> timedelta:
    """Wait after the `attempts`-th failed attempt: 1, 2, 5, 10, 30, 60, 60, ... minutes."""
    return timedelta(minutes=BACKOFF_MINUTES[min(max(attempts, 1), len(BACKOFF_MINUTES)) - 1])


def _instance(history: History) -> str:
    key = "notify.instance"
    value = history.get_state(key)
    if value:
        return value
    with history.tx() as db:
        db.execute("INSERT OR IGNORE INTO state(key, value) VALUES (?, ?)", (key, uuid.uuid4().hex[:16]))
    return history.get_state(key) or "0"


def _lease(settings: Settings, recipients: int) -> timedelta:
    """How long a claimed row may stay `sending` before it counts as abandoned."""
    return timedelta(seconds=settings.smtp_timeout * (8 + recipients) + 60)


def _claim(settings: Settings, history: History, now: datetime) -> dict[str, Any] | None:
    """Take the next due row (or an abandoned claim) for this process; None if none is due."""
    with history.tx() as db:
        row = db.execute(
            "SELECT id, run_id, created_at, message_id, message, recipients, status, attempts"
            " FROM outbox WHERE status IN ('pending', 'retrying', 'sending') AND next_try_at <= ?"
            " ORDER BY next_try_at, id LIMIT 1", (iso(now),)).fetchone()
        if row is None:
            return None
        recipients = [part.strip() for part in row["recipients"].split(",") if part.strip()]
        db.execute("UPDATE outbox SET status='sending', attempts=attempts+1, next_try_at=? WHERE id=?",
                   (iso(now + _lease(settings, len(recipients))), row["id"]))
    claimed = dict(row)
    claimed["recipients"] = recipients
    claimed["attempts"] = row["attempts"] + 1
    claimed["abandoned"] = row["status"] == "sending"
    if claimed["abandoned"]:
        log.warning("an earlier attempt to send this email was cut off; sending it again",
                    outbox_id=row["id"], message_id=row["message_id"])
    return claimed


def _record_sent(history: History, row: dict[str, Any], now: datetime, note: str | None) -> None:
    if row["abandoned"]:
        note = "; ".join(filter(None, [note, "an earlier attempt was cut off while sending, so the "
                                             "server may have received this message twice "
                                             "(same Message-ID)"]))
    with history.tx() as db:
        db.execute("UPDATE outbox SET status='sent', sent_at=?, last_error=? WHERE id=?",
                   (iso(now), redact.redact(note) if note else None, row["id"]))
    log.info("email sent", outbox_id=row["id"], run_id=row["run_id"], attempts=row["attempts"],
             recipients=", ".join(row["recipients"]))


def _record_failure(history: History, row: dict[str, Any], now: datetime, error: str) -> None:
    error = redact.redact(error)
    created = parse_iso(row["created_at"]) or now
    attempts = int(row["attempts"])
    if attempts >= MAX_ATTEMPTS or now - created >= GIVE_UP_AFTER:
        hours = (now - created).total_seconds() / 3600
        error = f"gave up after {attempts} attempt(s) in {hours:.1f} h; last error: {error}"
        with history.tx() as db:
            db.execute("UPDATE outbox SET status='given_up', next_try_at=?, last_error=? WHERE id=?",
                       (iso(now), error, row["id"]))
        log.error("email given up", outbox_id=row["id"], run_id=row["run_id"], error=error)
        return
    next_try = now + backoff(attempts)
    with history.tx() as db:
        db.execute("UPDATE outbox SET status='retrying', next_try_at=?, last_error=? WHERE id=?",
                   (iso(next_try), error, row["id"]))
    log.warning("email not sent, will retry", outbox_id=row["id"], run_id=row["run_id"],
                attempts=attempts, next_try=iso(next_try), error=error)


def _flush(settings: Settings, history: History, now: datetime | None, budget: float) -> int:
    register_secrets(settings)
    _trim(history, now or clock())
    started = time.monotonic()
    sent = 0
    conn: _Connection | None = None
    try:
        while time.monotonic() - started < budget:
            moment = now or clock()
            row = _claim(settings, history, moment)
            if row is None:
                break
            try:
                if conn is None:
                    conn = _open(settings)
                refused = _send(conn.client, settings, row["recipients"], row["message"])
            except Exception as exc:
                error = str(exc) if isinstance(exc, NotifyError) else describe_error(exc, settings, "sending")
                _record_failure(history, row, now or clock(), error)
                if conn is not None and _message_level(exc):
                    with contextlib.suppress(Exception):
                        conn.client.rset()
                    continue
                break  # the server is unreachable or unhappy: leave the rest for later
            note = None
            if refused:
                note = "refused by the server: " + "; ".join(
                    f"{rcpt} ({_smtp_reply(code, msg)})" for rcpt, (code, msg) in refused.items())
            _record_sent(history, row, now or clock(), note)
            sent += 1
    finally:
        if conn is not None:
            conn.close()
    return sent


def _trim(history: History, now: datetime) -> None:
    """Drop the bodies of long-finished messages (the row and its status stay for `history`)."""
    with history.tx() as db:
        db.execute("UPDATE outbox SET message=X'' WHERE status IN ('sent', 'given_up')"
                   " AND created_at < ? AND length(message) > 0", (iso(now - KEEP_BODIES),))


def _message_level(exc: BaseException) -> bool:
    """A failure of this one message, after which the connection is still usable."""
    cause = exc.__cause__ if isinstance(exc, NotifyError) else exc
    return isinstance(cause, smtplib.SMTPRecipientsRefused | smtplib.SMTPSenderRefused
                      | smtplib.SMTPDataError)


# SMTP ------------------------------------------------------------------------------------------
@dataclass
class _Connection:
    client: smtplib.SMTP
    description: str

    def close(self) -> None:
        try:
            self.client.quit()
        except Exception:
            with contextlib.suppress(Exception):
                self.client.close()


@contextlib.contextmanager
def _connection(settings: Settings) -> Iterator[_Connection]:
    conn = _open(settings)
    try:
        yield conn
    finally:
        conn.close()


def _tls_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if settings.smtp_ca_file:
        try:
            context.load_verify_locations(cafile=str(settings.smtp_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise NotifyError(f"SMTP_CA_FILE: cannot use {settings.smtp_ca_file}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
    return context


def _open(settings: Settings) -> _Connection:
    """A connected, greeted, encrypted (as configured) and logged-in SMTP client."""
    if not settings.smtp_host:
        raise NotifyError("SMTP_HOST is not set, so there is no mail server to send through")
    security = settings.smtp_security
    context = _tls_context(settings) if security != "none" else None
    helo = host_token()
    client: smtplib.SMTP | None = None
    stage = "connecting"
    parts = [f"{settings.smtp_host}:{settings.smtp_port}"]
    try:
        # the constructor connects and reads the greeting (SMTPConnectError unless 220)
        if security == "ssl":
            client = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, local_hostname=helo,
                                      timeout=settings.smtp_timeout, context=context)
        else:
            client = smtplib.SMTP(settings.smtp_host, settings.smtp_port, local_hostname=helo,
                                  timeout=settings.smtp_timeout)
        stage = "EHLO"
        client.ehlo_or_helo_if_needed()
        if security == "ssl":
            parts.append("SSL/TLS, certificate verified")
        elif security == "starttls":
            stage = "STARTTLS"
            if not client.has_extn("starttls"):
                raise NotifyError(
                    f"the server at {parts[0]} does not offer STARTTLS; use SMTP_SECURITY=ssl "
                    "if it expects TLS from the start (usually port 465), or SMTP_SECURITY=none "
                    "for a server on a trusted network")
            client.starttls(context=context)
            client.ehlo()
            parts.append("STARTTLS, certificate verified")
        else:
            parts.append("no encryption")
        if settings.smtp_user:
            stage = "AUTH"
            if not client.has_extn("auth"):
                raise NotifyError(
                    f"the server at {parts[0]} does not offer AUTH (login) "
                    + ("over an unencrypted connection; set SMTP_SECURITY=starttls or ssl"
                       if security == "none" else "; leave SMTP_USER empty if it needs no login"))
            client.login(settings.smtp_user, settings.smtp_password_value or "")
            parts.append(f"logged in as {settings.smtp_user}")
        else:
            parts.append("no login")
    except Exception as exc:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if isinstance(exc, NotifyError):
            raise
        raise NotifyError(describe_error(exc, settings, stage)) from exc
    return _Connection(client, f"{parts[0]} ({', '.join(parts[1:])})")


def _send(client: smtplib.SMTP, settings: Settings, recipients: list[str],
          message: bytes) -> dict[str, tuple[int, bytes]]:
    sender = email.utils.parseaddr(settings.smtp_from or "")[1]
    if not sender:
        raise NotifyError("SMTP_FROM is not set (the sender address)")
    if not recipients:
        raise NotifyError("the message has no recipients")
    try:
        return client.sendmail(sender, recipients, message)
    except Exception as exc:
        raise NotifyError(describe_error(exc, settings, "sending")) from exc


def _smtp_reply(code: int, message: bytes | str) -> str:
    text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
    return f"{code} {' '.join(text.split())}".strip()


def describe_error(exc: BaseException, settings: Settings, stage: str = "") -> str:
    """An SMTP/network failure in plain words (no secrets)."""
    where = f"{settings.smtp_host}:{settings.smtp_port}"
    during = f" (during {stage})" if stage and stage not in ("connecting", "sending") else ""
    text: str
    if isinstance(exc, smtplib.SMTPServerDisconnected) and isinstance(exc.__context__, OSError):
        exc = exc.__context__  # smtplib hides a timeout or reset behind "unexpectedly closed"
    if isinstance(exc, NotifyError):
        text = str(exc)
    elif isinstance(exc, smtplib.SMTPAuthenticationError):
        text = (f"authentication failed: the server at {where} refused SMTP_USER "
                f"{settings.smtp_user!r} with the configured SMTP_PASSWORD "
                f"({_smtp_reply(exc.smtp_code, exc.smtp_error)}); check the user name and password")
    elif isinstance(exc, smtplib.SMTPRecipientsRefused):
        refused = "; ".join(f"{rcpt} ({_smtp_reply(code, msg)})"
                            for rcpt, (code, msg) in exc.recipients.items())
        text = f"recipient refused: the server at {where} accepted none of the recipients: {refused}"
    elif isinstance(exc, smtplib.SMTPSenderRefused):
        text = (f"sender refused: the server at {where} does not accept SMTP_FROM {exc.sender!r} "
                f"({_smtp_reply(exc.smtp_code, exc.smtp_error)})")
    elif isinstance(exc, smtplib.SMTPDataError):
        text = f"message refused by the server at {where} ({_smtp_reply(exc.smtp_code, exc.smtp_error)})"
    elif isinstance(exc, smtplib.SMTPNotSupportedError):
        text = f"the server at {where} does not support what was asked{during}: {exc}"
    elif isinstance(exc, smtplib.SMTPServerDisconnected):
        text = (f"the server at {where} closed the connection unexpectedly{during}"
                + (f": {exc}" if str(exc) else "")
                + ("; is SMTP_SECURITY right for this port (465 = ssl, 587 = starttls)?"
                   if stage in ("connecting", "EHLO") else ""))
    elif isinstance(exc, smtplib.SMTPConnectError):
        text = (f"the server at {where} refused the session: it greeted with "
                f"{_smtp_reply(exc.smtp_code, exc.smtp_error)} instead of 220 (ready)")
    elif isinstance(exc, smtplib.SMTPResponseException):
        text = f"the server at {where} answered {_smtp_reply(exc.smtp_code, exc.smtp_error)}{during}"
    elif isinstance(exc, ssl.SSLCertVerificationError):
        text = (f"TLS failed: the certificate of {where} is not trusted "
                f"({exc.verify_message or exc.reason}); check SMTP_HOST matches the certificate, "
                "or give its CA in SMTP_CA_FILE")
    elif isinstance(exc, ssl.SSLError):
        hint = ""
        if "WRONG_VERSION_NUMBER" in str(exc).upper() or "wrong version" in str(exc).lower():
            hint = "; the server does not speak TLS here: is SMTP_SECURITY right for this port " \
                   "(465 = ssl, 587 = starttls)?"
        reason = str(exc.reason).replace("_", " ").lower() if exc.reason else str(exc)
        text = f"TLS failed with {where}{during}: {reason}{hint}"
    elif isinstance(exc, ConnectionRefusedError):
        text = f"connection refused by {where}: no mail server listens there (check SMTP_HOST and SMTP_PORT)"
    elif isinstance(exc, TimeoutError | socket.timeout):
        text = (f"timed out after {settings.smtp_timeout} s waiting for {where}{during} "
                "(SMTP_TIMEOUT); is the host reachable and the port right?")
    elif isinstance(exc, socket.gaierror):
        text = f"cannot resolve SMTP_HOST {settings.smtp_host!r}: {exc.strerror or exc}"
    elif isinstance(exc, OSError):
        text = f"network error talking to {where}{during}: {exc.strerror or exc}"
    else:
        text = f"{exc.__class__.__name__} talking to {where}{during}: {exc}"
    return redact.redact(text)
