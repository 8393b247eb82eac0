"""The logical tier against a real PostgreSQL container (issue 3)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PG, SEED_TABLES, Env

from toybox_backupd.core import atomic, manifests
from toybox_backupd.store import Store


def artifacts(env: Env, tier: str = "logical") -> list[Any]:
    with Store(env.state_dir) as history:
        return history.artifacts(tier=tier)


def last_run(env: Env) -> Any:
    with Store(env.state_dir) as history:
        return history.runs(limit=1)[0]


def partials(env: Env) -> list[Path]:
    return list(env.backup_dir.rglob("*.partial")) if env.backup_dir.exists() else []


def backup(env: Env, **overrides: str) -> subprocess.CompletedProcess[str]:
    return env.cli("backup", "pgdump", **overrides)


@pytest.mark.sql_ascii_too
def test_dump_is_readable_by_pg_restore_and_checksummed(env: Env, pg: PG) -> None:
    result = backup(env)
    assert result.returncode == 0, result.stderr
    [item] = artifacts(env)
    path = env.backup_dir / item.path
    assert path.name.endswith(".dump") and path.stat().st_size == item.size
    # checksum: file == catalog == manifest
    manifest = json.loads(manifests.manifest_path(path).read_text())
    assert atomic.sha256_of(path) == item.sha256 == manifest["sha256"]
    assert manifest["tier"] == "logical" and manifest["target"] == "toybox"
    assert re.fullmatch(r"15\.\d+ .*", manifest["extra"]["server_version"])  # not "b'15.18 …'"
    # pg_restore --list reads it (inside the server's container: same major version)
    from toybox_backupd.adapters import docker_api

    docker_api.put_file(pg.container, "/tmp/check.dump", path.read_bytes(), mode=0o644)
    listing = pg.container.exec_run(["pg_restore", "--list", "/tmp/check.dump"])
    assert listing.exit_code == 0, listing.output
    text = listing.output.decode()
    for table in SEED_TABLES:
        assert f"TABLE DATA public {table}" in text
    # globals beside it
    globals_path = env.backup_dir / item.extra["globals"]["path"]
    assert globals_path.exists()
    assert b"CREATE ROLE toybox" in subprocess.run(["zcat", str(globals_path)],
                                                   capture_output=True).stdout
    run = last_run(env)
    assert run.status == "ok" and run.bytes and run.artifact == item.path
    listed = json.loads(env.cli("list", "--json").stdout)
    assert [entry["sha256"] for entry in listed] == [item.sha256]
    verify = env.cli("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "1 of 1 artifacts verified" in verify.stdout


@pytest.mark.sql_ascii_too
def test_scenario_1_whole_database_back(env: Env, pg: PG) -> None:
    seed = pg.snapshot()
    assert backup(env).returncode == 0
    pg.psql("DROP DATABASE toybox", db="postgres")
    refused = env.cli("restore", "db")  # no --yes and no terminal: ask → refuse, but db is gone
    # the db does not exist, so nothing would be replaced: it restores without asking
    assert refused.returncode == 0, refused.stderr
    assert pg.snapshot() == seed
    # destructive restore over an existing database asks first; without a terminal: refuses
    pg.psql("INSERT INTO users(name, created) VALUES ('after-dump', '2026-11-30')")
    asked = env.cli("restore", "db")
    assert asked.returncode != 0 and "refusing without --yes" in asked.stderr
    assert "replaces database 'toybox'" in asked.stderr
    assert len(pg.rows("users")) == len(seed["users"]) + 1  # untouched
    done = env.cli("restore", "db", "--yes")
    assert done.returncode == 0, done.stderr
    assert pg.snapshot() == seed


@pytest.mark.sql_ascii_too
def test_scenario_3_single_tables_back_others_untouched(env: Env, pg: PG) -> None:
    seed = pg.snapshot()
    assert backup(env).returncode == 0
    pg.psql("DELETE FROM orders")
    pg.psql("DROP TABLE media_items")
    pg.psql("INSERT INTO users(name, created) VALUES ('newer-user', '2026-11-30')")
    result = env.cli("restore", "db", "--table", "orders", "--table", "media_items", "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.rows("orders") == seed["orders"]
    assert pg.rows("media_items") == seed["media_items"]
    users = pg.rows("users")
    assert len(users) == len(seed["users"]) + 1 and any("newer-user" in u for u in users)
    # indexes and constraints came back with the table
    indexes = pg.psql("SELECT indexname FROM pg_indexes WHERE tablename='orders' ORDER BY 1")
    assert "orders_user" in indexes and "orders_pkey" in indexes
    # into another database
    into = env.cli("restore", "db", "--into", "toybox_copy")
    assert into.returncode == 0, into.stderr
    assert pg.snapshot("toybox_copy") == seed
    again = env.cli("restore", "db", "--into", "toybox_copy")
    assert again.returncode != 0 and "already exists" in again.stderr
    unknown = env.cli("restore", "db", "--table", "no_such_table", "--yes")
    assert unknown.returncode != 0 and "no_such_table" in unknown.stderr


def test_a_table_restore_loads_only_the_rows_its_tables_need(env: Env, pg: PG) -> None:
    """The scratch database of a table restore gets every table's definition, but the rows only
    of the tables asked for and of those their foreign keys reference (orders -> users), and the
    foreign keys only of the tables asked for: less to load, the same result."""
    from toybox_backupd.adapters.pgtools import PgTools
    from toybox_backupd.tiers.logical import dump as logical

    pg.psql('CREATE SCHEMA "Odd ""Schema"""; CREATE TABLE "Odd ""Schema""".lookup '
            "(id int PRIMARY KEY); INSERT INTO \"Odd \"\"Schema\"\"\".lookup VALUES (1);"
            "ALTER TABLE media_items ADD COLUMN kind int REFERENCES \"Odd \"\"Schema\"\"\".lookup(id)")
    assert backup(env).returncode == 0
    settings = env.settings()
    [item] = artifacts(env)
    request = logical._Restore(settings, item, env.backup_dir / item.path, PgTools(settings),
                               "toybox", "now")
    toc = logical._scratch_toc(request, [("public", "orders")])
    assert toc is not None
    data = {line.split(" TABLE DATA ")[1].rsplit(" ", 1)[0]
            for line in toc.decode().splitlines() if " TABLE DATA " in line}
    assert data == {"public orders", "public users"}
    keys = [line for line in toc.decode().splitlines() if " FK CONSTRAINT " in line]
    assert len(keys) == 1 and " FK CONSTRAINT public orders " in keys[0]
    toc = logical._scratch_toc(request, [("public", "media_items")])
    assert toc is not None and ' TABLE DATA Odd "Schema" lookup ' in toc.decode()
    seed = pg.snapshot()
    pg.psql("DELETE FROM orders")
    pg.psql("DELETE FROM media_items")
    result = env.cli("restore", "db", "--table", "orders", "--table", "media_items", "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.snapshot() == seed


def test_a_table_restore_ends_before_the_dumps_later_rows(env: Env, pg: PG) -> None:
    """pg_restore given a list stops reading once it has what the list names: megabytes of
    another table's rows after the named table's (pg_dump writes them in name order) are never
    read, and that is no error (it was one at the x10 benchmark's scale)."""
    pg.psql("CREATE TABLE zzz_later AS SELECT i, md5(i::text) || md5((i * 7)::text) AS t "
            "FROM generate_series(1, 400000) i")
    assert backup(env).returncode == 0
    seed = pg.rows("orders")
    pg.psql("DELETE FROM orders")
    result = env.cli("restore", "db", "--table", "orders", "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.rows("orders") == seed


@pytest.mark.sql_ascii_too
def test_plain_format_and_local_pg_dump(env: Env, pg: PG) -> None:
    seed = pg.snapshot()
    # no PG_CONTAINER: the host's pg_dump (same major) over the network, gzip'd plain SQL
    result = backup(env, PGDUMP_FORMAT="plain", PG_CONTAINER="")
    assert result.returncode == 0, result.stderr
    [item] = artifacts(env)
    assert item.path.endswith(".sql.gz")
    text = subprocess.run(["zcat", str(env.backup_dir / item.path)], capture_output=True).stdout
    assert b"CREATE TABLE public.users" in text and b"PostgreSQL database dump complete" in text[-500:]
    pg.psql("DROP DATABASE toybox", db="postgres")
    restored = env.cli("restore", "db", "--yes")
    assert restored.returncode == 0, restored.stderr
    assert pg.snapshot() == seed
    table = env.cli("restore", "db", "--table", "users")
    assert table.returncode != 0 and "custom-format" in table.stderr


def test_local_pg_dump_older_than_server_is_refused(env: Env, pg: PG, tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "pg_dump").write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 13.4'\n")
    (fake / "pg_dump").chmod(0o755)
    result = backup(env, PG_CONTAINER="", PATH=f"{fake}:{os.environ['PATH']}")
    assert result.returncode != 0
    assert "older pg_dump cannot dump a newer server" in result.stderr
    assert partials(env) == [] and artifacts(env) == []


def test_corrupt_dump_is_refused_and_verify_flags_it(env: Env, pg: PG) -> None:
    assert backup(env).returncode == 0
    [item] = artifacts(env)
    path = env.backup_dir / item.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    pg.psql("DELETE FROM media_items WHERE id > 10")
    before = pg.rows("media_items")
    result = env.cli("restore", "db", "--yes")
    assert result.returncode != 0 and "corrupt" in result.stderr
    assert pg.rows("media_items") == before
    verify = env.cli("verify")
    assert verify.returncode != 0 and "CORRUPT" in verify.stdout
    with Store(env.state_dir) as history:
        assert history.artifacts(tier="logical", statuses=("corrupt",))
        assert history.runs(limit=1)[0].job == "verify"


# failures are failures ------------------------------------------------------------------------
def assert_clean_failure(env: Env, result: subprocess.CompletedProcess[str], older: list[Any],
                         words: tuple[str, ...]) -> str:
    assert result.returncode != 0
    run = last_run(env)
    assert run.status == "failed"
    assert run.error and any(word in run.error for word in words), run.error
    assert partials(env) == []
    now = artifacts(env)
    assert [a.path for a in now] == [a.path for a in older]
    for item in older:
        assert atomic.sha256_of(env.backup_dir / item.path) == item.sha256
    return str(run.error)


def test_database_stopped(env: Env, pg: PG) -> None:
    assert backup(env).returncode == 0
    older = artifacts(env)
    pg.stop()
    result = backup(env)
    assert_clean_failure(env, result, older, ("refused the connection", "not running"))
    check = env.cli("check")
    assert check.returncode != 0
    failing = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
    assert any("database" in line and "refused the connection" in line for line in failing)


def test_wrong_password(env: Env, pg: PG) -> None:
    assert backup(env).returncode == 0
    older = artifacts(env)
    result = backup(env, POSTGRES_PASSWORD="not-the-password")
    error = assert_clean_failure(env, result, older, ("refused the password",))
    assert "POSTGRES_PASSWORD" in error
    missing = backup(env, POSTGRES_DB="nope")
    assert missing.returncode != 0 and "does not exist" in last_run(env).error


def _big_table(pg: PG, rows: int = 600_000) -> None:
    pg.psql("CREATE TABLE big AS SELECT i, md5(i::text) || md5((i*7)::text) AS payload"
            f" FROM generate_series(1, {rows}) i")


def test_pg_dump_killed_mid_stream(env: Env, pg: PG) -> None:
    assert backup(env).returncode == 0
    older = artifacts(env)
    _big_table(pg)
    killed = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = [p for p in partials(env) if p.stat().st_size > 0]
            if found:
                pg.container.exec_run(["pkill", "-9", "-x", "pg_dump"])
                killed.set()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=killer)
    thread.start()
    result = backup(env)
    thread.join()
    assert killed.is_set(), "pg_dump finished before it could be killed"
    assert_clean_failure(env, result, older, ("killed", "exit status"))


@pytest.fixture
def tiny_backup_dir(env: Env, tmp_path: Path) -> Any:
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    env.values["BACKUP_DIR"] = str(mount)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full(env: Env, pg: PG, tiny_backup_dir: Path) -> None:
    assert backup(env).returncode == 0
    older = artifacts(env)
    _big_table(pg, 400_000)
    result = backup(env)
    error = assert_clean_failure(env, result, older, ("full",))
    assert "older backups are untouched" in error


def test_password_never_leaks(env: Env, pg: PG) -> None:
    outputs = []
    for args, overrides in [
        (("backup", "pgdump"), {}),
        (("backup", "pgdump"), {"LOG_FORMAT": "json"}),
        (("restore", "db", "--table", "users"), {}),
        (("history", "--json"), {}),
        (("check",), {}),
    ]:
        result = env.cli(*args, **overrides)
        outputs.append(result.stdout + result.stderr)
    pg.stop()
    for args in (("backup", "pgdump"), ("check",), ("restore", "db", "--yes")):
        result = env.cli(*args)
        outputs.append(result.stdout + result.stderr)
    text = "\n".join(outputs)
    assert "run_id=" in text  # the logs were really captured
    assert pg.password not in text
    db_bytes = b"".join(p.read_bytes() for p in env.state_dir.glob("history.sqlite3*"))
    assert pg.password.encode() not in db_bytes
    for path in env.backup_dir.rglob("*.json"):
        assert pg.password not in path.read_text()
