"""Reading a tar stream as it passes by: index its members, hash their contents, forward bytes.

The archive written to disk is byte for byte what GNU tar produced; this module only watches it
go through (so the file index in SQLite matches the archive exactly), in constant memory.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import xxhash

CHUNK = 1024 * 1024


class TeeReader(io.RawIOBase):
    """A readable stream over `chunks` that copies everything read into `sink`."""

    def __init__(self, chunks: Iterator[bytes], sink: IO[bytes] | None,
                 check: Callable[[], None] | None = None):
        super().__init__()
        self._chunks = chunks
        self._buffer = memoryview(b"")
        self._sink = sink
        self._check = check
        self.total = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        parts = []
        need = size
        while need > 0:
            if not self._buffer:
                if self._check:
                    self._check()
                try:
                    self._buffer = memoryview(next(self._chunks))
                except StopIteration:
                    break
                continue
            part = self._buffer[:need]
            self._buffer = self._buffer[need:]
            parts.append(part)
            need -= len(part)
        data = b"".join(parts)
        if self._sink is not None and data:
            self._sink.write(data)
        self.total += len(data)
        return data

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Forward whatever the tar reader left unread (end-of-archive padding)."""
        while self.read(CHUNK):
            pass


@dataclass
class Member:
    path: str
    type: str
    size: int
    mtime: float
    mode: int
    uid: int
    gid: int
    link: str | None
    hash: str | None


_TYPES = {
    tarfile.REGTYPE: "f", tarfile.AREGTYPE: "f", tarfile.CONTTYPE: "f", tarfile.GNUTYPE_SPARSE: "f",
    tarfile.DIRTYPE: "d", tarfile.SYMTYPE: "l", tarfile.LNKTYPE: "h", tarfile.CHRTYPE: "c",
    tarfile.BLKTYPE: "b", tarfile.FIFOTYPE: "p",
}


def normalize(name: str) -> str:
    name = name.removeprefix("./").rstrip("/")
    return name or "."


def members(stream: IO[bytes]) -> Iterator[Member]:
    """Members of a tar stream, each regular file's content hashed (xxh3-128)."""
    with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
        for info in tar:
            digest = None
            if info.isreg():
                hasher = xxhash.xxh3_128()
                handle = tar.extractfile(info)
                assert handle is not None
                while chunk := handle.read(CHUNK):
                    hasher.update(chunk)
                digest = hasher.hexdigest()
            yield Member(
                path=normalize(info.name), type=_TYPES.get(info.type, "?"), size=info.size,
                mtime=info.mtime, mode=info.mode, uid=info.uid, gid=info.gid,
                link=info.linkname or None, hash=digest,
            )
