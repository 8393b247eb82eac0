"""A directory as an off-site target (`file:///mnt/nas/toybox`: a NAS mount, a second disk).

Objects are files under the directory (sub-directories 0700, files 0600). A put writes a
hidden temporary file beside the final one while hashing, fsyncs it, renames it into place,
fsyncs the directory, then reads the file back and compares sha256 ("read-back"). A symbolic
link on the share (a folder or an object) is never followed: the operation is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from ...core.settings import Settings
from .base import OffsiteError, Stored
from .paths import check_key

CHUNK = 1024 * 1024
TEMP_PREFIX = ".toybox-partial-"


def _sha256_of(handle: BinaryIO) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_LINKED = (errno.ELOOP, errno.ENOTDIR)  # O_NOFOLLOW met a link (or a file stands for a folder)


class DirectoryTarget:
    """`file:///absolute/directory`. Every object is reached from the root one folder at a
    time by descriptor, never through a symbolic link (a link planted on the share is refused
    with its path named), so puts, reads and deletes stay inside the root."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.offsite_url
        self.root = Path(self.url.removeprefix("file://") or "/")

    @contextlib.contextmanager
    def _folder(self, key: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """(a descriptor of the key's folder, the key's last part). FileNotFoundError when a
        folder is missing (and not `create`), OffsiteError when one is a link."""
        parts = check_key(key, self.url).split("/")
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for depth, part in enumerate(parts[:-1], 1):
                try:
                    inner = self._enter(fd, part, create)
                except OSError as exc:
                    if exc.errno not in _LINKED:
                        raise
                    raise self._linked(key, "/".join(parts[:depth])) from None
                os.close(fd)
                fd = inner
            yield fd, parts[-1]
        finally:
            os.close(fd)

    @staticmethod
    def _enter(fd: int, part: str, create: bool) -> int:
        try:
            return os.open(part, _DIR, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
        os.mkdir(part, 0o700, dir_fd=fd)
        os.fsync(fd)
        return os.open(part, _DIR, dir_fd=fd)

    def _linked(self, key: str, where: str, what: str = "link (or not a directory)") -> OffsiteError:
        return OffsiteError(f"refusing {key} in {self.url}: {self.root / where} is a symbolic "
                            f"{what} on the share; this tool never follows one out of the "
                            "target: remove it, or point OFFSITE_URL at the real directory")

    def _open_file(self, fd: int, name: str, key: str) -> BinaryIO:
        """The object `name` in folder `fd`, opened for reading without following a link."""
        try:
            return os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), "rb")
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._linked(key, key, "link") from None
            raise

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
        check_key(key, self.url)
        self._usable_root()
        try:
            with self._folder(key, create=True) as (fd, name):
                size, sha256 = self._replace(fd, name, source)
                with self._open_file(fd, name, key) as handle:
                    read_size, read_sha256 = _sha256_of(handle)
        except OSError as exc:
            raise self._failed(f"writing {key}", exc) from None
        if (read_size, read_sha256) != (size, sha256):
            raise OffsiteError(f"{self.root / key} reads back as {read_size} bytes with sha256 "
                               f"{read_sha256}, not the {size} bytes with sha256 {sha256} written: "
                               "the copy is damaged")
        return Stored(key=key, size=size, sha256=sha256, verified_by="read-back")

    @staticmethod
    def _replace(fd: int, name: str, source: BinaryIO) -> tuple[int, str]:
        """Write `source` to a hidden temporary file in folder `fd`, fsynced, renamed to `name`
        (replacing what is there, a link included, never writing through it)."""
        temp = f"{TEMP_PREFIX}{secrets.token_hex(6)}-{name}"
        try:
            digest = hashlib.sha256()
            size = 0
            out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                          dir_fd=fd)
            with os.fdopen(out, "wb") as handle:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    handle.write(chunk)
                    size += len(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
            os.fsync(fd)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=fd)
        return size, digest.hexdigest()

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        try:
            with self._folder(key) as (fd, name):
                return self._open_file(fd, name, key)
        except FileNotFoundError:
            self._usable_root()
            raise OffsiteError(f"{key} is not in {self.url}") from None
        except OSError as exc:
            raise self._failed(f"reading {key}", exc) from None

    def check(self, stored: Stored) -> str | None:
        try:
            with self._folder(stored.key) as (fd, name):
                if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    return (f"{stored.key} is a symbolic link in {self.url}, not the object "
                            "copied (this tool never follows one)")
                with self._open_file(fd, name, stored.key) as handle:
                    size, sha256 = _sha256_of(handle)
        except FileNotFoundError:
            self._usable_root()
            return f"{stored.key} is missing from {self.url}"
        except OSError as exc:
            raise self._failed(f"checking {stored.key}", exc) from None
        if size != stored.size:
            return f"{stored.key} is {size} bytes in {self.url}, not {stored.size}"
        return None if sha256 == stored.sha256 else (
            f"{stored.key} has sha256 {sha256} in {self.url}, not {stored.sha256}: it is damaged")

    def delete(self, key: str) -> bool:
        try:
            with self._folder(key) as (fd, name):
                os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            self._usable_root()
            return False
        except OSError as exc:
            raise self._failed(f"deleting {key}", exc) from None
        return True

    def keys(self, prefix: str = "") -> Iterator[str]:
        check_key(prefix, self.url, root_ok=True)
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

