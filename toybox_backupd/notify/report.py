"""The email about one run: gathered from the SQLite store, rendered as text and HTML.

Everything that reaches a header goes through `header_text` (no CR/LF, so no header injection);
everything goes through `redact` (no secrets).
"""

from __future__ import annotations

import email.policy
import email.utils
import html
import json
import re
import shutil
import socket
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

from .. import __version__
from ..adapters import docker_api
from ..core import redact
from ..core.basics import duration_text, human, local_time, utcnow
from ..core.schedule import next_times
from ..core.settings import Settings
from ..store import Run, Store
from ..tiers import registry as jobs
from .smtp import host_token

WINDOW_DAYS = 7
MAX_WARNINGS = 20
SUBJECT_PREFIX = "[toybox-backupd]"

STATUS_WORDS = {"ok": "OK", "failed": "FAILED", "interrupted": "INTERRUPTED"}

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


def _local(moment: datetime | None, settings: Settings, seconds: bool = True) -> str:
    return local_time(moment, settings.zone, "seconds" if seconds else "minutes")


@dataclass
class Report:
    """Everything an email about one run says, gathered from the store."""

    run: Run
    status_word: str
    subject: str
    headline: str
    notes: list[str] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    restore_points: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    overview: list[tuple[str, str]] = field(default_factory=list)
    days: list[str] = field(default_factory=list)
    grid: list[tuple[str, list[str]]] = field(default_factory=list)
    footer: str = ""


def gather(settings: Settings, store: Store, run: Run, now: datetime) -> Report:
    """Everything the email about `run` says, from the store (never from in-memory state)."""
    job, target = run.job, run.target or "-"
    host = host_name(settings)
    status_word = STATUS_WORDS.get(run.status, run.status.upper())
    catchup = run.trigger == "catchup"
    subject = (f"{SUBJECT_PREFIX} {status_word} {job} {target} "
               f"{local_time(run.started_at, settings.zone, 'subject')}"
               + (" (catch-up)" if catchup else ""))
    report = Report(run=run, status_word=status_word, subject=header_text(subject),
                    headline=f"{status_word}: {_title(job)} of {target} on {host}")
    report.notes = _notes(run)
    report.facts = _facts(settings, store, run, host)
    if run.status != "ok":
        report.error = run.error or "no error text was recorded for this run"
    report.warnings = warnings_of(run.details or {})
    report.restore_points = _restore_points(settings, store)
    report.overview.append(("Free space", free_space_text(settings)))
    report.overview.append((f"Next {job} run", next_run_text(settings, job, now)))
    report.days, report.grid = last_days(settings, store, now)
    report.footer = (f"Sent by toybox-backupd {__version__} on {host} (TZ {settings.tz}). "
                     "`toybox-backupd history` lists every run, `toybox-backupd list` every "
                     "restore point.")
    return report


def _notes(run: Run) -> list[str]:
    notes = []
    if run.trigger == "catchup":
        notes.append("This is a catch-up run: the scheduled time passed while the daemon "
                     "was not running, so the backup ran as soon as it started again.")
    if run.status == "interrupted":
        notes.append("The run was interrupted before it finished (the daemon stopped or "
                     "crashed, or it was cancelled); nothing it wrote is used as a "
                     "restore point.")
    elif run.status != "ok":
        notes.append("This run made no usable restore point for what failed; the restore "
                     "points made before it are untouched (retention only runs after "
                     "a success).")
    return notes


def _facts(settings: Settings, store: Store, run: Run, host: str) -> list[tuple[str, str]]:
    details = run.details or {}
    how = "catch-up" if run.trigger == "catchup" else run.trigger
    facts = [("Host", host), ("Job", f"{run.job}: {_title(run.job)}, {how} run #{run.id}"),
             ("Target", run.target or "-"), ("Started", _local(run.started_at, settings)),
             ("Ended", _local(run.ended_at, settings)), ("Duration", duration_text(run.duration)),
             ("Size", human(run.bytes) if run.bytes else "-")]
    artifacts = store.run_artifacts(run.id)
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
    if details.get("pitr"):
        facts.append(("Point in time", str(details["pitr"])))
    offsite = offsite_text(details)
    if offsite:
        facts.append(("Off-site", offsite))
    if run.status == "ok":
        deleted = details.get("retention_deleted")
        if isinstance(deleted, list) and deleted:
            facts.append(("Retention", f"deleted {len(deleted)} old file(s):\n"
                          + "\n".join(_path_of(item) for item in deleted)))
        elif details.get("retention_refused"):
            facts.append(("Retention", str(details["retention_refused"])))
        elif "retention_error" not in details:
            facts.append(("Retention", "nothing to delete"))
    return facts


def host_name(settings: Settings) -> str:
    """The host's name in emails: BACKUP_HOST_NAME, else the Docker host's (the container's
    own name changes on every recreate), else this machine's."""
    return settings.backup_host_name or docker_api.engine_name() or socket.gethostname()


def _restore_points(settings: Settings, store: Store) -> list[tuple[str, str, str, str, str]]:
    """(tier, target, count, oldest, newest): one row per tier and database or volume."""
    rows = []
    for name in jobs.names():
        by_target: dict[str, list[Any]] = {}
        for item in store.artifacts(tier=name):
            by_target.setdefault(item.target, []).append(item)
        if not by_target:
            rows.append((name, "-", "0", "-", "-"))
        for target, items in sorted(by_target.items()):
            rows.append((name, target, str(len(items)),
                         _local(items[0].created_at, settings, False),
                         _local(items[-1].created_at, settings, False)))
    return rows


def _title(job: str) -> str:
    try:
        return jobs.get(job).title
    except ValueError:  # a run of a job no longer registered (or `verify`)
        return f"{job} backup"


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


def offsite_text(details: dict[str, Any]) -> str | None:
    """Where the run's off-site copy stands, from its details (None: off-site is off)."""
    if details.get("offsite_pending"):
        return (f"off-site copy pending: {details['offsite_pending']}. The local backup is "
                "complete; the copy is retried automatically until it is done")
    copied = details.get("offsite_copied")
    if not copied:
        return None
    text = f"copied to {details.get('offsite_url', 'the off-site target')}, verified"
    gone = details.get("offsite_retention_deleted")
    if isinstance(gone, list) and gone:
        text += f"; {len(gone)} old off-site restore point(s) deleted"
    return text


def warnings_of(details: dict[str, Any]) -> list[str]:
    """A run's warnings from its details, at most MAX_WARNINGS, with a count of the rest."""
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
    if details.get("retention_refused"):
        found.append(f"retention: {details['retention_refused']}")
    if details.get("offsite_pending"):
        found.append(f"off-site copy pending: {details['offsite_pending']}")
    total = details.get("warnings_total")
    extra = max(len(found) - MAX_WARNINGS, 0)
    if isinstance(total, int) and isinstance(listed, list) and total > len(listed):
        extra += total - len(listed)
    found = found[:MAX_WARNINGS]
    if extra:
        found.append(f"... and {extra} more (see the daemon's log)")
    return found


def free_space_text(settings: Settings) -> str:
    """"12.3 GiB free of 50.0 GiB (25%) in /backups"."""
    try:
        usage = shutil.disk_usage(settings.backup_dir)
    except OSError as exc:
        return f"unknown: {settings.backup_dir}: {exc.strerror or exc}"
    percent = 100 * usage.free / usage.total if usage.total else 0
    return f"{human(usage.free)} free of {human(usage.total)} ({percent:.0f}%) in {settings.backup_dir}"


def next_run_text(settings: Settings, job_name: str, now: datetime) -> str:
    """When `job_name` runs next, or why it does not."""
    try:
        job = jobs.get(job_name)
    except ValueError:
        return "-"
    why = job.disabled_reason(settings)
    if why:
        return f"not scheduled ({why})"
    expr = job.schedule(settings)
    try:
        moment = next_times(expr, settings.zone, now, 1)[0]
    except Exception:
        return f"none found for {expr!r}"
    return f"{local_time(moment, settings.zone, 'weekday')} ({expr})"


Grid = list[tuple[str, list[str]]]


def last_days(settings: Settings, store: Store, now: datetime) -> tuple[list[str], Grid]:
    """The last WINDOW_DAYS days (in TZ) per job: OK / FAILED / missing / - (nothing due)."""
    zone = settings.zone
    today = now.astimezone(zone).date()
    days = [today - timedelta(days=offset) for offset in range(WINDOW_DAYS - 1, -1, -1)]
    starts = [datetime(day.year, day.month, day.day, tzinfo=zone) for day in days]
    ends = [*starts[1:], starts[-1] + timedelta(days=1)]
    runs = store.runs_since(starts[0])
    first_seen = store.first_run_started()
    by_job_day: dict[tuple[str, Any], list[str]] = {}
    for run in runs:
        day = run.started_at.astimezone(zone).date()
        by_job_day.setdefault((run.job, day), []).append(run.status)
    grid: Grid = []
    for job in jobs.all_jobs():
        enabled = job.enabled(settings)
        if not enabled and not any(key[0] == job.name for key in by_job_day):
            continue
        cells = [_cell(settings, job.schedule(settings), enabled,
                       by_job_day.get((job.name, day), []), start, end, now, first_seen)
                 for day, start, end in zip(days, starts, ends, strict=True)]
        grid.append((job.name, cells))
    return [day.strftime("%a %m-%d") for day in days], grid


def _cell(settings: Settings, expr: str, enabled: bool, statuses: list[str], start: datetime,
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
        fire = next_times(expr, settings.zone, start - timedelta(microseconds=1), 1)[0]
    except Exception:
        return "-"
    if fire < end and fire < now and fire >= first_seen:
        return "missing"
    return "-"


# rendering ---------------------------------------------------------------------------------
def columns(rows: list[tuple[str, ...]], right: Collection[int] = ()) -> list[str]:
    """Rows of cells as aligned lines: each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(width) if i in right else cell.ljust(width)
                      for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


def render_text(report: Report) -> str:
    """The plain-text body of a report."""
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
    lines += [f"    {line}" for line in columns(
        [("tier", "target", "count", "oldest", "newest"), *report.restore_points],
        right={2})]
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
    """The HTML body of a report (every value escaped)."""
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
    out.append("<tr>" + "".join(f"<th {th}>{name}</th>" for name in
                                ("tier", "target", "count", "oldest", "newest")) + "</tr>")
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
    sender = settings.smtp_from or f"toybox-backupd <toybox-backupd@{host_token()}>"
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


def compose_run(settings: Settings, store: Store, run: Run, *, message_id: str,
                now: datetime | None = None) -> EmailMessage:
    """The email about one run, from its history row and the catalog."""
    register_secrets(settings)
    now = now or utcnow()
    report = gather(settings, store, run, now)
    return build_message(
        settings, subject=report.subject, text=render_text(report), html_body=render_html(report),
        message_id=message_id, now=now,
        extra_headers=[("X-Toybox-Run", str(run.id)), ("X-Toybox-Status", run.status),
                       ("X-Toybox-Job", run.job)])


CHAT_FACTS = ("Host", "Job", "Started", "Duration", "Size", "Artifact", "Downtime", "Off-site")


def compose_chat(settings: Settings, store: Store, run: Run, now: datetime | None = None
                 ) -> tuple[str, str]:
    """(title, body) of the short chat message about one run (NOTIFY_URLS): the email's
    headline, error, main facts, warnings and next run, in plain text."""
    register_secrets(settings)
    report = gather(settings, store, run, now or utcnow())
    lines = [report.headline]
    if report.error:
        lines += ["", f"Error: {report.error}"]
    lines.append("")
    lines += [f"{name}: {value.replace(chr(10), ', ')}" for name, value in report.facts
              if name in CHAT_FACTS]
    lines += [f"Warning: {warning}" for warning in report.warnings[:5]]
    lines += [f"{name}: {value}" for name, value in report.overview]
    return header_text(report.subject), body_text("\n".join(lines))


def compose_fallback(settings: Settings, run: Run, *, message_id: str, now: datetime,
                     problem: str) -> EmailMessage:
    """A short email with the bare facts of a run, for when the full report cannot be built."""
    status_word = STATUS_WORDS.get(run.status, run.status.upper())
    subject = (f"{SUBJECT_PREFIX} {status_word} {run.job} {run.target or '-'} "
               f"{local_time(run.started_at, settings.zone, 'subject')}")
    text = "\n".join([
        f"{status_word}: {run.job} backup of {run.target or '-'} on {host_name(settings)}",
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
    """The email `toybox-backupd notify test` sends."""
    now = utcnow()
    host = host_name(settings)
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
                         message_id=f"<toybox-backupd.test.{uuid.uuid4().hex}@{host_token()}>")


CHECK_AN_EDIT = "docker compose run --rm backupd toybox-backupd check"


def compose_problem(settings: Settings, lines: list[str], *, what: str, source: str,
                    message_id: str, now: datetime) -> EmailMessage:
    """The email saying the settings are wrong: `lines` (one per problem), `what` still
    runs, `source` (where the settings came from)."""
    host = host_name(settings)
    text = "\n".join([
        f"toybox-backupd on {host} found a problem in its settings ({source}):",
        "",
        *(f"  {line}" for line in lines),
        "",
        what,
        "",
        "Fix it in .env (beside docker-compose.yml), check the edit with",
        f"  {CHECK_AN_EDIT}",
        "then apply it with `docker compose up -d` (a restart alone keeps the old values).",
        "",
        "-- ",
        f"Sent by toybox-backupd {__version__} on {host} (TZ {settings.tz}).",
        "",
    ])
    return build_message(settings, subject=f"{SUBJECT_PREFIX} SETTINGS PROBLEM on {host}: "
                                           f"{lines[0] if lines else ''}",
                         text=text, html_body=None, message_id=message_id, now=now,
                         extra_headers=[("X-Toybox-Status", "settings")])


def register_secrets(settings: Settings) -> None:
    """Make sure the SMTP and database passwords are masked in what is sent."""
    redact.register(settings.smtp_password_value, settings.postgres_password_value)
