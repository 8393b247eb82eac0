"""A fourth tier for tests/test_new_tier.py: a snapshot (plain tar) of a host directory.

Written as a new tier would be: this module plus one registry entry, nothing else changed.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from toybox_backupd import __version__
from toybox_backupd.catalog.restore_points import check_file
from toybox_backupd.core.atomic import AtomicFile
from toybox_backupd.core.basics import CatalogError, JobError, RunContext, TierResult, iso, local_time, utcnow
from toybox_backupd.core.manifests import TOOL, write_manifest
from toybox_backupd.core.settings import Settings
from toybox_backupd.store import Artifact

TIER = "snapshot"


def backup(ctx: RunContext) -> TierResult:
    result = TierResult()
    for target in ctx.targets:
        source = Path(target)
        if not source.is_dir():
            raise JobError(f"{source} is not a directory (check SNAPSHOT_DIRS)")
        created = utcnow()
        name = source.name or "root"
        path = (ctx.settings.backup_dir / TIER / name
                / f"{name}_{local_time(created, ctx.settings.zone, 'stamp')}.tar")
        with AtomicFile(path) as out:
            with tarfile.open(fileobj=out, mode="w|") as tar:  # type: ignore[call-overload]
                tar.add(source, arcname=".")
            out.commit()
        relative = str(path.relative_to(ctx.settings.backup_dir))
        write_manifest(path, {"tool": TOOL, "version": __version__, "tier": TIER,
                              "target": target, "created_at": iso(created), "size": out.size,
                              "sha256": out.sha256, "file": path.name})
        ctx.store.add_artifact(run_id=ctx.run_id, tier=TIER, target=target, path=relative,
                               created_at=created, size=out.size, sha256=out.sha256)
        result.bytes += out.size
        result.artifacts.append(relative)
    return result


def verify(settings: Settings, item: Artifact) -> str | None:
    try:
        path = check_file(settings.backup_dir, item)
    except CatalogError as exc:
        return str(exc)
    with tarfile.open(path) as tar:
        return None if tar.getmembers() else f"{path.name} is empty"
