"""A directory as an off-site target (`file:///mnt/nas/toybox`: a NAS mount, a second disk).

Objects are files under the directory (sub-directories 0700, files 0600). A put writes a
hidden temporary file beside the final one while hashing, fsyncs it, renames it into place,
fsyncs the directory, then reads the file back and compares sha256 ("read-back").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from ..atomic import fsync_dir
from ..settings import Settings
from .base import OffsiteError, Stored
from .paths import check_key

CHUNK = 1024 * 1024
TEMP_PREFIX = ".toybox-partial-"


def _sha256_of(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class DirectoryTarget:
    """`file:///absolute/directory`."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.offsite_url
        self.root = Path(self.url.removeprefix("file://") or "/")

    def _path(self, key: str, *, root_ok: bool = False) -> Path:
        check_key(key, self.url, root_ok=root_ok)
        return self.root / key if key else self.root

    def _usable_root(self) -> None:
        """OffsiteError unless the directory exists and this process may write in it."""
        try:
            is_dir = self.root.is_dir()
        except PermissionError:
            raise OffsiteError(f"OFFSITE_URL directory {self.root} is not writable by uid "
                               f"{os.getuid()}: a directory on its path cannot be entered") from None
        if not is_dir:
            raise OffsiteError(f"OFFSITE_URL directory {self.root} does not exist (is the disk or "
                               "share mounted?)")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise OffsiteError(f"OFFSITE_URL directory {self.root} is not writable by uid "
                               f"{os.getuid()}")

    def _failed(self, doing: str, exc: OSError) -> OffsiteError:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason += f" (uid {os.getuid()})"
        return OffsiteError(f"{doing} in {self.root}: {reason}")

    # the Target protocol -------------------------------------------------------------------
    def put(self, key: str, source: BinaryIO, *, retain_until: datetime | None = None) -> Stored:
        path = self._path(key)
        self._usable_root()
        temp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(6)}-{path.name}"
        try:
            self._mkdirs(path.parent)
            size, sha256 = self._write(temp, source)
            os.replace(temp, path)
            fsync_dir(path.parent)
            read_size, read_sha256 = _sha256_of(path)
        except OSError as exc:
            raise self._failed(f"writing {key}", exc) from None
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()
        if (read_size, read_sha256) != (size, sha256):
            raise OffsiteError(f"{path} reads back as {read_size} bytes with sha256 {read_sha256}, "
                               f"not the {size} bytes with sha256 {sha256} written: the copy is damaged")
        return Stored(key=key, size=size, sha256=sha256, verified_by="read-back")

    def _mkdirs(self, directory: Path) -> None:
        missing = []
        while directory != self.root and not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for path in reversed(missing):
            path.mkdir(mode=0o700)
            fsync_dir(path.parent)

    @staticmethod
    def _write(temp: Path, source: BinaryIO) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                handle.write(chunk)
                size += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        return size, digest.hexdigest()

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        path = self._path(key)
        try:
            return path.open("rb")
        except FileNotFoundError:
            self._usable_root()
            raise OffsiteError(f"{key} is not in {self.url}") from None
        except OSError as exc:
            raise self._failed(f"reading {key}", exc) from None

    def check(self, stored: Stored) -> str | None:
        path = self._path(stored.key)
        try:
            size = path.stat().st_size
            if size != stored.size:
                return f"{stored.key} is {size} bytes in {self.url}, not {stored.size}"
            _, sha256 = _sha256_of(path)
        except FileNotFoundError:
            self._usable_root()
            return f"{stored.key} is missing from {self.url}"
        except OSError as exc:
            raise self._failed(f"checking {stored.key}", exc) from None
        return None if sha256 == stored.sha256 else (
            f"{stored.key} has sha256 {sha256} in {self.url}, not {stored.sha256}: it is damaged")

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            self._usable_root()
            return False
        except OSError as exc:
            raise self._failed(f"deleting {key}", exc) from None
        return True

    def keys(self, prefix: str = "") -> Iterator[str]:
        self._path(prefix, root_ok=True)
        self._usable_root()
        try:
            for directory, _, files in os.walk(self.root, onerror=_raise):
                for name in files:
                    key = Path(directory, name).relative_to(self.root).as_posix()
                    if not name.startswith(TEMP_PREFIX) and key.startswith(prefix):
                        yield key
        except OSError as exc:
            raise self._failed("listing", exc) from None

    def probe(self) -> None:
        self._usable_root()
        key = f".toybox-probe-{secrets.token_hex(8)}"
        next(self.keys(), None)
        self.put(key, io.BytesIO(b"toybox-backupd probe\n"))
        self.delete(key)

    def clean_up(self) -> list[str]:
        return []  # a put's temporary file goes in its own `finally`

    def lock_until(self, days: int, now: datetime) -> datetime | None:
        return None


def _raise(exc: OSError) -> None:
    raise exc

