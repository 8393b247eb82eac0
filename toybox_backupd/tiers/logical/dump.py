"""The logical tier: pg_dump backups, and restores of a whole database or single tables."""

from __future__ import annotations

import difflib
import gzip
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ... import __version__
from ...adapters import database
from ...adapters.pgtools import PgTools, Proc, tool_error
from ...catalog.restore_points import check_file, local_copy, restore_point
from ...core import progress
from ...core.atomic import Batch
from ...core.basics import (
    CatalogError,
    Confirm,
    JobError,
    RunContext,
    Say,
    TierResult,
    ToyboxError,
    Unverifiable,
    human,
    iso,
    local_time,
    silent,
    utcnow,
)
from ...core.compression import compressor, decompressed
from ...core.manifests import TOOL, write_manifest
from ...core.settings import Settings
from ...store import Artifact, Store

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
NO_DATABASE = "POSTGRES_DB is empty: set it to the database to back up and restore"


def backup(ctx: RunContext) -> TierResult:
    """Dump the database (and the cluster's roles) into BACKUP_DIR/logical/<database>/.

    Given a run whose target is the database; returns the dump's size and path; raises JobError
    (or DatabaseError, DiskFullError) with nothing cataloged when any step fails.
    """
    if not ctx.targets:
        raise JobError(NO_DATABASE)
    settings, dbname = ctx.settings, ctx.targets[0]
    with ThreadPoolExecutor(1, "pg-lookup") as pool:
        lookup = pool.submit(PgTools, settings)  # PG_CONTAINER looked up meanwhile
        try:
            server_version = database.check_reachable(settings)
        except database.DatabaseError as exc:
            raise JobError(str(exc)) from None
        tools = lookup.result()
    tools.check_version(server_version)
    ctx.check()
    created = utcnow()
    directory = settings.backup_dir / TIER / dbname
    custom = settings.pgdump_format == "custom"
    stem = _free_stem(directory, f"{dbname}_{local_time(created, settings.zone, 'stamp')}")
    path = directory / (stem + (".dump" if custom else ".sql.gz"))
    ctx.log.info("dumping database", database=dbname, server=server_version, where=tools.where,
                 file=str(path))
    with Batch() as batch, ThreadPoolExecutor(2, "pgdump-side") as pool:
        # the dump, its roles, its manifest and its row, or none of them
        size, digest, roles = _dump_beside(ctx, tools, batch, pool, path, stem, custom)
        globals_info = roles.result()
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


def _dump_beside(ctx: RunContext, tools: PgTools, batch: Batch, pool: ThreadPoolExecutor,
                 path: Path, stem: str, custom: bool) -> tuple[int, str, Future[dict[str, Any]]]:
    """pg_dump into `path`; beside it (each a docker exec and a start-up of its own, ~0.1-0.2
    s): the proof that PG_CONTAINER is the server psycopg checked (pg_dump only reads: a dump
    of another server is dropped before anything is kept), and the roles (`*.globals.sql.gz`).
    Returns the dump's size and sha256, and the roles' future (done)."""
    dbname = ctx.targets[0]
    same = pool.submit(tools.check_same_server, dbname)
    roles = pool.submit(_dump_globals, ctx, tools, batch, path.with_name(f"{stem}.globals.sql.gz"))
    try:
        size, digest = _dump_to(ctx, tools, "pg_dump", ["-Fc" if custom else "-Fp", "-d", dbname],
                                batch, path, gzip_it=not custom,
                                check=_check_custom if custom else _check_plain)
    finally:
        wait([same, roles])  # the roles file is part of `batch`: never undone mid-write
        same.result()  # another server's dump is never kept: this error comes first
    return size, digest, roles


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


def _end(ctx: RunContext, proc: Proc) -> None:
    """On a time limit or abort: end the tool where it runs and its server session (closing our
    stream alone would leave pg_dump holding its snapshot and locks), then our stream."""
    proc.kill()
    database.end_sessions(ctx.settings, [ctx.targets[0], "postgres", "template1"])
    proc.close()


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
        with ctx.on_cancel(lambda: _end(ctx, proc)):
            with compressor(out, "gzip" if gzip_it else "none", 6) as sink:
                for chunk in proc.stdout():
                    ctx.check()
                    if len(head) < 64:
                        head += chunk[:64]
                    tail = (tail + chunk[-4096:])[-4096:]  # not a copy of every chunk
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
DB_ENTRY = re.compile(r"^\d+; \d+ \d+ (DATABASE -|DATABASE PROPERTIES -|COMMENT - DATABASE |"
                      r"ACL - DATABASE )")
TABLE_ENTRY = re.compile(r"^\d+; \d+ \d+ TABLE (\S+) (.+) \S+$")
Hold = Callable[[], AbstractContextManager[object]]


@dataclass
class _Restore:
    """A restore request, resolved and checked before anything is asked or changed."""

    settings: Settings
    item: Artifact
    path: Path
    tools: PgTools
    target: str
    when: str

    @property
    def fmt(self) -> str:
        return str(self.item.extra.get("format", "custom"))

    @property
    def dumped(self) -> str:
        """The database's name when it was dumped."""
        return str(self.item.extra.get("database") or self.item.target)

    def chunks(self) -> Iterator[bytes]:
        return decompressed(self.path, "gzip" if self.fmt == "plain" else "none")


def restore_db(settings: Settings, *, at: datetime | None = None, tables: Iterable[str] = (),
               into: str | None = None, confirm: Confirm = None, say: Say = silent,
               hold: Hold = nullcontext) -> None:
    """Restore the dump nearest before `at`: the whole database, `tables` only, or `into` a new one.

    Everything is checked and asked (`confirm`) before `hold()` (the run lock) is taken; the
    live database is replaced only once the dump was restored completely beside it.
    Raises CatalogError (no such dump) or JobError (nothing changed, or the old state back).
    """
    if not settings.postgres_db:
        raise JobError(NO_DATABASE)
    with Store(settings.state_dir) as store:
        item = restore_point(store, (TIER,), settings.postgres_db, at)
        path = local_copy(settings, store, item, say)
    say(f"using {item.path} ({local_time(item.created_at, settings.zone)}, {human(item.size)}, "
        "sha256 ok)")
    restore_dump(settings, item, path, tables=tables, into=into, confirm=confirm, say=say,
                 hold=hold)


def restore_dump(settings: Settings, item: Artifact, path: Path, *, tables: Iterable[str] = (),
                 into: str | None = None, confirm: Confirm = None, say: Say = silent,
                 hold: Hold = nullcontext) -> None:
    """Restore the custom or plain dump at `path` (described by `item`) as `restore_db` does;
    a point-in-time restore hands in the dump it made from a recovered server."""
    try:
        database.check_reachable(settings, "postgres", attempts=2)
    except database.DatabaseError as exc:
        raise JobError(str(exc)) from None
    tools = PgTools(settings)
    tools.check_same_server("postgres")
    request = _Restore(settings, item, path, tools, into or settings.postgres_db,
                       local_time(item.created_at, settings.zone))
    if tables:
        names = _resolve_tables(request, list(tables))
        shown = ", ".join(n for n, _, _ in names)
        _ask(request, confirm, f"This replaces table(s) {shown} in")
        with hold(), progress.task(f"restoring {item.path}", item.size):
            _restore_tables(request, names)
        say(f"restored {shown} into {request.target}")
    elif into:
        if database.database_exists(settings, into):
            raise JobError(f"database {into!r} already exists; --into needs a new name")
        with hold(), progress.task(f"restoring {item.path}", item.size):
            _restore_beside(request, into)
        say(f"restored the dump of {item.target} into the new database {into}")
    else:
        exists = database.database_exists(settings, request.target)
        if exists:
            _ask(request, confirm, "This replaces database")
        with hold(), progress.task(f"restoring {item.path}", item.size):
            _restore_replacing(request, exists)
        say(f"restored database {request.target} from the dump of {request.when}")


def _ask(request: _Restore, confirm: Confirm, what: str) -> None:
    if confirm is None:
        return
    s = request.settings
    question = (f"{what} {request.target!r} on {s.postgres_host}:{s.postgres_port} "
                f"({database.describe(s, request.target)}) with the dump from {request.when}. "
                "Everything written since then is lost. Continue?")
    if not confirm(question):
        raise JobError("cancelled; nothing was changed")


def _restore_beside(request: _Restore, name: str) -> None:
    """Create database `name` as the dump describes it and restore the dump into it."""
    try:
        _create_as_dumped(request, name)
        _load(request, name)
    except BaseException:
        database.drop_quietly(request.settings, name)
        raise


def _restore_replacing(request: _Restore, exists: bool) -> None:
    scratch = f"{request.target}__restore_{secrets.token_hex(3)}"
    _restore_beside(request, scratch)
    try:
        database.replace(request.settings, scratch, request.target, exists)
    except BaseException:
        database.drop_quietly(request.settings, scratch)
        raise


def _create_as_dumped(request: _Restore, name: str) -> None:
    """CREATE DATABASE `name` with the dump's own encoding, locale, owner, settings, grants and
    comment (what `pg_restore --create` would make), else like the live target."""
    statements = _database_sql(request, name) if request.fmt == "custom" else None
    if statements is None:  # plain dumps carry no database-level entries
        exists = database.database_exists(request.settings, request.target)
        database.create(request.settings, name, like=request.target if exists else None)
        return
    proc = request.tools.start("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres"],
                               stdin=True)
    _run_into(proc, [statements.encode("utf-8", "surrogateescape")], "psql", request.tools.where)


def _database_sql(request: _Restore, name: str) -> str | None:
    """The dump's database-level SQL, for a database called `name` (None if it has none)."""
    listing = request.tools.output("pg_restore", ["-C", "-l"], request.chunks())
    entries = [line for line in listing.splitlines() if DB_ENTRY.match(line)]
    if not any(" DATABASE - " in line for line in entries):
        return None
    listed = ("\n".join(entries) + "\n").encode("utf-8", "surrogateescape")
    with request.tools.temp_file(listed) as list_file:
        text = request.tools.output("pg_restore", ["-C", "-L", list_file, "-f", "-"],
                                    request.chunks())
    old = "|".join(re.escape(n) for n in {request.dumped, quote_ident(request.dumped)})
    return re.sub(rf"(DATABASE |\\connect )({old})(?=[\s;]|$)",
                  lambda m: m.group(1) + quote_ident(name), text, flags=re.M)


def quote_ident(name: str) -> str:
    """`name` as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _run_into(proc: Proc, chunks: Iterable[bytes], tool: str, where: str,
              partial_ok: bool = False) -> None:
    proc.feed(chunks, partial_ok=partial_ok)
    result = proc.wait(timeout=600)
    if result.exit_code != 0:
        raise JobError(tool_error(tool, result, where))


def _load(request: _Restore, dbname: str, toc: bytes | None = None) -> None:
    """The dump into `dbname`: all of it, or the entries of `toc` (a pg_restore -L list)."""
    tools = request.tools
    if request.fmt == "plain":
        proc = tools.start("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dbname],
                           stdin=True)
        _run_into(proc, request.chunks(), "psql", tools.where)
        return
    with tools.temp_file(toc) if toc is not None else nullcontext(None) as listed:
        listing = ["-L", listed] if listed else []
        proc = tools.start("pg_restore", ["--exit-on-error", *listing, "-d", dbname],
                           stdin=True)
        # with a list, pg_restore rightly stops reading after the last entry it restores
        _run_into(proc, request.chunks(), "pg_restore", tools.where, partial_ok=bool(listed))


Table = tuple[str, str, tuple[str, str]]  # schema.table, its exact pg_dump -t pattern, (schema, table)


def _resolve_tables(request: _Restore, wanted: list[str]) -> list[Table]:
    """[(schema.table, exact pg_dump -t pattern, (schema, table))] for the names asked for.

    A name is a table of the dump, exactly: `orders` (in whichever schema has it, if only one
    does) or `schema.orders`. Raises JobError naming the close names for one that is not.
    """
    if request.fmt != "custom":
        raise JobError("restoring single tables needs a custom-format dump "
                       "(PGDUMP_FORMAT=custom); this one is plain SQL")
    if not database.database_exists(request.settings, request.target):
        raise JobError(f"database {request.target!r} does not exist; --table restores into an "
                       "existing database (restore the whole database first)")
    listing = request.tools.output("pg_restore", ["-l"], request.chunks())
    known = [m.groups() for m in map(TABLE_ENTRY.match, listing.splitlines()) if m]
    return [_match_table(name, known) for name in wanted]


def _match_table(name: str, known: list[tuple[str, str]]) -> Table:
    schema, _, table = name.rpartition(".")
    found = [(s, t) for s, t in known if t == table and (not schema or s == schema)]
    if len(found) == 1:
        s, t = found[0]
        return f"{s}.{t}", f"{quote_ident(s)}.{quote_ident(t)}", (s, t)
    if found:
        raise JobError(f"--table {name}: more than one table has that name; name one of "
                       f"{', '.join(f'{s}.{t}' for s, t in found)}")
    everything = [f"{s}.{t}" for s, t in known] + sorted({t for _, t in known})
    close = difflib.get_close_matches(name, everything, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else (
        f"; it holds {', '.join(everything[:10])}" if known else "; it holds no tables")
    raise JobError(f"--table {name}: no such table in the dump (names are exact, not "
                   f"patterns){hint}")


def _restore_tables(request: _Restore, names: list[Table]) -> None:
    """Restore the dump into a scratch database, then move just these tables over.

    pg_dump -t brings each table's indexes, constraints, triggers and sequences with it, which
    pg_restore -t alone would leave out. The scratch database gets the whole schema but only
    the data these tables need (see `_scratch_toc`). The move is one transaction per restore:
    on any error the target keeps its tables as they were.
    """
    scratch = f"{request.target}__tables_{secrets.token_hex(3)}"
    try:
        database.create(request.settings, scratch, like=request.target)
        _load(request, scratch, _scratch_toc(request, [table for _, _, table in names]))
        _move_tables(request.tools, scratch, [pattern for _, pattern, _ in names],
                     request.target)
    except BaseException:
        # a pg_restore cut off here (time limit, Ctrl-C) must not commit later on its own
        database.end_sessions(request.settings, [request.target])
        raise
    finally:
        database.drop_quietly(request.settings, scratch)


TOC_DATA = re.compile(r"^\d+; \d+ \d+ TABLE DATA ")
TOC_FOREIGN_KEY = re.compile(r"^\d+; \d+ \d+ FK CONSTRAINT ")
NAME = r'(?:"(?:[^"]|"")*"|[^\s(".]+)'  # an identifier as pg_dump writes it, quoted if need be
REFERENCES = re.compile(rf"\bREFERENCES ({NAME}\.{NAME})\(")
IDENTIFIER = re.compile(r'"((?:[^"]|"")*)"|([^".]+)')


def _scratch_toc(request: _Restore, tables: list[tuple[str, str]]) -> bytes | None:
    """The dump's table of contents for a table restore's scratch database: every entry but
    the rows of other tables (those its foreign keys reference excepted) and other tables'
    foreign keys (their referenced rows are not there). None (load it all) when an entry of
    these tables cannot be told apart for sure: slower, never wrong."""
    tools = request.tools
    lines = tools.output("pg_restore", ["-l"], request.chunks()).splitlines()
    ours = [line for line in lines if TOC_FOREIGN_KEY.match(line)
            and any(f" FK CONSTRAINT {s} {t} " in line for s, t in tables)]
    keep = set(tables)
    if ours:
        with tools.temp_file("\n".join(ours).encode("utf-8", "surrogateescape")) as listed:
            sql = tools.output("pg_restore", ["-L", listed, "-f", "-"], request.chunks())
        referenced = REFERENCES.findall(sql)
        if len(referenced) != len(ours):
            return None
        keep |= {_split_name(name) for name in referenced}
    marks = [f" TABLE DATA {s} {t} " for s, t in keep]
    toc = [line for line in lines
           if not (TOC_DATA.match(line) and not any(mark in line for mark in marks))
           and not (TOC_FOREIGN_KEY.match(line) and line not in ours)]
    if not all(any(mark in line for line in toc) for mark in marks):
        return None  # e.g. a partitioned table: its rows are in its partitions' entries
    return "\n".join(toc).encode("utf-8", "surrogateescape") + b"\n"


def _split_name(qualified: str) -> tuple[str, str]:
    """(schema, table) of pg_dump's `schema.table`, each part quoted only where it must be."""
    schema, table = (quoted.replace('""', '"') if quoted else plain
                     for quoted, plain in IDENTIFIER.findall(qualified))
    return schema, table


def _move_tables(tools: PgTools, scratch: str, patterns: list[str], target: str) -> None:
    args = ["-Fc", "--strict-names", "-d", scratch]
    for pattern in patterns:
        args += ["-t", pattern]
    dump = tools.start("pg_dump", args)
    load = tools.start("pg_restore", ["--clean", "--if-exists", "--single-transaction",
                                      "--exit-on-error", "-d", target], stdin=True)
    load.feed(dump.stdout())
    loaded = load.wait(timeout=600)
    dumped = dump.wait()
    if dumped.exit_code != 0:
        raise JobError(tool_error("pg_dump", dumped, tools.where).replace(scratch, "the dump"))
    if loaded.exit_code != 0:
        text = tool_error("pg_restore", loaded, tools.where) + "; the target database was left as it was"
        if "other objects depend on it" in loaded.stderr:
            text += (". Views or other tables' foreign keys depend on the table; PostgreSQL's "
                     "hint, DROP ... CASCADE, would drop them too. Restore with --into a new "
                     "database and copy the rows from there instead (docs/runbooks.md, runbook 3)")
        raise JobError(text)


# verify --------------------------------------------------------------------------------------
def verify(settings: Settings, item: Artifact) -> str | None:
    """Re-read one dump to its end: None if it is sound, else what is wrong.

    Raises Unverifiable when the tools to read it cannot run now (database container stopped,
    Docker unreachable): that is no verdict on the dump.
    """
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
        # -f /dev/null makes pg_restore read every entry and all data (--list reads only the
        # table of contents at the start)
        proc = tools.start("pg_restore", ["-f", "/dev/null"], stdin=True)
    except ToyboxError as exc:
        raise Unverifiable(f"cannot run pg_restore to read {path.name} now: {exc}") from None
    proc.feed(decompressed(path, "none"))
    try:
        result = proc.wait(timeout=3600)
    except ToyboxError as exc:  # it stopped reading before the end: damaged where it stopped
        return str(exc)
    if result.exit_code != 0:
        return tool_error("pg_restore", result, tools.where)
    return None
