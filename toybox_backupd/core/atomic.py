"""Writing files so that nothing half-written looks valid.

`AtomicFile` writes `<name>.partial`, counts and sha256-hashes what goes to disk, fsyncs, renames
and fsyncs the directory; on any error the partial is removed. `Batch` does that for an
artifact and its companions together: all of them appear, or none.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from . import progress
from .basics import DiskFullError

PARTIAL = ".partial"
CHUNK = 1024 * 1024


class AtomicFile:
    """A binary file written as `<path>.partial`, renamed to `path` by `commit()`."""

    def __init__(self, path: Path):
        self.path = path
        self.partial = path.with_name(path.name + PARTIAL)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: BinaryIO | None = open(self.partial, "xb")  # noqa: SIM115
        self._hash = hashlib.sha256()
        self.size = 0
        self.committed = False

    # file-like surface used by compressors
    def write(self, data: bytes | bytearray | memoryview) -> int:
        assert self._handle is not None
        try:
            self._handle.write(data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(self.path.parent, exc.errno) from None
            raise
        self._hash.update(data)
        self.size += len(data)
        progress.advance(len(data))
        return len(data)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._handle is None

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self) -> None:
        """fsync, rename into place, fsync the directory."""
        assert self._handle is not None
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(self.path.parent, exc.errno) from None
            raise
        self._handle.close()
        self._handle = None
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)
        self.committed = True

    def discard(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                self.partial.unlink()

    def close(self) -> None:
        """Compressors call close() when they finish; the file stays open until commit()."""

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None or not self.committed:
            self.discard()


class WriteBehind:
    """Writes handed to a thread that does them on `target` (an AtomicFile: write + sha256),
    so the thread that reads, indexes and compresses a stream never waits for the disk or the
    hash (both release the GIL). At most `depth` chunks wait in between: memory stays flat.
    An error of the writing thread (a full disk) is raised by the next `write` or by `finish`.
    """

    def __init__(self, target: AtomicFile, depth: int = 8):
        self.target = target
        self._queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:  # after an error: drained, never written, so no put blocks
                try:
                    self.target.write(data)
                except BaseException as exc:
                    self._error = exc

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._error is not None:
            raise self._error
        self._queue.put(data if isinstance(data, bytes) else bytes(data))
        return len(data)

    def flush(self) -> None:
        """Nothing: `finish` waits for every write."""

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """Compressors call close() when they finish; `finish` ends the thread."""

    def finish(self) -> None:
        """Wait until every write is done; raise the writing thread's error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


@contextlib.contextmanager
def write_behind(target: AtomicFile) -> Iterator[WriteBehind]:
    """A WriteBehind on `target`, finished on the way out (its error raised unless another
    is already on its way)."""
    writer = WriteBehind(target)
    try:
        yield writer
    except BaseException:
        with contextlib.suppress(BaseException):
            writer.finish()
        raise
    writer.finish()


class Batch:
    """Files that appear together or not at all (an artifact, its companions, its manifest).

    `open(path)` gives an AtomicFile written as `<path>.partial`; `commit()` renames them all,
    in the order they were opened (open the manifest last). If the `with` block raises, or
    ends before `commit()`, every file goes: partials and files already renamed alike. Do
    what must succeed with them (the catalog row) inside the block, after `commit()`.
    """

    def __init__(self) -> None:
        self.files: list[AtomicFile] = []
        self.committed = False

    def open(self, path: Path) -> AtomicFile:
        """A new file of the batch."""
        handle = AtomicFile(path)
        self.files.append(handle)
        return handle

    def drop(self, handle: AtomicFile) -> None:
        """Remove one file that failed (to write it again, say) from the batch."""
        handle.discard()
        self.files.remove(handle)

    def commit(self) -> None:
        """fsync and rename every file of the batch into place."""
        for handle in self.files:
            if not handle.committed:
                handle.commit()
        self.committed = True

    def undo(self) -> None:
        """Remove every file of the batch, renamed or not."""
        for handle in self.files:
            handle.discard()
            if handle.committed:
                with contextlib.suppress(FileNotFoundError):
                    handle.path.unlink()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None or not self.committed:
            self.undo()


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            progress.advance(len(chunk))
    return digest.hexdigest()


UMASKS = {"0600": 0o077, "0640": 0o027}  # BACKUP_FILE_MODE → umask: files 0600/0640, dirs 0700/0750


def use_file_mode(file_mode: str) -> None:
    """Make everything this process creates from now on private (BACKUP_FILE_MODE).

    Backups hold role password hashes, PGDATA and private uploads: files 0600 and directories
    0700 by default, or 0640/0750 for a backup-reading group. Set once at start (a umask).
    """
    os.umask(UMASKS[file_mode])


def looser_than(roots: list[Path], file_mode: str, limit: int = 5) -> tuple[int, list[str]]:
    """(count, examples) of files and directories under `roots` more open than the policy."""
    extra = UMASKS[file_mode]
    count, examples = 0, []
    for root in roots:
        if not root.exists():
            continue
        for path in [root, *root.rglob("*")]:
            try:
                mode = path.lstat().st_mode
            except OSError:
                continue
            if stat.S_ISLNK(mode) or not mode & extra:
                continue
            count += 1
            if len(examples) < limit:
                examples.append(f"{path} {stat.S_IMODE(mode):04o}")
    return count, examples


TOOL_DIRS = ("logical", "volumes")  # BACKUP_DIR/<tier dir>/<target>/<target>_<stamp>...


def remove_partials(root: Path) -> list[Path]:
    """Delete the partial files a crash left in the tool's own layout; return what was removed.

    Only `BACKUP_DIR/{logical,volumes}/<target>/<target>_*.partial` are ours: a `.partial`
    anywhere else (a user's files restored into BACKUP_DIR/restore, say) is left alone.
    """
    removed: list[Path] = []
    for top in TOOL_DIRS:
        for path in sorted((root / top).glob("*/*" + PARTIAL)):
            if not path.name.startswith(path.parent.name + "_") or path.is_symlink():
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
