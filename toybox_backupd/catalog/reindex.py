"""`toybox-backupd reindex`: rebuild the catalog from the manifests in BACKUP_DIR alone.

Only the tool's own layout counts, because a restore from the catalog pipes a dump into psql:
`logical/<db>/<db>_<stamp>.dump|.sql.gz` (tier logical, target <db>),
`volumes/<v>/<v>_<stamp>_full|diff.tar[.zst|.gz]` (that tier, target <v>) and
`base/<db>/<db>_<stamp>/base.tar.gz` (tier base, target <db>; with its pg_wal.tar.gz and
backup_manifest beside it, as its manifest lists them), each a regular file beside its regular
`.manifest.json` that names it, with the file's size, dated no later than now. Anything else,
such as files restored into BACKUP_DIR/restore, is never read.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core.atomic import PARTIAL
from ..core.basics import utcnow
from ..core.manifests import MANIFEST_SUFFIX, TOOL, companion_paths, index_path, read_index
from ..store import Store

TOP_TIERS = {"logical": ("logical",), "volumes": ("full", "diff"), "base": ("base",)}
_STEM = r"_\d{8}-\d{6}(?:-\d+)?"
# an artifact's name below `<top>/<target>/` (a base backup is a directory of files)
_NAMES = {"logical": _STEM + r"\.(?:dump|sql\.gz)",
          "volumes": _STEM + r"_(full|diff)\.tar(?:\.zst|\.gz)?",
          "base": _STEM + r"/base\.tar\.gz"}
BASE_FILES = ("pg_wal.tar.gz", "backup_manifest")  # beside a base backup's base.tar.gz
_LSN = r"[0-9A-F]{1,8}/[0-9A-F]{1,8}"
INDEX_FIELDS = 11  # path, type, size, mtime_ns, ctime_ns, inode, mode, uid, gid, link, hash


@dataclass
class Reindexed:
    """What a reindex did: artifacts added, and manifests it would not trust (path, why)."""

    added: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def reindex(backup_dir: Path, state_dir: Path, now: datetime | None = None) -> Reindexed:
    """Add every artifact of the tool's layout that the catalog lacks (see the module's doc),
    and bring back those it marked deleted whose files are there again."""
    found, skipped = candidates(backup_dir, now or utcnow())
    # fulls before the differentials that name them
    found.sort(key=lambda pair: (pair[1].get("tier") == "diff", pair[1].get("created_at", "")))
    result = Reindexed(skipped=skipped)
    with Store(state_dir) as store:
        for relative, data in found:
            try:
                if _catalog(store, backup_dir, relative, data):
                    result.added.append(relative)
            except ValueError as exc:  # its file index: the one part read only now
                result.skipped.append((relative, str(exc)))
    return result


def unknown_files(backup_dir: Path, store: Store) -> list[str]:
    """Files under `logical/`, `volumes/` and `base/` that the catalog does not know, relative to
    BACKUP_DIR, sorted: for `verify` to report.

    Known are the kept (ok or corrupt) artifacts and the files the tool writes beside them
    (manifest, file index, a dump's roles file). Such a file is, for instance, an artifact
    whose catalog row a crash kept from being written (a run renames its files, then adds the
    row: `reindex` adds it), one of a backup the catalog marks deleted (copied back by hand,
    or left alone by retention because it had been replaced), or anything put there by hand.
    `*.partial` files (and the files of a base backup's `.…partial` directory) are left out:
    a run is writing them, or start-up recovery (the next base backup) removes them.
    Symbolic links are listed, never followed.
    """
    known: set[str] = set()
    for item in store.artifacts(statuses=("ok", "corrupt")):
        known.add(item.path)
        known.update(companion_paths(item.tier, item.path, item.extra))
    found = []
    for top in TOP_TIERS:
        if not _is_dir(backup_dir / top):
            continue
        for directory, _, names in os.walk(backup_dir / top):
            if directory.endswith(PARTIAL):
                continue
            for name in names:
                relative = str((Path(directory) / name).relative_to(backup_dir))
                if not name.endswith(PARTIAL) and relative not in known:
                    found.append(relative)
    return sorted(found)


def _subdirs(parent: Path) -> list[Path]:
    """The real directories in `parent` (none when it is not one), sorted."""
    if not _is_dir(parent):
        return []
    return [parent / name for name in sorted(os.listdir(parent)) if _is_dir(parent / name)]


def layout_dirs(backup_dir: Path) -> list[tuple[str, Path]]:
    """(top, directory) for each `logical/<db>/`, `volumes/<v>/` and `base/<db>/<db>_<stamp>/`
    (real directories only) where artifacts and their manifests lie."""
    found = []
    for top in TOP_TIERS:
        for directory in _subdirs(backup_dir / top):
            if top == "base":  # one directory per base backup
                found += [(top, folder) for folder in _subdirs(directory)]
            else:
                found.append((top, directory))
    return found


def split_layout(relative: str) -> tuple[str, str, str] | None:
    """(top, target, name below `<top>/<target>/`) of an artifact path in the tool's layout
    (None when it has not the layout's depth: `base/<db>/<folder>/<file>`, else 3 parts)."""
    parts = relative.split("/")
    if parts[0] not in TOP_TIERS or len(parts) != (4 if parts[0] == "base" else 3):
        return None
    return parts[0], parts[1], "/".join(parts[2:])


def candidates(backup_dir: Path, now: datetime) -> tuple[list[tuple[str, dict[str, Any]]],
                                                         list[tuple[str, str]]]:
    """([(artifact path, manifest)], [(artifact path, why it is not trusted)]) in the layout."""
    found: list[tuple[str, dict[str, Any]]] = []
    skipped: list[tuple[str, str]] = []
    for _top, directory in layout_dirs(backup_dir):
        for manifest in sorted(directory.glob("*" + MANIFEST_SUFFIX)):
            name = manifest.name[: -len(MANIFEST_SUFFIX)]
            relative = str((directory / name).relative_to(backup_dir))
            data, problem = _read(manifest)
            if data is not None:
                problem = problem_of(backup_dir, relative, data, now)
            if problem:
                skipped.append((relative, problem))
            elif data is not None:
                found.append((relative, data))
    return found, skipped


def _read(manifest: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not _is_regular(manifest):
        return None, "its manifest is not a regular file"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"its manifest cannot be read ({exc})"
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        return None, "its manifest was not written by toybox-backupd"
    return data, None


def problem_of(backup_dir: Path, relative: str, data: dict[str, Any],
               now: datetime) -> str | None:
    """Why the artifact at `relative` (in the layout) with this manifest is not trusted."""
    where = split_layout(relative)
    if where is None:
        return "it is not where this tool writes its backups"
    problem = manifest_problem(*where, data, now)
    if problem:
        return problem
    path = backup_dir / relative
    for other, size in [(path, data.get("size")), *_base_files(path, data)]:
        if not _is_regular(other):
            return f"{other.name} is missing or not a regular file"
        if size != other.stat().st_size:
            return f"{other.name} has {other.stat().st_size} bytes, its manifest says {size}"
    return None


def _base_files(path: Path, data: dict[str, Any]) -> list[tuple[Path, Any]]:
    """(file, size its manifest says) of the files beside a base backup's base.tar.gz."""
    if data.get("tier") != "base":
        return []
    files = (data.get("extra") or {}).get("files") or {}
    return [(path.parent / name, (files.get(name) or {}).get("size")) for name in BASE_FILES]


def manifest_problem(top: str, target: str, name: str, data: dict[str, Any],
                     now: datetime) -> str | None:
    """Why a manifest for `<top>/<target>/<name>` is not trusted (the file itself unseen)."""
    shape = _shape_problem(data)
    if shape:
        return shape
    match = re.fullmatch(re.escape(target) + _NAMES[top], name)
    if data.get("tier") not in TOP_TIERS[top] or data.get("target") != target:
        return (f"its manifest says tier {data.get('tier')!r}, target {data.get('target')!r}; "
                f"{top}/{target}/ holds {'/'.join(TOP_TIERS[top])} backups of {target!r}")
    if match is None or (top == "volumes" and match.group(1) != data["tier"]):
        return f"the name {name!r} is not one this tool gives a {data['tier']} of {target!r}"
    if data.get("file") != name.rsplit("/", 1)[-1]:
        return f"its manifest names another file ({data.get('file')!r})"
    if not re.fullmatch(r"[0-9a-f]{64}", str(data.get("sha256"))):
        return "its manifest has no valid sha256"
    if data["tier"] == "diff" and not str(data.get("base") or "").startswith(f"volumes/{target}/"):
        return f"its base full ({data.get('base')!r}) is not one of {target}'s"
    if not isinstance(data.get("size"), int):
        return "its manifest has no size"
    return (_date_problem(data, now)
            or _globals_problem(target, name, data) or _base_problem(data))


def _shape_problem(data: dict[str, Any]) -> str | None:
    """Why the manifest's optional fields are not of the shape this tool writes."""
    if not isinstance(data.get("extra", {}), dict):
        return "its manifest's extra (the description of the backup) is not a JSON object"
    deleted = data.get("deleted") or []
    if not isinstance(deleted, list) or not all(isinstance(path, str) for path in deleted):
        return "its manifest's deleted (the paths deleted since the full) is not a list of paths"
    if not isinstance(data.get("base") or "", str):
        return f"its manifest's base ({data.get('base')!r:.60}) is not a path"
    return None


def _date_problem(data: dict[str, Any], now: datetime) -> str | None:
    try:
        created = datetime.fromisoformat(str(data.get("created_at")))
    except ValueError:
        return "its manifest has no valid created_at"
    if created.tzinfo is None:
        return "its manifest's created_at has no time zone"
    if created > now:
        return (f"it is dated {created.isoformat()}, in the future (now is {now.isoformat()}); "
                "set the clock right and run reindex again")
    return None


def _globals_problem(target: str, name: str, data: dict[str, Any]) -> str | None:
    """A dump's roles file must be its own, beside it (retention deletes it with the dump)."""
    info = (data.get("extra") or {}).get("globals") if data.get("tier") == "logical" else None
    if not info:
        return None
    stem = name.removesuffix(".dump").removesuffix(".sql.gz")
    own = f"logical/{target}/{stem}.globals.sql.gz"
    if not isinstance(info, dict) or info.get("path") != own:
        return f"its manifest names a roles file that is not its own ({info!r})"
    return None


def _base_problem(data: dict[str, Any]) -> str | None:
    """What a restore to a moment needs of a base backup's manifest: its WAL start, the
    image it was taken with and its other files' sizes and checksums."""
    if data.get("tier") != "base":
        return None
    extra = data.get("extra")
    if not isinstance(extra, dict):
        return "its manifest has no description of the base backup (extra)"
    files = extra.get("files")
    if not isinstance(extra.get("start_segment"), int) or not re.fullmatch(
            _LSN, str(extra.get("end_lsn"))) or not isinstance(extra.get("image"), str):
        return "its manifest has no valid WAL range (start_segment, end_lsn) or image"
    if not isinstance(files, dict) or not all(
            isinstance(files.get(name), dict) and isinstance(files[name].get("size"), int)
            and re.fullmatch(r"[0-9a-f]{64}", str(files[name].get("sha256")))
            for name in BASE_FILES):
        return f"its manifest does not describe its {' and '.join(BASE_FILES)}"
    return None


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def fields(store: Store, data: dict[str, Any]) -> dict[str, Any]:
    """The catalog's columns for an artifact, from its manifest."""
    base = store.artifact_by_path(data["base"]) if data.get("base") else None
    return {"created_at": datetime.fromisoformat(data["created_at"]), "size": int(data["size"]),
            "sha256": data["sha256"], "base_id": base.id if base else None,
            "extra": data.get("extra") or {}}


def _index(backup_dir: Path, relative: str) -> list[tuple[Any, ...]]:
    """The rows of the artifact's file index (none if it has none); ValueError saying why
    when it cannot be read or is not the tool's."""
    index = index_path(backup_dir / relative)
    if not _is_regular(index):
        return []
    try:
        rows = read_index(index)
    except (OSError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"its file index {index.name} cannot be read ({exc})") from None
    if not all(_index_row(row) for row in rows):
        raise ValueError(f"its file index {index.name} has a row that is not a file's "
                         f"({INDEX_FIELDS} values: path, type, size, ...)")
    return rows


def _index_row(row: tuple[Any, ...]) -> bool:
    return (len(row) == INDEX_FIELDS and isinstance(row[0], str)
            and all(value is None or isinstance(value, str | int | float) for value in row))


def _catalog(store: Store, backup_dir: Path, relative: str, data: dict[str, Any]) -> bool:
    """Add the artifact, or bring back a deleted one whose files are there again (copied back
    by hand), with its file index and deleted paths in one transaction; whether it did."""
    known = store.artifact_by_path(relative)
    if known is not None and known.status != "deleted":
        return False
    files, deleted = _index(backup_dir, relative), data.get("deleted") or []
    if known is not None:
        return store.revive_artifact(known.id, **fields(store, data), files=files,
                                     deleted=deleted)
    store.add_artifact(run_id=None, tier=data["tier"], target=data["target"], path=relative,
                       **fields(store, data), files=files, deleted=deleted)
    return True
