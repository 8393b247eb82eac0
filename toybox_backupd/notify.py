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
import html
import json
import re
import shutil
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

from . import __version__, logs, redact
from .history import Artifact, History, Run, iso, parse_iso, utcnow
from .runner import human
from .schedule import next_times
from .settings import JOBS, Settings

log = logs.get("toybox_backupd.notify")

BACKOFF_MINUTES = (1, 2, 5, 10, 30, 60)  # then every 60 minutes
GIVE_UP_AFTER = timedelta(hours=48)
MAX_ATTEMPTS = 60
KEEP_BODIES = timedelta(days=30)  # sent/given-up messages keep their row, lose their body after
WINDOW_DAYS = 7
MAX_WARNINGS = 20
SUBJECT_PREFIX = "[toybox-backupd]"

STATUS_WORDS = {"ok": "OK", "failed": "FAILED", "interrupted": "INTERRUPTED"}
SCHEDULE_VARS = {"pgdump": "PGDUMP_SCHEDULE", "full": "VOLUME_FULL_SCHEDULE",
                 "diff": "VOLUME_DIFF_SCHEDULE"}
TIER_ORDER = ("logical", "full", "diff")
JOB_LABELS = {"pgdump": "logical backup (pg_dump)", "full": "full volume backup",
              "diff": "differential volume backup"}
GRID_LABELS = {"pgdump": "logical (pgdump)", "full": "full", "diff": "diff"}

# the clock: tests may replace it (or pass `now=` to flush_outbox)
clock: Callable[[], datetime] = utcnow


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
    _register_secrets(settings)
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
    _register_secrets(settings)
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
    return f"<toybox-backupd.run-{run_id}.{_instance(history)}@{_host_token()}>"


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
    _register_secrets(settings)
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
    helo = _host_token()
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


# composing -----------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_BODY_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def header_text(value: object, limit: int = 200) -> str:
    """A single line safe for a header: no CR/LF or other control characters, no secrets."""
    text = " ".join(_CONTROL.sub(" ", redact.redact(str(value))).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def body_text(value: object) -> str:
    """Text for a body: newlines normalised, other control characters dropped, no secrets."""
    text = str(value).replace("\r\n", "\n").replace("\r", "\n")
    return redact.redact(_BODY_CONTROL.sub("", text))


def _host_token() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()).strip(".-")
    return host or "localhost"


def _local(moment: datetime | None, settings: Settings, seconds: bool = True) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(settings.zone).strftime(
        "%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M %Z")


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@dataclass
class Report:
    """Everything an email about one run says, gathered from the history."""

    run: Run
    status_word: str
    subject: str
    headline: str
    notes: list[str] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    restore_points: list[tuple[str, str, str, str]] = field(default_factory=list)
    overview: list[tuple[str, str]] = field(default_factory=list)
    days: list[str] = field(default_factory=list)
    grid: list[tuple[str, list[str]]] = field(default_factory=list)
    footer: str = ""


def gather(settings: Settings, history: History, run: Run, now: datetime) -> Report:
    job = run.job
    host = run.host or socket.gethostname()
    status_word = STATUS_WORDS.get(run.status, run.status.upper())
    catchup = run.trigger == "catchup"
    target = run.target or "-"
    subject = (f"{SUBJECT_PREFIX} {status_word} {job} {target} "
               f"{run.started_at.astimezone(settings.zone).strftime('%Y-%m-%d %H:%M')}"
               + (" (catch-up)" if catchup else ""))
    label = JOB_LABELS.get(job, f"{job} backup")
    headline = f"{status_word}: {label} of {target} on {host}"
    report = Report(run=run, status_word=status_word, subject=header_text(subject),
                    headline=headline)
    if catchup:
        report.notes.append("This is a catch-up run: the scheduled time passed while the daemon "
                            "was not running, so the backup ran as soon as it started again.")
    if run.status == "interrupted":
        report.notes.append("The run was interrupted before it finished (the daemon stopped or "
                            "crashed, or it was cancelled); nothing it wrote is used as a "
                            "restore point.")
    elif run.status != "ok":
        report.notes.append("This run made no usable restore point for what failed; the restore "
                            "points made before it are untouched (retention only runs after "
                            "a success).")

    details = run.details or {}
    facts = report.facts
    facts.append(("Host", host))
    facts.append(("Job", f"{job}: {label}, {'catch-up' if catchup else run.trigger} run #{run.id}"))
    facts.append(("Target", target))
    facts.append(("Started", _local(run.started_at, settings)))
    facts.append(("Ended", _local(run.ended_at, settings)))
    facts.append(("Duration", duration_text(run.duration)))
    facts.append(("Size", human(run.bytes) if run.bytes else "-"))
    artifacts = _run_artifacts(history, run.id)
    if artifacts:
        facts.append(("Artifact", "\n".join(
            f"{item.path} ({human(item.size)})" for item in artifacts)))
        facts.append(("SHA-256", "\n".join(
            f"{item.sha256}" + (f"  ({item.target})" if len(artifacts) > 1 else "")
            for item in artifacts)))
    else:
        facts.append(("Artifact", run.artifact or "none"))
        if details.get("sha256"):
            facts.append(("SHA-256", str(details["sha256"])))
    downtime = downtime_text(details)
    if downtime:
        facts.append(("Downtime", downtime))
    if run.status == "ok":
        deleted = details.get("retention_deleted")
        if isinstance(deleted, list) and deleted:
            facts.append(("Retention", f"deleted {len(deleted)} old file(s):\n"
                          + "\n".join(_path_of(item) for item in deleted)))
        elif "retention_error" not in details:
            facts.append(("Retention", "nothing to delete"))
    if run.status != "ok":
        report.error = run.error or "no error text was recorded for this run"
    report.warnings = warnings_of(details)

    for name in TIER_ORDER:
        items = history.artifacts(tier=name)
        if items:
            oldest, newest = items[0], items[-1]
            report.restore_points.append((
                name, str(len(items)),
                f"{_local(oldest.created_at, settings, False)} ({oldest.target})",
                f"{_local(newest.created_at, settings, False)} ({newest.target})"))
        else:
            report.restore_points.append((name, "0", "-", "-"))
    report.overview.append(("Free space", free_space_text(settings)))
    report.overview.append((f"Next {job} run", next_run_text(settings, job, now)))
    report.days, report.grid = last_days(settings, history, now)
    report.footer = (f"Sent by toybox-backupd {__version__} on {host} (TZ {settings.tz}). "
                     "`toybox-backupd history` lists every run, `toybox-backupd list` every "
                     "restore point.")
    return report


def _run_artifacts(history: History, run_id: int) -> list[Artifact]:
    rows = history.db.execute("SELECT * FROM artifacts WHERE run_id=? ORDER BY id", (run_id,))
    return [Artifact.from_row(row) for row in rows]


def _path_of(item: Any) -> str:
    if isinstance(item, dict):
        return str(item.get("path") or item.get("file") or json.dumps(item, default=str))
    return str(item)


def downtime_text(details: dict[str, Any]) -> str | None:
    """Containers stopped for the archive and for how long, from the run's details."""
    per = details.get("downtime")
    total = details.get("downtime_seconds")
    parts: list[str] = []
    if isinstance(per, dict):
        parts = [f"{name} {duration_text(_number(seconds))}" for name, seconds in per.items()]
    elif isinstance(per, list):
        for entry in per:
            if isinstance(entry, dict):
                name = entry.get("container") or entry.get("name") or "?"
                parts.append(f"{name} {duration_text(_number(entry.get('seconds')))}")
            else:
                parts.append(str(entry))
    elif isinstance(per, int | float):
        total = per if total is None else total
    if not parts and total is None:
        return None
    if not parts:
        return f"{duration_text(_number(total))} in all"
    text = ", ".join(parts)
    if total is not None and len(parts) > 1:
        text += f" ({duration_text(_number(total))} in all)"
    return text


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def warnings_of(details: dict[str, Any]) -> list[str]:
    found: list[str] = []
    listed = details.get("warnings")
    if isinstance(listed, list):
        found += [str(item) for item in listed]
    elif isinstance(listed, str) and listed:
        found.append(listed)
    if isinstance(details.get("warning"), str) and details["warning"]:
        found.append(details["warning"])
    if details.get("retention_error"):
        found.append(f"retention failed, nothing old was deleted: {details['retention_error']}")
    total = details.get("warnings_total")
    extra = max(len(found) - MAX_WARNINGS, 0)
    if isinstance(total, int) and isinstance(listed, list) and total > len(listed):
        extra += total - len(listed)
    found = found[:MAX_WARNINGS]
    if extra:
        found.append(f"... and {extra} more (see the daemon's log)")
    return found


def free_space_text(settings: Settings) -> str:
    try:
        usage = shutil.disk_usage(settings.backup_dir)
    except OSError as exc:
        return f"unknown: {settings.backup_dir}: {exc.strerror or exc}"
    percent = 100 * usage.free / usage.total if usage.total else 0
    return f"{human(usage.free)} free of {human(usage.total)} ({percent:.0f}%) in {settings.backup_dir}"


def next_run_text(settings: Settings, job: str, now: datetime) -> str:
    if job not in JOBS:
        return "-"
    if not settings.job_enabled(job):
        why = (f"{SCHEDULE_VARS[job]} is empty" if not settings.schedule_for(job)
               else "BACKUP_VOLUMES is empty")
        return f"not scheduled ({why})"
    try:
        moment = next_times(settings.schedule_for(job), settings.zone, now, 1)[0]
    except Exception:
        return f"none found for {settings.schedule_for(job)!r}"
    return f"{moment.strftime('%a %Y-%m-%d %H:%M %Z')} ({settings.schedule_for(job)})"


Grid = list[tuple[str, list[str]]]


def last_days(settings: Settings, history: History, now: datetime) -> tuple[list[str], Grid]:
    """The last WINDOW_DAYS days (in TZ) per job: OK / FAILED / missing / - (nothing due)."""
    zone = settings.zone
    today = now.astimezone(zone).date()
    days = [today - timedelta(days=offset) for offset in range(WINDOW_DAYS - 1, -1, -1)]
    starts = [datetime(day.year, day.month, day.day, tzinfo=zone) for day in days]
    ends = [*starts[1:], starts[-1] + timedelta(days=1)]
    runs = history.runs_since(starts[0])
    first = history.db.execute("SELECT MIN(started_at) AS first FROM runs").fetchone()["first"]
    first_seen = parse_iso(first)
    by_job_day: dict[tuple[str, Any], list[str]] = {}
    for run in runs:
        day = run.started_at.astimezone(zone).date()
        by_job_day.setdefault((run.job, day), []).append(run.status)
    grid: Grid = []
    for job in JOBS:
        enabled = settings.job_enabled(job)
        has_runs = any(key[0] == job for key in by_job_day)
        if not enabled and not has_runs:
            continue
        cells = []
        for day, start, end in zip(days, starts, ends, strict=True):
            statuses = by_job_day.get((job, day), [])
            cells.append(_cell(settings, job, enabled, statuses, start, end, now, first_seen))
        grid.append((GRID_LABELS[job], cells))
    return [day.strftime("%a %m-%d") for day in days], grid


def _cell(settings: Settings, job: str, enabled: bool, statuses: list[str], start: datetime,
          end: datetime, now: datetime, first_seen: datetime | None) -> str:
    if "ok" in statuses:
        failed = sum(1 for status in statuses if status not in ("ok", "running"))
        return "OK" if not failed else f"OK ({failed} failed)"
    if any(status not in ("running",) for status in statuses):
        return "FAILED"
    if statuses:
        return "running"
    if not enabled or first_seen is None or end <= first_seen:
        return "-"
    try:
        fire = next_times(settings.schedule_for(job), settings.zone, start - timedelta(microseconds=1), 1)[0]
    except Exception:
        return "-"
    if fire < end and fire < now and fire >= first_seen:
        return "missing"
    return "-"


# rendering ---------------------------------------------------------------------------------
def render_text(report: Report) -> str:
    width = max(len(label) for label, _ in [*report.facts, *report.overview, ("Warnings", "")])
    lines = [report.headline, ""]
    for note in report.notes:
        lines += [note, ""]
    if report.error:
        lines += ["What went wrong:", *(f"    {line}" for line in report.error.splitlines()), ""]

    def put(label: str, value: str) -> None:
        first, *rest = value.splitlines() or [""]
        lines.append(f"{label:<{width}}  {first}")
        lines.extend(f"{'':<{width}}  {line}" for line in rest)

    for label, value in report.facts:
        put(label, value)
    if report.warnings:
        put("Warnings", "\n".join(f"- {item}" for item in report.warnings))
    lines += ["", "Restore points (kept, status ok):"]
    lines.append(f"    {'tier':<8} {'count':>5}  {'oldest':<34} newest")
    for tier, count, oldest, newest in report.restore_points:
        lines.append(f"    {tier:<8} {count:>5}  {oldest:<34} {newest}")
    lines.append("")
    for label, value in report.overview:
        put(label, value)
    lines += ["", f"Last {WINDOW_DAYS} days:"]
    label_width = max([len(label) for label, _ in report.grid] + [3])
    table = [("job", report.days), *report.grid]
    widths = [max(len(cells[column]) for _, cells in table) for column in range(len(report.days))]
    for label, cells in table:
        lines.append(f"    {label:<{label_width}}  " + "  ".join(
            f"{cell:<{width}}" for cell, width in zip(cells, widths, strict=True)).rstrip())
    lines += ["", "-- ", report.footer, ""]
    return body_text("\n".join(lines))


_COLORS = {"OK": "#1a7f37", "FAILED": "#cf222e", "INTERRUPTED": "#cf222e"}
_CELL_STYLE = {"OK": "background:#dafbe1", "FAILED": "background:#ffebe9",
               "missing": "background:#fff8c5", "running": "background:#ddf4ff"}


def _esc(value: object) -> str:
    return html.escape(body_text(value), quote=True)


def _esc_lines(value: str) -> str:
    return "<br/>".join(_esc(line) for line in value.splitlines())


def render_html(report: Report) -> str:
    color = _COLORS.get(report.status_word, "#9a6700")
    td = 'style="padding:2px 10px 2px 0;vertical-align:top"'
    th = 'style="padding:2px 10px 2px 0;text-align:left;vertical-align:top"'
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"/>',
        f"<title>{_esc(report.subject)}</title></head>",
        '<body style="font-family:sans-serif;font-size:14px">',
        f'<h2 style="color:{color}">{_esc(report.headline)}</h2>',
    ]
    out += [f"<p>{_esc(note)}</p>" for note in report.notes]
    if report.error:
        out.append(f'<p><strong>What went wrong:</strong></p><pre style="white-space:pre-wrap">'
                   f"{_esc(report.error)}</pre>")
    out.append("<table>")
    for label, value in report.facts:
        out.append(f"<tr><th {th}>{_esc(label)}</th><td {td}>{_esc_lines(value)}</td></tr>")
    if report.warnings:
        items = "".join(f"<li>{_esc(item)}</li>" for item in report.warnings)
        out.append(f"<tr><th {th}>Warnings</th><td {td}><ul>{items}</ul></td></tr>")
    out.append("</table>")
    out.append("<h3>Restore points</h3><table>")
    out.append(f"<tr><th {th}>tier</th><th {th}>count</th><th {th}>oldest</th><th {th}>newest</th></tr>")
    for row in report.restore_points:
        out.append("<tr>" + "".join(f"<td {td}>{_esc(cell)}</td>" for cell in row) + "</tr>")
    out.append("</table><table>")
    for label, value in report.overview:
        out.append(f"<tr><th {th}>{_esc(label)}</th><td {td}>{_esc(value)}</td></tr>")
    out.append("</table>")
    out.append(f"<h3>Last {WINDOW_DAYS} days</h3>")
    out.append('<table style="border-collapse:collapse">')
    cell = "padding:2px 8px;border:1px solid #d0d7de;text-align:center"
    out.append(f'<tr><th style="{cell}">job</th>'
               + "".join(f'<th style="{cell}">{_esc(day)}</th>' for day in report.days) + "</tr>")
    for label, cells in report.grid:
        row = f'<tr><th style="{cell};text-align:left">{_esc(label)}</th>'
        for value in cells:
            extra = _CELL_STYLE.get(value.split(" ")[0], "")
            row += f'<td style="{cell};{extra}">{_esc(value)}</td>'
        out.append(row + "</tr>")
    out.append("</table>")
    out.append(f'<p style="color:#57606a;font-size:12px">{_esc(report.footer)}</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def build_message(settings: Settings, *, subject: str, text: str, html_body: str | None,
                  message_id: str, now: datetime,
                  extra_headers: Iterable[tuple[str, str]] = ()) -> EmailMessage:
    """An RFC 5322 message; every header value is a single line without secrets."""
    message = EmailMessage(policy=email.policy.SMTP)
    message["Subject"] = header_text(subject)
    sender = settings.smtp_from or f"toybox-backupd <toybox-backupd@{_host_token()}>"
    try:
        message["From"] = header_text(sender, 400)
    except Exception:
        message["From"] = header_text(email.utils.parseaddr(sender)[1] or "toybox-backupd@localhost")
    message["To"] = header_text(", ".join(settings.notify_email_to), 2000)
    message["Date"] = email.utils.format_datetime(now.astimezone(settings.zone))
    message["Message-ID"] = header_text(message_id, 400)
    message["Auto-Submitted"] = "auto-generated"
    message["X-Mailer"] = f"toybox-backupd {__version__}"
    for name, value in extra_headers:
        message[name] = header_text(value)
    message.set_content(body_text(text), cte="quoted-printable")
    if html_body is not None:
        message.add_alternative(redact.redact(html_body), subtype="html", cte="quoted-printable")
    return message


def compose_run(settings: Settings, history: History, run: Run, *, message_id: str,
                now: datetime | None = None) -> EmailMessage:
    """The email about one run, from its history row and the catalog."""
    _register_secrets(settings)
    now = now or clock()
    report = gather(settings, history, run, now)
    return build_message(
        settings, subject=report.subject, text=render_text(report), html_body=render_html(report),
        message_id=message_id, now=now,
        extra_headers=[("X-Toybox-Run", str(run.id)), ("X-Toybox-Status", run.status),
                       ("X-Toybox-Job", run.job)])


def compose_fallback(settings: Settings, run: Run, *, message_id: str, now: datetime,
                     problem: str) -> EmailMessage:
    status_word = STATUS_WORDS.get(run.status, run.status.upper())
    subject = (f"{SUBJECT_PREFIX} {status_word} {run.job} {run.target or '-'} "
               f"{run.started_at.astimezone(settings.zone).strftime('%Y-%m-%d %H:%M')}")
    text = "\n".join([
        f"{status_word}: {run.job} backup of {run.target or '-'} on {run.host or socket.gethostname()}",
        "",
        f"Run        #{run.id} ({run.trigger})",
        f"Started    {_local(run.started_at, settings)}",
        f"Ended      {_local(run.ended_at, settings)}",
        f"Artifact   {run.artifact or 'none'}",
        f"Error      {run.error or '-'}",
        "",
        f"(The full report could not be built: {problem}. `toybox-backupd history` has the details.)",
        "",
    ])
    return build_message(settings, subject=subject, text=text, html_body=None,
                         message_id=message_id, now=now,
                         extra_headers=[("X-Toybox-Run", str(run.id)),
                                        ("X-Toybox-Status", run.status)])


def compose_test(settings: Settings) -> EmailMessage:
    now = clock()
    host = socket.gethostname()
    text = "\n".join([
        f"This is a test email from toybox-backupd on {host}.",
        "",
        "If you can read this, the backup reports will reach you:",
        f"  recipients  {', '.join(settings.notify_email_to)}",
        f"  server      {settings.smtp_host}:{settings.smtp_port} ({settings.smtp_security})",
        f"  login       {settings.smtp_user or '(none)'}",
        f"  reports on  {'every run' if settings.notify_on == 'all' else 'failures and catch-up runs'}"
        f" (NOTIFY_ON={settings.notify_on})",
        f"  sent at     {_local(now, settings)}",
        "",
    ])
    return build_message(settings, subject=f"{SUBJECT_PREFIX} test email from {host}", text=text,
                         html_body=None, now=now,
                         message_id=f"<toybox-backupd.test.{uuid.uuid4().hex}@{_host_token()}>")


def _register_secrets(settings: Settings) -> None:
    redact.register(settings.smtp_password_value, settings.postgres_password_value)
