"""Writing artifacts so that nothing half-written looks valid.

`AtomicFile` writes `<name>.partial`, counts and sha256-hashes what goes to disk, fsyncs, renames
and fsyncs the directory; on any error the partial is removed. `compressor` wraps it in zstd,
gzip or nothing. Manifests (small JSON files beside each artifact) make the catalog rebuildable
from the backup directory alone.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

import zstandard

PARTIAL = ".partial"
MANIFEST_SUFFIX = ".manifest.json"
CHUNK = 1024 * 1024
EXTENSIONS = {"zstd": ".zst", "gzip": ".gz", "none": ""}


class DiskFullError(OSError):
    """The backup directory ran out of space while writing."""


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
                raise DiskFullError(exc.errno, f"no space left in {self.path.parent}") from None
            raise
        self._hash.update(data)
        self.size += len(data)
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
                raise DiskFullError(exc.errno, f"no space left in {self.path.parent}") from None
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


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def compressor(target: AtomicFile, kind: str, level: int) -> Iterator[IO[bytes]]:
    """A writable stream that compresses into `target` (kind: zstd | gzip | none)."""
    if kind == "zstd":
        with zstd_compressor(level).stream_writer(target, closefd=False,
                                                   write_size=CHUNK) as writer:
            yield writer  # type: ignore[misc]
    elif kind == "gzip":
        with gzip.GzipFile(fileobj=target, mode="wb", compresslevel=level, mtime=0) as writer:
            yield writer
    elif kind == "none":
        yield target  # type: ignore[misc]
    else:
        raise ValueError(f"unknown compression {kind!r}")


ZSTD_WORKERS = 2


def zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    """zstd with at most ZSTD_WORKERS threads and jobs half zstd's default size.

    Multi-threaded zstd holds a few jobs' input and output per worker: with zstd's defaults
    (a worker per core, 8 MiB jobs at level 3) that is ~40 MB per worker, so memory grew with
    the host's core count (~80 MB on 2 cores, ~180 MB on 8). Two workers compress level 3
    faster than `docker exec` delivers the stream; 4 MiB jobs cost +0.08 % of size.
    """
    window = zstandard.ZstdCompressionParameters.from_level(level).window_log
    default_job = 1 << max(20, window + 2)
    job = min(default_job, max(4 << 20, 1 << (window + 1)))
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=min(os.cpu_count() or 1, ZSTD_WORKERS), job_size=job,
        write_checksum=True)
    return zstandard.ZstdCompressor(compression_params=params)


def decompressed(path: Path, kind: str) -> Iterator[bytes]:
    """Chunks of the decompressed contents of `path`."""
    with open(path, "rb") as raw:
        if kind == "zstd":
            reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK)
        elif kind == "gzip":
            reader = gzip.GzipFile(fileobj=raw, mode="rb")
        else:
            reader = raw
        while chunk := reader.read(CHUNK):
            yield chunk


def compression_of(path: Path) -> str:
    if path.name.endswith(".zst"):
        return "zstd"
    if path.name.endswith(".gz"):
        return "gzip"
    return "none"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX)


def write_manifest(artifact: Path, manifest: dict[str, Any]) -> Path:
    """Write `<artifact>.manifest.json` atomically."""
    path = manifest_path(artifact)
    with AtomicFile(path) as out:
        out.write(json.dumps(manifest, indent=2, sort_keys=True, default=str).encode() + b"\n")
        out.commit()
    return path


def read_manifest(artifact: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(manifest_path(artifact).read_text(encoding="utf-8"))
    return data


def remove_partials(root: Path) -> list[Path]:
    """Delete `*.partial` files under `root` (left by a crash); return what was removed."""
    removed = []
    if not root.exists():
        return removed
    for path in root.rglob("*" + PARTIAL):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
