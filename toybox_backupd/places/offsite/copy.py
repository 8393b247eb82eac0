"""Copying restore points off the host: the run's copy step and the retry queue.

A restore point goes off-site as its files (the artifact, its file index, a dump's roles file),
each encrypted for OFFSITE_AGE_RECIPIENTS when set (`<path>.age`), then its manifest in plain
JSON with an `offsite` section naming every object, its size and sha256 before and after
encryption, and the recipients, signed with OFFSITE_SIGNING_KEY_FILE (offsite.trust). The
manifest goes last: a restore point whose manifest is in the bucket is complete there
(`reindex --offsite` trusts nothing else).

A copy that fails never fails the backup: it stays `pending` in the catalog and is tried
again with backoff (1, 2, 5, 10, 30, 60, 60 ... minutes), across restarts, until it is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from ...core import compression, locks, logs, manifests, redact
from ...core.basics import ToyboxError, backoff, describe_unexpected, iso, utcnow
from ...core.manifests import MANIFEST_SUFFIX, TOOL
from ...core.settings import Settings
from ...store import Artifact, Copy, Store
from . import trust
from .target import Stored, Target, open_target

log = logs.get("toybox_backupd.offsite")

AGE_SUFFIX = ".age"
ZSTD_SUFFIX = ".zst"
KeepDays = Callable[[str], int]  # tier -> days its off-site copies are kept


class HashingReader(io.RawIOBase):
    """A read-only stream over `source` that sha256-hashes and counts what is read."""

    def __init__(self, source: BinaryIO):
        self.source = source
        self.hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.hash.update(data)
        self.size += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def local_files(settings: Settings, item: Artifact) -> list[str]:
    """The artifact's files to copy, relative to BACKUP_DIR: the artifact, then those of its
    companions that exist (its own manifest is written separately, last)."""
    own_manifest = item.path + MANIFEST_SUFFIX
    found = [item.path]
    for relative in manifests.companion_paths(item.tier, item.path, item.extra):
        if relative != own_manifest and (settings.backup_dir / relative).is_file():
            found.append(relative)
    return found


def _encrypting(source: BinaryIO, recipients: list[str]) -> contextlib.AbstractContextManager[
        BinaryIO]:
    if not recipients:
        return contextlib.nullcontext(source)
    from . import crypto
    return crypto.encrypting(source, recipients)


def _put_file(settings: Settings, target: Target, relative: str,
              retain_until: datetime | None, remote: str | None = None,
              compress: bool = False) -> dict[str, Any]:
    """Copy one local file (to `remote`, default its own path; compressed by zstd to
    `….zst` with `compress`); the object's description for the remote manifest (its
    source_* are of what was encrypted: the compressed bytes with `compress`, and then
    `plain_sha256` is of the file's own bytes as they were read)."""
    recipients = [] if relative.endswith(MANIFEST_SUFFIX) else settings.offsite_age_recipients
    key = (remote or relative) + (ZSTD_SUFFIX if compress else "") + (
        AGE_SUFFIX if recipients else "")
    with open(settings.backup_dir / relative, "rb") as raw:
        plain = HashingReader(raw) if compress else None  # type: ignore[arg-type]
        with (contextlib.closing(compression.zstd_reader(plain)) if plain is not None
              else contextlib.nullcontext(raw)) as handle:
            stored, source_size, source_sha256 = _put_stream(target, key, handle, recipients,
                                                             retain_until)
    described = {"key": key, "source": relative, "size": stored.size, "sha256": stored.sha256,
                 "etag": stored.etag, "source_size": source_size, "source_sha256": source_sha256,
                 "encrypted": bool(recipients), "verified_by": stored.verified_by}
    if plain is not None:
        described["plain_sha256"] = plain.hash.hexdigest()
    return described


def _put_stream(target: Target, key: str, handle: BinaryIO, recipients: list[str],
                retain_until: datetime | None) -> tuple[Stored, int, str]:
    """`handle` stored at `key`, encrypted for `recipients`; (stored, size, sha256 of what
    was encrypted)."""
    if recipients:  # the plaintext is hashed on its way into the encryption
        reader = HashingReader(handle)
        with _encrypting(reader, recipients) as stream:  # type: ignore[arg-type]
            stored = target.put(key, stream, retain_until=retain_until)
        return stored, reader.size, reader.hash.hexdigest()
    stored = target.put(key, handle, retain_until=retain_until)  # it hashes what it stores
    return stored, stored.size, stored.sha256


def put_file(settings: Settings, target: Target, relative: str,
             remote: str | None = None, compress: bool = False) -> dict[str, Any]:
    """Copy one file of BACKUP_DIR (e.g. a WAL segment) to the same path off-site (or to
    `remote`), compressed with `compress` (`….zst`), encrypted when OFFSITE_AGE_RECIPIENTS is
    set (`….age`) and verified; its object's description."""
    return _put_file(settings, target, relative, None, remote, compress)


def _local_manifest(settings: Settings, item: Artifact) -> dict[str, Any]:
    """The artifact's manifest as written beside it (rebuilt from the catalog if missing)."""
    path = manifests.manifest_path(settings.backup_dir / item.path)
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("tool") == TOOL:
            return data
    return {"tool": TOOL, "tier": item.tier, "target": item.target,
            "file": Path(item.path).name, "created_at": item.created_at.isoformat(),
            "size": item.size, "sha256": item.sha256, "extra": item.extra}


def copy_artifact(settings: Settings, store: Store, target: Target, item: Artifact,
                  keep_days: int, now: datetime | None = None) -> dict[str, Any]:
    """Copy one restore point and record it; return its remote manifest. Raises OffsiteError
    (or ToyboxError when the local file no longer matches its checksum)."""
    now = now or utcnow()
    retain_until = target.lock_until(keep_days, item.created_at)
    objects = [_put_file(settings, target, relative, retain_until)
               for relative in local_files(settings, item)]
    if objects[0]["source_sha256"] != item.sha256:
        raise ToyboxError(f"{item.path} no longer matches its checksum; not copied off-site "
                          "(run `verify`)")
    manifest = _local_manifest(settings, item)
    manifest["offsite"] = {
        "objects": objects, "recipients": settings.offsite_age_recipients,
        "encryption": "age" if settings.offsite_age_recipients else None, "copied_at": iso(now)}
    trust.sign_manifest(settings, manifest, item.path + MANIFEST_SUFFIX)
    body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode() + b"\n"
    stored = target.put(item.path + MANIFEST_SUFFIX, io.BytesIO(body), retain_until=retain_until)
    objects.append({"key": stored.key, "source": item.path + MANIFEST_SUFFIX,
                    "size": stored.size, "sha256": stored.sha256, "etag": stored.etag,
                    "encrypted": False, "verified_by": stored.verified_by, "manifest": True})
    store.copy_done(item.id, url=target.url, objects=objects,
                    recipients=settings.offsite_age_recipients, now=now,
                    retain_until=retain_until)
    log.info("off-site copy done", path=item.path, url=target.url, objects=len(objects),
             encrypted=bool(settings.offsite_age_recipients))
    return manifest


def _attempt(settings: Settings, store: Store, target: Target, item: Artifact,
             keep_days: KeepDays, attempts: int) -> str | None:
    """Copy one artifact; on failure record it as pending (retried later) and return why."""
    try:
        copy_artifact(settings, store, target, item, keep_days(item.tier))
        return None
    except ToyboxError as exc:
        error = redact.redact(str(exc))
    except Exception as exc:  # a copy never fails the backup, whatever happens
        error = redact.redact(describe_unexpected(exc))
    next_try = utcnow() + backoff(attempts + 1)
    store.copy_failed(item.id, error, next_try)
    log.warning("off-site copy pending", path=item.path, error=error,
                next_try=iso(next_try), attempt=attempts + 1)
    return error


def copy_run(settings: Settings, store: Store, run_id: int, keep_days: KeepDays) -> dict[str, Any]:
    """The run's copy step: copy the artifacts run `run_id` made. The run's details: what was
    copied, or why copies are pending."""
    items = [item for item in store.run_artifacts(run_id) if item.status == "ok"]
    if not settings.offsite_url or not items:
        return {}
    now = utcnow()
    for item in items:
        store.copy_pending(item.id, settings.offsite_url, now)
    try:
        target = open_target(settings)
        assert target is not None
    except Exception as exc:  # e.g. an endpoint the SDK refuses: the copies wait, the run is ok
        error = redact.redact(str(exc) if isinstance(exc, ToyboxError)
                              else describe_unexpected(exc))
        for item in items:
            store.copy_failed(item.id, error, now + backoff(1))
        log.warning("off-site copy pending", error=error)
        return {"offsite_copied": [], "offsite_pending": error}
    copied: list[str] = []
    for index, item in enumerate(items):
        error = _attempt(settings, store, target, item, keep_days, 0)
        if error is not None:
            for rest in items[index + 1:]:  # the target is down: try these later too
                store.copy_failed(rest.id, error, utcnow() + backoff(1))
            return {"offsite_copied": copied, "offsite_pending": error}
        copied.append(item.path)
    return {"offsite_copied": copied, "offsite_url": target.url}


def _open_or_postpone(settings: Settings, store: Store, due: list[Copy]) -> Target | None:
    """The target, or None after postponing the due copies when it cannot even be opened."""
    try:
        return open_target(settings)
    except Exception as exc:
        error = redact.redact(str(exc) if isinstance(exc, ToyboxError)
                              else describe_unexpected(exc))
    for copy in due:
        store.copy_failed(copy.artifact_id, error, utcnow() + backoff(copy.attempts + 1))
    log.warning("off-site copies pending", count=len(due), error=error)
    return None


def retry_due(settings: Settings, keep_days: KeepDays,
              stop: Callable[[], bool] | None = None) -> list[str]:
    """Try the copies whose next attempt is due (under the run lock, so retention does not
    delete a file being copied); stop at the first failure (the target is likely down).
    Returns the paths copied."""
    if not settings.offsite_url:
        return []
    with Store(settings.state_dir) as store:
        queued = store.queue_uncopied(settings.offsite_url, utcnow())
        if queued:
            log.info("restore points queued for an off-site copy (made before OFFSITE_URL was "
                     "set, or copied to another one)", count=queued, url=settings.offsite_url)
        due = store.copies_due(utcnow())
        if not due:
            return []
        target = _open_or_postpone(settings, store, due)
    if target is None:
        return []
    done: list[str] = []
    with locks.run_lock(settings.state_dir, "off-site copies", cancelled=stop), \
            Store(settings.state_dir) as store:
        for copy in store.copies_due(utcnow()):
            item = store.artifact(copy.artifact_id)
            if item is None or item.status != "ok":
                store.set_copy_status(copy.artifact_id, "lost", utcnow(),
                                      "the local copy is gone; there is nothing to copy")
                continue
            if _attempt(settings, store, target, item, keep_days, copy.attempts) is not None:
                break
            done.append(item.path)
    return done

