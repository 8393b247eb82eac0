"""The base backup tier (with PITR): an online `pg_basebackup`, no downtime.

pg_basebackup runs on the route (wal.route: a helper from the database's own image in its
network namespace) and writes tar format, gzip-compressed, with a SHA-256 backup manifest and
the WAL of its own span (`-X stream`), into a hidden `.<db>_<stamp>.partial/` directory under
BACKUP_DIR/base/<db>/. The files are checked (sizes, every gzip stream to its end), hashed,
fsynced, described in `base.tar.gz.manifest.json`, and the directory renamed to its final name
before the catalog row is written.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

from ... import __version__
from ...adapters import database, docker_api
from ...adapters.pgtools import tool_error
from ...catalog.restore_points import check_file
from ...core.atomic import fsync_dir, sha256_of
from ...core.basics import CatalogError, JobError, RunContext, TierResult, human, iso, local_time, utcnow
from ...core.manifests import TOOL, write_manifest
from ...core.settings import Settings
from ...store import Artifact
from . import wal

TIER = "base"
FILES = ("base.tar.gz", "pg_wal.tar.gz", "backup_manifest")


def backup(ctx: RunContext) -> TierResult:
    """Take one online base backup of the cluster that holds the target database."""
    settings, dbname = ctx.settings, ctx.targets[0]
    try:
        version = database.check_reachable(settings)
        port = database.server_port(settings)
        system = database.system_identifier(settings)  # the cluster its WAL must come from
    except database.DatabaseError as exc:
        raise JobError(str(exc)) from None
    ctx.check()
    created = utcnow()
    root = settings.backup_dir / TIER / dbname
    stem = f"{dbname}_{local_time(created, settings.zone, 'stamp')}"
    partial = root / f".{stem}.partial"
    _remove_partials(root)
    try:
        image = _run_basebackup(ctx, port, partial)
        files = _check_files(partial)
        final = root / stem
        extra = {**_describe(partial, files, image, version, dbname, created),
                 "system_identifier": system}
        main = final / FILES[0]
        write_manifest(partial / FILES[0], {
            "tool": TOOL, "version": __version__, "tier": TIER, "target": dbname,
            "created_at": iso(extra["finished"]), "size": files[FILES[0]]["size"],
            "sha256": files[FILES[0]]["sha256"], "file": FILES[0], "extra": extra})
        fsync_dir(partial)
        partial.rename(final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    relative = str(main.relative_to(settings.backup_dir))
    size = sum(info["size"] for info in files.values())
    ctx.store.add_artifact(run_id=ctx.run_id, tier=TIER, target=dbname, path=relative,
                           created_at=extra["finished"], size=files[FILES[0]]["size"],
                           sha256=files[FILES[0]]["sha256"], extra=_jsonable(extra))
    ctx.log.info("base backup written", file=relative, size=human(size),
                 start_lsn=extra["start_lsn"], end_lsn=extra["end_lsn"])
    ctx.note(downtime_seconds=0.0, start_lsn=extra["start_lsn"], end_lsn=extra["end_lsn"])
    return TierResult(bytes=size, artifacts=[relative],
                      details={"sha256": files[FILES[0]]["sha256"], "downtime_seconds": 0.0})


def _remove_partials(root: Path) -> None:
    """What a killed base backup left (only our own hidden `.…partial` directories)."""
    for path in root.glob(".*.partial"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _run_basebackup(ctx: RunContext, port: int, partial: Path) -> str:
    """pg_basebackup on the route into `partial`; returns the image it ran from."""
    settings = ctx.settings
    limit = ctx.job.time_limit_seconds(settings) if ctx.job is not None else 4 * 3600
    partial.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with wal.route(settings, partial.parent, "base", lifetime=limit) as (helper, where, image):
        cmd = ["pg_basebackup", "-d", wal.connection(settings, port), "-D",
               where.path(partial.parent) + "/" + partial.name, "-Ft", "-z", "-X", "stream",
               "--manifest-checksums=SHA256", "--checkpoint=fast", "--no-password",
               f"--label=toybox-backupd {partial.name[1:-8]}"]
        proc = docker_api.Exec(helper, cmd, environment=wal.environment(settings))
        with ctx.on_cancel(lambda: (proc.kill(), proc.close())):
            for _ in proc.stdout():
                pass
            result = proc.wait()
        ctx.check()
        if result.exit_code != 0:
            raise JobError(tool_error("pg_basebackup", result, "a helper beside the database"))
    return image


def _check_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Each file's size and sha256; JobError if one is missing, empty or a damaged gzip."""
    files: dict[str, dict[str, Any]] = {}
    for name in FILES:
        path = directory / name
        if not path.is_file() or path.stat().st_size == 0:
            raise JobError(f"pg_basebackup left no {name} (or an empty one) in {directory}")
        if name.endswith(".gz"):
            problem = _gzip_problem(path)
            if problem:
                raise JobError(problem)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(path, 0o600)
        files[name] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    return files


def _gzip_problem(path: Path) -> str | None:
    """None if `path` is a whole gzip stream, else what is wrong."""
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(1024 * 1024):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        return f"{path.name}: damaged gzip stream ({exc})"
    return None


def _describe(directory: Path, files: dict[str, dict[str, Any]], image: str, version: str,
              dbname: str, started: Any) -> dict[str, Any]:
    """The base backup's WAL range (from its backup_manifest) and what else a restore needs."""
    try:
        manifest = json.loads((directory / "backup_manifest").read_text(encoding="utf-8"))
        ranges = manifest["WAL-Ranges"]
        start, end = ranges[0]["Start-LSN"], ranges[-1]["End-LSN"]
        timeline = int(ranges[-1]["Timeline"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise JobError(f"the backup_manifest of the base backup is unreadable ({exc})") from None
    return {"start_lsn": start, "end_lsn": end, "timeline": timeline,
            "start_segment": wal.segment_of_lsn(start), "image": image,
            "server_version": version, "database": dbname, "started": started,
            "finished": utcnow(), "files": files, "format": "tar.gz"}


def _jsonable(extra: dict[str, Any]) -> dict[str, Any]:
    return {key: (iso(value) if hasattr(value, "astimezone") else value)
            for key, value in extra.items()}


def verify(settings: Settings, item: Artifact) -> str | None:
    """Re-read a base backup: every file's sha256, every gzip stream to its end."""
    try:
        path = check_file(settings.backup_dir, item)
    except CatalogError as exc:
        return str(exc)
    files = item.extra.get("files") or {}
    for name in FILES[1:]:
        other = path.parent / name
        want = (files.get(name) or {}).get("sha256")
        if not other.is_file():
            return f"{other.name} of {item.path} is missing"
        if want and sha256_of(other) != want:
            return f"{other.name} of {item.path} does not match its sha256"
    for name in FILES[:2]:
        problem = _gzip_problem(path.parent / name)
        if problem:
            return problem
    return None
