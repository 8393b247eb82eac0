"""Restoring a database can never destroy it (issue 12, items 2-5 and 8), against a real
PostgreSQL 15 container and the real CLI."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
import pytest
from conftest import PG, Env

from toybox_backupd.adapters import database
from toybox_backupd.core import locks
from toybox_backupd.store import Store


def backup(env: Env) -> None:
    result = env.cli("backup", "logical")
    assert result.returncode == 0, result.stderr


@pytest.mark.sql_ascii_too
def test_a_failed_swap_leaves_the_live_database_under_its_name(env: Env, pg: PG) -> None:
    """The old code dropped the target first: a failing rename then lost both databases."""
    settings = env.settings()
    seed = pg.snapshot()
    pg.psql("CREATE DATABASE toybox_scratch TEMPLATE template0", db="postgres")
    # a session on the scratch database makes its rename fail
    with (psycopg.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password,
                          dbname="toybox_scratch", autocommit=True),
          pytest.raises(database.DatabaseError, match="cannot rename database")):
        database.replace(settings, "toybox_scratch", "toybox", exists=True)
    assert pg.snapshot() == seed  # the live database is back under its own name, untouched
    names = pg.psql("SELECT datname FROM pg_database ORDER BY 1", db="postgres").split()
    assert "toybox" in names and "toybox_scratch" in names
    assert not [n for n in names if n.startswith("toybox__old_")]
    assert pg.psql("SELECT datallowconn FROM pg_database WHERE datname='toybox'",
                   db="postgres") == "t"
    # and when nothing is in the way, the scratch database takes the name, the old one goes
    database.replace(settings, "toybox_scratch", "toybox", exists=True)
    names = pg.psql("SELECT datname FROM pg_database ORDER BY 1", db="postgres").split()
    assert "toybox_scratch" not in names and not [n for n in names if "__old_" in n]
    assert pg.psql("SELECT count(*) FROM pg_tables WHERE schemaname='public'") == "0"


@pytest.mark.sql_ascii_too
def test_restore_db_keeps_the_database_properties(env: Env, pg: PG) -> None:
    """ALTER DATABASE … SET, database grants, the comment, encoding and collation come back
    as they were dumped (the old code made a bare database from template0)."""
    # the database under test: C collation and LATIN1, unlike the cluster's C.UTF-8/UTF8
    pg.psql("DROP DATABASE toybox WITH (FORCE)", db="postgres")
    pg.psql("CREATE DATABASE toybox TEMPLATE template0 ENCODING 'LATIN1' LOCALE 'C'",
            db="postgres")
    pg.psql("CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'x')")
    pg.psql("CREATE ROLE reader; ALTER DATABASE toybox SET work_mem TO '8MB';"
            " GRANT CONNECT ON DATABASE toybox TO reader;"
            " REVOKE TEMPORARY ON DATABASE toybox FROM PUBLIC;"
            " COMMENT ON DATABASE toybox IS 'the toy box''s\nsecond line'", db="postgres")
    properties = _properties(pg)
    backup(env)
    pg.psql("ALTER DATABASE toybox RESET work_mem; REVOKE CONNECT ON DATABASE toybox FROM reader;"
            " GRANT TEMPORARY ON DATABASE toybox TO PUBLIC;"
            " COMMENT ON DATABASE toybox IS 'changed'", db="postgres")
    assert _properties(pg) != properties
    result = env.cli("restore", "db", "--yes")
    assert result.returncode == 0, result.stderr
    assert _properties(pg) == properties
    assert pg.rows("notes") == ["(1,x)"]
    # --into makes the new database as it was dumped too
    assert env.cli("restore", "db", "--into", "toybox_copy").returncode == 0
    assert _properties(pg, "toybox_copy")[1:] == properties[1:]  # all but the name's own ACL


def _properties(pg: PG, name: str = "toybox") -> tuple[str, ...]:
    query = ("SELECT pg_encoding_to_char(d.encoding), d.datcollate, d.datctype,"
             " coalesce(array_to_string(array(SELECT unnest(s.setconfig) ORDER BY 1), ','), ''),"
             " shobj_description(d.oid, 'pg_database'), pg_get_userbyid(d.datdba)"
             " FROM pg_database d LEFT JOIN pg_db_role_setting s"
             " ON s.setdatabase = d.oid AND s.setrole = 0 WHERE d.datname = '%s'")
    acl = pg.psql(f"SELECT array_to_string(array(SELECT unnest(datacl)::text ORDER BY 1), ' ')"
                  f" FROM pg_database WHERE datname = '{name}'", db="postgres")
    acl = acl.replace(name, "<db>")
    return (acl, *pg.psql(query % name, db="postgres").split("|"))


@pytest.mark.sql_ascii_too
def test_table_restore_takes_exact_names_and_asks(env: Env, pg: PG) -> None:
    seed = pg.snapshot()
    pg.psql("CREATE SCHEMA audit; CREATE TABLE audit.orders (id int)")
    backup(env)
    pg.psql("DELETE FROM orders; DELETE FROM media_items")
    # a pattern is not a table: '*' used to replace every table
    star = env.cli("restore", "db", "--table", "*", "--yes")
    assert star.returncode == 1 and "no such table in the dump" in star.stderr, star.stderr
    typo = env.cli("restore", "db", "--table", "ordrs", "--yes")
    assert typo.returncode == 1 and "did you mean" in typo.stderr and "orders" in typo.stderr
    two = env.cli("restore", "db", "--table", "orders", "--yes")
    assert two.returncode == 1 and "more than one table has that name" in two.stderr
    assert "public.orders" in two.stderr and "audit.orders" in two.stderr
    # it asks like a whole restore: no terminal and no --yes → refused, nothing changed
    asked = env.cli("restore", "db", "--table", "public.orders")
    assert asked.returncode == 1 and "refusing without --yes" in asked.stderr
    assert "replaces table(s) public.orders" in asked.stderr
    assert pg.rows("orders") == [] and pg.rows("media_items") == []
    done = env.cli("restore", "db", "--table", "public.orders", "--yes")
    assert done.returncode == 0, done.stderr
    assert pg.rows("orders") == seed["orders"] and pg.rows("media_items") == []


def test_the_prompt_does_not_hold_the_run_lock(env: Env, pg: PG) -> None:
    backup(env)
    proc, master = _on_a_terminal(env, "restore", "db")
    try:
        screen = _read_until(master, b"Continue? [y/N]", 60)
        assert b"replaces database 'toybox'" in screen
        # while the question waits, the lock is free: a backup runs now, not after the answer
        assert locks.holder(env.state_dir) == ""
        assert env.cli("backup", "logical", timeout=120).returncode == 0
        os.write(master, b"n\n")
        assert proc.wait(30) == 1
        assert b"cancelled; nothing was changed" in _read_until(master, b"nothing was changed", 10)
    finally:
        proc.kill()
        os.close(master)


def _on_a_terminal(env: Env, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    master, slave = pty.openpty()
    environ = {**os.environ, **env.values}
    proc = subprocess.Popen(
        [sys.executable, "-m", "toybox_backupd.cli", "--env-file", str(env.tmp / "none.env"),
         *args], stdin=slave, stdout=slave, stderr=slave, env=environ, cwd=str(env.tmp))
    os.close(slave)
    return proc, master


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    assert marker in seen, seen.decode(errors="replace")
    return seen


def test_a_backup_waiting_for_a_restore_says_who_holds_the_lock(env: Env, pg: PG) -> None:
    holding = threading.Event()
    release = threading.Event()

    def restore_in_progress() -> None:
        with locks.run_lock(env.state_dir, "restore volume media"):
            holding.set()
            release.wait(60)

    thread = threading.Thread(target=restore_in_progress)
    thread.start()
    try:
        assert holding.wait(10)
        proc = subprocess.Popen(
            [sys.executable, "-m", "toybox_backupd.cli", "--env-file", str(env.tmp / "none.env"),
             "backup", "logical"], env={**os.environ, **env.values}, cwd=str(env.tmp),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        release.set()
        _, err = proc.communicate(timeout=120)
    finally:
        release.set()
        thread.join()
    assert proc.returncode == 0, err
    assert "waiting for the current run" in err and "restore volume media (pid " in err, err


def test_a_restore_has_a_time_limit_and_leaves_the_table_as_it_was(env: Env, pg: PG) -> None:
    """A table restore that cannot get its lock is stopped at RESTORE_TIME_LIMIT_MIN; its
    pg_restore does not go on to commit later."""
    seed = pg.snapshot()
    backup(env)
    pg.psql("DELETE FROM media_items WHERE id > 10")
    after = pg.rows("media_items")
    with psycopg.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password,
                         dbname=pg.db) as blocker:
        blocker.execute("LOCK TABLE media_items IN ACCESS SHARE MODE")  # DROP TABLE waits
        started = time.monotonic()
        result = env.cli("restore", "db", "--table", "media_items", "--yes",
                         RESTORE_TIME_LIMIT_MIN="1", timeout=300)
        waited = time.monotonic() - started
        blocker.rollback()
    assert result.returncode == 1, result.stdout
    assert "reached its time limit of 1 min (RESTORE_TIME_LIMIT_MIN)" in result.stderr
    assert waited >= 60
    time.sleep(3)  # a pg_restore left running would now get its lock and commit
    assert pg.rows("media_items") == after != seed["media_items"]
    assert "toybox-backupd" not in pg.psql("SELECT string_agg(application_name, ',')"
                                           " FROM pg_stat_activity", db="postgres")


def test_verify_tells_could_not_check_from_corrupt(env: Env, pg: PG) -> None:
    backup(env)
    pg.container.stop(timeout=30)
    try:
        result = env.cli("verify")
    finally:
        pg.container.start()
        pg.wait_ready()
    assert result.returncode == 1
    assert "UNCHECKED" in result.stdout and "CORRUPT" not in result.stdout, result.stdout
    assert "could not be checked now" in result.stdout
    with Store(env.state_dir) as store:
        [item] = store.artifacts(tier="logical")  # still ok: restore db still finds it
        assert item.status == "ok"
    assert env.cli("verify").returncode == 0


def test_verify_reads_the_whole_dump(env: Env, pg: PG) -> None:
    """A dump cut after its table of contents passed `pg_restore --list`; the data is read now."""
    pg.psql("INSERT INTO media_items(path, bytes) SELECT 'x' || i, i"
            " FROM generate_series(1, 200000) i")
    backup(env)
    with Store(env.state_dir) as store:
        [item] = store.artifacts(tier="logical")
        path = env.backup_dir / item.path
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # as if the dump had been written cut short
        _recatalog(store, item.id, path)
    result = env.cli("verify")
    assert result.returncode == 1 and "CORRUPT" in result.stdout, result.stdout
    with Store(env.state_dir) as store:
        assert store.artifact(item.id).status == "corrupt"  # type: ignore[union-attr]


def _recatalog(store: Store, artifact_id: int, path: Any) -> None:
    from toybox_backupd.core.atomic import sha256_of

    with store.tx() as db:
        db.execute("UPDATE artifacts SET sha256=?, size=? WHERE id=?",
                   (sha256_of(path), path.stat().st_size, artifact_id))


def test_verify_names_files_the_catalog_does_not_know(env: Env, pg: PG) -> None:
    backup(env)
    stray = env.backup_dir / "logical" / "toybox" / "toybox_20260101-000000.dump"
    stray.write_bytes(b"PGDMP put here by hand")
    result = env.cli("verify")
    assert result.returncode == 0, result.stdout  # the kept dump is fine
    assert "1 file(s) in BACKUP_DIR that the catalog does not know" in result.stdout
    assert "logical/toybox/toybox_20260101-000000.dump" in result.stdout


def test_a_volume_restore_also_asks_before_it_takes_the_lock(
        env: Env, pg: PG, make_volume: Any) -> None:
    volume = make_volume("echo kept > a.txt")
    assert env.cli("backup", "full", BACKUP_VOLUMES=volume).returncode == 0
    env.values["BACKUP_VOLUMES"] = volume
    proc, master = _on_a_terminal(env, "restore", "volume", volume)
    try:
        assert b"replaces everything in volume" in _read_until(master, b"Continue? [y/N]", 60)
        assert locks.holder(env.state_dir) == ""  # nobody holds the run lock meanwhile
        assert env.cli("backup", "logical", timeout=120).returncode == 0
        os.write(master, b"n\n")
        assert proc.wait(30) == 1
    finally:
        proc.kill()
        os.close(master)
