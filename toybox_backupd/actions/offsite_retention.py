"""Off-site retention: the local rules (retention.plan) applied to the off-site copies.

Copies are kept OFFSITE_KEEP_DAYS (default: each tier's local keep days); the newest good
copies of each tier and target stay whatever their age, and so does the full a kept
differential needs. Only objects this tool wrote and recorded in the catalog are deleted, and
only keys derived from the restore point's own files (offsite.trust); the manifest first (so a
half-deleted restore point never looks complete to `reindex --offsite`).
A copy under an Object Lock retain-until date is left alone until that date.
Runs only after a successful copy, in the run that made it, after local retention passed its
clock check. After a base backup run, the WAL segments off-site that no base backup kept here
or off-site needs go too (tiers.wal_offsite.prune), and each `.partial` copy whose completed
segment is there.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from ..catalog.restore_points import ANYWHERE
from ..core import logs
from ..core.basics import local_time, utcnow
from ..core.settings import Settings
from ..places.offsite import confine
from ..places.offsite.target import OffsiteError, Target, open_target
from ..store import Artifact, Copy, Store
from ..tiers import registry as jobs
from . import retention

log = logs.get("toybox_backupd.offsite")


def keep_days(settings: Settings) -> dict[str, int]:
    """Days each tier's off-site copies are kept."""
    return {job.name: settings.offsite_keep(job.keep_days(settings)) for job in jobs.all_jobs()}


def _copied(store: Store, job: str, targets: list[str]) -> tuple[list[Artifact], dict[int, Copy]]:
    """The job's restore points with an off-site copy, each carrying its copy's status."""
    copies = {copy.artifact_id: copy for copy in store.offsite_copies(retention.CONSIDERED)}
    items = [replace(item, status=copies[item.id].status)
             for tier in jobs.get(job).family for target in targets
             for item in store.artifacts(tier=tier, target=target, statuses=ANYWHERE)
             if item.id in copies]
    return items, copies


def apply(settings: Settings, store: Store, job: str, targets: list[str],
          now: datetime | None = None) -> list[str]:
    """Delete the off-site copies of `job`'s targets that no rule keeps; their paths."""
    target = open_target(settings)
    if target is None:
        return []
    now = now or utcnow()
    items, copies = _copied(store, job, targets)
    days = keep_days(settings)
    decided = retention.plan(items, now=now, keep_days=days,
                             keep_counts=retention.keep_counts(settings, now, days))
    deleted: list[str] = []
    for item in decided.delete:
        copy = copies[item.id]
        if not _may_delete(settings, item, copy, now):
            continue
        try:
            _delete(target, copy)
        except OffsiteError as exc:
            log.warning("off-site retention stopped", path=item.path, error=str(exc))
            break
        store.set_copy_status(item.id, "deleted", now)
        deleted.append(item.path)
        log.info("off-site retention: deleted", path=item.path, url=target.url,
                 reason=decided.reasons[item.id])
    if job == "base":
        deleted += _prune_wal(settings, store, targets)
    return deleted


def _may_delete(settings: Settings, item: Artifact, copy: Copy, now: datetime) -> bool:
    """False (and why, logged) when the copy's Object Lock holds it, or its record names
    objects that are not the restore point's own (a prune must not delete someone else's)."""
    problem = confine.objects_problem(item.tier, item.path, item.extra, copy.objects)
    if problem:
        log.warning("off-site retention: refusing to delete objects that are not the restore "
                    "point's own", path=item.path, problem=problem)
        return False
    if copy.retain_until and copy.retain_until > now:
        log.info("off-site retention: kept by its Object Lock", path=item.path,
                 until=local_time(copy.retain_until, settings.zone, "minutes"))
        return False
    return True


def _prune_wal(settings: Settings, store: Store, targets: list[str]) -> list[str]:
    """The off-site WAL no kept base backup (here or off-site) needs, chain-aware as locally."""
    from ..tiers.pitr import wal_offsite

    gone: list[str] = []
    for target in targets:
        oldest = retention.wal_keep_from(store, target)
        if oldest is not None:
            gone += wal_offsite.prune(settings, oldest, target,
                                      warn=lambda text: log.warning(text))
    if not gone:
        return []
    log.info("off-site retention: WAL no kept base backup needs deleted", count=len(gone),
             first=gone[0], last=gone[-1])
    return [f"{len(gone)} off-site WAL object(s) {gone[0]} … {gone[-1]}"]


def _delete(target: Target, copy: Copy) -> None:
    """The copy's objects, its manifest first."""
    for obj in sorted(copy.objects, key=lambda obj: not obj.get("manifest")):
        target.delete(obj["key"])
