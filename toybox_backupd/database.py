"""Talking to PostgreSQL with psycopg: reachability in plain words, small admin statements.

The only module that imports psycopg.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from . import redact
from .basics import ToyboxError, human
from .settings import Settings


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
    """A connection as POSTGRES_USER; DatabaseError in plain words when it cannot be had."""
    try:
        return psycopg.connect(
            host=settings.postgres_host, port=settings.postgres_port,
            dbname=dbname or settings.postgres_db, user=settings.postgres_user,
            password=settings.postgres_password_value, connect_timeout=timeout,
            autocommit=autocommit, application_name="toybox-backupd",
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


def create(settings: Settings, name: str, like: str | None) -> None:
    """CREATE DATABASE `name` from template0, owned like `like` (else by POSTGRES_USER)."""
    with admin(settings) as conn:
        owner = settings.postgres_user
        if like:
            row = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname=%s", (like,)
            ).fetchone()
            owner = row[0] if row else owner
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(
            sql.Identifier(name), sql.Identifier(owner)))


def drop_quietly(settings: Settings, name: str) -> None:
    """DROP DATABASE IF EXISTS `name` (forcing sessions out); errors are swallowed."""
    with contextlib.suppress(psycopg.Error, DatabaseError), admin(settings) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def replace(settings: Settings, scratch: str, target: str, exists: bool) -> None:
    """Replace database `target` by the fully restored `scratch`."""
    with admin(settings) as conn:
        if exists:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(target)))
        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(scratch), sql.Identifier(target)))
