"""Bringing a restore point back from off-site into BACKUP_DIR, decrypted and checked.

A restore uses the local copy when it is there and intact; otherwise the restore point's
objects are streamed from the target (decrypted with AGE_IDENTITY_FILE when they were
encrypted), each checked against the sha256 its manifest recorded, and written into their
usual places in BACKUP_DIR together (all or none). The catalog then knows the restore point as
local again, and the restore goes on from the local files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...core import logs
from ...core.atomic import Batch
from ...core.basics import CatalogError, Say, silent
from ...core.manifests import INDEX_SUFFIX, MANIFEST_SUFFIX, read_index
from ...core.settings import Settings
from ...store import Artifact, Copy, Store
from . import confine, trust
from .target import OffsiteError, Target, open_target

log = logs.get("toybox_backupd.offsite")


def _copy_for(settings: Settings, store: Store, item: Artifact) -> tuple[Target, Copy]:
    copy = store.offsite_copy(item.id)
    if copy is None or copy.status != "ok":
        raise CatalogError(f"{item.path} has no off-site copy to fetch")
    target = open_target(settings)
    if target is None:
        raise CatalogError(f"{item.path} is off-site only ({copy.url}), but OFFSITE_URL is "
                           "empty: set it to fetch the restore point")
    if copy.recipients and settings.age_identity_file is None:
        raise CatalogError(f"{item.path} is encrypted off-site for {', '.join(copy.recipients)}"
                           ": set AGE_IDENTITY_FILE to the identity (private key) to restore it")
    return target, copy


def download(settings: Settings, target: Target, obj: dict[str, Any], out: Any) -> None:
    """Stream one object into `out`, decrypting it if it was encrypted (an object that is not,
    with OFFSITE_AGE_RECIPIENTS set, is refused: trust.require_encrypted)."""
    trust.require_encrypted(settings, obj["key"], bool(obj.get("encrypted")))
    with target.open(obj["key"]) as stream:
        if obj.get("encrypted"):
            from . import crypto
            assert settings.age_identity_file is not None
            crypto.decrypt(stream, out, settings.age_identity_file)  # type: ignore[arg-type]
        else:
            while chunk := stream.read(1024 * 1024):
                out.write(chunk)


def _manifest_body(settings: Settings, target: Target, obj: dict[str, Any]) -> bytes:
    """The remote manifest (believed: trust.remote_manifest) without its `offsite` section and
    signature: the local manifest as it was."""
    data = trust.remote_manifest(settings, target, obj["key"], obj.get("sha256"))
    data.pop("offsite", None)
    data.pop("signature", None)
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode() + b"\n"


def bring_back(settings: Settings, store: Store, item: Artifact, say: Say = silent) -> Path:
    """Fetch `item` from off-site into BACKUP_DIR (see the module's doc); its local path.

    Raises CatalogError (no copy, no identity, a record of objects that are not the restore
    point's own files: offsite.trust) or OffsiteError (target unreachable, an
    object missing or not what the manifest says); nothing is left half-written."""
    target, copy = _copy_for(settings, store, item)
    confine.check_objects(item.tier, item.path, item.extra, copy.objects, "to fetch")
    say(f"fetching {item.path} from off-site ({copy.url})")
    root = settings.backup_dir
    with Batch() as batch:
        for obj in copy.objects:
            out = batch.open(confine.local_path(root, obj["source"]))
            if obj.get("manifest"):
                out.write(_manifest_body(settings, target, obj))
                continue
            download(settings, target, obj, out)
            if out.sha256 != obj["source_sha256"]:
                raise OffsiteError(
                    f"the off-site copy of {obj['source']} ({obj['key']}) does not match the "
                    f"sha256 its manifest recorded ({out.sha256[:16]}… ≠ "
                    f"{obj['source_sha256'][:16]}…); run `verify --offsite`")
        batch.commit()
        _relocal(store, root, item)
    log.info("fetched from off-site", path=item.path, url=copy.url, objects=len(copy.objects))
    return root / item.path


def _relocal(store: Store, root: Path, item: Artifact) -> None:
    """The catalog knows the fetched restore point as local (and ok) again."""
    if item.status == "ok":
        return
    if item.status == "corrupt":
        store.set_artifact_status(item.id, "ok")
        return
    index = root / (item.path + INDEX_SUFFIX)
    manifest_path = root / (item.path + MANIFEST_SUFFIX)
    deleted: list[str] = []
    if manifest_path.is_file():
        deleted = json.loads(manifest_path.read_text(encoding="utf-8")).get("deleted") or []
    store.revive_artifact(item.id, created_at=item.created_at, size=item.size,
                          sha256=item.sha256, base_id=item.base_id, extra=item.extra,
                          files=read_index(index) if index.is_file() else [],
                          deleted=deleted)
