"""Catch-up: a scheduled time that passed while the daemon was down runs once at start."""

from __future__ import annotations

from datetime import UTC, datetime

from ..core import schedule
from ..core.settings import Settings
from ..store import Store
from ..tiers import registry as jobs


def missed_jobs(settings: Settings, store: Store, now: datetime,
                since: datetime | None) -> dict[str, datetime]:
    """Enabled jobs whose latest scheduled time (at or before `now`) was not served by a run.

    A slot is served by any run of the job started at or after it, except an interrupted one
    (a crash ended it, so that backup did not happen) — unless that run was itself a catch-up
    (so a crash at start never loops). Slots before `since` (the daemon's first start) do not
    count: a new installation catches nothing up. Returns {job: slot}, at most one per job.
    """
    if since is None:
        return {}
    missed: dict[str, datetime] = {}
    for job in jobs.all_jobs():
        if not job.enabled(settings):
            continue
        slot = schedule.previous_time(job.schedule(settings), settings.zone, now)
        if slot is None or slot.astimezone(UTC) < since.astimezone(UTC):
            continue
        runs = [run for run in store.runs_since(slot.astimezone(UTC)) if run.job == job.name]
        if any(run.status != "interrupted" or run.trigger == "catchup" for run in runs):
            continue
        missed[job.name] = slot
    return missed
