"""The physical tiers: full and differential archives of Docker volumes, and their restores.

How a volume is read: a short-lived helper container mounts it read-only (by volume name, through
the Docker API), `find` lists every path with its metadata, and GNU tar archives the chosen paths
to stdout. The stream comes back over `docker exec`, is indexed and hashed as it passes
(tarstream), compressed (zstd by default) and written atomically. The same code serves the full
(every path) and the differential (paths whose metadata differ from the last full's index).
"""

from __future__ import annotations

import fnmatch
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__, archive, catalog, docker_api, logs, tarstream
from .archive import AtomicFile, DiskFullError
from .catalog import CatalogError, check_file, restore_point
from .history import Artifact, History, iso, utcnow
from .runner import JobError, RunContext, TierResult, human
from .settings import Settings

log = logs.get("toybox_backupd.volumes")
MOUNT = "/vol"
FIND_FORMAT = r"%P\0%y\0%s\0%T@\0%C@\0%i\0%m\0%U\0%G\0%l\0"
FIELDS = 10
TAR_CREATE = [
    "tar", "--create", "--file=-", "--format=posix", "--numeric-owner", "--no-recursion",
    "--ignore-failed-read", "--pax-option=delete=atime", "--xattrs", "--directory=" + MOUNT,
    "--null", "--verbatim-files-from", "--files-from=-",
]
TAR_EXTRACT = [
    "tar", "--extract", "--file=-", "--numeric-owner", "--same-owner", "--same-permissions",
    "--xattrs", "--xattrs-include=*", "--directory=" + MOUNT,
]
INDEX_COLUMNS = "path, type, size, mtime_ns, ctime_ns, inode, mode, uid, gid, link, hash"
COMPARED = ("type", "size", "mtime_ns", "ctime_ns", "inode", "mode", "uid", "gid", "link")


def tool_error(tool: str, result: docker_api.ExecResult, where: str) -> str:
    # pgtools imports psycopg (~60 ms at start-up): load it only to word a failure
    from .pgtools import tool_error as describe

    return describe(tool, result, where)


def backup_full(ctx: RunContext) -> TierResult:
    return _backup(ctx, "full")


def backup_diff(ctx: RunContext) -> TierResult:
    return _backup(ctx, "diff")


def _backup(ctx: RunContext, kind: str) -> TierResult:
    if not ctx.volumes:
        raise JobError("no volumes to archive: set BACKUP_VOLUMES")
    missing = [v for v in ctx.volumes if not docker_api.volume_exists(v)]
    if missing:
        raise JobError(f"no such Docker volume: {', '.join(missing)} (check BACKUP_VOLUMES)")
    result = TierResult()
    downtime: dict[str, float] = {}
    warnings: list[str] = []
    errors: list[str] = []
    for volume in ctx.volumes:
        ctx.check()
        try:
            artifact, size, info = archive_volume(ctx, volume, kind)
        except JobError as exc:
            errors.append(f"{volume}: {exc}")
            ctx.log.error("volume archive failed", volume=volume, error=str(exc))
            continue
        result.bytes += size
        result.artifacts.append(artifact)
        for name, seconds in info.get("downtime", {}).items():
            downtime[name] = downtime.get(name, 0.0) + seconds
        warnings += [f"{volume}: {w}" for w in info.get("warnings", [])]
        if info.get("note"):
            warnings.append(f"{volume}: {info['note']}")
    result.details = {
        "downtime": {k: round(v, 2) for k, v in downtime.items()},
        "downtime_seconds": round(sum(downtime.values()), 2),
        "warnings": warnings[:200],
        "warnings_total": len(warnings),
    }
    ctx.note(**result.details)
    if errors:
        raise JobError("; ".join(errors))
    return result


# one volume ----------------------------------------------------------------------------------
def archive_volume(ctx: RunContext, volume: str, kind: str) -> tuple[str, int, dict[str, Any]]:
    """Archive one volume; return (artifact path, size, info)."""
    settings, history = ctx.settings, ctx.history
    info: dict[str, Any] = {"warnings": []}
    base: Artifact | None = None
    if kind == "diff":
        fulls = history.artifacts(tier="full", target=volume)
        if fulls:
            base = fulls[-1]
        else:
            kind = "full"
            info["note"] = "no full archive yet, so this differential run made a full instead"
            ctx.log.warning("no full archive yet: making a full instead", volume=volume)
    created = utcnow()
    stamp = created.astimezone(settings.zone).strftime("%Y%m%d-%H%M%S")
    ext = ".tar" + archive.EXTENSIONS[settings.volume_compression]
    directory = settings.backup_dir / "volumes" / volume
    path = directory / f"{volume}_{stamp}_{kind}{ext}"
    number = 2
    while path.exists():
        path = directory / f"{volume}_{stamp}-{number}_{kind}{ext}"
        number += 1
    image = docker_api.helper_image(settings.helper_image)
    db = history.db
    db.execute(f"CREATE TEMP TABLE IF NOT EXISTS scan ({INDEX_COLUMNS}, selected INTEGER,"
               " seen INTEGER, PRIMARY KEY (path)) WITHOUT ROWID")
    db.execute("DELETE FROM scan")
    with ExitStack() as stack:
        helper = stack.enter_context(docker_api.helper(
            image, {volume: (MOUNT, "ro")}, "backup", history.instance_id()))
        stack.enter_context(ctx.on_cancel(lambda: _kill(helper)))
        with AtomicFile(path) as out, stopped_for(ctx, volume) as downtime:
            _scan(ctx, helper, volume)
            deleted = _select(db, kind, base)
            tar_warnings = _tar(ctx, helper, out, path)
        info["downtime"] = downtime
        info["warnings"] += tar_warnings
        vanished = [row[0] for row in db.execute(
            "SELECT path FROM scan WHERE selected=1 AND seen=0 ORDER BY path")]
        if vanished:
            info["warnings"] += [f"vanished while read: {p}" for p in vanished[:100]]
            db.execute("DELETE FROM scan WHERE selected=1 AND seen=0")
        count = db.execute("SELECT count(*) FROM scan WHERE selected=1").fetchone()[0]

        def rows() -> Iterator[tuple[Any, ...]]:
            # read from the scan table each time rather than held in a list, so memory does
            # not grow with the number of files (~0.5 KB a file)
            return (tuple(r) for r in db.execute(
                f"SELECT {INDEX_COLUMNS} FROM scan WHERE selected=1 ORDER BY path"))

        relative = str(path.relative_to(settings.backup_dir))
        extra = {"compression": settings.volume_compression, "files": count,
                 "deleted": len(deleted), "warnings": len(info["warnings"]),
                 "downtime_seconds": round(sum(downtime.values()), 2)}
        catalog.write_index(path, rows())  # type: ignore[arg-type]  # it only iterates
        archive.write_manifest(path, {
            "tool": "toybox-backupd", "version": __version__, "tier": kind, "target": volume,
            "created_at": iso(created), "size": out.size, "sha256": out.sha256,
            "file": path.name, "base": base.path if base else None, "deleted": deleted,
            "extra": extra,
        })
        artifact_id = history.add_artifact(
            run_id=ctx.run_id, tier=kind, target=volume, path=relative, created_at=created,
            size=out.size, sha256=out.sha256, base_id=base.id if base else None, extra=extra)
        history.add_files(artifact_id, rows())
        history.add_deleted_paths(artifact_id, deleted)
    ctx.log.info("volume archived", volume=volume, kind=kind, file=relative, files=count,
                 deleted=len(deleted), size=human(out.size),
                 downtime_s=round(sum(downtime.values()), 2))
    return relative, out.size, info


def _kill(container: Any) -> None:
    container.remove(force=True)


@contextmanager
def stopped_for(ctx: RunContext, volume: str) -> Iterator[dict[str, float]]:
    """Stop the containers that want it while `volume` is read; always start them again."""
    own = docker_api.own_container()
    candidates = [
        c for c in docker_api.containers_using_volume(volume)
        if c.status == "running" and (own is None or c.id != own.id)
        and docker_api.wants_stop(c, ctx.settings.stop_during_backup)
    ]
    downtime: dict[str, float] = {}
    stopped: list[tuple[Any, float]] = []
    try:
        for container in candidates:
            ctx.history.record_stopped(container.id, container.name, ctx.run_id)
            ctx.log.info("stopping container for a consistent archive", container=container.name,
                         volume=volume)
            docker_api.stop_container(container)
            stopped.append((container, time.monotonic()))
        yield downtime
    finally:
        for container, since in reversed(stopped):
            try:
                docker_api.start_container(container.id)
                ctx.history.forget_stopped(container.id)
                downtime[container.name] = time.monotonic() - since
                ctx.log.info("container started again", container=container.name,
                             downtime_s=round(downtime[container.name], 2))
            except Exception as exc:  # recorded in stopped_containers: start-up retries it
                ctx.log.error("could not start container again", container=container.name,
                              error=str(exc))


def _ns(text: str) -> int:
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


def _scan(ctx: RunContext, helper: Any, volume: str) -> None:
    """List every path of the volume with its metadata into the temp table `scan`."""
    proc = docker_api.Exec(helper, ["find", MOUNT, "-printf", FIND_FORMAT])
    db = ctx.history.db
    batch: list[tuple[Any, ...]] = []
    pending = b""
    with ctx.on_cancel(proc.close):
        db.execute("BEGIN")
        try:
            for chunk in proc.stdout():
                ctx.check()
                fields = (pending + chunk).split(b"\0")
                complete = (len(fields) - 1) // FIELDS * FIELDS
                pending = b"\0".join(fields[complete:])
                for i in range(0, complete, FIELDS):
                    batch.append(_scan_row(fields[i:i + FIELDS]))
                if len(batch) >= 5000:
                    _insert_scan(db, batch)
                    batch = []
            _insert_scan(db, batch)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        result = proc.wait()
    if result.exit_code != 0:
        raise JobError(tool_error("find", result, f"the helper container for {volume}"))


def _scan_row(fields: list[bytes]) -> tuple[Any, ...]:
    name, kind, size, mtime, ctime, inode, mode, uid, gid, link = (
        f.decode("utf-8", "surrogateescape") for f in fields)
    return (name or ".", kind, int(size), _ns(mtime), _ns(ctime), int(inode), int(mode, 8),
            int(uid), int(gid), link if kind == "l" else None)


def _insert_scan(db: Any, rows: list[tuple[Any, ...]]) -> None:
    db.executemany(
        "INSERT OR REPLACE INTO scan(path, type, size, mtime_ns, ctime_ns, inode, mode, uid,"
        " gid, link, hash, selected, seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 0, 0)",
        rows)


def _select(db: Any, kind: str, base: Artifact | None) -> list[str]:
    """Mark the paths to archive; return the paths deleted since the base full."""
    if kind == "full" or base is None:
        db.execute("UPDATE scan SET selected=1")
        return []
    differs = " OR ".join(f"f.{c} IS NOT s.{c}" for c in COMPARED)
    db.execute(
        "UPDATE scan SET selected=1 WHERE path IN (SELECT s.path FROM scan s LEFT JOIN files f"
        f" ON f.artifact_id=? AND f.path=s.path WHERE f.path IS NULL OR {differs})", (base.id,))
    # Parents of changed paths come along: extracting into a directory changes its mtime, and
    # tar only sets it back for directories that are in the archive.
    parents: set[str] = set()
    for (path,) in db.execute("SELECT path FROM scan WHERE selected=1"):
        while "/" in path:
            path = path.rsplit("/", 1)[0]
            if path in parents:
                break
            parents.add(path)
        parents.add(".")
    db.executemany("UPDATE scan SET selected=1 WHERE path=?", ((p,) for p in parents))
    return [row[0] for row in db.execute(
        "SELECT f.path FROM files f WHERE f.artifact_id=? AND NOT EXISTS"
        " (SELECT 1 FROM scan s WHERE s.path=f.path) ORDER BY f.path", (base.id,))]


def _tar(ctx: RunContext, helper: Any, out: AtomicFile, path: Path) -> list[str]:
    """Archive the selected paths into `out`; return tar's warnings."""
    settings = ctx.settings
    db = ctx.history.db
    with tempfile.TemporaryFile(dir=settings.state_dir) as names:
        for (name,) in db.execute("SELECT path FROM scan WHERE selected=1 ORDER BY path"):
            names.write(name.encode("utf-8", "surrogateescape") + b"\0")
        names.seek(0)
        proc = docker_api.Exec(helper, TAR_CREATE, stdin=True)
        proc.feed(iter(lambda: names.read(archive.CHUNK), b""))
        hashes: list[tuple[str | None, str]] = []
        with ctx.on_cancel(proc.close):
            try:
                with archive.compressor(out, settings.volume_compression,
                                        settings.compression_level()) as sink:
                    reader = tarstream.TeeReader(proc.stdout(), sink, ctx.check)
                    for member in tarstream.members(reader):
                        hashes.append((member.hash, member.path))
                        if len(hashes) >= 5000:
                            _mark_seen(db, hashes)
                            hashes = []
                    reader.drain()
                    _mark_seen(db, hashes)
            except DiskFullError as exc:
                raise JobError(f"the backup directory is full ({exc.strerror}); the partial "
                               "archive was removed and older backups are untouched") from None
            except tarfile.TarError as exc:
                ctx.check()
                raise JobError(f"the tar stream from the helper was damaged: {exc}") from None
            ctx.check()
            result = proc.wait()
    # GNU tar: 0 ok, 1 "some files differ" (changed while read), 2 fatal
    warnings = [line.removeprefix("tar: ") for line in result.stderr.splitlines()
                if line.strip()]
    if result.exit_code not in (0, 1):
        raise JobError(tool_error("tar", result, "the helper container"))
    try:
        out.commit()
    except DiskFullError as exc:
        raise JobError(f"the backup directory is full ({exc.strerror})") from None
    return warnings


def _mark_seen(db: Any, hashes: list[tuple[str | None, str]]) -> None:
    db.execute("BEGIN")
    db.executemany("UPDATE scan SET seen=1, hash=? WHERE path=?", hashes)
    db.execute("COMMIT")


# restore -------------------------------------------------------------------------------------
Confirm = Callable[[str], bool] | None


def chain_for(history: History, volume: str, at: datetime | None) -> list[Artifact]:
    """The artifacts that rebuild `volume` at `at`: [full] or [full, diff]."""
    point = restore_point(history, ("full", "diff"), volume, at)
    if point.tier == "full":
        return [point]
    base = history.artifact(point.base_id) if point.base_id else None
    if base is None or base.status != "ok":
        raise CatalogError(f"the differential {point.path} needs its full archive, which is "
                           "missing from the catalog")
    return [base, point]


def restore_volume(settings: Settings, name: str, *, at: datetime | None = None,
                   to: str | None = None, confirm: Confirm = None,
                   stop_containers: bool = False) -> None:
    target = to or name
    with History(settings.state_dir) as history:
        chain = chain_for(history, name, at)
        deleted = history.deleted_paths(chain[-1].id) if len(chain) > 1 else []
    files = [check_file(settings, item) for item in chain]
    when = chain[-1].created_at.astimezone(settings.zone).strftime("%Y-%m-%d %H:%M:%S %Z")
    exists = docker_api.volume_exists(target)
    users = docker_api.containers_using_volume(target) if exists else []
    running = [c for c in users if c.status == "running"]
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
    print(f"restoring {target} from {' + '.join(item.path for item in chain)} ({when})")
    stopped: list[Any] = []
    try:
        for container in running:
            docker_api.stop_container(container)
            stopped.append(container)
        image = docker_api.helper_image(settings.helper_image)
        with History(settings.state_dir) as history:
            owner = history.instance_id()
        with docker_api.helper(image, {target: (MOUNT, "rw")}, "restore", owner) as helper:
            _run(helper, ["find", MOUNT, "-mindepth", "1", "-delete"], "emptying the volume")
            _extract(helper, files[0], chain[0])
            if len(chain) > 1:
                _delete_paths(helper, deleted)
                _extract(helper, files[1], chain[1])
    finally:
        for container in stopped:
            docker_api.start_container(container.id)
    print(f"restored volume {target}: {name} as of {when}")


def _run(helper: Any, cmd: list[str], what: str, stdin: Iterator[bytes] | None = None) -> None:
    proc = docker_api.Exec(helper, cmd, stdin=stdin is not None)
    if stdin is not None:
        proc.feed(stdin)
    result = proc.wait(timeout=3600)
    if result.exit_code != 0:
        raise JobError(f"{what}: " + tool_error(cmd[0], result, "the helper container"))


def _extract(helper: Any, path: Path, item: Artifact) -> None:
    kind = item.extra.get("compression") or archive.compression_of(path)
    _run(helper, TAR_EXTRACT, f"extracting {path.name}", archive.decompressed(path, kind))


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


def restore_files(settings: Settings, name: str, patterns: list[str], *,
                  at: datetime | None = None, dest: str) -> None:
    """Extract the paths matching `patterns` as they were at `at` into `dest` (a directory)."""
    destination = Path(dest).resolve()
    destination.mkdir(parents=True, exist_ok=True)
    with History(settings.state_dir) as history:
        chain = chain_for(history, name, at)
        wanted: list[set[str]] = [set() for _ in chain]
        newer = {row["path"] for row in history.files(chain[-1].id)} if len(chain) > 1 else set()
        gone = set(history.deleted_paths(chain[-1].id)) if len(chain) > 1 else set()
        for position, item in enumerate(chain):
            for row in history.files(item.id):
                row_path = row["path"]
                if position == 0 and len(chain) > 1 and (row_path in newer or row_path in gone):
                    continue
                if _matches(row_path, patterns):
                    wanted[position].add(row_path)
    if not any(wanted):
        raise JobError(f"nothing in {name} at that time matches {' '.join(patterns)}")
    files = [check_file(settings, item) for item in chain]
    written = refused = 0
    for item, path, names in zip(chain, files, wanted, strict=True):
        if not names:
            continue
        kind = item.extra.get("compression") or archive.compression_of(path)
        reader = tarstream.TeeReader(archive.decompressed(path, kind), None)
        with tarfile.open(fileobj=reader, mode="r|", bufsize=archive.CHUNK) as tar:
            for member in tar:
                if tarstream.normalize(member.name) not in names:
                    continue
                try:
                    _extract_member(tar, member, destination)
                    written += 1
                except (_FILTER_ERROR, ValueError, OSError, KeyError) as exc:
                    refused += 1
                    log.warning("member refused", member=member.name, error=str(exc))
    print(f"restored {written} path(s) of {name} into {destination}"
          + (f"; refused {refused} unsafe or unreadable member(s)" if refused else ""))
    if refused and not written:
        raise JobError("every matching member was refused (unsafe names or links)")


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


# verify --------------------------------------------------------------------------------------
def verify(settings: Settings, item: Artifact) -> str | None:
    try:
        path = check_file(settings, item)
    except CatalogError as exc:
        return str(exc)
    kind = item.extra.get("compression") or archive.compression_of(path)
    count = 0
    try:
        reader = tarstream.TeeReader(archive.decompressed(path, kind), None)
        for _ in tarstream.members(reader):
            count += 1
    except Exception as exc:
        return f"{path.name} does not read to its end: {exc}"
    expected = item.extra.get("files")
    if expected is not None and count != expected:
        return f"{path.name} holds {count} members, the catalog says {expected}"
    return None


def size_on_disk(path: Path) -> int:
    return os.stat(path).st_size
