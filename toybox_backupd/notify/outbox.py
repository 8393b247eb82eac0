"""Reports of every run: composed from the SQLite store, queued in the outbox, then delivered by
SMTP (email), Apprise (chat: NOTIFY_URLS) and HTTP (dead-man's-switch pings: PING_URL).

after_run(settings, store, run_id)
    reads the closed run row (never in-memory state), renders a plain-text report with an HTML
    alternative, puts the complete RFC 5322 message in the `outbox` table (and a short chat
    message per NOTIFY_URLS entry, and the end-of-run ping), then sends what is due. Never
    raises, never blocks for long: a report never fails or holds up a backup.
run_started(settings, store, run_id)
    queues the `/start` ping of a scheduled run and sends it on a background thread.
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

Every channel goes through the same states, retries and backoff; each row has a `channel`
(email | apprise | ping) and is sent by that channel's sender. Chat rows name their URL by a
fingerprint (the URLs hold tokens and never reach the store); ping rows name their variable.
Pings are given up sooner (PING_GIVE_UP_AFTER: a late ping would tell the monitor about an old
run as if it were now), and a `/start` whose run has ended is dropped as superseded.

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
import json
import re
import smtplib
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

from ..core import logs, redact
from ..core.basics import ToyboxError, backoff, describe_unexpected, iso, parse_iso, utcnow
from ..core.settings import Settings
from ..store import Run, Store
from ..tiers import registry as jobs
from . import channels, smtp
from .report import (
    compose_chat,
    compose_fallback,
    compose_problem,
    compose_run,
    compose_test,
    register_secrets,
)
from .smtp import NotifyError

log = logs.get("toybox_backupd.notify")

# the clock: tests may replace it (or pass `now=` to flush_outbox)
clock: Callable[[], datetime] = utcnow

GIVE_UP_AFTER = timedelta(hours=48)
PING_GIVE_UP_AFTER = timedelta(hours=2)
PINGED_TRIGGERS = ("schedule", "catchup")  # a manual run does not tell the dead-man's switch
_starting: dict[int, threading.Thread] = {}  # run id -> the thread sending its start ping
_starting_lock = threading.Lock()
WORDS = {"email": "email", "apprise": "chat message", "ping": "ping"}
MAX_ATTEMPTS = 60
KEEP_BODIES = timedelta(days=30)  # sent/given-up messages keep their row, lose their body after


# public interface ----------------------------------------------------------------------------
def after_run(settings: Settings, store: Store, run_id: int) -> None:
    """Queue the email and chat messages about run `run_id` (per NOTIFY_ON) and its ping, then
    send what is due. Never raises."""
    if not (settings.notify_email_to or settings.notify_url_list or _pings(settings)):
        return
    try:
        run = store.run(run_id)
        if run is None:
            log.warning("no such run, no report", run_id=run_id)
        elif run.status == "running":
            log.warning("the run is not finished, no report yet", run_id=run_id)
        else:
            if wanted(settings, run) and settings.notify_email_to:
                enqueue_run(settings, store, run)
            if wanted(settings, run) and settings.notify_url_list:
                enqueue_chat(settings, store, run)
            _start_sent(run.id)
            enqueue_ping(settings, store, run, "success" if run.status == "ok" else "fail")
    except Exception as exc:
        log.error("could not queue the run's report", run_id=run_id,
                  error=redact.redact(f"{exc.__class__.__name__}: {exc}"))
    flush_outbox(settings, store)


def run_started(settings: Settings, store: Store, run_id: int) -> None:
    """Queue the `/start` ping of a scheduled run; send it on a background thread (a slow
    monitor never delays the backup). Never raises."""
    try:
        run = store.run(run_id)
        if run is None or enqueue_ping(settings, store, run, "start") is None:
            return
    except Exception as exc:
        log.error("could not queue the start ping", run_id=run_id,
                  error=redact.redact(describe_unexpected(exc)))
        return

    def send() -> None:
        try:
            with Store(settings.state_dir) as own:
                _flush_channel(settings, own, "ping", None, channels.PING_TIMEOUT * 2)
        except Exception as exc:
            log.error("sending the start ping failed", error=redact.redact(describe_unexpected(exc)))

    thread = threading.Thread(target=send, name="start-ping", daemon=True)
    with _starting_lock:
        _starting[run_id] = thread
    thread.start()


def _start_sent(run_id: int) -> None:
    """Wait (a little) for the run's start ping, so the monitor never hears the end first."""
    with _starting_lock:
        thread = _starting.pop(run_id, None)
    if thread is not None:
        thread.join(channels.PING_TIMEOUT * 2)


def flush_outbox(settings: Settings, store: Store, *, now: datetime | None = None,
                 budget: float | None = None) -> int:
    """Send the outbox messages that are due, every channel; return how many were sent.
    Never raises.

    Each channel stops after `budget` seconds (default 2 × SMTP_TIMEOUT); email also at the
    first failure to reach the server; what is left waits for the next call.
    """
    budget = budget if budget is not None else 2.0 * settings.smtp_timeout
    sent = 0
    for channel in WORDS:
        if channel == "email" and not settings.notify_email_to:
            continue
        try:
            if channel == "email":
                sent += _flush(settings, store, now, budget)
            else:
                sent += _flush_channel(settings, store, channel, now, budget)
        except Exception as exc:
            log.error(f"sending queued {WORDS[channel]}s failed",
                      error=redact.redact(f"{exc.__class__.__name__}: {exc}"))
    return sent


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


def send_test_chat(settings: Settings) -> list[tuple[bool, str]]:
    """Send a test message to every NOTIFY_URLS entry now (not through the outbox); per URL,
    whether it went through and how (named by its label, never by the URL)."""
    redact.register_url(*settings.notify_url_list)
    host = smtp.host_token()
    said = []
    for url in settings.notify_url_list:
        try:
            channels.send_chat(url, title=f"[toybox-backupd] test message from {host}",
                               body=f"This is a test message from toybox-backupd on {host}: the "
                                    "run reports will reach this channel.", failure=False)
            said.append((True, f"test message sent to {channels.label(url)}"))
        except Exception as exc:
            text = str(exc) if isinstance(exc, ToyboxError) else describe_unexpected(exc)
            said.append((False, redact.redact(f"test message NOT sent to {channels.label(url)}: "
                                              f"{text}")))
    return said


def check_smtp(settings: Settings) -> str:
    """Connect, EHLO, STARTTLS/SSL, AUTH (if SMTP_USER), QUIT; a short description or NotifyError."""
    register_secrets(settings)
    with smtp.connection(settings) as conn:
        try:
            conn.client.noop()
        except Exception as exc:
            raise NotifyError(smtp.describe_error(exc, settings, "NOOP")) from None
        return conn.description


def check_chat(settings: Settings) -> str:
    """Every NOTIFY_URLS entry is a URL Apprise can use (nothing is sent); NotifyError if not."""
    urls = settings.notify_url_list
    redact.register_url(*urls)
    problems = [f"entry {number}: {why}" for number, url in enumerate(urls, 1)
                if (why := channels.unusable(url))]
    if problems:
        raise NotifyError("NOTIFY_URLS: " + "; ".join(problems))
    return f"{len(urls)} Apprise URL(s): " + ", ".join(channels.label(url) for url in urls)


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


def _claim(settings: Settings, store: Store, now: datetime,
           channel: str = "email") -> dict[str, Any] | None:
    """Take the channel's next due row (or an abandoned claim) for this process; None if none
    is due."""
    row = store.outbox_claim(now, lambda count: now + _lease(settings, count), channel)
    if row is None:
        return None
    row["abandoned"] = row["status"] == "sending"
    row["attempts"] += 1
    row["channel"] = channel
    if row["abandoned"]:
        log.warning(f"an earlier attempt to send this {WORDS[channel]} was cut off; sending it "
                    "again", outbox_id=row["id"], message_id=row["message_id"])
    return row


def _record_sent(store: Store, row: dict[str, Any], now: datetime, note: str | None) -> None:
    if row["abandoned"]:
        note = "; ".join(filter(None, [note, "an earlier attempt was cut off while sending, so the "
                                             "receiver may have got this message twice"]))
    store.outbox_sent(row["id"], now, note)
    log.info(f"{WORDS[row.get('channel', 'email')]} sent", outbox_id=row["id"],
             run_id=row["run_id"], attempts=row["attempts"], recipients=", ".join(row["recipients"]))


def _record_failure(store: Store, row: dict[str, Any], now: datetime, error: str,
                    give_up_after: timedelta = GIVE_UP_AFTER) -> None:
    error = redact.redact(error)
    created = parse_iso(row["created_at"]) or now
    attempts = int(row["attempts"])
    what = WORDS[row.get("channel", "email")]
    if attempts >= MAX_ATTEMPTS or now - created >= give_up_after:
        hours = (now - created).total_seconds() / 3600
        error = f"gave up after {attempts} attempt(s) in {hours:.1f} h; last error: {error}"
        store.outbox_failed(row["id"], "given_up", now, error)
        log.error(f"{what} given up", outbox_id=row["id"], run_id=row["run_id"], error=error)
        return
    next_try = now + backoff(attempts)
    store.outbox_failed(row["id"], "retrying", next_try, error)
    log.warning(f"{what} not sent, will retry", outbox_id=row["id"], run_id=row["run_id"],
                attempts=attempts, next_try=iso(next_try), error=error)


# chat (Apprise) and pings ----------------------------------------------------------------------
class _Drop(ToyboxError):
    """A row that must not be sent any more (given up at once, with this reason)."""


def _pings(settings: Settings) -> bool:
    return any(settings.ping_url_for(name) for name in ("", *jobs.names()))


def _row_id(store: Store, run_id: int, what: str) -> str:
    """The Message-ID-like key of a run's non-email row (one per run, channel and receiver)."""
    return f"<toybox-backupd.run-{run_id}.{what}.{store.instance_id()[:16]}@{smtp.host_token()}>"


def enqueue_chat(settings: Settings, store: Store, run: Run) -> list[int]:
    """Queue the run's chat message once per NOTIFY_URLS entry; the new rows' ids."""
    now = clock()
    title, body = compose_chat(settings, store, run, now)
    message = json.dumps({"title": title, "body": body, "failure": run.status != "ok"}).encode()
    queued = []
    for url in settings.notify_url_list:
        outbox_id = store.outbox_add(
            run_id=run.id, message_id=_row_id(store, run.id, f"chat-{channels.fingerprint(url)}"),
            subject=title, message=message, recipients=[channels.label(url)], now=now,
            channel="apprise")
        if outbox_id is not None:
            queued.append(outbox_id)
            log.info("chat message queued", outbox_id=outbox_id, run_id=run.id, to=channels.label(url))
    return queued


def enqueue_ping(settings: Settings, store: Store, run: Run, signal: channels.Signal) -> int | None:
    """Queue the run's `signal` ping (scheduled and catch-up runs with a PING_URL only)."""
    target = settings.ping_url_for(run.job)
    if target is None or run.trigger not in PINGED_TRIGGERS:
        return None
    var, _url = target
    text = f"toybox-backupd {run.job} run #{run.id} ({run.trigger}): {signal}"
    if run.error and signal == "fail":
        text += f": {run.error}"
    message = json.dumps({"signal": signal, "var": var, "text": redact.redact(text)}).encode()
    return store.outbox_add(run_id=run.id, message_id=_row_id(store, run.id, f"ping-{signal}"),
                            subject=f"{signal} ({var})", message=message, recipients=[var],
                            now=clock(), channel="ping")


def _deliver_chat(settings: Settings, store: Store, row: dict[str, Any]) -> None:
    found = re.search(r"\.chat-([0-9a-f]{16})\.", row["message_id"])
    urls = [url for url in settings.notify_url_list
            if found and channels.fingerprint(url) == found.group(1)]
    if not urls:
        raise _Drop("its URL is no longer in NOTIFY_URLS")
    content = json.loads(row["message"])
    channels.send_chat(urls[0], title=content["title"], body=content["body"],
                       failure=bool(content["failure"]))


def _deliver_ping(settings: Settings, store: Store, row: dict[str, Any]) -> None:
    content = json.loads(row["message"])
    run = store.run(row["run_id"]) if row["run_id"] is not None else None
    target = settings.ping_url_for(run.job) if run else None
    if target is None or target[0] != content["var"]:
        raise _Drop(f"{content['var']} is no longer set")
    if content["signal"] == "start" and row["attempts"] > 1 and run and run.status != "running":
        raise _Drop("superseded: the run ended before its start could be signalled")
    channels.send_ping(target[1], content["signal"], content["text"])


DELIVER = {"apprise": _deliver_chat, "ping": _deliver_ping}


def _flush_channel(settings: Settings, store: Store, channel: str, now: datetime | None,
                   budget: float) -> int:
    """Send the channel's due rows one by one (a failure moves on to the next)."""
    register_secrets(settings)
    redact.register_url(*settings.notify_url_list)
    started, sent = time.monotonic(), 0
    while time.monotonic() - started < budget:
        row = _claim(settings, store, now or clock(), channel)
        if row is None:
            break
        try:
            DELIVER[channel](settings, store, row)
        except _Drop as exc:
            store.outbox_failed(row["id"], "given_up", now or clock(), f"not sent: {exc}")
            log.info(f"{WORDS[channel]} dropped", outbox_id=row["id"], reason=str(exc))
        except Exception as exc:
            error = str(exc) if isinstance(exc, ToyboxError) else describe_unexpected(exc)
            _record_failure(store, row, now or clock(), error,
                            PING_GIVE_UP_AFTER if channel == "ping" else GIVE_UP_AFTER)
        else:
            _record_sent(store, row, now or clock(), None)
            sent += 1
    return sent


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
