"""The files beside each artifact that make the catalog rebuildable from BACKUP_DIR alone.

`<artifact>.manifest.json`: tier, target, times, size, sha256, base full (see reindex).
`<archive>.index.jsonl.gz`: a volume archive's file index, one JSON array per line.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .atomic import AtomicFile

MANIFEST_SUFFIX = ".manifest.json"
INDEX_SUFFIX = ".index.jsonl.gz"
TOOL = "toybox-backupd"


def manifest_path(artifact: Path) -> Path:
    """`<artifact>.manifest.json`."""
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX)


def write_manifest(artifact: Path, manifest: dict[str, Any]) -> Path:
    """Write `<artifact>.manifest.json` atomically."""
    path = manifest_path(artifact)
    with AtomicFile(path) as out:
        out.write(json.dumps(manifest, indent=2, sort_keys=True, default=str).encode() + b"\n")
        out.commit()
    return path


def index_path(artifact_path: Path) -> Path:
    """`<archive>.index.jsonl.gz`."""
    return artifact_path.with_name(artifact_path.name + INDEX_SUFFIX)


def write_index(artifact_path: Path, rows: Iterable[tuple[Any, ...]]) -> Path:
    """The file index beside a volume archive, one JSON array per line, gzip'd."""
    path = index_path(artifact_path)
    with AtomicFile(path) as out:
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as writer:
            for row in rows:
                writer.write(json.dumps(list(row), ensure_ascii=False).encode() + b"\n")
        out.commit()
    return path


def read_index(path: Path) -> list[tuple[Any, ...]]:
    """The rows of a file index written by `write_index`."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [tuple(json.loads(line)) for line in handle if line.strip()]
