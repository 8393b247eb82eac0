"""Compression of artifacts: zstd (default), gzip or none, streaming both ways."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import zstandard

from . import progress
from .atomic import CHUNK, AtomicFile, WriteBehind

EXTENSIONS = {"zstd": ".zst", "gzip": ".gz", "none": ""}


@contextlib.contextmanager
def compressor(target: AtomicFile | WriteBehind, kind: str, level: int) -> Iterator[IO[bytes]]:
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


def zstd_reader(raw: IO[bytes], level: int = 3) -> Any:
    """A readable stream of `raw`'s contents compressed by zstd (what `zstd -d` reads back)."""
    return zstd_compressor(level).stream_reader(raw, read_size=CHUNK)


@contextlib.contextmanager
def zstd_unpacking(out: IO[bytes] | AtomicFile) -> Iterator[IO[bytes]]:
    """A writable stream that takes zstd-compressed bytes and writes their contents to `out`."""
    with zstandard.ZstdDecompressor().stream_writer(out, closefd=False,
                                                    write_size=CHUNK) as writer:
        yield writer  # type: ignore[misc]


def decompressed(path: Path, kind: str) -> Iterator[bytes]:
    """Chunks of the decompressed contents of `path`."""
    with open(path, "rb") as raw:
        yield from decompressed_from(_Counted(raw), kind)


class _Counted:
    """A file whose reads count as progress."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        progress.advance(len(data))
        return data


def decompressed_from(raw: IO[bytes] | HashingReader | _Counted, kind: str) -> Iterator[bytes]:
    """Chunks of the decompressed contents of the open file `raw`."""
    if kind == "zstd":
        reader: Any = zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK)
    elif kind == "gzip":
        reader = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]
    else:
        reader = raw
    while chunk := reader.read(CHUNK):
        yield chunk


class HashingReader:
    """A file read through once while its sha256 is computed (a checksum checked while a
    restore streams, instead of in a pass before it)."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close() / the with block
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._digest.update(data)
        progress.advance(len(data))
        return data

    def sha256(self) -> str:
        """The file's sha256, once whatever was not read yet is read too."""
        while self.read(CHUNK):
            pass
        return self._digest.hexdigest()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> HashingReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def kind_of(path: Path) -> str:
    """The compression of a file by its name: zstd (.zst), gzip (.gz) or none."""
    if path.name.endswith(".zst"):
        return "zstd"
    if path.name.endswith(".gz"):
        return "gzip"
    return "none"
