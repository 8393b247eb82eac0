"""The email about one run: gathered from the SQLite history, rendered as text and HTML.

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

from . import __version__, redact
from .history import Artifact, History, Run, parse_iso, utcnow
from .runner import human
from .schedule import next_times
from .settings import JOBS, Settings

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


def host_token() -> str:
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


def compose_run(settings: Settings, history: History, run: Run, *, message_id: str,
                now: datetime | None = None) -> EmailMessage:
    """The email about one run, from its history row and the catalog."""
    register_secrets(settings)
    now = now or utcnow()
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
    now = utcnow()
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
                         message_id=f"<toybox-backupd.test.{uuid.uuid4().hex}@{host_token()}>")


def register_secrets(settings: Settings) -> None:
    redact.register(settings.smtp_password_value, settings.postgres_password_value)
