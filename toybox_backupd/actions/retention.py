"""Retention: which old backups to delete, chain-aware, and deleting them safely.

Rules (each one keeps something; an artifact is deleted only if no rule keeps it):

- young enough: created within PGDUMP_KEEP_DAYS (logical) or VOLUME_KEEP_DAYS (full, diff);
- newest good: the N newest `ok` artifacts of each tier and target are never deleted, however
  old, where N is how many runs the job's schedule makes in its keep window (7 daily dumps in 7
  days, 2 weekly fulls in 14 days; at least 1). Ages come from the clock; this count does not,
  so a clock that jumped ahead costs no more restore points than a normal day does;
- a sane clock: `apply` deletes nothing when the clock is further past the newest earlier
  backup than the keep window (the clock jumped, or nothing was backed up for that long), and
  says so (`Refused`);
- chain: a full that a kept differential is based on is kept, so the oldest kept restore
  point is always complete;
- only after success: `apply` refuses to prune unless the job's last run succeeded (the
  runner calls it only after a successful run, before it closes the run row);
- only our files: only an artifact's own file and its known companions (manifest, file index,
  the globals dump of a logical backup and its manifest) are deleted, only when they resolve
  inside BACKUP_DIR and are regular files; a file the catalog does not name is never touched.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..catalog.restore_points import restorable
from ..core import logs, manifests, schedule
from ..core.basics import ToyboxError, ago, local_time, utcnow
from ..core.manifests import MANIFEST_SUFFIX, TOOL
from ..core.settings import Settings
from ..store import Artifact, Store
from ..tiers import registry as jobs

log = logs.get("toybox_backupd.retention")

CONSIDERED = ("ok", "corrupt")  # 'deleted' rows are history already
_DELETE_ORDER = {"diff": 0, "full": 1, "logical": 2}  # a diff goes before the full it needs


class Refused(ToyboxError):
    """Retention deleted nothing, on purpose; the message says why (for the run and its email)."""


@dataclass
class Plan:
    """What to delete and why, and why everything else is kept."""

    delete: list[Artifact] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)  # artifact id -> why deleted
    kept: dict[int, str] = field(default_factory=dict)  # artifact id -> why kept

    @property
    def delete_ids(self) -> list[int]:
        return [item.id for item in self.delete]


def keep_days(settings: Settings) -> dict[str, int]:
    """Days each tier is kept, from its job's setting."""
    return {job.name: job.keep_days(settings) for job in jobs.all_jobs()}


def keep_counts(settings: Settings, now: datetime | None = None,
                days: Mapping[str, int] | None = None) -> dict[str, int]:
    """How many of each tier's newest good backups are always kept: as many as its job's
    schedule makes in its keep window (`days`, default its keep days; at least 1; 1 for a job
    without a schedule)."""
    end = now or utcnow()
    days = days or keep_days(settings)
    return {job.name: max(1, schedule.runs_within(job.schedule(settings), settings.zone,
                                                  days[job.name], end))
            for job in jobs.all_jobs()}


def _why_old(tier: str, days: int) -> str:
    return f"older than {days} days ({jobs.get(tier).keep_var})"


def plan(artifacts: Iterable[Artifact], *, now: datetime, keep_days: Mapping[str, int],
         keep_counts: Mapping[str, int] | None = None,
         hold: Mapping[int, str] | None = None) -> Plan:
    """Decide, without touching anything, which of `artifacts` to delete.

    `artifacts` are catalog rows of one or more tiers/targets (rows with a status other than
    ok/corrupt are ignored); `keep_days` maps a tier to its retention in days, `keep_counts`
    to how many of its newest good artifacts per target are kept whatever their age (1 if
    not given); `hold` maps artifact ids kept for another reason to that reason.
    """
    items = [item for item in artifacts if item.status in CONSIDERED]
    result = Plan()
    now = now.astimezone(UTC)
    for item in items:  # 1. young enough
        days = keep_days[item.tier]
        if item.created_at.astimezone(UTC) >= now - timedelta(days=days):
            result.kept.setdefault(
                item.id, f"younger than {days} days ({jobs.get(item.tier).keep_var})")
    for item, why in _newest_good(items, keep_counts or {}):  # 2. the newest good ones
        result.kept.setdefault(item.id, why)
    for item in items:  # 2b. held, e.g. its off-site copy is still pending
        if hold and item.id in hold:
            result.kept.setdefault(item.id, hold[item.id])
    _keep_chains(items, result)  # 3. the base of every kept differential
    # everything else goes, differentials before the fulls they were based on
    doomed = [item for item in items if item.id not in result.kept]
    doomed.sort(key=lambda item: (_DELETE_ORDER.get(item.tier, 9), item.created_at, item.id))
    for item in doomed:
        result.delete.append(item)
        result.reasons[item.id] = _why_old(item.tier, keep_days[item.tier])
    return result


def _newest_good(items: list[Artifact],
                 counts: Mapping[str, int]) -> list[tuple[Artifact, str]]:
    """The newest good artifacts of each tier and target, as many as `counts` says (>= 1)."""
    groups: dict[tuple[str, str], list[Artifact]] = {}
    for item in items:
        if item.status == "ok":
            groups.setdefault((item.tier, item.target), []).append(item)
    kept = []
    for (tier, target), group in groups.items():
        group.sort(key=lambda item: (item.created_at, item.id), reverse=True)
        count = max(1, counts.get(tier, 1))
        kept.append((group[0], f"the newest good {tier} backup of {target}"))
        kept += [(item, f"one of the {count} newest good {tier} backups of {target} (as many "
                  f"as {jobs.get(tier).schedule_var} makes in the keep window)")
                 for item in group[1:count]]
    return kept


def _keep_chains(items: list[Artifact], result: Plan) -> None:
    """Keep the base of every kept differential (following base_id until it ends)."""
    by_id = {item.id: item for item in items}
    changed = True
    while changed:
        changed = False
        for item in items:
            if item.id not in result.kept or item.base_id is None:
                continue
            base = by_id.get(item.base_id)
            if base is not None and base.id not in result.kept:
                result.kept[base.id] = f"the base of kept differential {item.id} ({item.path})"
                changed = True


# applying a plan ----------------------------------------------------------------------------
def _last_run_ok(store: Store, job: str) -> tuple[bool, str]:
    last = store.last_run(job)
    if last is None:
        return False, f"no {job} run in the history"
    if last.status == "ok":
        return True, ""
    # the runner prunes before it closes its own row: a run of this process still 'running'
    if last.status == "running" and last.pid == os.getpid():
        return True, ""
    return False, f"the last {job} run (#{last.id}) is {last.status}, not ok"


def apply(settings: Settings, store: Store, job: str, targets: list[str],
          now: datetime | None = None) -> list[str]:
    """Prune `job`'s tier family for `targets` after a successful run.

    Returns the deleted artifacts' paths, relative to BACKUP_DIR (companion files such as
    manifests and file indexes are deleted with them and logged, not listed). Raises Refused,
    deleting nothing, when the clock looks wrong (see `check_clock`).
    """
    job = jobs.get(job).name
    ok, why = _last_run_ok(store, job)
    if not ok:
        log.warning("retention skipped: pruning happens only after a successful run", job=job,
                    reason=why)
        return []
    now = now or utcnow()
    last = store.last_run(job)
    check_clock(settings, store, job, now, last.id if last else None)
    tiers = jobs.get(job).family
    artifacts = [item for tier in tiers for target in targets
                 for item in store.artifacts(tier=tier, target=target, statuses=CONSIDERED)]
    pending = {copy.artifact_id for copy in store.offsite_copies(("pending",))}
    decided = plan(artifacts, now=now, keep_days=keep_days(settings),
                   keep_counts=keep_counts(settings, now),
                   hold={item.id: "its off-site copy is still pending" for item in artifacts
                         if item.id in pending})
    deleted: list[str] = []
    for item in decided.delete:
        removed = delete_artifact(settings, store, item, decided.reasons[item.id])
        if removed:
            deleted.append(item.path)
    if job == "base":
        deleted += _prune_wal(settings, store, targets)
    if deleted:
        log.info("retention done", job=job, deleted=len(deleted))
    return deleted


def wal_keep(store: Store, target: str) -> dict[str | None, int]:
    """For each database cluster a base backup of `target` kept here or off-site is of (its
    system identifier; None for base backups that recorded none), the first WAL segment the
    oldest of them needs. The WAL from there on stays, here and off-site, so that every kept
    base backup, wherever it lies, can be recovered to any moment after it, with its own
    cluster's WAL: after a cluster was replaced (a major-version upgrade), the old one's too."""
    keep: dict[str | None, int] = {}
    for item in restorable(store, "base", target):
        system = str(item.extra.get("system_identifier") or "") or None
        start = int(item.extra.get("start_segment", 0))
        keep[system] = min(start, keep.get(system, start))
    return keep


def wal_keep_from(store: Store, target: str) -> int | None:
    """The first WAL segment any kept base backup of `target` needs, whatever its cluster
    (None: no base backup is kept anywhere): the off-site WAL, whose objects are not read, is
    kept from there on."""
    return min(wal_keep(store, target).values(), default=None)


def _prune_wal(settings: Settings, store: Store, targets: list[str]) -> list[str]:
    """The WAL no kept base backup needs (chain-aware: of each cluster, everything from the
    oldest kept base backup's start on stays)."""
    from ..tiers.pitr import wal

    gone: list[str] = []
    for target in targets:
        keep = wal_keep(store, target)
        if keep:
            gone += wal.prune(settings, keep, target)
    if not gone:
        return []
    log.info("retention: WAL segments no kept base backup needs deleted", count=len(gone),
             first=gone[0], last=gone[-1])
    return [f"{len(gone)} WAL segment(s) {gone[0]} … {gone[-1]}"]


def check_clock(settings: Settings, store: Store, job: str, now: datetime,
                run_id: int | None) -> None:
    """Raise Refused if `now` is further past the newest backup made before run `run_id`
    than the job's keep window: the clock jumped ahead, or nothing was backed up for so long,
    and ages measured with that clock are not a reason to delete anything."""
    earlier = [item.created_at for item in store.artifacts(statuses=CONSIDERED)
               if item.run_id is None or item.run_id != run_id]
    if not earlier:
        return
    newest = max(earlier)
    days = max(jobs.get(tier).keep_days(settings) for tier in jobs.get(job).family)
    if now - newest <= timedelta(days=days):
        return
    raise Refused(
        f"nothing was deleted: the clock says {local_time(now, settings.zone, 'minutes')}, "
        f"{ago(now - newest)} after the newest earlier backup "
        f"({local_time(newest, settings.zone, 'minutes')}), longer than the {days}-day keep "
        "window. Either the clock jumped ahead or nothing was backed up for that long; old "
        "backups are not deleted on the strength of such a clock. Check the host's clock "
        "(`date`); later runs keep at least as many backups as the schedule makes in the "
        "keep window.")


def delete_artifact(settings: Settings, store: Store, item: Artifact, reason: str) -> bool:
    """Delete one artifact's files (only known, in-BACKUP_DIR ones); mark its row deleted.

    Returns True if the artifact's own file was removed.
    """
    root = settings.backup_dir
    main = inside(root, item.path)
    if main is None:
        log.error("retention: the catalog path is outside BACKUP_DIR; not deleting it",
                  path=item.path, artifact=item.id)
        return False
    if os.path.lexists(main) and (not _is_regular(main) or main.lstat().st_size != item.size):
        # something else now sits at our path (a link, a directory, another file): not ours
        log.warning("retention: the file at this path is not the one the catalog wrote; "
                    "leaving it alone and dropping the catalog entry", path=item.path,
                    artifact=item.id)
        store.set_artifact_status(item.id, "deleted")
        return False
    companions: list[Path] = []
    for relative in companion_paths(item):
        path = inside(root, relative)
        if path is None:
            log.warning("retention: a companion path is outside BACKUP_DIR; not deleting it",
                        path=relative, artifact=item.id)
            continue
        if relative.endswith(MANIFEST_SUFFIX) and not _our_manifest(path):
            continue
        companions.append(path)
    removed_main = _unlink(main)
    if not removed_main:
        log.warning("retention: the artifact file was already gone", path=item.path)
    gone = [str(path.relative_to(root)) for path in companions if _unlink(path)]
    store.set_artifact_status(item.id, "deleted")
    copy = store.offsite_copy(item.id)
    if copy is None or copy.status != "ok":  # an off-site restore point keeps its index
        store.forget_index(item.id)
    log.info("retention: deleted", path=item.path, tier=item.tier, target=item.target,
             created=local_time(item.created_at, settings.zone, "minutes"),
             reason=reason, companions=", ".join(gone) or "-")
    return removed_main


def companion_paths(item: Artifact) -> list[str]:
    """The files the catalog created beside `item.path` (besides the artifact itself)."""
    return manifests.companion_paths(item.tier, item.path, item.extra)


def inside(root: Path, relative: str) -> Path | None:
    """`root / relative` if it resolves inside `root` (symlinks followed), else None."""
    if not relative or os.path.isabs(relative):
        return None
    candidate = root / relative
    try:
        real_root = root.resolve()
        resolved = candidate.resolve()
    except (OSError, RuntimeError):
        return None
    if resolved == real_root or not resolved.is_relative_to(real_root):
        return None
    return candidate


def _is_regular(path: Path) -> bool:
    try:
        mode = path.lstat().st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode)


def _our_manifest(path: Path) -> bool:
    if not _is_regular(path):
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("tool") == TOOL


def _unlink(path: Path) -> bool:
    """Remove a regular file (never a link or a directory); True if something went."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        log.warning("retention: not a regular file, leaving it alone", path=str(path))
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
