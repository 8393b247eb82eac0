"""`toybox-backupd reindex --offsite`: rebuild the catalog from the off-site manifests alone.

For a new host that has nothing but `.env` (and the age identity): every `<path>.manifest.json`
in the target whose path is in the tool's layout, whose manifest passes the same checks as a
local one (reindex.manifest_problem), carries the `offsite` section of a complete copy and a
trusted signature (offsite.trust),
becomes a restore point the catalog knows as off-site only (`remote`), with its file index
(read from the index object, decrypted when AGE_IDENTITY_FILE is set). Restores then fetch
the files they need (offsite.fetch).
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core import logs
from ..core.atomic import sha256_of
from ..core.basics import CatalogError, ToyboxError, iso, utcnow
from ..core.manifests import INDEX_SUFFIX, MANIFEST_SUFFIX, read_index
from ..core.settings import Settings
from ..places.offsite import confine, trust
from ..places.offsite.fetch import download
from ..places.offsite.target import OffsiteError, Target, open_target
from ..store import Store
from .reindex import BASE_FILES, Reindexed, fields, manifest_problem, split_layout

log = logs.get("toybox_backupd.reindex")


def _read(target: Target, key: str) -> dict[str, Any] | None:
    with target.open(key) as stream:
        body = stream.read()
    try:
        data = json.loads(body.decode("utf-8"))
    except ValueError:
        return None
    if isinstance(data, dict):
        data["_manifest_size"] = len(body)
    return data if isinstance(data, dict) else None


def _problem(relative: str, data: dict[str, Any] | None, now: datetime) -> str | None:
    where = split_layout(relative)
    if data is None or where is None:
        return "its manifest is not a JSON object"
    problem = manifest_problem(*where, data, now) or _offsite_problem(data)
    if problem:
        return problem
    objects = _objects(relative, data)
    problem = confine.objects_problem(data["tier"], relative, data.get("extra", {}), objects)
    if problem:
        return problem
    if objects[0].get("source_sha256") != data.get("sha256"):
        return "its off-site copy does not hold the file its manifest describes"
    return _base_objects_problem(relative, data, objects)


def _offsite_problem(data: dict[str, Any]) -> str | None:
    """Why the manifest's `offsite` section is not of the shape a copy writes."""
    offsite = data.get("offsite")
    if not isinstance(offsite, dict) or not isinstance(offsite.get("objects"), list):
        return "its manifest does not describe a complete off-site copy"
    recipients = offsite.get("recipients") or []
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        return f"its off-site recipients are not a list of age recipients ({recipients!r:.60})"
    try:
        datetime.fromisoformat(offsite.get("copied_at") or iso())
    except (TypeError, ValueError):
        return f"its off-site copied_at ({offsite.get('copied_at')!r:.40}) is not a time"
    return None


def _objects(relative: str, data: dict[str, Any]) -> list[Any]:
    """The restore point's objects as the catalog records them: those its manifest lists, then
    the manifest itself."""
    return [*data["offsite"]["objects"], {
        "key": relative + MANIFEST_SUFFIX, "source": relative + MANIFEST_SUFFIX,
        "size": data.get("_manifest_size"), "sha256": None, "etag": None, "encrypted": False,
        "manifest": True}]


def _base_objects_problem(relative: str, data: dict[str, Any],
                          objects: list[dict[str, Any]]) -> str | None:
    """A base backup is copied with its pg_wal.tar.gz and backup_manifest, as it lists them."""
    if data.get("tier") != "base":
        return None
    folder = relative.rsplit("/", 1)[0]
    sums = {obj.get("source"): obj.get("source_sha256") for obj in objects}
    files = data["extra"]["files"]
    missing = [name for name in BASE_FILES
               if sums.get(f"{folder}/{name}") != files[name]["sha256"]]
    if missing:
        return f"its off-site copy lacks {' and '.join(missing)} (or holds others)"
    return None


def candidates(target: Target, now: datetime) -> tuple[list[tuple[str, dict[str, Any]]],
                                                      list[tuple[str, str]]]:
    """([(artifact path, manifest)], [(artifact path, why it is not trusted)])."""
    found: list[tuple[str, dict[str, Any]]] = []
    skipped: list[tuple[str, str]] = []
    for key in sorted(target.keys()):
        if not key.endswith(MANIFEST_SUFFIX):
            continue
        relative = key[: -len(MANIFEST_SUFFIX)]
        if split_layout(relative) is None or ".globals." in relative.rsplit("/", 1)[-1]:
            continue
        try:
            data = _read(target, key)
        except OffsiteError as exc:
            skipped.append((relative, f"its manifest cannot be read ({exc})"))
            continue
        problem = _problem(relative, data, now)
        if problem:
            skipped.append((relative, problem))
        elif data is not None:
            found.append((relative, data))
    return found, skipped


def _index_rows(settings: Settings, target: Target, objects: list[dict[str, Any]],
                relative: str) -> list[tuple[Any, ...]]:
    """The restore point's file index, from its index object ([] if it has none, or it is
    encrypted and no identity is set: `restore files` then fetches it with the archive)."""
    obj = next((o for o in objects if o.get("source") == relative + INDEX_SUFFIX), None)
    if obj is None or (obj.get("encrypted") and settings.age_identity_file is None):
        return []
    with tempfile.TemporaryDirectory(dir=settings.state_dir) as scratch:
        path = Path(scratch) / "index.jsonl.gz"
        try:
            with open(path, "wb") as out:
                download(settings, target, obj, out)
            if sha256_of(path) != obj["source_sha256"]:
                raise ValueError("its sha256 is not the one its manifest recorded")
            return read_index(path)
        except (ToyboxError, OSError, ValueError, EOFError) as exc:
            raise IndexUnreadable(f"its file index object {obj['key']} cannot be read "
                                  f"({exc})") from None


class IndexUnreadable(ToyboxError):
    """The file index object a remote manifest lists cannot be read, or is not the one it
    recorded: the restore point is skipped."""


def _add(settings: Settings, store: Store, target: Target, relative: str,
         data: dict[str, Any]) -> None:
    offsite = data["offsite"]
    objects = _objects(relative, data)
    known = store.artifact_by_path(relative)
    if known is None:
        artifact_id = store.add_artifact(
            run_id=None, tier=data["tier"], target=data["target"], path=relative,
            **fields(store, data), status="remote",
            files=_index_rows(settings, target, objects, relative),
            deleted=data.get("deleted") or [])
    else:
        artifact_id = known.id
    store.copy_done(artifact_id, url=target.url, objects=objects,
                    recipients=list(offsite.get("recipients") or []),
                    now=datetime.fromisoformat(offsite.get("copied_at") or iso()),
                    retain_until=None)


def reindex_offsite(settings: Settings, now: datetime | None = None) -> Reindexed:
    """Add every complete off-site restore point the catalog lacks (see the module's doc)."""
    target = open_target(settings)
    if target is None:
        raise CatalogError("OFFSITE_URL is empty: set it to the bucket or directory the "
                           "backups were copied to")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        found, skipped = candidates(target, now or utcnow())
    except OffsiteError as exc:
        raise CatalogError(f"cannot read the off-site manifests: {exc}") from None
    found = trust.signed_only(settings, found, skipped, MANIFEST_SUFFIX)
    found.sort(key=lambda pair: (pair[1].get("tier") == "diff", pair[1].get("created_at", "")))
    result = Reindexed(skipped=skipped)
    with Store(settings.state_dir) as store:
        for relative, data in found:
            copy = (store.offsite_copy(known.id)
                    if (known := store.artifact_by_path(relative)) else None)
            if copy is not None and copy.status == "ok":
                continue
            try:
                _add(settings, store, target, relative, data)
            except IndexUnreadable as exc:
                result.skipped.append((relative, str(exc)))
                continue
            result.added.append(relative)
    log.info("reindexed from off-site", url=target.url, added=len(result.added),
             skipped=len(result.skipped))
    return result
