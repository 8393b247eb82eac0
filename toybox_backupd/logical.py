"""The logical tier: pg_dump backups, and restores of a whole database or single tables."""

from __future__ import annotations

import contextlib
import gzip
import secrets
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import __version__, archive, database, logs
from .archive import AtomicFile, DiskFullError
from .catalog import CatalogError, check_file, restore_point
from .history import History, iso, utcnow
from .pgtools import PgTools, Proc, tool_error
from .runner import JobError, RunContext, TierResult, human
from .settings import Settings

log = logs.get("toybox_backupd.logical")
TIER = "logical"
PLAIN_TRAILER = b"-- PostgreSQL database dump complete"
CUSTOM_MAGIC = b"PGDMP"


def _stamp(moment: datetime, settings: Settings) -> str:
    return moment.astimezone(settings.zone).strftime("%Y%m%d-%H%M%S")


def _free_stem(directory: Path, stem: str) -> str:
    """`stem`, or `stem-2`, `stem-3`… if a file of that stem exists already."""
    candidate, number = stem, 2
    while any(directory.glob(f"{candidate}.*")):
        candidate = f"{stem}-{number}"
        number += 1
    return candidate


# backup --------------------------------------------------------------------------------------
def backup(ctx: RunContext) -> TierResult:
    settings = ctx.settings
    db = settings.postgres_db
    try:
        server_version = database.check_reachable(settings)
    except database.DatabaseError as exc:
        raise JobError(str(exc)) from None
    tools = PgTools(settings)
    tools.check_version(server_version)
    ctx.check()

    created = utcnow()
    directory = settings.backup_dir / TIER / db
    custom = settings.pgdump_format == "custom"
    stem = _free_stem(directory, f"{db}_{_stamp(created, settings)}") if directory.exists() \
        else f"{db}_{_stamp(created, settings)}"
    path = directory / (stem + (".dump" if custom else ".sql.gz"))
    fmt = ["-Fc"] if custom else ["-Fp"]
    ctx.log.info("dumping database", database=db, server=server_version, where=tools.where,
                 file=str(path))
    size, digest = _dump_to(ctx, tools, "pg_dump", [*fmt, "-d", db], path, gzip_it=not custom,
                            check=_check_custom if custom else _check_plain)
    globals_path = directory / f"{stem}.globals.sql.gz"
    globals_info: dict[str, Any] = {}
    try:
        gsize, gdigest = _dump_to(ctx, tools, "pg_dumpall", ["--globals-only"], globals_path,
                                  gzip_it=True, check=_check_nonempty)
        globals_info = {"path": _rel(settings, globals_path), "sha256": gdigest, "size": gsize}
    except JobError as exc:
        if "permission denied" not in str(exc):
            raise
        gsize, gdigest = _dump_to(ctx, tools, "pg_dumpall",
                                  ["--globals-only", "--no-role-passwords"], globals_path,
                                  gzip_it=True, check=_check_nonempty)
        globals_info = {"path": _rel(settings, globals_path), "sha256": gdigest, "size": gsize,
                        "note": "role passwords left out: POSTGRES_USER is not a superuser"}
        ctx.note(warning=globals_info["note"])

    extra = {"format": settings.pgdump_format, "server_version": server_version,
             "database": db, "globals": globals_info}
    relative = _rel(settings, path)
    archive.write_manifest(path, {
        "tool": "toybox-backupd", "version": __version__, "tier": TIER, "target": db,
        "created_at": iso(created), "size": size, "sha256": digest, "file": path.name,
        "extra": extra,
    })
    ctx.history.add_artifact(run_id=ctx.run_id, tier=TIER, target=db, path=relative,
                             created_at=created, size=size, sha256=digest, extra=extra)
    ctx.log.info("dump written", file=relative, size=human(size), sha256=digest)
    return TierResult(bytes=size + globals_info.get("size", 0), artifacts=[relative],
                      details={"sha256": digest, "format": settings.pgdump_format})


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


def _dump_to(ctx: RunContext, tools: PgTools, tool: str, args: list[str], path: Path,
             gzip_it: bool, check: Callable[[bytes, bytes, int], str | None]) -> tuple[int, str]:
    """Stream a tool's stdout into `path` (atomically); return (size on disk, sha256)."""
    proc = tools.start(tool, args)
    raw = 0
    head = b""
    tail = b""
    try:
        with ctx.on_cancel(proc.close), AtomicFile(path) as out:
            try:
                with archive.compressor(out, "gzip" if gzip_it else "none", 6) as sink:
                    for chunk in proc.stdout():
                        ctx.check()
                        if len(head) < 64:
                            head += chunk[:64]
                        tail = (tail + chunk)[-4096:]
                        raw += len(chunk)
                        sink.write(chunk)
            except DiskFullError as exc:
                raise JobError(
                    f"the backup directory is full ({exc.strerror}); the partial file was removed "
                    "and older backups are untouched") from None
            ctx.check()
            result = proc.wait()
            if result.exit_code != 0:
                raise JobError(tool_error(tool, result, tools.where))
            if raw == 0:
                raise JobError(f"{tool} in {tools.where} wrote nothing")
            problem = check(head, tail, raw)
            if problem:
                raise JobError(f"{tool} in {tools.where}: {problem}")
            try:
                out.commit()
            except DiskFullError as exc:
                raise JobError(f"the backup directory is full ({exc.strerror})") from None
            return out.size, out.sha256
    finally:
        proc.close()


# restore -------------------------------------------------------------------------------------
Confirm = Callable[[str], bool] | None


def _dump_chunks(settings: Settings, path: Path, fmt: str) -> Iterator[bytes]:
    return archive.decompressed(path, "gzip" if fmt == "plain" else "none")


def restore_db(settings: Settings, *, at: datetime | None = None, tables: Iterable[str] = (),
               into: str | None = None, confirm: Confirm = None) -> None:
    tables = list(tables)
    with History(settings.state_dir) as history:
        item = restore_point(history, (TIER,), settings.postgres_db, at)
    path = check_file(settings, item)
    fmt = item.extra.get("format", "custom")
    when = item.created_at.astimezone(settings.zone).strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        database.check_reachable(settings, "postgres", attempts=2)
    except database.DatabaseError as exc:
        raise JobError(str(exc)) from None
    tools = PgTools(settings)
    target = into or settings.postgres_db
    print(f"using {item.path} ({when}, {human(item.size)}, sha256 ok)")
    if tables:
        if fmt != "custom":
            raise JobError("restoring single tables needs a custom-format dump "
                           "(PGDUMP_FORMAT=custom); this one is plain SQL")
        if not database.database_exists(settings, target):
            raise JobError(f"database {target!r} does not exist; --table restores into an "
                           "existing database (restore the whole database first)")
        _restore_tables(settings, tools, path, tables, target)
        print(f"restored {', '.join(tables)} into {target}")
        return
    if into:
        if database.database_exists(settings, into):
            raise JobError(f"database {into!r} already exists; --into needs a new name")
        _create_db(settings, into, like=None)
        try:
            _restore_whole(tools, path, fmt, into)
        except BaseException:
            _drop_db(settings, into)
            raise
        print(f"restored the dump of {item.target} into the new database {into}")
        return
    exists = database.database_exists(settings, target)
    if exists and confirm is not None:
        summary = _describe_db(settings, target)
        question = (f"This replaces database {target!r} on {settings.postgres_host}:"
                    f"{settings.postgres_port} ({summary}) with the dump from {when}. "
                    "Everything written since then is lost. Continue?")
        if not confirm(question):
            raise JobError("cancelled; nothing was changed")
    scratch = f"{target}__restore_{secrets.token_hex(3)}"
    _create_db(settings, scratch, like=target if exists else None)
    try:
        _restore_whole(tools, path, fmt, scratch)
        _swap(settings, scratch, target, exists)
    except BaseException:
        _drop_db(settings, scratch)
        raise
    print(f"restored database {target} from the dump of {when}")


def _describe_db(settings: Settings, name: str) -> str:
    with database.connect(settings, name) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema NOT IN "
            "('pg_catalog','information_schema')").fetchone()
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    tables = row[0] if row else 0
    return f"{tables} tables, {human(size[0] if size else 0)}"


def _create_db(settings: Settings, name: str, like: str | None) -> None:
    with database.admin(settings) as conn:
        owner = settings.postgres_user
        if like:
            row = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname=%s", (like,)
            ).fetchone()
            owner = row[0] if row else owner
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(
            sql.Identifier(name), sql.Identifier(owner)))


def _drop_db(settings: Settings, name: str) -> None:
    with contextlib.suppress(psycopg.Error, database.DatabaseError), \
            database.admin(settings) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def _swap(settings: Settings, scratch: str, target: str, exists: bool) -> None:
    """Replace `target` by the fully restored `scratch` database."""
    with database.admin(settings) as conn:
        if exists:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(target)))
        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(scratch), sql.Identifier(target)))


def _run_into(proc: Proc, chunks: Iterable[bytes], tool: str, where: str) -> None:
    proc.feed(chunks)
    result = proc.wait(timeout=600)
    if result.exit_code != 0:
        raise JobError(tool_error(tool, result, where))


def _restore_whole(tools: PgTools, path: Path, fmt: str, dbname: str) -> None:
    log.info("restoring", file=str(path), database=dbname, where=tools.where)
    if fmt == "plain":
        proc = tools.start("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dbname],
                           stdin=True)
        _run_into(proc, archive.decompressed(path, "gzip"), "psql", tools.where)
    else:
        proc = tools.start("pg_restore", ["--exit-on-error", "-d", dbname], stdin=True)
        _run_into(proc, archive.decompressed(path, "none"), "pg_restore", tools.where)


def _restore_tables(settings: Settings, tools: PgTools, path: Path, tables: list[str],
                    target: str) -> None:
    """Restore the whole dump into a scratch database, then move just these tables over.

    pg_dump -t brings each table's indexes, constraints, triggers and sequences with it, which
    pg_restore -t alone would leave out. The move is one transaction per restore: on any error
    the target keeps its tables as they were.
    """
    scratch = f"{target}__tables_{secrets.token_hex(3)}"
    _create_db(settings, scratch, like=target)
    try:
        _restore_whole(tools, path, "custom", scratch)
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
    finally:
        _drop_db(settings, scratch)


# verify --------------------------------------------------------------------------------------
def verify(settings: Settings, item: Any) -> str | None:
    """None if the dump is sound, else what is wrong."""
    try:
        path = check_file(settings, item)
    except CatalogError as exc:
        return str(exc)
    fmt = item.extra.get("format", "custom")
    if fmt == "plain":
        try:
            tail = b""
            for chunk in archive.decompressed(path, "gzip"):
                tail = (tail + chunk)[-4096:]
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            return f"{path.name}: gzip stream is damaged ({exc})"
        return None if PLAIN_TRAILER in tail else f"{path.name}: truncated SQL dump"
    try:
        tools = PgTools(settings)
    except Exception as exc:
        return f"cannot run pg_restore to read {path.name}: {exc}"
    proc = tools.start("pg_restore", ["--list"], stdin=True)
    proc.feed(archive.decompressed(path, "none"))
    entries = sum(chunk.count(b"\n") for chunk in proc.stdout())
    result = proc.wait()
    if result.exit_code != 0:
        return tool_error("pg_restore --list", result, tools.where)
    if entries == 0:
        return f"{path.name}: pg_restore --list found no entries"
    return None
