"""Email reports: composed from the history, queued in the outbox, sent to a real SMTP server.

The server is aiosmtpd on 127.0.0.1 with STARTTLS (a CA made at test time) and AUTH
(tests/smtp_server.py). Tests that make real backups use the PostgreSQL container fixtures.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import datetime, timedelta
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import pytest
from smtp_server import Received, SMTPServer, silent_server, smtp_server

from toybox_backupd.core.basics import iso, utcnow
from toybox_backupd.notify import outbox as notify
from toybox_backupd.notify import report
from toybox_backupd.store import Store

TO = ["maki@example.org", "tech@example.org"]
SMTP_USER = "mailer"
SMTP_PASSWORD = "smtp-" + secrets.token_hex(6) + "&<'\"x"
DB_PASSWORD = "db-" + secrets.token_hex(6) + "!$'\"<>"


# helpers -------------------------------------------------------------------------------------
@pytest.fixture
def smtp() -> Iterator[SMTPServer]:
    with smtp_server(tls="starttls", auth=(SMTP_USER, SMTP_PASSWORD)) as server:
        yield server


def mail_values(server: SMTPServer, **extra: str) -> dict[str, str]:
    return server.settings_values(to=",".join(TO), **extra)


@pytest.fixture
def mail_env(plain_env: Any, smtp: SMTPServer) -> Any:
    plain_env.values.update(mail_values(smtp, POSTGRES_PASSWORD=DB_PASSWORD))
    return plain_env


def outbox(history: Store) -> list[dict[str, Any]]:
    return [dict(row) for row in history.db.execute("SELECT * FROM outbox ORDER BY id")]


def make_run(history: Store, job: str = "logical", target: str = "toybox", status: str = "ok",
             *, trigger: str = "schedule", error: str | None = None,
             details: dict[str, Any] | None = None, artifact: bool = True,
             started_at: datetime | None = None) -> int:
    run_id = history.open_run(job, target, trigger, started_at=started_at)
    path = None
    if artifact and status == "ok":
        tier = job  # a job makes artifacts of its own tier
        path = f"{tier}/{target}/{target}_{run_id}.dump"
        history.add_artifact(run_id=run_id, tier=tier, target=target, path=path,
                             created_at=utcnow(), size=123_456, sha256="ab" * 32)
    history.close_run(run_id, status, bytes_=123_456 if path else None, artifact=path,
                      error=error, details=details)
    return run_id


def text_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def html_of(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert part is not None
    return str(part.get_content())


class StrictHTML(HTMLParser):
    """Fails on unbalanced or misnested tags."""

    VOID: ClassVar[set[str]] = {"meta", "br", "hr", "img", "link", "input"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.VOID:
            self.errors.append(f"<{tag}/> is not a void element")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check_html(markup: str) -> str:
    """Parse the HTML part strictly (html.parser and as XML); return its text."""
    parser = StrictHTML()
    parser.feed(markup)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    root = ET.fromstring(markup.replace("<!DOCTYPE html>", "", 1))
    assert root.tag == "html"
    return "".join(parser.text)


def all_text(received: Received) -> str:
    """The raw bytes and every decoded part, to grep for things that must not be there."""
    message = received.message
    parts = [received.data.decode("utf-8", errors="replace")]
    for part in message.walk():
        if not part.is_multipart():
            parts.append(str(part.get_content()))
    parts += [f"{key}: {value}" for key, value in message.items()]
    return "\n".join(parts)


def assert_no_secrets(messages: list[Received], *secrets_: str) -> None:
    for received in messages:
        blob = all_text(received)
        for secret in secrets_:
            assert secret not in blob
            core = secret[:12]  # the part html.escape / quoted-printable leave alone
            assert core not in blob


def one_per_recipient(messages: list[Received]) -> None:
    for received in messages:
        assert sorted(received.rcpt_tos) == sorted(TO)
        assert received.tls and received.authenticated_as == SMTP_USER


# composing and delivering ---------------------------------------------------------------------
def test_success_and_failure_runs_are_delivered(mail_env: Any, smtp: SMTPServer) -> None:
    settings = mail_env.settings(BACKUP_HOST_NAME="toybox-prod")
    with Store(settings.state_dir) as history:
        ok_id = make_run(history, details={
            "sha256": "ab" * 32, "retention_deleted": ["logical/toybox/old_1.dump"],
            "warnings": ["role passwords left out"]})
        notify.after_run(settings, history, ok_id)
        failed_id = make_run(history, status="failed",
                             error="cannot reach PostgreSQL at 127.0.0.1:5432: connection refused")
        notify.after_run(settings, history, failed_id)
        rows = outbox(history)
    received = smtp.wait_for(2)
    assert len(received) == 2
    one_per_recipient(received)
    assert [row["status"] for row in rows] == ["sent", "sent"]
    assert [row["run_id"] for row in rows] == [ok_id, failed_id]

    ok, failed = (item.message for item in received)
    assert ok["Subject"].startswith("[toybox-backupd] OK logical toybox ")
    assert failed["Subject"].startswith("[toybox-backupd] FAILED logical toybox ")
    assert ok["To"] == ", ".join(TO) and ok["Message-ID"] == rows[0]["message_id"]
    assert "backups@example.org" in ok["From"]
    text = text_of(ok)
    for needle in ("Started", "Ended", "Duration", "Size", "120.6 KiB", f"logical/toybox/toybox_{ok_id}.dump",
                   "ab" * 32, "logical/toybox/old_1.dump", "role passwords left out",
                   "Restore points", "Free space", "Next logical run", "on toybox-prod",
                   "Last 7 days"):
        assert needle in text, needle
    assert f"on {socket.gethostname()}" not in text  # the container's id: new on every recreate
    assert re.search(r"\n +logical +toybox +1 ", text)  # one restore point of the logical tier
    html_text = check_html(html_of(ok))
    assert "Restore points" in html_text and "ab" * 32 in html_text
    assert "OK" in html_text and "Last 7 days" in html_text

    failure_text = text_of(failed)
    assert "What went wrong" in failure_text and "connection refused" in failure_text
    assert "FAILED" in check_html(html_of(failed))


def test_interrupted_and_catch_up_runs_say_so(mail_env: Any, smtp: SMTPServer) -> None:
    settings = mail_env.settings(NOTIFY_ON="failure")
    with Store(settings.state_dir) as history:
        notify.after_run(settings, history, make_run(history))  # OK, not wanted on failure
        notify.after_run(settings, history, make_run(history, status="interrupted",
                                                     error="the daemon stopped during the run"))
        notify.after_run(settings, history, make_run(history, trigger="catchup"))
        assert len(outbox(history)) == 2
    first, second = (item.message for item in smtp.wait_for(2))
    assert first["Subject"].startswith("[toybox-backupd] INTERRUPTED logical toybox")
    assert "interrupted" in text_of(first)
    assert second["Subject"].startswith("[toybox-backupd] OK logical toybox")
    assert second["Subject"].endswith("(catch-up)")
    assert "catch-up run" in text_of(second)


def test_volume_run_reports_downtime_and_every_artifact(mail_env: Any, smtp: SMTPServer) -> None:
    settings = mail_env.settings(BACKUP_VOLUMES="media,pgdata")
    with Store(settings.state_dir) as history:
        run_id = history.open_run("full", "media,pgdata", "schedule")
        for volume in ("media", "pgdata"):
            history.add_artifact(run_id=run_id, tier="full", target=volume,
                                 path=f"full/{volume}/{volume}_1.tar.zst", created_at=utcnow(),
                                 size=2048, sha256=volume[0] * 64)
        history.close_run(run_id, "ok", bytes_=4096, artifact="full/media/.., full/pgdata/..",
                          details={"downtime": {"toybox-db-1": 12.34},
                                   "downtime_seconds": 12.34, "warnings": ["w1"],
                                   "warnings_total": 30})
        notify.after_run(settings, history, run_id)
    text = text_of(smtp.wait_for(1)[0].message)
    assert "toybox-db-1 12.3 s" in text
    assert "m" * 64 in text and "p" * 64 in text
    assert "full/pgdata/pgdata_1.tar.zst" in text
    assert "and 29 more" in text


def test_nothing_happens_without_recipients(plain_env: Any, smtp: SMTPServer) -> None:
    settings = plain_env.settings(**mail_values(smtp, NOTIFY_EMAIL_TO=""))
    with Store(settings.state_dir) as history:
        notify.after_run(settings, history, make_run(history))
        assert outbox(history) == []
        assert notify.flush_outbox(settings, history) == 0
    assert smtp.messages == []


def test_a_run_is_queued_once(mail_env: Any, smtp: SMTPServer) -> None:
    settings = mail_env.settings()
    with Store(settings.state_dir) as history:
        run_id = make_run(history)
        notify.after_run(settings, history, run_id)
        notify.after_run(settings, history, run_id)
        assert len(outbox(history)) == 1
    assert len(smtp.wait_for(1)) == 1


# secrets and header injection -------------------------------------------------------------------
def test_no_password_appears_in_any_email(mail_env: Any, smtp: SMTPServer) -> None:
    settings = mail_env.settings()
    with Store(settings.state_dir) as history:
        run_id = make_run(history, status="failed", error="placeholder")
        # bypass the history's own masking, as a careless tier might
        history.db.execute(
            "UPDATE runs SET error=?, details=? WHERE id=?",
            (f"pg_dump: password authentication failed (password={DB_PASSWORD}, smtp {SMTP_PASSWORD})",
             json.dumps({"warnings": [SMTP_PASSWORD]}), run_id))
        notify.after_run(settings, history, run_id)
        stored = outbox(history)[0]
    received = smtp.wait_for(1)
    assert_no_secrets(received, DB_PASSWORD, SMTP_PASSWORD)
    assert DB_PASSWORD[:12].encode() not in stored["message"]
    assert "***" in text_of(received[0].message)
    ok, message = notify.send_test(settings)
    assert ok, message
    assert_no_secrets(smtp.wait_for(2), DB_PASSWORD, SMTP_PASSWORD)
    assert SMTP_PASSWORD not in message


@pytest.mark.parametrize("where", ["target", "error"])
def test_header_injection_is_impossible(mail_env: Any, smtp: SMTPServer, where: str) -> None:
    evil = "media\r\nBcc: evil@x.example\r\nX-Evil: 1\r\n\r\n<script>alert(1)</script>"
    settings = mail_env.settings()
    with Store(settings.state_dir) as history:
        if where == "target":
            run_id = make_run(history, job="full", target=evil, status="failed", error="boom")
        else:
            run_id = make_run(history, status="failed", error=evil)
        notify.after_run(settings, history, run_id)
    received = smtp.wait_for(1)[0]
    message = received.message
    assert sorted(received.rcpt_tos) == sorted(TO)
    assert message["Bcc"] is None and message["X-Evil"] is None
    header_block = received.data.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in header_block and b"\r\nX-Evil:" not in header_block
    assert "\n" not in message["Subject"] and "\r" not in message["Subject"]
    markup = html_of(message)
    assert "<script>" not in markup and "&lt;script&gt;" in markup
    check_html(markup)
    assert "Bcc: evil@x.example" in text_of(message)  # the text is there, harmless


# delivery failures, retries, outbox ------------------------------------------------------------
def test_smtp_down_then_back_delivers_once_with_original_content(
        mail_env: Any, smtp: SMTPServer) -> None:
    settings = mail_env.settings()
    smtp.stop()
    with Store(settings.state_dir) as history:
        run_id = make_run(history)
        notify.after_run(settings, history, run_id)
        [row] = outbox(history)
        assert row["status"] == "retrying" and row["attempts"] == 1
        assert "connection refused" in row["last_error"]
        assert notify.flush_outbox(settings, history) == 0  # not due yet
        smtp.start()
        assert notify.flush_outbox(settings, history) == 0  # still not due
        later = utcnow() + timedelta(minutes=1, seconds=5)
        assert notify.flush_outbox(settings, history, now=later) == 1
        assert notify.flush_outbox(settings, history, now=later + timedelta(hours=3)) == 0
        [row] = outbox(history)
    assert row["status"] == "sent" and row["attempts"] == 2 and row["sent_at"]
    [received] = smtp.wait_for(1)
    assert received.data.rstrip(b"\r\n") == row["message"].rstrip(b"\r\n")
    assert received.message["Message-ID"] == row["message_id"]


def test_backoff_grows_and_gives_up(mail_env: Any, smtp: SMTPServer) -> None:
    assert [notify.backoff(n).total_seconds() / 60 for n in range(1, 9)] == [1, 2, 5, 10, 30, 60, 60, 60]
    settings = mail_env.settings()
    smtp.stop()
    with Store(settings.state_dir) as history:
        notify.after_run(settings, history, make_run(history))
        now = utcnow()
        for expected_wait in (2, 5):
            now = datetime.fromisoformat(outbox(history)[0]["next_try_at"])
            notify.flush_outbox(settings, history, now=now)
            row = outbox(history)[0]
            assert row["status"] == "retrying"
            waited = datetime.fromisoformat(row["next_try_at"]) - now
            assert waited == timedelta(minutes=expected_wait)
        history.db.execute("UPDATE outbox SET created_at=?", (iso(now - timedelta(hours=49)),))
        notify.flush_outbox(settings, history, now=now + timedelta(hours=1))
        row = outbox(history)[0]
        assert row["status"] == "given_up" and "gave up after 4 attempt(s)" in row["last_error"]
        smtp.start()
        assert notify.flush_outbox(settings, history, now=now + timedelta(days=3)) == 0
    assert smtp.messages == []


def test_claims_prevent_double_sends_and_stale_claims_are_resent(
        mail_env: Any, smtp: SMTPServer) -> None:
    settings = mail_env.settings()
    smtp.stop()
    with Store(settings.state_dir) as history, Store(settings.state_dir) as other:
        notify.after_run(settings, history, make_run(history))
        due = datetime.fromisoformat(outbox(history)[0]["next_try_at"])
        claimed = notify._claim(settings, history, due)
        assert claimed is not None
        assert notify._claim(settings, other, due) is None  # another process gets nothing
        smtp.start()
        assert notify.flush_outbox(settings, other, now=due) == 0  # a live claim is left alone
        lease_end = datetime.fromisoformat(outbox(history)[0]["next_try_at"])
        # the claimer "crashed": after its lease, the row is sent again, once
        assert notify.flush_outbox(settings, other, now=lease_end) == 1
        assert notify.flush_outbox(settings, other, now=lease_end + timedelta(days=1)) == 0
        row = outbox(history)[0]
    assert row["status"] == "sent" and "cut off" in row["last_error"]
    assert len(smtp.wait_for(1)) == 1


def test_one_refused_recipient_does_not_stop_the_others(mail_env: Any, smtp: SMTPServer) -> None:
    smtp.reject_recipients.add(TO[1])
    settings = mail_env.settings()
    with Store(settings.state_dir) as history:
        notify.after_run(settings, history, make_run(history))
        row = outbox(history)[0]
    assert row["status"] == "sent" and TO[1] in row["last_error"]
    assert smtp.wait_for(1)[0].rcpt_tos == [TO[0]]


def test_wrong_password_is_said_plainly_and_the_mail_waits(mail_env: Any, smtp: SMTPServer) -> None:
    settings = mail_env.settings(SMTP_PASSWORD="not-the-password")
    ok, message = notify.send_test(settings)
    assert not ok
    assert "authentication failed" in message and "SMTP_USER 'mailer'" in message
    assert "not-the-password" not in message
    with Store(settings.state_dir) as history:
        run_id = make_run(history)
        notify.after_run(settings, history, run_id)
        [row] = outbox(history)
    assert row["status"] == "retrying" and "authentication failed" in row["last_error"]
    assert smtp.messages == [] and smtp.auth_failures >= 1

    wrong = {"SMTP_PASSWORD": "not-the-password"}
    result = mail_env.cli("notify", "test", **wrong)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "authentication failed" in result.stderr and "not-the-password" not in result.stderr
    result = mail_env.cli("history", **wrong)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith(str(run_id)))
    assert "retrying (1)" in line

    result = mail_env.cli("notify", "test")  # the right password
    assert result.returncode == 0, result.stderr
    assert "test email sent to maki@example.org, tech@example.org" in result.stdout
    [received] = smtp.wait_for(1)
    assert received.message["Subject"].startswith("[toybox-backupd] test email from ")


def test_send_test_names_each_problem(mail_env: Any, smtp: SMTPServer, tmp_path: Path) -> None:
    settings = mail_env.settings()
    ok, message = notify.send_test(settings)
    assert ok and "STARTTLS, certificate verified, logged in as mailer" in message, message
    assert "logged in as mailer" in notify.check_smtp(settings)

    ok, message = notify.send_test(mail_env.settings(SMTP_CA_FILE=""))
    assert not ok and "TLS failed" in message and "not trusted" in message, message

    ok, message = notify.send_test(mail_env.settings(SMTP_SECURITY="ssl"))
    assert not ok and "TLS failed" in message, message

    ok, message = notify.send_test(mail_env.settings(SMTP_SECURITY="none"))
    assert not ok and "does not offer AUTH" in message, message

    smtp.reject_recipients.update(TO)
    ok, message = notify.send_test(settings)
    assert not ok and "recipient refused" in message and TO[0] in message, message
    smtp.reject_recipients.clear()

    with silent_server() as port:
        quiet = mail_env.settings(SMTP_PORT=str(port), SMTP_TIMEOUT="1")
        ok, message = notify.send_test(quiet)
        assert not ok and "timed out after 1 s" in message, message
        with pytest.raises(notify.NotifyError, match="timed out"):
            notify.check_smtp(quiet)

    smtp.stop()
    ok, message = notify.send_test(settings)
    assert not ok and "connection refused" in message, message
    with pytest.raises(notify.NotifyError, match="connection refused"):
        notify.check_smtp(settings)

    ok, message = notify.send_test(mail_env.settings(NOTIFY_EMAIL_TO=""))
    assert not ok and "NOTIFY_EMAIL_TO is empty" in message


def test_after_run_never_raises(mail_env: Any, smtp: SMTPServer, monkeypatch: Any) -> None:
    settings = mail_env.settings()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("report bug")

    monkeypatch.setattr(report, "gather", broken)
    with Store(settings.state_dir) as history:
        run_id = make_run(history, status="failed", error="disk full")
        notify.after_run(settings, history, run_id)  # falls back to a short report
        notify.after_run(settings, history, 9999)  # no such run
    message = smtp.wait_for(1)[0].message
    assert message["Subject"].startswith("[toybox-backupd] FAILED logical toybox")
    assert "disk full" in text_of(message) and "report bug" in text_of(message)


# real runs (Docker + PostgreSQL) ------------------------------------------------------------------
def test_real_pgdump_success_and_failure_are_emailed(env: Any, pg: Any, smtp: SMTPServer) -> None:
    from toybox_backupd.actions import runner

    env.values.update(mail_values(smtp))
    settings = env.settings()
    ok_id = runner.run_job(settings, "logical")
    with Store(settings.state_dir) as history:
        run = history.run(ok_id)
        assert run is not None and run.status == "ok", run and run.error
        [artifact] = history.db.execute("SELECT * FROM artifacts WHERE run_id=?", (ok_id,)).fetchall()
    pg.stop()
    failed_id = runner.run_job(settings, "logical")
    with Store(settings.state_dir) as history:
        failed = history.run(failed_id)
        assert failed is not None and failed.status == "failed"
        assert [row["status"] for row in outbox(history)] == ["sent", "sent"]
    received = smtp.wait_for(2)
    assert len(received) == 2
    one_per_recipient(received)
    ok_message, failed_message = (item.message for item in received)
    assert ok_message["Subject"].startswith("[toybox-backupd] OK logical toybox ")
    text = text_of(ok_message)
    assert artifact["path"] in text and artifact["sha256"] in text
    check_html(html_of(ok_message))
    assert failed_message["Subject"].startswith("[toybox-backupd] FAILED logical toybox ")
    failure = text_of(failed_message)
    assert "What went wrong" in failure and (failed.error or "")[:40] in failure
    assert re.search(rf"\n +logical +{pg.db} +1 ", failure)  # the earlier dump is still there
    check_html(html_of(failed_message))
    assert_no_secrets(received, pg.password, SMTP_PASSWORD)


def test_real_run_while_smtp_is_down_and_with_a_wrong_password(
        env: Any, pg: Any, smtp: SMTPServer) -> None:
    from toybox_backupd.actions import runner

    env.values.update(mail_values(smtp))
    settings = env.settings()
    smtp.stop()
    run_id = runner.run_job(settings, "logical")
    with Store(settings.state_dir) as history:
        run = history.run(run_id)
        assert run is not None and run.status == "ok", run and run.error
        [row] = outbox(history)
        assert row["status"] == "retrying" and "connection refused" in row["last_error"]
        smtp.start()
        later = utcnow() + timedelta(minutes=2)
        assert notify.flush_outbox(settings, history, now=later) == 1
        assert notify.flush_outbox(settings, history, now=later + timedelta(hours=1)) == 0
        [row] = outbox(history)
    [received] = smtp.wait_for(1)
    assert received.data.rstrip(b"\r\n") == row["message"].rstrip(b"\r\n")
    assert f"run #{run_id}" in text_of(received.message)

    wrong = env.settings(SMTP_PASSWORD="wrong-" + secrets.token_hex(4))
    second = runner.run_job(wrong, "logical")
    result = env.cli("history", SMTP_PASSWORD="whatever")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith(str(second)))
    assert " ok " in line and "retrying (1)" in line
    assert len(smtp.messages) == 1
