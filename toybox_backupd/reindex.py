"""`toybox-backupd reindex`: rebuild the catalog from the manifests in BACKUP_DIR alone."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from .manifests import MANIFEST_SUFFIX, TOOL, index_path, read_index
from .store import Store


def reindex(backup_dir: Path, state_dir: Path) -> int:
    """Add every artifact found by its manifest that the catalog lacks; return how many."""
    loaded = _manifests(backup_dir)
    # fulls before the differentials that name them
    loaded.sort(key=lambda pair: (pair[1].get("tier") == "diff", pair[1].get("created_at", "")))
    added = 0
    with Store(state_dir) as store:
        for artifact_path, data in loaded:
            relative = str(artifact_path.relative_to(backup_dir))
            if store.artifact_by_path(relative) is None:
                _add(store, artifact_path, relative, data)
                added += 1
    return added


def _manifests(backup_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(artifact, manifest) for every readable manifest of ours whose artifact exists."""
    loaded: list[tuple[Path, dict[str, Any]]] = []
    for manifest in sorted(backup_dir.rglob("*" + MANIFEST_SUFFIX)):
        artifact_path = manifest.with_name(manifest.name[: -len(MANIFEST_SUFFIX)])
        if not artifact_path.exists():
            continue
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("tool") == TOOL:
            loaded.append((artifact_path, data))
    return loaded


def _add(store: Store, artifact_path: Path, relative: str, data: dict[str, Any]) -> None:
    base_id = None
    if data.get("base"):
        base = store.artifact_by_path(data["base"])
        base_id = base.id if base else None
    artifact_id = store.add_artifact(
        run_id=None, tier=data["tier"], target=data["target"], path=relative,
        created_at=datetime.fromisoformat(data["created_at"]), size=int(data["size"]),
        sha256=data["sha256"], base_id=base_id, extra=data.get("extra", {}),
    )
    index = index_path(artifact_path)
    if index.exists():
        store.add_files(artifact_id, read_index(index))
    if data.get("deleted"):
        store.add_deleted_paths(artifact_id, data["deleted"])
