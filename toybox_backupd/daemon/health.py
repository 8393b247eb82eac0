"""`toybox-backupd healthcheck`: is the daemon alive, and did every job succeed when due?"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

from cronsim import CronSim

from ..core.basics import ago, local_time, parse_iso, utcnow
from ..core.settings import Settings, cron_fields
from ..store import Store
from ..tiers import registry as jobs
from ..tiers.registry import Job
from .keys import (
    HEARTBEAT_STALE,
    STATE_FIRST_STARTED,
    STATE_HEARTBEAT,
    STATE_PITR_DOWN,
    STATE_PITR_ERROR,
    STATE_STOPPED,
    STATE_UNUSABLE,
)

MIN_MARGIN = timedelta(hours=1)


@dataclass
class Due:
    slot: datetime  # the latest scheduled time whose run should have succeeded by now
    interval: timedelta  # the gap between it and the scheduled time before it
    margin: timedelta


def required_slot(expr: str, zone: tzinfo, now: datetime, limit: int = 5000) -> Due | None:
    """The latest scheduled time `slot` with slot + margin <= now, where the margin is
    max(1 h, 25 % of the gap between `slot` and the scheduled time before it)."""
    times = iter(CronSim(cron_fields(expr), now.astimezone(zone), reverse=True))
    try:
        later = next(times)
        for _ in range(limit):
            earlier = next(times)
            interval = later.astimezone(UTC) - earlier.astimezone(UTC)
            margin = max(MIN_MARGIN, interval / 4)
            if later.astimezone(UTC) + margin <= now.astimezone(UTC):
                return Due(later, interval, margin)
            later = earlier
    except StopIteration:
        return None
    return None


def healthcheck(settings: Settings, now: datetime | None = None) -> tuple[bool, list[str]]:
    """Healthy if the heartbeat is fresh and every enabled job succeeded when it should have.

    Returns (healthy, lines): one line per problem, or one summary line when healthy.
    """
    now = now or utcnow()
    problems: list[str] = []
    good: list[str] = []
    with Store(settings.state_dir) as store:
        _heartbeat(settings, store, now, problems, good)
        first = parse_iso(store.get_state(STATE_FIRST_STARTED))
        for job in jobs.all_jobs():
            if job.enabled(settings):
                _job_health(settings, store, job, now, first, problems, good)
            elif problem := job.problem(settings):
                problems.append(problem)
        _offsite_health(settings, store, now, first, problems, good)
        _pitr_health(settings, store, now, problems, good)
    if problems:
        return False, problems
    return True, ["healthy: " + "; ".join(good)]


def _heartbeat(settings: Settings, store: Store, now: datetime, problems: list[str],
               good: list[str]) -> None:
    beat = parse_iso(store.get_state(STATE_HEARTBEAT))
    stopped = parse_iso(store.get_state(STATE_STOPPED))
    unusable = store.get_state(STATE_UNUSABLE)
    zone = settings.zone
    if unusable:
        problems.append("daemon: runs no backup until its settings are fixed: "
                        + "; ".join(unusable.splitlines()))
    elif beat is None:
        problems.append(f"daemon: no heartbeat in {store.path}; the daemon has not run "
                        "with this STATE_DIR")
    elif now - beat > HEARTBEAT_STALE:
        why = ("it stopped at " + local_time(stopped, zone, "weekday")
               if stopped and stopped >= beat else "it is not running or is stuck")
        problems.append(f"daemon: last heartbeat {ago(now - beat)} ago "
                        f"({local_time(beat, zone, 'weekday')}); {why}")
    else:
        good.append(f"heartbeat {ago(now - beat)} ago")


def _job_health(settings: Settings, store: Store, job: Job, now: datetime,
                first: datetime | None, problems: list[str], good: list[str]) -> None:
    zone = settings.zone
    due = required_slot(job.schedule(settings), zone, now)
    last_ok = store.last_run(job.name, "ok")
    if due is None or first is None or due.slot.astimezone(UTC) < first:
        good.append(f"{job.name} not due yet")
        return
    if last_ok is not None and last_ok.started_at >= due.slot.astimezone(UTC) - timedelta(
            seconds=5):
        good.append(f"{job.name} ok {ago(now - last_ok.started_at)} ago")
        return
    last = store.last_run(job.name)
    success = (f"last success {local_time(last_ok.started_at, zone, 'weekday')}"
               if last_ok else "never succeeded")
    latest = ""
    if last is not None and last.status != "ok":
        latest = f"; last run #{last.id} {last.status}"
        if last.error:
            latest += f": {last.error[:200]}"
    problems.append(
        f"{job.name}: no successful run since the one due "
        f"{local_time(due.slot, zone, 'weekday')} (allowed {ago(due.margin)} to finish); "
        f"{success}{latest}")


def _offsite_health(settings: Settings, store: Store, now: datetime, first: datetime | None,
                    problems: list[str], good: list[str]) -> None:
    """The newest off-site restore point must be younger than OFFSITE_MAX_LAG_HOURS."""
    if not settings.offsite_url or not settings.offsite_max_lag_hours:
        return
    lag = timedelta(hours=settings.offsite_max_lag_hours)
    ids = [copy.artifact_id for copy in store.offsite_copies(("ok",))]
    newest = max((item.created_at for i in ids if (item := store.artifact(i))), default=None)
    if newest is not None and now - newest <= lag:
        good.append(f"newest off-site restore point {ago(now - newest)} old")
        return
    if newest is None and (first is None or now - first <= lag):
        good.append("off-site copies not due yet")
        return
    pending = store.offsite_copies(("pending",))
    errors = [copy.last_error for copy in pending if copy.last_error]
    when = (f"is {ago(now - newest)} old ({local_time(newest, settings.zone, 'weekday')})"
            if newest else "does not exist")
    problems.append(
        f"off-site: the newest restore point at {settings.offsite_url} {when}, more than "
        f"OFFSITE_MAX_LAG_HOURS={settings.offsite_max_lag_hours}; {len(pending)} cop"
        f"{'y' if len(pending) == 1 else 'ies'} pending" + (f", last error: {errors[-1][:200]}"
                                                          if errors else ""))


def _pitr_health(settings: Settings, store: Store, now: datetime, problems: list[str],
                 good: list[str]) -> None:
    """With PITR: the WAL streamer must not have been down for PITR_ALERT_MINUTES."""
    if not settings.pitr:
        return
    down = parse_iso(store.get_state(STATE_PITR_DOWN))
    if down is None:
        good.append("WAL streaming")
    elif now - down < timedelta(minutes=settings.pitr_alert_minutes):
        good.append(f"WAL streamer starting ({ago(now - down)})")
    else:
        error = store.get_state(STATE_PITR_ERROR) or "-"
        problems.append(f"pitr: the WAL streamer has been down for {ago(now - down)} (since "
                        f"{local_time(down, settings.zone, 'weekday')}): {error[:300]}")
