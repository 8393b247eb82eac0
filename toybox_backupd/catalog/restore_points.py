"""Restore points: choosing one by time, and the checked file behind it."""

from __future__ import annotations

from datetime import date, datetime, time, tzinfo
from pathlib import Path

from ..core import progress
from ..core.atomic import sha256_of
from ..core.basics import CatalogError, Say, silent
from ..core.settings import Settings
from ..places.offsite import fetch
from ..store import Artifact, Copy, Store

ANYWHERE = ("ok", "corrupt", "deleted", "remote")  # local statuses of a restore point that may
# still be off-site: `remote` ones came from `reindex --offsite` and were never local here


def restorable(store: Store, tier: str, target: str) -> list[Artifact]:
    """The restore points of `tier` and `target` that are intact here or off-site."""
    offsite = {copy.artifact_id for copy in store.offsite_copies(("ok",))}
    return [item for item in store.artifacts(tier=tier, target=target, statuses=ANYWHERE)
            if item.status == "ok" or item.id in offsite]


def where(item: Artifact, copy: Copy | None) -> str:
    """Where a restore point lives: local, off-site, both; a pending copy is said so."""
    local = item.status in ("ok", "corrupt")
    remote = copy is not None and copy.status == "ok"
    if local and remote:
        return "both"
    if remote:
        return "off-site"
    if copy is not None and copy.status == "pending":
        return "local (off-site copy pending)"
    return "local"


def listing(store: Store, tier: str | None = None) -> list[tuple[Artifact, Copy | None]]:
    """Every restore point kept here or off-site (oldest first), with its off-site copy."""
    copies = {copy.artifact_id: copy for copy in store.offsite_copies(("ok", "corrupt", "pending"))}
    return [(item, copies.get(item.id)) for item in store.artifacts(tier=tier, statuses=ANYWHERE)
            if item.status in ("ok", "corrupt")
            or (item.id in copies and copies[item.id].status in ("ok", "corrupt"))]


def parse_when(text: str, zone: tzinfo) -> datetime:
    """`--at`: an ISO date or datetime in `zone`; a bare date means the end of that day.

    Raises CatalogError for anything else.
    """
    text = text.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day, time.max, tzinfo=zone)
        moment = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        raise CatalogError(
            f"--at {text!r}: use an ISO date (2026-01-26) or date and time (2026-01-26T17:45)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment


def restore_point(store: Store, tiers: tuple[str, ...], target: str,
                  at: datetime | None) -> Artifact:
    """The newest good artifact of `tiers` for `target` at or before `at` (default: latest).

    Raises CatalogError naming the oldest kept one when there is none.
    """
    kept = [item for tier in tiers for item in restorable(store, tier, target)]
    candidates = [item for item in kept if at is None or item.created_at <= at]
    if not candidates:
        when = f" at or before {at.isoformat()}" if at else ""
        hint = (f"; the oldest kept one is from {min(i.created_at for i in kept).isoformat()}"
                if kept else "; none are kept (see `toybox-backupd list`, or run `reindex`)")
        raise CatalogError(f"no {'/'.join(tiers)} backup of {target!r}{when}{hint}")
    return max(candidates, key=lambda item: (item.created_at, item.id))


def chain_for(store: Store, volume: str, at: datetime | None) -> list[Artifact]:
    """The artifacts that rebuild `volume` at `at`: [full] or [full, differential]."""
    point = restore_point(store, ("full", "diff"), volume, at)
    if point.tier == "full":
        return [point]
    base = store.artifact(point.base_id) if point.base_id else None
    if base is None or base.id not in {item.id for item in restorable(store, "full", volume)}:
        raise CatalogError(f"the differential {point.path} needs its full archive, which is "
                           "missing from the catalog")
    return [base, point]


def check_file(backup_dir: Path, item: Artifact) -> Path:
    """The artifact's file, after its checksum was checked against the catalog.

    Raises CatalogError when it is missing or its sha256 differs.
    """
    path = backup_dir / item.path
    if not path.exists():
        raise CatalogError(f"{path} is missing from the backup directory")
    actual = sha256_of(path)
    if actual != item.sha256:
        raise corrupt(path, actual, item.sha256)
    return path


def corrupt(path: Path, actual: str, expected: str) -> CatalogError:
    """The error for a file whose sha256 is not the catalog's."""
    return CatalogError(
        f"{path} is corrupt: its sha256 is {actual[:16]}…, the catalog says "
        f"{expected[:16]}…; refusing to restore from it (pick another with --at)")


def local_copy(settings: Settings, store: Store, item: Artifact, say: Say = silent,
               streamed: bool = False) -> Path:
    """The restore point's checked local file; fetched from off-site first when it is missing
    or corrupt here and has a good off-site copy. Raises CatalogError otherwise.

    `streamed`: the caller checks the sha256 itself as it reads the file (and fails before it
    changes anything on a mismatch), so a local file of the right size is not read in a pass
    before, unless a good off-site copy could stand in for a corrupt one.
    """
    path = settings.backup_dir / item.path
    if streamed and _size(path) == item.size:
        copy = store.offsite_copy(item.id)
        if copy is None or copy.status != "ok":
            return path
    try:
        with progress.task(f"checking the sha256 of {item.path}", item.size):
            return check_file(settings.backup_dir, item)
    except CatalogError as exc:
        copy = store.offsite_copy(item.id)
        if copy is None or copy.status != "ok":
            raise
        say(f"{exc}; it has an off-site copy")
    return fetch.bring_back(settings, store, item, say)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
