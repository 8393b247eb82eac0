"""`restore files`: some paths of a volume, as they were at a restore point, into a directory.

Extraction runs here, on the reading side, with the rules of tarfile's `data` filter. A hard
link in an archive names an earlier member of the same archive; when that member is not among
the paths asked for, its content is kept aside as the stream passes (the file index tells which
paths share an inode with a wanted one) and the link is written as a file with that content.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tarfile
import tempfile
from datetime import datetime
from pathlib import Path

from ...catalog.restore_points import chain_for, local_copy
from ...core import progress, tarstream
from ...core.atomic import CHUNK
from ...core.basics import JobError, Say, silent
from ...core.compression import decompressed, kind_of
from ...core.logs import get
from ...core.settings import Settings
from ...store import Artifact, Store

log = get("toybox_backupd.volumes")
# Python 3.11.0-3.11.3 (Debian 12 ships 3.11.2) has no tarfile extraction filters.
_HAS_FILTERS = hasattr(tarfile, "data_filter")
_FILTER_ERROR: type[Exception] = getattr(tarfile, "FilterError", ValueError)
_REFUSED = (_FILTER_ERROR, ValueError, OSError, KeyError, tarfile.StreamError)


def restore_files(settings: Settings, name: str, patterns: list[str], *,
                  at: datetime | None = None, dest: str, say: Say = silent) -> None:
    """Extract the paths of volume `name` matching `patterns` as they were at `at` into `dest`.

    Members that would land outside `dest` (or are special files) are refused and counted.
    Raises CatalogError or JobError (nothing matches; every match refused).
    """
    destination = Path(dest).resolve()
    destination.mkdir(parents=True, exist_ok=True)
    with Store(settings.state_dir) as store:
        chain = chain_for(store, name, at)
        files = None
        if any(not store.has_index(item.id) for item in chain):
            # off-site only, indexed without the identity: the fetch brings the index back
            files = [local_copy(settings, store, item, say) for item in chain]
        wanted = _wanted(store, chain, patterns)
        sources = [_link_sources(store, item, names) for item, names in zip(chain, wanted,
                                                                           strict=True)]
        if not any(wanted):
            raise JobError(f"nothing in {name} at that time matches {' '.join(patterns)}")
        files = files or [local_copy(settings, store, item, say) for item in chain]
    written = refused = 0
    for item, path, names, kept in zip(chain, files, wanted, sources, strict=True):
        if names:
            with progress.task(f"extracting from {item.path}", item.size):
                done, bad = _extract_some(item, path, names, kept, destination)
            written, refused = written + done, refused + bad
    say(f"restored {written} path(s) of {name} into {destination}"
        + (f"; refused {refused} unsafe or unreadable member(s)" if refused else ""))
    if refused and not written:
        raise JobError("every matching member was refused (unsafe names or links)")


def _wanted(store: Store, chain: list[Artifact], patterns: list[str]) -> list[set[str]]:
    """Per archive of the chain, the matching paths to take from it (the newest copy wins)."""
    wanted: list[set[str]] = [set() for _ in chain]
    newer = {row["path"] for row in store.files(chain[-1].id)} if len(chain) > 1 else set()
    gone = set(store.deleted_paths(chain[-1].id)) if len(chain) > 1 else set()
    for position, item in enumerate(chain):
        for row in store.files(item.id):
            row_path = row["path"]
            if position == 0 and len(chain) > 1 and (row_path in newer or row_path in gone):
                continue
            if _matches(row_path, patterns):
                wanted[position].add(row_path)
    return wanted


def _link_sources(store: Store, item: Artifact, names: set[str]) -> set[str]:
    """Files of `item` not wanted that share an inode with a wanted one: a wanted hard link
    may name one of them."""
    inodes = {row["inode"] for row in store.files(item.id)
              if row["type"] == "f" and row["path"] in names}
    return {row["path"] for row in store.files(item.id)
            if row["type"] == "f" and row["inode"] in inodes and row["path"] not in names}


def _extract_some(item: Artifact, path: Path, names: set[str], sources: set[str],
                  destination: Path) -> tuple[int, int]:
    """Extract `names` from one archive; return (written, refused)."""
    written = refused = 0
    done: set[str] = set()
    saved: dict[str, Path] = {}
    kind = item.extra.get("compression") or kind_of(path)
    reader = tarstream.TeeReader(decompressed(path, kind), None)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix=".toybox-links-", dir=destination))) if sources else destination
        tar = stack.enter_context(tarfile.open(fileobj=reader, mode="r|", bufsize=CHUNK))
        for member in tar:
            member_path = tarstream.normalize(member.name)
            if member_path in sources and member.isreg():
                saved[member_path] = _save(tar, member, scratch / str(len(saved)))
            if member_path not in names:
                continue
            try:
                _extract_one(tar, member, destination, done, saved)
                done.add(member_path)
                written += 1
            except _REFUSED as exc:
                refused += 1
                log.warning("member refused", member=member.name, error=str(exc))
    return written, refused


def _save(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> Path:
    """Keep the content of the member passing by (a hard link's target) in `target`."""
    source = tar.extractfile(member)
    assert source is not None
    with open(target, "wb") as out:
        shutil.copyfileobj(source, out, CHUNK)
    return target


def _extract_one(tar: tarfile.TarFile, member: tarfile.TarInfo, destination: Path,
                 done: set[str], saved: dict[str, Path]) -> None:
    """One wanted member; a hard link to a member not written becomes a file with its content."""
    if member.islnk():
        target = tarstream.normalize(member.linkname)
        if target not in done:
            if target not in saved:
                raise ValueError(f"{member.name!r} is a hard link to {member.linkname!r}, "
                                 "which is not in this archive's restored paths")
            _extract_copy(member, saved[target], destination)
            return
    _extract_member(tar, member, destination)


def _extract_copy(member: tarfile.TarInfo, content: Path, destination: Path) -> None:
    """Write hard link `member` as a regular file holding `content` (same rules as a member)."""
    info = tarfile.TarInfo(member.name)
    info.size = content.stat().st_size
    info.mode, info.mtime = member.mode, member.mtime
    info.uid, info.gid, info.uname, info.gname = member.uid, member.gid, member.uname, member.gname
    with tempfile.TemporaryFile(dir=content.parent) as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as single, \
                open(content, "rb") as data:
            single.addfile(info, data)
        raw.seek(0)
        with tarfile.open(fileobj=raw, mode="r:") as single:
            _extract_member(single, single.getmembers()[0], destination)


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, destination: Path) -> None:
    """Extract one member under `destination` with the rules of tarfile's "data" filter."""
    if _HAS_FILTERS:
        tar.extract(member, destination, filter="data")
        return
    target = Path(os.path.realpath(destination / member.name))
    if os.path.isabs(member.name) or not target.is_relative_to(destination):
        raise ValueError(f"{member.name!r} would be written outside {destination}")
    if member.issym() or member.islnk():
        base = target.parent if member.issym() else destination
        link = Path(os.path.realpath(base / member.linkname))
        if os.path.isabs(member.linkname) or not link.is_relative_to(destination):
            raise ValueError(f"{member.name!r} links outside {destination}")
    elif not (member.isreg() or member.isdir()):
        raise ValueError(f"{member.name!r} is a special file")
    # no setuid/setgid/sticky or group/other write; the owner can read and write; owned by us
    member.mode = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)
    member.uid, member.gid = os.getuid(), os.getgid()
    member.uname = member.gname = ""
    tar.extract(member, destination, numeric_owner=True)


def _matches(path: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        pattern = pattern.strip("/") or "."
        if fnmatch.fnmatchcase(path, pattern) or path.startswith(pattern + "/"):
            return True
    return False
