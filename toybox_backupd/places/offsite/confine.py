"""What a restore point's list of off-site objects must be before anything uses it.

The list comes from a remote manifest (`reindex --offsite`) or from the catalog (a fetch, a
prune), which an older version may have filled from a hostile bucket. It is trusted only when:
- its first object is the artifact, and every object is one of the restore point's own files
  (the artifact or a companion: manifests.companion_paths), each at most once;
- every `source` (where a fetch writes the object, relative to BACKUP_DIR) is a relative path
  without `.` or `..` parts, and stays inside BACKUP_DIR once resolved (`local_path`);
- every `key` (what a fetch reads and a prune deletes) is derived from its source: the source
  itself, or `<source>.age` when it was encrypted.
So a fetch writes only the restore point's own files, and a prune deletes only its own objects.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ...core.basics import CatalogError
from ...core.manifests import companion_paths
from .copy import AGE_SUFFIX

_SHA256 = re.compile(r"[0-9a-f]{64}")


def relative_problem(path: Any) -> str | None:
    """Why `path` is not a relative path without `.`/`..` parts (None when it is one)."""
    if not isinstance(path, str) or not path:
        return f"{path!r} is not a path"
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or "\0" in path or any(
            part in ("", ".", "..") for part in parts):
        return f"{path!r} is not a relative path inside BACKUP_DIR (no leading /, no . or ..)"
    return None


def _object_problem(obj: dict[str, Any], allowed: set[str]) -> str | None:
    source, key = obj.get("source"), obj.get("key")
    problem = relative_problem(source)
    if problem:
        return f"an object's source {problem}"
    if source not in allowed:
        return f"an object's source {source!r} is not one of the restore point's own files"
    if not isinstance(key, str) or not isinstance(obj.get("size"), int):
        return f"the object of {source} has no key or size"
    if key != source + (AGE_SUFFIX if obj.get("encrypted") else ""):
        return f"the object of {source} has the key {key!r}, not its own ({source}[{AGE_SUFFIX}])"
    if not obj.get("manifest") and not _SHA256.fullmatch(str(obj.get("source_sha256"))):
        return f"the object of {source} has no valid source_sha256"
    return None


def objects_problem(tier: str, path: str, extra: Any, objects: Any) -> str | None:
    """Why the off-site objects `objects` of the restore point at `path` (its tier and the
    `extra` of its manifest) are not trusted, in plain words (see the module's doc)."""
    problem = relative_problem(path)
    if problem:
        return f"its path {problem}"
    if not isinstance(extra, dict):
        return "its description (extra) is not a JSON object"
    if not isinstance(objects, list) or not objects:
        return "its manifest does not describe a complete off-site copy"
    odd = next((obj for obj in objects if not isinstance(obj, dict)), None)
    if odd is not None:
        return f"its off-site objects include one that is not a JSON object ({odd!r:.60})"
    if objects[0].get("source") != path:
        return "its manifest does not describe a complete off-site copy"
    allowed = {path, *companion_paths(tier, path, extra)}
    seen: set[str] = set()
    for obj in objects:
        problem = _object_problem(obj, allowed)
        if problem:
            return problem
        if obj["source"] in seen:
            return f"it lists the object of {obj['source']} twice"
        seen.add(obj["source"])
    return None


def check_objects(tier: str, path: str, extra: Any, objects: Any, doing: str) -> None:
    """CatalogError (naming the restore point and why) unless objects_problem finds nothing."""
    problem = objects_problem(tier, path, extra, objects)
    if problem:
        raise CatalogError(f"refusing {doing} {path}: {problem}; its off-site copy's record "
                           "is not one this tool wrote (run `verify --offsite`, and check who "
                           "else can write to the target)")


def local_path(root: Path, source: str) -> Path:
    """Where the object of `source` goes in `root` (BACKUP_DIR): CatalogError if it is not
    a relative path inside it, once the links on its way are resolved."""
    problem = relative_problem(source)
    path = root / source
    if problem is None and not path.resolve().is_relative_to(root.resolve()):
        problem = f"{path} leads out of {root} (through a symbolic link)"
    if problem:
        raise CatalogError(f"refusing to write {source!r}: {problem}")
    return path
