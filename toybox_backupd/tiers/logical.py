"""The logical tier: pg_dump backups, and restores of a whole database or single tables."""

from __future__ import annotations

import gzip
import secrets
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import __version__, database
from ..atomic import Batch
from ..basics import (
    CatalogError,
    Confirm,
    JobError,
    RunContext,
    Say,
    TierResult,
    human,
    iso,
    local_time,
    silent,
    utcnow,
)
from ..compression import compressor, decompressed
from ..manifests import TOOL, write_manifest
from ..pgtools import PgTools, Proc, tool_error
from ..restore_points import check_file, restore_point
from ..settings import Settings
from ..store import Artifact, Store

TIER = "logical"
PLAIN_TRAILER = b"-- PostgreSQL database dump complete"
CUSTOM_MAGIC = b"PGDMP"


def _free_stem(directory: Path, stem: str) -> str:
    """`stem`, or `stem-2`, `stem-3`… if a file of that stem exists already."""
    candidate, number = stem, 2
    while directory.exists() and any(directory.glob(f"{candidate}.*")):
        candidate = f"{stem}-{number}"
        number += 1
    return candidate


# backup --------------------------------------------------------------------------------------
def backup(ctx: RunContext) -> TierResult:
    """Dump the database (and the cluster's roles) into BACKUP_DIR/logical/<database>/.

    Given a run whose target is the database; returns the dump's size and path; raises JobError
    (or DatabaseError, DiskFullError) with nothing cataloged when any step fails.
    """
    settings, dbname = ctx.settings, ctx.targets[0]
    try:
        server_version = database.check_reachable(settings)
    except database.DatabaseError as exc:
        raise JobError(str(exc)) from None
    tools = PgTools(settings)
    tools.check_version(server_version)
    ctx.check()
    created = utcnow()
    directory = settings.backup_dir / TIER / dbname
    custom = settings.pgdump_format == "custom"
    stem = _free_stem(directory, f"{dbname}_{local_time(created, settings.zone, 'stamp')}")
    path = directory / (stem + (".dump" if custom else ".sql.gz"))
    ctx.log.info("dumping database", database=dbname, server=server_version, where=tools.where,
                 file=str(path))
    with Batch() as batch:  # the dump, its roles, its manifest and its row, or none of them
        size, digest = _dump_to(ctx, tools, "pg_dump", ["-Fc" if custom else "-Fp", "-d", dbname],
                                batch, path, gzip_it=not custom,
                                check=_check_custom if custom else _check_plain)
        globals_info = _dump_globals(ctx, tools, batch, directory / f"{stem}.globals.sql.gz")
        extra = {"format": settings.pgdump_format, "server_version": server_version,
                 "database": dbname, "globals": globals_info}
        relative = _rel(settings, path)
        write_manifest(path, {
            "tool": TOOL, "version": __version__, "tier": TIER, "target": dbname,
            "created_at": iso(created), "size": size, "sha256": digest, "file": path.name,
            "extra": extra,
        }, batch)
        batch.commit()
        ctx.store.add_artifact(run_id=ctx.run_id, tier=TIER, target=dbname, path=relative,
                               created_at=created, size=size, sha256=digest, extra=extra)
    ctx.log.info("dump written", file=relative, size=human(size), sha256=digest)
    return TierResult(bytes=size + globals_info.get("size", 0), artifacts=[relative],
                      details={"sha256": digest, "format": settings.pgdump_format})


def _dump_globals(ctx: RunContext, tools: PgTools, batch: Batch, path: Path) -> dict[str, Any]:
    """pg_dumpall --globals-only beside the dump; without role passwords if not a superuser."""
    args = ["--globals-only"]
    note = None
    try:
        size, digest = _dump_to(ctx, tools, "pg_dumpall", args, batch, path, gzip_it=True,
                                check=_check_nonempty)
    except JobError as exc:
        if "permission denied" not in str(exc):
            raise
        size, digest = _dump_to(ctx, tools, "pg_dumpall", [*args, "--no-role-passwords"], batch,
                                path, gzip_it=True, check=_check_nonempty)
        note = "role passwords left out: POSTGRES_USER is not a superuser"
        ctx.note(warning=note)
    info: dict[str, Any] = {"path": _rel(ctx.settings, path), "sha256": digest, "size": size}
    if note:
        info["note"] = note
    return info


def _rel(settings: Settings, path: Path) -> str:
    return str(path.relative_to(settings.backup_dir))


def _check_custom(head: bytes, tail: bytes, size: int) -> str | None:
    if not head.startswith(CUSTOM_MAGIC):
        return "the dump does not start with the custom-format header"
    return None


def _check_plain(head: bytes, tail: bytes, size: int) -> str | None:
    if PLAIN_TRAILER not in tail:
        return "the dump ends before pg_dump's 'dump complete' line (truncated)"
    return None


def _check_nonempty(head: bytes, tail: bytes, size: int) -> str | None:
    return None if size else "no output"


def _dump_to(ctx: RunContext, tools: PgTools, tool: str, args: list[str], batch: Batch,
             path: Path, gzip_it: bool,
             check: Callable[[bytes, bytes, int], str | None]) -> tuple[int, str]:
    """Stream a tool's stdout into `path`, a file of `batch` (dropped from it if anything
    fails); return (size on disk, sha256)."""
    proc = tools.start(tool, args)
    out = batch.open(path)
    raw, head, tail = 0, b"", b""
    try:
        with ctx.on_cancel(proc.close):
            with compressor(out, "gzip" if gzip_it else "none", 6) as sink:
                for chunk in proc.stdout():
                    ctx.check()
                    if len(head) < 64:
                        head += chunk[:64]
                    tail = (tail + chunk)[-4096:]
                    raw += len(chunk)
                    sink.write(chunk)
            ctx.check()
            result = proc.wait()
            if result.exit_code != 0:
                raise JobError(tool_error(tool, result, tools.where))
            if raw == 0:
                raise JobError(f"{tool} in {tools.where} wrote nothing")
            problem = check(head, tail, raw)
            if problem:
                raise JobError(f"{tool} in {tools.where}: {problem}")
            return out.size, out.sha256
    except BaseException:
        batch.drop(out)
        raise
    finally:
        proc.close()


# restore -------------------------------------------------------------------------------------
def restore_db(settings: Settings, *, at: datetime | None = None, tables: Iterable[str] = (),
               into: str | None = None, confirm: Confirm = None, say: Say = silent) -> None:
    """Restore the dump nearest before `at`: the whole database, `tables` only, or `into` a new one.

    The live database is replaced only once the dump was restored completely beside it.
    Raises CatalogError (no such dump), JobError (a step failed; the target kept as it was).
    """
    tables = list(tables)
    with Store(settings.state_dir) as store:
        item = restore_point(store, (TIER,), settings.postgres_db, at)
    path = check_file(settings.backup_dir, item)
    fmt = item.extra.get("format", "custom")
    try:
        database.check_reachable(settings, "postgres", attempts=2)
    except database.DatabaseError as exc:
        raise JobError(str(exc)) from None
    tools = PgTools(settings)
    target = into or settings.postgres_db
    when = local_time(item.created_at, settings.zone)
    say(f"using {item.path} ({when}, {human(item.size)}, sha256 ok)")
    if tables:
        _restore_tables(settings, tools, path, fmt, tables, target)
        say(f"restored {', '.join(tables)} into {target}")
    elif into:
        _restore_into_new(settings, tools, path, fmt, into)
        say(f"restored the dump of {item.target} into the new database {into}")
    else:
        _restore_replacing(settings, tools, path, fmt, target, when, confirm)
        say(f"restored database {target} from the dump of {when}")


def _restore_into_new(settings: Settings, tools: PgTools, path: Path, fmt: str,
                      into: str) -> None:
    if database.database_exists(settings, into):
        raise JobError(f"database {into!r} already exists; --into needs a new name")
    database.create(settings, into, like=None)
    try:
        _restore_whole(tools, path, fmt, into)
    except BaseException:
        database.drop_quietly(settings, into)
        raise


def _restore_replacing(settings: Settings, tools: PgTools, path: Path, fmt: str, target: str,
                       when: str, confirm: Confirm) -> None:
    exists = database.database_exists(settings, target)
    if exists and confirm is not None:
        question = (f"This replaces database {target!r} on {settings.postgres_host}:"
                    f"{settings.postgres_port} ({database.describe(settings, target)}) with the "
                    f"dump from {when}. Everything written since then is lost. Continue?")
        if not confirm(question):
            raise JobError("cancelled; nothing was changed")
    scratch = f"{target}__restore_{secrets.token_hex(3)}"
    database.create(settings, scratch, like=target if exists else None)
    try:
        _restore_whole(tools, path, fmt, scratch)
        database.replace(settings, scratch, target, exists)
    except BaseException:
        database.drop_quietly(settings, scratch)
        raise


def _run_into(proc: Proc, chunks: Iterable[bytes], tool: str, where: str) -> None:
    proc.feed(chunks)
    result = proc.wait(timeout=600)
    if result.exit_code != 0:
        raise JobError(tool_error(tool, result, where))


def _restore_whole(tools: PgTools, path: Path, fmt: str, dbname: str) -> None:
    if fmt == "plain":
        proc = tools.start("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dbname],
                           stdin=True)
        _run_into(proc, decompressed(path, "gzip"), "psql", tools.where)
    else:
        proc = tools.start("pg_restore", ["--exit-on-error", "-d", dbname], stdin=True)
        _run_into(proc, decompressed(path, "none"), "pg_restore", tools.where)


def _restore_tables(settings: Settings, tools: PgTools, path: Path, fmt: str,
                    tables: list[str], target: str) -> None:
    """Restore the whole dump into a scratch database, then move just these tables over.

    pg_dump -t brings each table's indexes, constraints, triggers and sequences with it, which
    pg_restore -t alone would leave out. The move is one transaction per restore: on any error
    the target keeps its tables as they were.
    """
    if fmt != "custom":
        raise JobError("restoring single tables needs a custom-format dump "
                       "(PGDUMP_FORMAT=custom); this one is plain SQL")
    if not database.database_exists(settings, target):
        raise JobError(f"database {target!r} does not exist; --table restores into an "
                       "existing database (restore the whole database first)")
    scratch = f"{target}__tables_{secrets.token_hex(3)}"
    database.create(settings, scratch, like=target)
    try:
        _restore_whole(tools, path, "custom", scratch)
        _move_tables(tools, scratch, tables, target)
    finally:
        database.drop_quietly(settings, scratch)


def _move_tables(tools: PgTools, scratch: str, tables: list[str], target: str) -> None:
    args = ["-Fc", "--strict-names", "-d", scratch]
    for table in tables:
        args += ["-t", table]
    dump = tools.start("pg_dump", args)
    load = tools.start("pg_restore", ["--clean", "--if-exists", "--single-transaction",
                                      "--exit-on-error", "-d", target], stdin=True)
    load.feed(dump.stdout())
    loaded = load.wait(timeout=600)
    dumped = dump.wait()
    if dumped.exit_code != 0:
        raise JobError(tool_error("pg_dump", dumped, tools.where).replace(
            scratch, "the dump") + " (is the table name right? try schema.table)")
    if loaded.exit_code != 0:
        raise JobError(tool_error("pg_restore", loaded, tools.where)
                       + "; the target database was left as it was")


# verify --------------------------------------------------------------------------------------
def verify(settings: Settings, item: Artifact) -> str | None:
    """Re-read one dump: None if it is sound, else what is wrong."""
    try:
        path = check_file(settings.backup_dir, item)
    except CatalogError as exc:
        return str(exc)
    if item.extra.get("format", "custom") == "plain":
        try:
            tail = b""
            for chunk in decompressed(path, "gzip"):
                tail = (tail + chunk)[-4096:]
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            return f"{path.name}: gzip stream is damaged ({exc})"
        return None if PLAIN_TRAILER in tail else f"{path.name}: truncated SQL dump"
    try:
        tools = PgTools(settings)
    except Exception as exc:
        return f"cannot run pg_restore to read {path.name}: {exc}"
    proc = tools.start("pg_restore", ["--list"], stdin=True)
    proc.feed(decompressed(path, "none"), partial_ok=True)  # it reads the table of contents
    entries = sum(chunk.count(b"\n") for chunk in proc.stdout())
    result = proc.wait()
    if result.exit_code != 0:
        return tool_error("pg_restore --list", result, tools.where)
    if entries == 0:
        return f"{path.name}: pg_restore --list found no entries"
    return None
