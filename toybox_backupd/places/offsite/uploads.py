"""The S3 multipart uploads this host has started and not finished, so that none is left behind.

A multipart upload cut short (the store went down, the process was killed) keeps its parts in
the bucket, billed and unseen, until someone aborts it. So before an upload starts it is
written down in `STATE_DIR/s3-uploads/<token>.json` (bucket, key, endpoint; then its upload
id, once the store has given one), and the record goes when the upload is completed or aborted.
The uploading thread holds an flock on `<token>.lock` meanwhile: a record whose lock is free
belongs to an upload nobody carries on (the kernel drops the lock of a killed process), which
the next upload to that store, and start-up, abort (`S3Target.clean_up`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.atomic import AtomicFile
from ...core.basics import iso
from ...core.locks import try_lock

DIRECTORY = "s3-uploads"


@dataclass
class Upload:
    """One multipart upload as recorded: `upload_id` is None if the process died between asking
    the store for one and writing it down (then it is found by its key)."""

    path: Path
    endpoint: str | None
    bucket: str
    key: str
    started: str = field(default_factory=iso)
    upload_id: str | None = None

    def save(self) -> None:
        with AtomicFile(self.path) as out:
            out.write(json.dumps({"endpoint": self.endpoint, "bucket": self.bucket,
                                  "key": self.key, "started": self.started,
                                  "upload_id": self.upload_id}).encode())
            out.commit()

    def record(self, upload_id: str) -> None:
        self.upload_id = upload_id
        self.save()

    def forget(self) -> None:
        """Completed or aborted: the record goes."""
        for path in (self.path, self.path.with_suffix(".lock")):
            path.unlink(missing_ok=True)


class Ledger:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / DIRECTORY

    @contextlib.contextmanager
    def begin(self, endpoint: str | None, bucket: str, key: str) -> Iterator[Upload]:
        """Record an upload about to start, held as in progress until the block ends (the record
        stays unless `forget` was called: an upload left for the next attempt to abort)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        with open(self.directory / f"{token}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            upload = Upload(self.directory / f"{token}.json", endpoint, bucket, key)
            upload.save()
            yield upload

    @contextlib.contextmanager
    def leftovers(self) -> Iterator[list[Upload]]:
        """The recorded uploads no live upload holds, locked while the block ends (so no other
        thread aborts them too); those unreadable are forgotten."""
        if not self.directory.is_dir():
            yield []
            return
        with contextlib.ExitStack() as held:
            found = []
            for path in sorted(self.directory.glob("*.json")):
                lock = held.enter_context(open(path.with_suffix(".lock"), "a+"))
                if try_lock(lock):
                    upload = _read(path)
                    if upload is None:
                        path.unlink(missing_ok=True)
                        path.with_suffix(".lock").unlink(missing_ok=True)
                    else:
                        found.append(upload)
            yield found

    def recorded(self) -> bool:
        """Whether any upload is recorded (live or left over)."""
        return self.directory.is_dir() and any(self.directory.glob("*.json"))

    def recorded_ids(self) -> set[str]:
        """The upload ids of every record, live or left over."""
        uploads = (_read(path) for path in self.directory.glob("*.json")) if self.directory.is_dir() else ()
        return {upload.upload_id for upload in uploads if upload and upload.upload_id}


def _read(path: Path) -> Upload | None:
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        return Upload(path, data["endpoint"], data["bucket"], data["key"], data["started"],
                      data["upload_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
