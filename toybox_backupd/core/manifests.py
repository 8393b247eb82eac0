"""The files beside each artifact that make the catalog rebuildable from BACKUP_DIR alone.

`<artifact>.manifest.json`: tier, target, times, size, sha256, base full (see reindex).
`<archive>.index.jsonl.gz`: a volume archive's file index, one JSON array per line.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .atomic import AtomicFile, Batch

MANIFEST_SUFFIX = ".manifest.json"
INDEX_SUFFIX = ".index.jsonl.gz"
TOOL = "toybox-backupd"


def manifest_path(artifact: Path) -> Path:
    """`<artifact>.manifest.json`."""
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX)


@contextmanager
def _writing(path: Path, batch: Batch | None) -> Iterator[AtomicFile]:
    """A file of `batch` (committed with it), or one committed on its own at the end."""
    if batch is not None:
        yield batch.open(path)
        return
    with AtomicFile(path) as out:
        yield out
        out.commit()


def write_manifest(artifact: Path, manifest: dict[str, Any], batch: Batch | None = None) -> Path:
    """Write `<artifact>.manifest.json` atomically (with `batch`, when it commits)."""
    path = manifest_path(artifact)
    with _writing(path, batch) as out:
        out.write(json.dumps(manifest, indent=2, sort_keys=True, default=str).encode() + b"\n")
    return path


def index_path(artifact_path: Path) -> Path:
    """`<archive>.index.jsonl.gz`."""
    return artifact_path.with_name(artifact_path.name + INDEX_SUFFIX)


def write_index(artifact_path: Path, rows: Iterable[tuple[Any, ...]],
                batch: Batch | None = None) -> Path:
    """The file index beside a volume archive, one JSON array per line, gzip'd."""
    path = index_path(artifact_path)
    with _writing(path, batch) as out, gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as writer:
        for row in rows:
            writer.write(json.dumps(list(row)).encode() + b"\n")
    return path


def companion_paths(tier: str, path: str, extra: dict[str, Any]) -> list[str]:
    """The files the tool writes beside the artifact at `path` (relative to BACKUP_DIR):
    its manifest, its file index and, for a dump, its roles file (and that file's manifest,
    which older versions may have written)."""
    paths = [path + MANIFEST_SUFFIX, path + INDEX_SUFFIX]
    if tier == "base":  # a base backup's other files, in its own directory
        folder = path.rsplit("/", 1)[0]
        paths += [f"{folder}/{name}" for name in ("pg_wal.tar.gz", "backup_manifest")]
    globals_info: Any = extra.get("globals") if tier == "logical" else None
    if isinstance(globals_info, dict) and isinstance(globals_info.get("path"), str):
        gpath = globals_info["path"]
        if gpath and gpath != path:
            paths += [gpath, gpath + MANIFEST_SUFFIX]
    return paths


def read_index(path: Path) -> list[tuple[Any, ...]]:
    """The rows of a file index written by `write_index`."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [tuple(json.loads(line)) for line in handle if line.strip()]
