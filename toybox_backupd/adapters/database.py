"""Talking to PostgreSQL with psycopg: reachability in plain words, small admin statements.

The only module that imports psycopg.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..core import redact
from ..core.basics import ToyboxError, human
from ..core.settings import Settings

APPLICATION_NAME = "toybox-backupd"  # our sessions, and our tools' (PGAPPNAME), are named so


class DatabaseError(ToyboxError):
    """The database cannot be used, in words an operator can act on."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


def explain(exc: BaseException, settings: Settings, dbname: str | None = None) -> DatabaseError:
    """Turn a psycopg error into a sentence that says what is wrong."""
    text = str(exc)
    where = f"{settings.postgres_host}:{settings.postgres_port}"
    db = dbname or settings.postgres_db
    lowered = text.lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return DatabaseError(
            f"PostgreSQL at {where} refused the password for user {settings.postgres_user!r} "
            "(check POSTGRES_USER and POSTGRES_PASSWORD)")
    if re.search(r'database ".*" does not exist', text):
        return DatabaseError(f"database {db!r} does not exist on {where} (check POSTGRES_DB)")
    if re.search(r'role ".*" does not exist', text):
        return DatabaseError(f"user {settings.postgres_user!r} does not exist on {where} "
                             "(check POSTGRES_USER)")
    if "could not translate host name" in lowered or "name or service not known" in lowered:
        return DatabaseError(f"host {settings.postgres_host!r} is unknown (check POSTGRES_HOST "
                             "and that the sidecar is on the database's network)", retryable=True)
    if "connection refused" in lowered:
        return DatabaseError(f"PostgreSQL at {where} refused the connection: the server is down "
                             "or not listening there", retryable=True)
    if "timeout" in lowered or "timed out" in lowered:
        return DatabaseError(f"PostgreSQL at {where} did not answer in time (host unreachable "
                             "or firewalled)", retryable=True)
    if "the database system is starting up" in lowered or "shutting down" in lowered:
        return DatabaseError(f"PostgreSQL at {where} is starting up or shutting down",
                             retryable=True)
    if "no pg_hba.conf entry" in lowered:
        return DatabaseError(f"PostgreSQL at {where} does not allow this client (pg_hba.conf)")
    first = redact.redact(text.strip().splitlines()[0] if text.strip() else repr(exc))
    return DatabaseError(f"cannot connect to PostgreSQL at {where}: {first}", retryable=True)


def connect(settings: Settings, dbname: str | None = None, timeout: int = 5,
            autocommit: bool = True) -> psycopg.Connection:
    """A connection as POSTGRES_USER; DatabaseError in plain words when it cannot be had.

    The client encoding is always UTF8, whatever the server's: the server converts from its
    own encoding, and a SQL_ASCII one passes its bytes through (psycopg would otherwise hand
    back every name and text of a SQL_ASCII database as bytes).
    """
    try:
        return psycopg.connect(
            host=settings.postgres_host, port=settings.postgres_port,
            dbname=dbname or settings.postgres_db, user=settings.postgres_user,
            password=settings.postgres_password_value, connect_timeout=timeout,
            autocommit=autocommit, application_name=APPLICATION_NAME, client_encoding="UTF8",
        )
    except psycopg.Error as exc:
        raise explain(exc, settings, dbname) from None


def check_reachable(settings: Settings, dbname: str | None = None, attempts: int = 4,
                    timeout: int = 5) -> str:
    """Connect (retrying with backoff on transient errors); return the server version."""
    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=1, min=1, max=8),
        retry=retry_if_exception(lambda e: isinstance(e, DatabaseError) and e.retryable),
        reraise=True,
    )
    for attempt in retrying:
        with attempt, connect(settings, dbname, timeout) as conn:
            return str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    raise AssertionError("unreachable")


# Which server answers: its system identifier (made by initdb, so a clone of the data directory
# shares it) and the moment its postmaster started (which a clone's does not)
SERVER_IDENTITY = (
    "SELECT 'system ' || system_identifier || ', started ' || to_char(pg_postmaster_start_time()"
    " AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || ' UTC' FROM pg_control_system()")


def server_identity(settings: Settings, dbname: str | None = None) -> str:
    """The identity (SERVER_IDENTITY) of the server at POSTGRES_HOST:POSTGRES_PORT."""
    with connect(settings, dbname) as conn:
        row = conn.execute(SERVER_IDENTITY).fetchone()
    return str(row[0]) if row else ""


def server_major(version: str) -> int:
    """The major version in `SHOW server_version` ("15.18 (Debian…)" → 15)."""
    return int(re.match(r"(\d+)", version).group(1))  # type: ignore[union-attr]


@contextmanager
def admin(settings: Settings) -> Iterator[psycopg.Connection]:
    """A connection to the maintenance database `postgres`."""
    conn = connect(settings, "postgres")
    try:
        yield conn
    finally:
        conn.close()


def database_exists(settings: Settings, name: str) -> bool:
    """Whether database `name` exists on the server."""
    with admin(settings) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (name,)).fetchone()
        return row is not None


def describe(settings: Settings, name: str) -> str:
    """"12 tables, 45.1 MiB": what a restore is about to replace."""
    with connect(settings, name) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema NOT IN "
            "('pg_catalog','information_schema')").fetchone()
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    tables = row[0] if row else 0
    return f"{tables} tables, {human(size[0] if size else 0)}"


# The owner is copied on the server: its name never passes through here, so it may be in any
# bytes (a SQL_ASCII cluster holds whatever its clients wrote).
_OWN_LIKE = """DO $$DECLARE owner name; BEGIN
  SELECT pg_get_userbyid(datdba) INTO owner FROM pg_database
   WHERE datname = current_setting('toybox_backupd.like');
  IF owner IS NOT NULL THEN
    EXECUTE format('ALTER DATABASE %I OWNER TO %I', current_setting('toybox_backupd.name'), owner);
  END IF;
END$$"""


def create(settings: Settings, name: str, like: str | None) -> None:
    """CREATE DATABASE `name` from template0, owned like `like` (else by POSTGRES_USER).

    Raises DatabaseError in plain words (nothing left behind) when it cannot be made.
    """
    with admin(settings) as conn:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
                sql.Identifier(name)))
        except psycopg.Error as exc:
            raise DatabaseError(
                f"cannot create a database on {settings.postgres_host}:{settings.postgres_port} "
                f"as {settings.postgres_user!r} ({_first_line(exc)}); a restore needs a user "
                "with CREATEDB (or a superuser)") from None
        if like is None:
            return
        try:
            conn.execute("SELECT set_config('toybox_backupd.name', %s, false),"
                         " set_config('toybox_backupd.like', %s, false)", (name, like))
            conn.execute(_OWN_LIKE)
        except psycopg.Error as exc:
            drop_quietly(settings, name)
            raise DatabaseError(
                f"cannot give database {name!r} the owner of {like!r} as "
                f"{settings.postgres_user!r} ({_first_line(exc)}); a restore needs a superuser "
                f"or a member of the owner's role") from None


def try_restore(settings: Settings) -> str:
    """Do what a restore does to databases, on a scratch one: create it like POSTGRES_DB, rename
    it, drop it. Returns what was tried; raises DatabaseError saying what a restore would hit."""
    target, where = settings.postgres_db, f"{settings.postgres_host}:{settings.postgres_port}"
    scratch = f"{target}__check_{secrets.token_hex(3)}"
    with admin(settings) as conn:
        encoding = str(conn.execute("SHOW server_encoding").fetchone()[0])  # type: ignore[index]
    exists = database_exists(settings, target)
    create(settings, scratch, like=target if exists else None)
    try:
        with admin(settings) as conn:
            _rename(conn, scratch, scratch + "_")
            scratch += "_"
            conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(scratch)))
    except psycopg.Error as exc:
        raise DatabaseError(f"a restore could not replace database {target!r} on {where} as "
                            f"{settings.postgres_user!r}: {_first_line(exc)}") from None
    finally:
        drop_quietly(settings, scratch)
    like = f"like {target!r}" if exists else f"({target!r} does not exist yet)"
    return (f"{settings.postgres_user!r} can create, rename and drop a database {like} on "
            f"{where} (server encoding {encoding})")


def drop_quietly(settings: Settings, name: str) -> None:
    """DROP DATABASE IF EXISTS `name` (forcing sessions out); errors are swallowed."""
    with contextlib.suppress(psycopg.Error, DatabaseError), admin(settings) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def replace(settings: Settings, scratch: str, target: str, exists: bool) -> None:
    """Put the fully restored database `scratch` in the place of `target`, atomically enough.

    The live database is renamed aside (its sessions ended, new ones refused), the scratch one
    renamed in, and only then the old one dropped. Any failure before the scratch database took
    the name puts the old one back: one of the two always holds the original name.
    Raises DatabaseError (the old database back in place) when the swap cannot be made.
    """
    with admin(settings) as conn:
        if not exists:
            _rename(conn, scratch, target)
            return
        aside = f"{target}__old_{secrets.token_hex(3)}"
        _close(conn, target)
        _rename(conn, target, aside)
        try:
            _rename(conn, scratch, target)
        except BaseException:
            _rename(conn, aside, target)
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(
                sql.Identifier(target)))
            raise
        try:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(aside)))
        except psycopg.Error as exc:  # the restore stands; the old copy is only in the way
            raise DatabaseError(
                f"database {target!r} was restored, but its previous contents could not be "
                f"dropped and are still there as {aside!r} ({_first_line(exc)}); drop it by "
                "hand once you no longer need it") from None


def _close(conn: psycopg.Connection, name: str) -> None:
    """Refuse new sessions to `name` and end the current ones (a rename needs it alone)."""
    conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
        sql.Identifier(name)))
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                 " WHERE datname = %s AND pid <> pg_backend_pid()", (name,))


def _rename(conn: psycopg.Connection, old: str, new: str) -> None:
    for attempt in range(5):  # a session that was ending may still be counted for a moment
        try:
            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                sql.Identifier(old), sql.Identifier(new)))
            return
        except psycopg.errors.ObjectInUse as exc:
            if attempt == 4:
                raise DatabaseError(f"cannot rename database {old!r} to {new!r}: "
                                    f"{_first_line(exc)}") from None
            time.sleep(0.5)


def _first_line(exc: BaseException) -> str:
    return redact.redact(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))


def end_sessions(settings: Settings, databases: list[str]) -> int:
    """End this tool's own sessions (application_name toybox-backupd) in `databases`.

    Used when a restore is cut off: a pg_restore that goes on alone must not finish later.
    Returns how many were ended; never raises.
    """
    try:
        with admin(settings) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name"
                " = %s AND datname = ANY(%s) AND pid <> pg_backend_pid()",
                (APPLICATION_NAME, databases)).fetchall()
        return len(rows)
    except (psycopg.Error, DatabaseError):
        return 0


# point in time: the replication slot of the WAL streamer -------------------------------------
def server_port(settings: Settings) -> int:
    """The port the server listens on inside its own container (`SHOW port`)."""
    with admin(settings) as conn:
        row = conn.execute("SHOW port").fetchone()
    return int(row[0]) if row else 5432


def server_version(settings: Settings) -> str:
    """`SHOW server_version` ("15.18 (Debian 15.18-0+deb12u1)")."""
    with admin(settings) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else ""


def server_timeline(settings: Settings) -> int:
    """The timeline the server writes its WAL on now (2 and up after a restore to a moment)."""
    with admin(settings) as conn:
        row = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
    return int(str(row[0])[:8], 16) if row else 1


def system_identifier(settings: Settings) -> str:
    """The database cluster's system identifier (pg_control_system()): initdb draws a new one
    for every cluster, so a cluster replaced under the same container (a major-version upgrade
    by dump and restore, a volume initialised again) has another."""
    with admin(settings) as conn:
        row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    return str(row[0]) if row else ""


def timeline_history(settings: Settings, name: str) -> bytes | None:
    """The server's timeline history file `name` (`00000002.history`) from its pg_wal; None when
    it has none, or POSTGRES_USER may not read it (a superuser may)."""
    try:
        with admin(settings) as conn:
            row = conn.execute("SELECT pg_read_binary_file('pg_wal/' || %s, 0, 1048576, true)",
                               (name,)).fetchone()
    except psycopg.Error:
        return None
    return bytes(row[0]) if row and row[0] is not None else None


def ensure_slot(settings: Settings, slot: str) -> bool:
    """Create the physical replication slot `slot` (WAL reserved at once) unless it exists.

    True if it was created now (the WAL before this moment is not held for us).
    """
    with admin(settings) as conn:
        if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,)).fetchone():
            return False
        conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
        return True


SLOT_HELD = ("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) FROM "
             "pg_replication_slots WHERE slot_name = %s")


def slot_retained(settings: Settings, slot: str) -> int | None:
    """Bytes of WAL the server keeps for `slot` (None: no such slot)."""
    with admin(settings) as conn:
        row = conn.execute(SLOT_HELD, (slot,)).fetchone()
    return None if row is None else int(row[0] or 0)


class SlotGauge:
    """slot_retained over one kept connection (measured every second: no new session each
    time); the connection is opened again after an error."""

    def __init__(self, settings: Settings, slot: str):
        self.settings = settings
        self.slot = slot
        self.conn: psycopg.Connection | None = None

    def held(self) -> int | None:
        """Bytes of WAL the slot holds (None: no such slot); DatabaseError when the server
        cannot be asked."""
        try:
            if self.conn is None or self.conn.closed:
                self.conn = connect(self.settings, "postgres")
            row = self.conn.execute(SLOT_HELD, (self.slot,)).fetchone()
        except psycopg.Error as exc:
            self.close()
            raise DatabaseError(f"could not measure the replication slot {self.slot}: "
                                f"{type(exc).__name__}") from None
        return None if row is None else int(row[0] or 0)

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = None


def drop_slot(settings: Settings, slot: str) -> None:
    """End the session using `slot` (if any) and drop it, so the server frees its WAL."""
    try:
        _drop_slot(settings, slot)
    except psycopg.Error as exc:
        raise DatabaseError(f"could not drop the replication slot {slot}: "
                            f"{redact.redact(str(exc)).strip()}") from None


def _drop_slot(settings: Settings, slot: str) -> None:
    with admin(settings) as conn:
        conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE "
                     "slot_name = %s AND active_pid IS NOT NULL", (slot,))
        for _ in range(100):  # else the next watch tries again
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                               (slot,)).fetchone()
            if row is None:
                return
            if not row[0]:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return
            time.sleep(0.1)
        raise DatabaseError(f"replication slot {slot} is still in use; it was not dropped")


def mark_and_flush(settings: Settings, application: str, wait: float = 10.0) -> bool:
    """Commit a transaction now (a WAL commit record stamped with this moment), then wait up to
    `wait` s until the WAL receiver `application` has flushed it. True if it has; False at
    once when no such receiver is connected (nothing streams: waiting would change nothing)."""
    with admin(settings) as conn:
        streaming = conn.execute("SELECT count(*) FROM pg_stat_replication WHERE "
                                 "application_name = %s", (application,)).fetchone()
        if not streaming or not streaming[0]:
            return False
        row = conn.execute("SELECT txid_current(), pg_current_wal_insert_lsn()").fetchone()
        if row is None:
            return False
        lsn = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]  # type: ignore[index]
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            done = conn.execute(
                "SELECT bool_or(flush_lsn >= %s::pg_lsn) FROM pg_stat_replication "
                "WHERE application_name = %s", (str(lsn), application)).fetchone()
            if done and done[0]:
                return True
            time.sleep(0.1)
    return False
