"""`toybox-backupd status`: everything an operator checks first, gathered from the store.

Each job's last run and next run, the restore points per tier and target, the off-site lag,
the free space in BACKUP_DIR, and a "needs attention" list: the healthcheck's problems (daemon
not alive, a job that did not succeed when due, off-site lag), a failed last run, low disk (a
run that would be refused for space), reports stuck in the outbox. The CLI renders it.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..actions import runner
from ..catalog.restore_points import listing
from ..core import schedule
from ..core.basics import JobError, ago, human, iso, local_time, parse_iso, utcnow
from ..core.settings import Settings
from ..store import Store
from ..tiers import registry as jobs
from .health import _heartbeat, _job_health, _offsite_health
from .keys import STATE_FIRST_STARTED, STATE_HEARTBEAT, STATE_STARTED

STUCK_AFTER = timedelta(minutes=10)  # a report still waiting this long needs attention
GIVEN_UP_SHOWN = timedelta(days=7)
LOW_DISK = 0.05  # less than this share of the backup disk free needs attention


@dataclass
class JobStatus:
    job: str
    enabled: bool
    schedule: str
    last_run: dict[str, Any] | None  # id, status, started_at, age_s, duration_s, bytes, error
    last_success: str | None
    next_run: str | None


@dataclass
class Points:
    tier: str
    target: str
    count: int
    oldest: str
    newest: str
    bytes: int
    offsite: int  # how many of them have an off-site copy


@dataclass
class Status:
    now: str
    timezone: str
    daemon: dict[str, Any]
    jobs: list[JobStatus] = field(default_factory=list)
    restore_points: list[Points] = field(default_factory=list)
    offsite: dict[str, Any] | None = None
    disk: dict[str, Any] = field(default_factory=dict)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gather(settings: Settings, now: datetime | None = None) -> Status:
    """The status, from the store, the schedules and the backup directory."""
    now = now or utcnow()
    with Store(settings.state_dir) as store:
        status = Status(now=iso(now), timezone=settings.tz, daemon=_daemon(store, now))
        status.jobs = [_job(settings, store, job, now) for job in jobs.all_jobs()]
        status.restore_points = _points(store)
        status.offsite = _offsite(settings, store, now)
        status.disk = _disk(settings)
        status.outbox = store.outbox_waiting(now - GIVEN_UP_SHOWN)
        status.attention = _attention(settings, store, status, now)
    return status


def _daemon(store: Store, now: datetime) -> dict[str, Any]:
    beat = parse_iso(store.get_state(STATE_HEARTBEAT))
    return {"heartbeat": iso(beat) if beat else None,
            "heartbeat_age_s": round((now - beat).total_seconds()) if beat else None,
            "started": store.get_state(STATE_STARTED)}


def _job(settings: Settings, store: Store, job: jobs.Job, now: datetime) -> JobStatus:
    enabled = job.enabled(settings)
    expr = job.schedule(settings)
    last, last_ok = store.last_run(job.name), store.last_run(job.name, "ok")
    upcoming = schedule.next_times(expr, settings.zone, now, 1) if enabled else []
    run = None
    if last is not None:
        run = {"id": last.id, "status": last.status, "trigger": last.trigger,
               "started_at": iso(last.started_at),
               "age_s": round((now - last.started_at).total_seconds()),
               "duration_s": round(last.duration, 1) if last.duration is not None else None,
               "bytes": last.bytes, "error": last.error}
    return JobStatus(job.name, enabled, expr, run,
                     iso(last_ok.started_at) if last_ok else None,
                     iso(upcoming[0]) if upcoming else None)


def _points(store: Store) -> list[Points]:
    groups: dict[tuple[str, str], Points] = {}
    for item, copy in listing(store):
        key = (item.tier, item.target)
        created = iso(item.created_at)
        entry = groups.setdefault(key, Points(item.tier, item.target, 0, created, created, 0, 0))
        entry.count += 1
        entry.newest = created
        entry.bytes += item.size
        entry.offsite += 1 if copy is not None and copy.status == "ok" else 0
    order = {name: number for number, name in enumerate(jobs.names())}
    return sorted(groups.values(), key=lambda p: (order.get(p.tier, 99), p.tier, p.target))


def _offsite(settings: Settings, store: Store, now: datetime) -> dict[str, Any] | None:
    if not settings.offsite_url:
        return None
    ids = [copy.artifact_id for copy in store.offsite_copies(("ok",))]
    newest = max((item.created_at for i in ids if (item := store.artifact(i))), default=None)
    return {"url": settings.offsite_url, "copies": len(ids),
            "pending": len(store.offsite_copies(("pending",))),
            "newest": iso(newest) if newest else None,
            "lag_s": round((now - newest).total_seconds()) if newest else None,
            "max_lag_hours": settings.offsite_max_lag_hours}


def _disk(settings: Settings) -> dict[str, Any]:
    try:
        usage = shutil.disk_usage(settings.backup_dir)
    except OSError as exc:
        return {"path": str(settings.backup_dir), "error": exc.strerror or str(exc)}
    return {"path": str(settings.backup_dir), "free": usage.free, "total": usage.total}


def _attention(settings: Settings, store: Store, status: Status, now: datetime) -> list[str]:
    """The healthcheck's problems, failed last runs, low disk, stuck reports."""
    problems: list[str] = []
    first = parse_iso(store.get_state(STATE_FIRST_STARTED))
    _heartbeat(settings, store, now, problems, [])
    for job in jobs.all_jobs():
        if job.enabled(settings):
            _job_health(settings, store, job, now, first, problems, [])
            try:
                runner.check_disk_space(settings, store, job, job.targets(settings))
            except (JobError, OSError) as exc:
                problems.append(f"disk: the next {job.name} run would be refused: {exc}")
    _offsite_health(settings, store, now, first, problems, [])
    for entry in status.jobs:
        last = entry.last_run
        if last and last["status"] not in ("ok", "running") and not any(
                line.startswith(f"{entry.job}:") for line in problems):
            problems.append(f"{entry.job}: the last run #{last['id']} {last['status']}: "
                            f"{(last['error'] or '')[:200]}")
    free, total = status.disk.get("free"), status.disk.get("total")
    if free is not None and total and free < total * LOW_DISK:
        problems.append(f"disk: only {human(free)} free of {human(total)} in {settings.backup_dir}")
    problems += _stuck(settings, status.outbox, now)
    return problems


def _stuck(settings: Settings, rows: list[dict[str, Any]], now: datetime) -> list[str]:
    lines = []
    for row in rows:
        created = parse_iso(row["created_at"]) or now
        if row["status"] != "given_up" and now - created < STUCK_AFTER:
            continue
        what = {"email": "email", "apprise": "chat message", "ping": "ping"}.get(
            row["channel"], row["channel"])
        state = ("given up" if row["status"] == "given_up"
                 else f"{row['status']} ({row['attempts']} attempt(s))")
        lines.append(f"outbox: {what} '{row['subject']}' queued "
                     f"{local_time(created, settings.zone, 'weekday')} ({ago(now - created)} ago) "
                     f"is {state}" + (f": {row['last_error'][:200]}" if row["last_error"] else ""))
    return lines
