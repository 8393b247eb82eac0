"""Restores of the physical tiers: a whole volume, or some of its files into a directory."""

from __future__ import annotations

import fnmatch
import os
import tarfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import docker_api, tarstream
from ..atomic import CHUNK
from ..basics import Confirm, JobError, Say, local_time, silent
from ..compression import decompressed, kind_of
from ..logs import get
from ..pgtools import tool_error
from ..restore_points import chain_for, check_file
from ..settings import Settings
from ..store import Artifact, Store

log = get("toybox_backupd.volumes")
MOUNT = "/vol"
TAR_EXTRACT = [
    "tar", "--extract", "--file=-", "--numeric-owner", "--same-owner", "--same-permissions",
    "--xattrs", "--xattrs-include=*", "--directory=" + MOUNT,
]


def restore_volume(settings: Settings, name: str, *, at: datetime | None = None,
                   to: str | None = None, confirm: Confirm = None,
                   stop_containers: bool = False, say: Say = silent) -> None:
    """Rebuild volume `to` (default `name`) as `name` was at `at`: its full, then its differential.

    Raises CatalogError (no restore point, or a corrupt file: nothing changed) or JobError.
    """
    target = to or name
    with Store(settings.state_dir) as store:
        chain = chain_for(store, name, at)
        deleted = store.deleted_paths(chain[-1].id) if len(chain) > 1 else []
        owner = store.instance_id()
    files = [check_file(settings.backup_dir, item) for item in chain]
    when = local_time(chain[-1].created_at, settings.zone)
    exists = docker_api.volume_exists(target)
    running = [c for c in (docker_api.containers_using_volume(target) if exists else [])
               if c.status == "running"]
    if running and not stop_containers:
        names = ", ".join(c.name for c in running)
        raise JobError(f"volume {target} is in use by running container(s) {names}; stop them "
                       "first or pass --stop-containers")
    if exists and confirm is not None and not confirm(
            f"This replaces everything in volume {target!r} with {name} as it was at {when}. "
            "Continue?"):
        raise JobError("cancelled; nothing was changed")
    if not exists:
        docker_api.create_volume(target)
    say(f"restoring {target} from {' + '.join(item.path for item in chain)} ({when})")
    stopped: list[Any] = []
    try:
        for container in running:
            docker_api.stop_container(container)
            stopped.append(container)
        image = docker_api.helper_image(settings.helper_image)
        with docker_api.helper(image, {target: (MOUNT, "rw")}, "restore", owner) as helper:
            _run(helper, ["find", MOUNT, "-mindepth", "1", "-delete"], "emptying the volume")
            _extract(helper, files[0], chain[0])
            if len(chain) > 1:
                _delete_paths(helper, deleted)
                _extract(helper, files[1], chain[1])
    finally:
        for container in stopped:
            docker_api.start_container(container.id)
    say(f"restored volume {target}: {name} as of {when}")


def _run(helper: Any, cmd: list[str], what: str, stdin: Iterator[bytes] | None = None) -> None:
    proc = docker_api.Exec(helper, cmd, stdin=stdin is not None)
    if stdin is not None:
        proc.feed(stdin)
    result = proc.wait(timeout=3600)
    if result.exit_code != 0:
        raise JobError(f"{what}: " + tool_error(cmd[0], result, "the helper container"))


def _extract(helper: Any, path: Path, item: Artifact) -> None:
    kind = item.extra.get("compression") or kind_of(path)
    _run(helper, TAR_EXTRACT, f"extracting {path.name}", decompressed(path, kind))


def _delete_paths(helper: Any, paths: list[str]) -> None:
    safe = [p for p in paths if _safe_relative(p)]
    if not safe:
        return
    data = b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in safe)
    _run(helper, ["sh", "-c", f"cd {MOUNT} && xargs -0 -r rm -rf --"],
         "removing paths deleted since the full", iter([data]))


def _safe_relative(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and ".." not in parts and path != "."


# some files ----------------------------------------------------------------------------------
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
        wanted = _wanted(store, chain, patterns)
    if not any(wanted):
        raise JobError(f"nothing in {name} at that time matches {' '.join(patterns)}")
    files = [check_file(settings.backup_dir, item) for item in chain]
    written = refused = 0
    for item, path, names in zip(chain, files, wanted, strict=True):
        if names:
            done, bad = _extract_some(item, path, names, destination)
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


def _extract_some(item: Artifact, path: Path, names: set[str],
                  destination: Path) -> tuple[int, int]:
    """Extract `names` from one archive; return (written, refused)."""
    written = refused = 0
    kind = item.extra.get("compression") or kind_of(path)
    reader = tarstream.TeeReader(decompressed(path, kind), None)
    with tarfile.open(fileobj=reader, mode="r|", bufsize=CHUNK) as tar:
        for member in tar:
            if tarstream.normalize(member.name) not in names:
                continue
            try:
                _extract_member(tar, member, destination)
                written += 1
            except (_FILTER_ERROR, ValueError, OSError, KeyError) as exc:
                refused += 1
                log.warning("member refused", member=member.name, error=str(exc))
    return written, refused


# Python 3.11.0-3.11.3 (Debian 12 ships 3.11.2) has no tarfile extraction filters.
_HAS_FILTERS = hasattr(tarfile, "data_filter")
_FILTER_ERROR: type[Exception] = getattr(tarfile, "FilterError", ValueError)


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
