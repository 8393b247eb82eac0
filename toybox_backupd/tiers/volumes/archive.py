"""The physical tiers: full and differential archives of Docker volumes.

How a volume is read: a short-lived helper container mounts it read-only (by volume name, through
the Docker API), `find` lists every path with its metadata, and GNU tar archives the chosen paths
to stdout. The stream comes back over `docker exec`, is indexed and hashed as it passes
(tarstream), compressed (zstd by default) and written atomically. The same code serves the full
(every path) and the differential (paths whose metadata differ from the last full's index).
Restores live in volume_restore (with volume_swap) and file_restore.
"""

from __future__ import annotations

import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ... import __version__
from ...adapters import docker_api, hints
from ...catalog.restore_points import check_file
from ...core import tarstream
from ...core.atomic import CHUNK, AtomicFile, Batch, write_behind
from ...core.basics import (
    Cancelled,
    CatalogError,
    JobError,
    RunContext,
    TierResult,
    ToyboxError,
    describe_unexpected,
    human,
    iso,
    local_time,
    utcnow,
)
from ...core.compression import EXTENSIONS, compressor, decompressed, kind_of
from ...core.manifests import TOOL, write_index, write_manifest
from ...core.settings import Settings
from ...store import Artifact
from . import kept_helper, transfer
from .file_restore import restore_files
from .restore import restore_volume
from .swap import MOUNT
from .swap import PREFIX as STAGING_PREFIX

__all__ = ["backup", "restore_files", "restore_volume", "verify"]

FIND_FORMAT = r"%P\0%y\0%s\0%T@\0%C@\0%i\0%m\0%U\0%G\0%l\0"
# -ignore_readdir_race: a file deleted between readdir and stat is skipped silently; a directory
# deleted before find opens it is still reported (findutils 4.9), in these words under LC_ALL=C
# a restore's staging dir (left by a killed restore until it is settled) is not volume data
def find_list(mount: str) -> list[str]:
    """find over the volume mounted at `mount`, one record per path (FIND_FORMAT)."""
    return ["find", mount, "-ignore_readdir_race", "-path", f"{mount}/{STAGING_PREFIX}*",
            "-prune", "-o", "-printf", FIND_FORMAT]


FIND_VANISHED = re.compile(r"^find: '(.*)': No such file or directory$")
FIELDS = 10
# the pax headers' names without tar's pid (`%d/PaxHeaders.%p/%f` by default): the same
# volume gives the same archive, byte for byte, whatever ran in the helper before
def tar_create(mount: str) -> list[str]:
    """GNU tar archiving the paths named on stdin, relative to the volume mounted at `mount`."""
    return [
        "tar", "--create", "--format=posix", "--numeric-owner", "--no-recursion",
        "--ignore-failed-read", "--pax-option=delete=atime,exthdr.name=%d/PaxHeaders/%f",
        "--xattrs", "--directory=" + mount, "--null", "--verbatim-files-from", "--files-from=-",
    ]


@dataclass
class Archived:
    """One volume's archive: where, how big, and what the run should report."""

    path: str
    size: int
    downtime: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    steps: dict[str, Any] = field(default_factory=dict)


class Steps:
    """Seconds spent in each step of a volume's archive (the run's details show them)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._since = time.monotonic()

    def lap(self, step: str) -> None:
        """The time since the previous lap goes to `step`."""
        now = time.monotonic()
        self.seconds[step] = round(self.seconds.get(step, 0.0) + now - self._since, 3)
        self._since = now

    def since_now(self) -> None:
        """The next lap counts from now (what passed since the last one is not a step)."""
        self._since = time.monotonic()


def backup(ctx: RunContext) -> TierResult:
    """Archive every target volume (`ctx.job.name`: "full" or "diff").

    One helper container reads them all. Each volume is archived on its own: one volume's
    failure is reported and the others still run. Returns the archives; raises JobError naming
    every volume that failed.
    """
    if not ctx.targets:
        raise JobError("no volumes to archive: set BACKUP_VOLUMES")
    missing = hints.missing_volumes(ctx.targets)
    if missing:
        raise JobError(missing)
    result, archives, errors = TierResult(), [], []
    steps = Steps()
    left_to_base = _left_to_base(ctx)
    targets = [volume for volume in ctx.targets if volume not in left_to_base]
    with ExitStack() as stack:
        reader = _reader(ctx, stack, targets) if targets else None
        steps.lap("start")
        for volume in targets:
            assert reader is not None
            ctx.check()
            try:
                archives.append((volume, archive_volume(ctx, volume, ctx.job.name, reader)))
            except Cancelled:
                raise
            except Exception as exc:  # one volume's failure, foreseen or not, never skips others
                ctx.check()  # unless the run itself was ended
                text = str(exc) if isinstance(exc, ToyboxError) else describe_unexpected(exc)
                errors.append(f"{volume}: {text}")
                ctx.log.error("volume archive failed", volume=volume, error=text,
                              **({} if isinstance(exc, ToyboxError) else {"exc_info": True}))
        if errors and reader is not None:
            reader.lease.discard()  # a helper that saw a failure is not kept
        steps.since_now()
    steps.lap("remove")
    result.details = {**_details(archives, steps, reader), **_pitr_note(left_to_base)}
    for _, archived in archives:
        result.bytes += archived.size
        result.artifacts.append(archived.path)
    ctx.note(**result.details)
    if errors:
        raise JobError("; ".join(errors))
    return result


def _details(archives: list[tuple[str, Archived]], helper: Steps,
             reader: Reader | None) -> dict[str, Any]:
    """The run's details: downtime per container, warnings, and the steps' seconds."""
    downtime: dict[str, float] = {}
    warnings: list[str] = []
    for volume, archived in archives:
        for name, seconds in archived.downtime.items():
            downtime[name] = downtime.get(name, 0.0) + seconds
        warnings += [f"{volume}: {w}" for w in archived.warnings]
    return {
        "downtime": {k: round(v, 2) for k, v in downtime.items()},
        "downtime_seconds": round(sum(downtime.values()), 2),
        "warnings": warnings[:200],
        "warnings_total": len(warnings),
        "helper": {"seconds": helper.seconds,
                   **({"kept": reader.lease.reused} if reader is not None else {})},
        "volumes": {volume: archived.steps for volume, archived in archives},
    }


# one volume ----------------------------------------------------------------------------------
def _left_to_base(ctx: RunContext) -> list[str]:
    """With PITR=on, the target volumes of the database container: its base backups are their
    physical backup, so the database is never stopped for them."""
    if not ctx.settings.pitr or not ctx.settings.pg_container:
        return []
    mounted = docker_api.mounted_volumes(docker_api.find_container(ctx.settings.pg_container))
    return [volume for volume in ctx.targets if volume in mounted]


def _pitr_note(left_to_base: list[str]) -> dict[str, str]:
    if not left_to_base:
        return {}
    return {"pitr": f"{', '.join(left_to_base)}: the database's data, not stopped and not "
            "archived by this run: with PITR=on the online base backups (tier base) and the "
            "WAL are its physical backup (`restore cluster --at` rebuilds it)"}


@dataclass
class Reader:
    """The run's helper container: each target volume mounted read-only at its own path, and
    the spool where FIFOs carry the archives (None: the exec stream carries them)."""

    helper: Any
    mounts: dict[str, str]
    spool: Callable[[], transfer.Spool | None]  # waits for the check that the helper sees it
    lease: kept_helper.Lease
    running: dict[str, Future[list[Any]]] = field(default_factory=dict)  # looked up already


def _reader(ctx: RunContext, stack: ExitStack, volumes: list[str]) -> Reader:
    """One helper for the whole run (its start-up paid once; in the daemon, the one kept from
    the last run when it fits), removed or kept when `stack` closes."""
    settings = ctx.settings
    image = docker_api.helper_image(settings.helper_image)
    spool = transfer.spool(settings.state_dir)
    mounts = {volume: f"{MOUNT}/{number}" for number, volume in enumerate(volumes)}
    first = _running_in_background(volumes[0])  # while the helper starts
    lease = stack.enter_context(kept_helper.helper(
        image, {volume: (path, "ro") for volume, path in mounts.items()}
        | transfer.mounts(spool), "backup", ctx.store.instance_id(),
        lifetime=ctx.job.time_limit_seconds(settings) + 60))
    helper = lease.container
    stack.enter_context(ctx.on_cancel(lambda: docker_api.remove_helper(helper)))
    return Reader(helper, mounts, _spool_check(spool, lease), lease, {volumes[0]: first})


def _running_in_background(volume: str) -> Future[list[Any]]:
    """`running_users(volume)` on a thread of its own."""
    pool = ThreadPoolExecutor(1, "lookup")
    found = pool.submit(running_users, volume)
    pool.shutdown(wait=False)  # no more tasks; this one runs on
    return found


def running_users(volume: str) -> list[Any]:
    """The running containers that use `volume`, this process's own left out."""
    own = docker_api.own_container()
    return [c for c in docker_api.containers_using_volume(volume)
            if c.status == "running" and (own is None or c.id != own.id)]


def _spool_check(spool: transfer.Spool | None,
                 lease: kept_helper.Lease) -> Callable[[], transfer.Spool | None]:
    """Whether the helper sees the spool's FIFOs: found out in the background, or known from
    an earlier run of a kept helper."""
    if spool is not None and lease.facts.get("sees_spool") == spool.source:
        return lambda: spool
    check = transfer.checked_in_background(spool, lease.container)

    def answer() -> transfer.Spool | None:
        seen = check()
        if seen is not None:
            lease.facts["sees_spool"] = seen.source
        return seen

    return answer


def archive_volume(ctx: RunContext, volume: str, kind: str, reader: Reader) -> Archived:
    """Archive one volume (a full, or a differential against its newest full)."""
    settings, store = ctx.settings, ctx.store
    steps = Steps()
    kind, base, notes = _base_for(ctx, volume, kind)
    created = utcnow()
    path = _new_path(settings, volume, kind, created)
    store.scan_reset()
    mount = reader.mounts[volume]
    with Batch() as batch:  # the archive, its index, its manifest and its rows, or none of them
        out = batch.open(path)
        running = reader.running.pop(volume, None)  # the first volume's: looked up already
        with ExitStack() as stack, stopped_for(ctx, volume, running) as downtime:
            steps.lap("stop")
            listing_warnings = _list_volume(ctx, reader.helper, volume, mount)
            steps.lap("scan")
            deleted = store.scan_select_changed(base.id) if base else []
            if base is None:
                store.scan_select_all()
            steps.lap("select")
            spool = reader.spool()
            channel = stack.enter_context(spool.fifo(helper_writes=True)) if spool else None
            steps.lap("fifo")
            tar_warnings = _tar(ctx, reader.helper, mount, out, channel)
            steps.lap("tar")
        steps.lap("start")  # the stopped containers started again
        archived = Archived(str(path.relative_to(settings.backup_dir)), out.size, downtime,
                            notes + listing_warnings + tar_warnings)
        vanished = store.scan_take_vanished()
        archived.warnings += [f"vanished while read: {p}" for p in vanished[:100]]
        _catalog(ctx, batch, path, out, volume, kind, created, base, deleted, archived, steps)
    archived.steps = {"transport": "fifo" if channel else "exec", "seconds": steps.seconds}
    return archived


def _base_for(ctx: RunContext, volume: str, kind: str) -> tuple[str, Artifact | None, list[str]]:
    """(kind, base full, notes): a differential without a full becomes a full."""
    if kind != "diff":
        return kind, None, []
    fulls = ctx.store.artifacts(tier="full", target=volume)
    if fulls:
        return kind, fulls[-1], []
    ctx.log.warning("no full archive yet: making a full instead", volume=volume)
    return "full", None, ["no full archive yet, so this differential run made a full instead"]


def _new_path(settings: Settings, volume: str, kind: str, created: datetime) -> Path:
    stamp = local_time(created, settings.zone, "stamp")
    ext = ".tar" + EXTENSIONS[settings.volume_compression]
    directory = settings.backup_dir / "volumes" / volume
    path = directory / f"{volume}_{stamp}_{kind}{ext}"
    number = 2
    while path.exists():
        path = directory / f"{volume}_{stamp}-{number}_{kind}{ext}"
        number += 1
    return path


def _catalog(ctx: RunContext, batch: Batch, path: Path, out: AtomicFile, volume: str,
             kind: str, created: datetime, base: Artifact | None, deleted: list[str],
             archived: Archived, steps: Steps) -> None:
    """The index and manifest beside the archive, all of them committed, then its rows."""
    store = ctx.store
    count = store.scan_count()
    extra = {"compression": ctx.settings.volume_compression, "files": count,
             "deleted": len(deleted), "warnings": len(archived.warnings),
             "downtime_seconds": round(sum(archived.downtime.values()), 2)}
    write_index(path, store.scan_index_rows(), batch)
    write_manifest(path, {
        "tool": TOOL, "version": __version__, "tier": kind, "target": volume,
        "created_at": iso(created), "size": out.size, "sha256": out.sha256,
        "file": path.name, "base": base.path if base else None, "deleted": deleted,
        "extra": extra,
    }, batch)
    steps.lap("index")  # the file index and the manifest written
    batch.commit()
    steps.lap("fsync")  # the archive and its companions fsynced and renamed into place
    store.add_artifact(
        run_id=ctx.run_id, tier=kind, target=volume, path=archived.path, created_at=created,
        size=out.size, sha256=out.sha256, base_id=base.id if base else None, extra=extra,
        files=store.scan_index_rows(), deleted=deleted)
    steps.lap("catalog")
    ctx.log.info("volume archived", volume=volume, kind=kind, file=archived.path, files=count,
                 deleted=len(deleted), size=human(out.size),
                 downtime_s=extra["downtime_seconds"])


@contextmanager
def stopped_for(ctx: RunContext, volume: str,
                running: Future[list[Any]] | None = None) -> Iterator[dict[str, float]]:
    """Stop the containers that want it while `volume` is read; always start them again.

    `running`: running_users(volume), looked up while the helper started (no later than a
    lookup here would be, less the helper's start). Each is recorded in the store before it is
    stopped, so start-up recovery restarts it after a crash. Yields {container name: seconds
    stopped}, filled in on the way out.
    """
    users = running.result() if running is not None else running_users(volume)
    candidates = [c for c in users if docker_api.wants_stop(c, ctx.settings.stop_during_backup)]
    downtime: dict[str, float] = {}
    stopped: list[tuple[Any, float]] = []
    try:
        for container in candidates:
            ctx.store.record_stopped(container.id, container.name, ctx.run_id)
            ctx.log.info("stopping container for a consistent archive", container=container.name,
                         volume=volume)
            docker_api.stop_container(container)
            stopped.append((container, time.monotonic()))
        yield downtime
    finally:
        for container, since in reversed(stopped):
            try:
                docker_api.start_container(container.id)
                ctx.store.forget_stopped(container.id)
                downtime[container.name] = time.monotonic() - since
                ctx.log.info("container started again", container=container.name,
                             downtime_s=round(downtime[container.name], 2))
            except Exception as exc:  # recorded in stopped_containers: start-up retries it
                ctx.log.error("could not start container again", container=container.name,
                              error=str(exc))


def _ns(text: str) -> int:
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


def _list_volume(ctx: RunContext, helper: Any, volume: str, mount: str) -> list[str]:
    """List every path of the volume with its metadata into the store's scan table.

    Returns warnings for paths that vanished while they were listed (a busy volume); any other
    error of find fails the run.
    """
    proc = docker_api.Exec(helper, find_list(mount), environment={"LC_ALL": "C"})
    batch: list[tuple[Any, ...]] = []
    pending = b""
    with ctx.on_cancel(proc.close):
        for chunk in proc.stdout():
            ctx.check()
            fields = (pending + chunk).split(b"\0")
            complete = (len(fields) - 1) // FIELDS * FIELDS
            pending = b"\0".join(fields[complete:])
            batch += [_scan_row(fields[i:i + FIELDS]) for i in range(0, complete, FIELDS)]
            if len(batch) >= 5000:
                ctx.store.scan_add(batch)
                batch = []
        ctx.store.scan_add(batch)
        result = proc.wait()
    vanished = _vanished(result.stderr, mount) if result.exit_code == 1 else None
    if result.exit_code != 0 and vanished is None:
        raise JobError(docker_api.tool_error("find", result, f"the helper container for {volume}"))
    return [f"vanished while listed: {path}" for path in vanished or []]


def _vanished(stderr: str, mount: str) -> list[str] | None:
    """The paths of find's messages if each says a path is gone, else None (a real error)."""
    lines = stderr.splitlines()
    if len(stderr) >= docker_api.STDERR_KEEP and lines and not lines[0].startswith("find: "):
        lines = lines[1:]  # the kept tail of a long stderr starts in the middle of a line
    paths = []
    for line in lines:
        match = FIND_VANISHED.match(line)
        if match is None:
            return None
        paths.append(match.group(1).removeprefix(mount).lstrip("/"))
    return paths or None


def _scan_row(fields: list[bytes]) -> tuple[Any, ...]:
    name, kind, size, mtime, ctime, inode, mode, uid, gid, link = (
        f.decode("utf-8", "surrogateescape") for f in fields)
    return (name or ".", kind, int(size), _ns(mtime), _ns(ctime), int(inode), int(mode, 8),
            int(uid), int(gid), link if kind == "l" else None)


def _tar(ctx: RunContext, helper: Any, mount: str, out: AtomicFile,
         channel: transfer.Fifo | None) -> list[str]:
    """Archive the selected paths into `out` (committed later, with its companions), through
    the FIFO `channel` or else the exec stream; return tar's warnings."""
    settings, store = ctx.settings, ctx.store
    with tempfile.TemporaryFile(dir=settings.state_dir) as names:
        for name in store.scan_selected_names():
            names.write(name.encode("utf-8", "surrogateescape") + b"\0")
        names.seek(0)
        target = channel.inside if channel is not None else "-"
        proc = docker_api.Exec(helper, [*tar_create(mount), "--file=" + target], stdin=True)
        proc.feed(iter(lambda: names.read(CHUNK), b""))
        waiter = transfer.Waiter(proc) if channel is not None else None
        chunks = (transfer.chunks_from(channel, waiter.done) if channel and waiter
                  else proc.stdout())
        with ctx.on_cancel(proc.close):
            try:
                with write_behind(out) as behind, compressor(
                        behind, settings.volume_compression, settings.compression_level()) as sink:
                    _index_stream(ctx, tarstream.TeeReader(chunks, sink, ctx.check))
            except tarfile.TarError as exc:
                ctx.check()
                if waiter is not None and waiter.done.wait(1):  # tar ended: say why, if it can
                    _tar_failed(waiter.result())
                raise JobError(f"the tar stream from the helper is cut short or damaged: {exc}; "
                               "nothing was kept") from None
            ctx.check()
            result = waiter.result() if waiter else proc.wait()
    _tar_failed(result)
    return [line.removeprefix("tar: ") for line in result.stderr.splitlines() if line.strip()]


def _tar_failed(result: docker_api.ExecResult) -> None:
    """JobError in tar's words unless it succeeded: GNU tar exits 0 when all is well, 1 when
    "some files differ" (changed while read), 2 on a fatal error."""
    if result.exit_code not in (0, 1):
        raise JobError(docker_api.tool_error("tar", result, "the helper container"))


def _index_stream(ctx: RunContext, reader: tarstream.TeeReader) -> None:
    """Read the archive as it passes: mark each member seen, with its content hash."""
    hashes: list[tuple[str | None, str]] = []
    for member in tarstream.members(reader):
        hashes.append((member.hash, member.path))
        if len(hashes) >= 5000:
            ctx.store.scan_mark_seen(hashes)
            hashes = []
    reader.drain()
    ctx.store.scan_mark_seen(hashes)


# verify --------------------------------------------------------------------------------------
def verify(settings: Settings, item: Artifact) -> str | None:
    """Re-read one archive to its end: None if it is sound, else what is wrong."""
    try:
        path = check_file(settings.backup_dir, item)
    except CatalogError as exc:
        return str(exc)
    kind = item.extra.get("compression") or kind_of(path)
    count = 0
    try:
        reader = tarstream.TeeReader(decompressed(path, kind), None)
        for _ in tarstream.members(reader):
            count += 1
    except Exception as exc:
        return f"{path.name} does not read to its end: {exc}"
    expected = item.extra.get("files")
    if expected is not None and count != expected:
        return f"{path.name} holds {count} members, the catalog says {expected}"
    return None
