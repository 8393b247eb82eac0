"""Restore points: choosing one by time, and rebuilding the catalog from manifests alone."""

from __future__ import annotations

import gzip
import json
from datetime import date, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import Any

from . import archive
from .history import Artifact, History
from .settings import Settings

TIERS = ("logical", "full", "diff")


class CatalogError(Exception):
    """No usable restore point; nothing was changed."""


def parse_when(text: str, zone: tzinfo) -> datetime:
    """ISO date or datetime in `zone`; a bare date means the end of that day."""
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


def restore_point(history: History, tiers: tuple[str, ...], target: str,
                  at: datetime | None) -> Artifact:
    """The newest good artifact of `tiers` for `target` at or before `at` (default: latest)."""
    candidates = [
        item for tier in tiers for item in history.artifacts(tier=tier, target=target)
        if at is None or item.created_at <= at
    ]
    if not candidates:
        when = f" at or before {at.isoformat()}" if at else ""
        kept = [item for tier in tiers for item in history.artifacts(tier=tier, target=target)]
        hint = (f"; the oldest kept one is from {min(i.created_at for i in kept).isoformat()}"
                if kept else "; none are kept (see `toybox-backupd list`, or run `reindex`)")
        raise CatalogError(f"no {'/'.join(tiers)} backup of {target!r}{when}{hint}")
    return max(candidates, key=lambda item: (item.created_at, item.id))


def artifact_file(settings: Settings, item: Artifact) -> Path:
    return settings.backup_dir / item.path


def check_file(settings: Settings, item: Artifact) -> Path:
    """The artifact's file, after its checksum was checked against the catalog."""
    path = artifact_file(settings, item)
    if not path.exists():
        raise CatalogError(f"{path} is missing from the backup directory")
    actual = archive.sha256_of(path)
    if actual != item.sha256:
        raise CatalogError(
            f"{path} is corrupt: its sha256 is {actual[:16]}…, the catalog says "
            f"{item.sha256[:16]}…; refusing to restore from it (pick another with --at)")
    return path


# rebuilding from manifests -------------------------------------------------------------------
def reindex(settings: Settings) -> int:
    """Add every artifact found by its manifest in BACKUP_DIR that the catalog lacks."""
    added = 0
    manifests = sorted(settings.backup_dir.rglob("*" + archive.MANIFEST_SUFFIX))
    loaded: list[tuple[Path, dict[str, Any]]] = []
    for manifest in manifests:
        artifact_path = manifest.with_name(manifest.name[: -len(archive.MANIFEST_SUFFIX)])
        if not artifact_path.exists():
            continue
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("tool") != "toybox-backupd":
            continue
        loaded.append((artifact_path, data))
    # fulls before the differentials that name them
    loaded.sort(key=lambda pair: (pair[1].get("tier") == "diff", pair[1].get("created_at", "")))
    with History(settings.state_dir) as history:
        for artifact_path, data in loaded:
            relative = str(artifact_path.relative_to(settings.backup_dir))
            if history.artifact_by_path(relative) is not None:
                continue
            base_id = None
            if data.get("base"):
                base = history.artifact_by_path(data["base"])
                base_id = base.id if base else None
            artifact_id = history.add_artifact(
                run_id=None, tier=data["tier"], target=data["target"], path=relative,
                created_at=datetime.fromisoformat(data["created_at"]), size=int(data["size"]),
                sha256=data["sha256"], base_id=base_id, extra=data.get("extra", {}),
            )
            index = artifact_path.with_name(artifact_path.name + INDEX_SUFFIX)
            if index.exists():
                history.add_files(artifact_id, read_index(index))
            if data.get("deleted"):
                history.add_deleted_paths(artifact_id, data["deleted"])
            added += 1
    return added


INDEX_SUFFIX = ".index.jsonl.gz"


def index_path(artifact_path: Path) -> Path:
    return artifact_path.with_name(artifact_path.name + INDEX_SUFFIX)


def write_index(artifact_path: Path, rows: list[tuple[Any, ...]]) -> Path:
    """The file index beside a volume archive, one JSON array per line, gzip'd."""
    path = index_path(artifact_path)
    with archive.AtomicFile(path) as out:
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as writer:
            for row in rows:
                writer.write(json.dumps(list(row), ensure_ascii=False).encode() + b"\n")
        out.commit()
    return path


def read_index(path: Path) -> list[tuple[Any, ...]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [tuple(json.loads(line)) for line in handle if line.strip()]


def cutoff(days: int, now: datetime) -> datetime:
    return now - timedelta(days=days)
