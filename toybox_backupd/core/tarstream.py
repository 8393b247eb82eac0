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
    """A readable stream over `chunks` that copies everything it takes in into `sink`.

    Each chunk goes to `sink` whole as it is taken from `chunks` (so the sink sees the stream
    byte for byte, in large writes), then is handed out by `read` or passed over without a copy
    by `skip`.
    """

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

    def _pull(self) -> bool:
        """Take the next chunk (into the sink); False at the end of the stream."""
        while True:
            if self._check:
                self._check()
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return False
            if chunk:
                if self._sink is not None:
                    self._sink.write(chunk)
                self._buffer = memoryview(chunk)
                return True

    def _take(self, size: int) -> Iterator[memoryview]:
        """Up to `size` bytes from the chunks, as slices of them (no copies)."""
        need = size
        while need > 0:
            if not self._buffer and not self._pull():
                return
            part = self._buffer[:need]
            self._buffer = self._buffer[need:]
            need -= len(part)
            yield part

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        data = b"".join(self._take(size))
        self.total += len(data)
        return data

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def skip(self, size: int, update: Callable[[memoryview], object] | None = None) -> int:
        """Pass over up to `size` bytes, showing them to `update`; return how many there were."""
        taken = 0
        for part in self._take(size):
            if update is not None:
                update(part)
            taken += len(part)
        self.total += taken
        return taken

    def tell(self) -> int:
        return self.total

    def drain(self) -> None:
        """Forward whatever the tar reader left unread (end-of-archive padding)."""
        self.total += len(self._buffer)
        self._buffer = memoryview(b"")
        while self._pull():
            self.total += len(self._buffer)
            self._buffer = memoryview(b"")


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
    """A member name as the file index spells it (no leading ./ or /; the root is ".")."""
    name = name.removeprefix("./").rstrip("/")
    return name or "."


def members(stream: IO[bytes]) -> Iterator[Member]:
    """Members of a tar stream, each regular file's content hashed (xxh3-128).

    The stream must end with tar's end-of-archive marker (two zero blocks): one that stops
    anywhere else, even right before a member's header, raises tarfile.ReadError.
    """
    reader = stream if isinstance(stream, TeeReader) else TeeReader(
        iter(lambda: stream.read(CHUNK), b""), None)
    yield from _read_headers(reader)


def _member(info: tarfile.TarInfo, digest: str | None) -> Member:
    return Member(
        path=normalize(info.name), type=_TYPES.get(info.type, "?"), size=info.size,
        mtime=info.mtime, mode=info.mode, uid=info.uid, gid=info.gid,
        link=info.linkname or None, hash=digest,
    )


class _Headers:
    """The part of a TarFile that `TarInfo.fromtarfile` uses, reading from a TeeReader.

    The headers (and pax / GNU long-name records) are parsed by tarfile itself, exactly as
    `tarfile.open(mode="r|")` would; the members' contents are hashed straight from the
    stream's chunks, without tarfile's buffering and copies, and no TarInfo is kept.
    """

    def __init__(self, reader: TeeReader):
        self.fileobj = reader
        self.encoding = "utf-8"  # as the volume listing is decoded (surrogateescape)
        self.errors = "surrogateescape"
        self.pax_headers: dict[str, str] = {}
        self.offset = 0


_ZEROS = bytes(CHUNK)


def _read_headers(reader: TeeReader) -> Iterator[Member]:
    """Like `tarfile.open(fileobj=reader, mode="r|")` + `extractfile`, in one pass, no copies."""
    headers = _Headers(reader)
    while True:
        # what TarFile.next() does: advance to the next header, read it, stop at the end
        gap = headers.offset - reader.tell()
        if gap and reader.skip(gap) != gap:
            raise tarfile.ReadError("unexpected end of data")
        try:
            info = tarfile.TarInfo.fromtarfile(headers)  # type: ignore[arg-type]
        except tarfile.SubsequentHeaderError as exc:
            raise tarfile.ReadError(str(exc)) from None
        except tarfile.EOFHeaderError:
            _second_zero_block(reader)
            return
        except tarfile.EmptyHeaderError:
            if headers.offset == 0:
                raise tarfile.ReadError("empty file") from None
            raise tarfile.ReadError(_cut(headers.offset, "the stream ends there")) from None
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:
            if headers.offset == 0:
                raise tarfile.ReadError(str(exc)) from None
            raise tarfile.ReadError(_cut(headers.offset, str(exc))) from None
        digest = None
        if info.isreg():
            hasher = xxhash.xxh3_128()
            _hash_content(reader, info, hasher.update)
            digest = hasher.hexdigest()
        yield _member(info, digest)


def _cut(offset: int, why: str) -> str:
    return (f"no end-of-archive marker: the archive is cut short or damaged at byte {offset} "
            f"({why})")


def _second_zero_block(reader: TeeReader) -> None:
    """After the first zero block, the second one of tar's end-of-archive marker."""
    offset = reader.tell()
    block = reader.read(tarfile.BLOCKSIZE)
    if len(block) != tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError(_cut(offset, "only one of the two zero blocks is there"))


def _hash_content(reader: TeeReader, info: tarfile.TarInfo,
                  update: Callable[[memoryview], object]) -> None:
    """Feed a member's content to `update` as `tar.extractfile(info)` would read it."""
    if info.offset_data > reader.tell():
        reader.skip(info.offset_data - reader.tell())
    # sparse members: the stored segments, with the holes between them read as zeros
    segments = info.sparse if info.sparse is not None else [(0, info.size)]
    position = 0
    for offset, size in [*segments, (info.size, 0)]:
        while position < offset:
            step = min(offset - position, CHUNK)
            update(memoryview(_ZEROS)[:step])
            position += step
        if size and reader.skip(size, update) != size:
            raise tarfile.ReadError("unexpected end of data")
        position = max(position, offset + size)
