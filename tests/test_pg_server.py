"""Which PostgreSQL server, and in which encoding (issue 13, items 5 and 6), against real
PostgreSQL 15 containers and the real CLI."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import PG, Env, pg_values, remove_pg, start_pg, unique

from toybox_backupd.store import Store


def artifacts(env: Env) -> list[Any]:
    with Store(env.state_dir) as history:
        return history.artifacts(tier="logical")


def databases(pg: PG) -> list[str]:
    return pg.psql("SELECT datname FROM pg_database ORDER BY 1", db="postgres").split()


def check_lines(result: Any) -> dict[str, str]:
    """{part: "ok  <text>" or "FAIL <text>"} from `check`'s output."""
    lines = {}
    for line in result.stdout.splitlines():
        status, _, rest = line.partition("  ")
        name, _, text = rest.strip().partition(" ")
        lines[name if name != "db" else "db container"] = f"{status} {text.strip()}"
    return lines


# item 5: PG_CONTAINER is the server at POSTGRES_HOST ------------------------------------------
def test_pg_container_of_another_server_is_refused(env: Env, pg: PG, docker_engine: Any) -> None:
    """PG_CONTAINER names a compose service that another stack's database also has, and the
    lookup falls back to that one while psycopg talks to POSTGRES_HOST:POSTGRES_PORT. Backup,
    restore and check refuse in words naming both; the matching pair works."""
    service = unique("tbt-db")
    other = start_pg(docker_engine, labels={"com.docker.compose.service": service,
                                            "com.docker.compose.project": "otherstack"})
    try:
        assert env.cli("backup", "logical").returncode == 0  # PG_CONTAINER = pg's own container
        seed, other_seed, other_dbs = pg.snapshot(), other.snapshot(), databases(other)
        pg.psql("DELETE FROM media_items WHERE id > 10")
        changed = pg.snapshot()
        mixed = {"PG_CONTAINER": service}
        for args in (("backup", "logical"), ("restore", "db", "--yes"),
                     ("restore", "db", "--table", "orders", "--yes"),
                     ("restore", "db", "--into", "toybox_copy")):
            result = env.cli(*args, **mixed)
            assert result.returncode == 1, (args, result.stderr)
            _names_both(result.stderr, pg, other, service)
            assert pg.snapshot() == changed and "toybox_copy" not in databases(pg)
            assert other.snapshot() == other_seed and databases(other) == other_dbs
        assert len(artifacts(env)) == 1
        with Store(env.state_dir) as history:
            failed = history.runs(limit=1)[0]
        assert failed.status == "failed"
        _names_both(str(failed.error), pg, other, service)
        check = env.cli("check", **mixed)
        assert check.returncode == 1
        line = check_lines(check)["db container"]
        assert line.startswith("FAIL"), line
        _names_both(line, pg, other, service)
        # the matching pair: check says so, and a restore goes through
        check = env.cli("check")
        assert check.returncode == 0, check.stdout
        assert f"the server at {pg.host}:{pg.port}" in check_lines(check)["db container"]
        assert env.cli("restore", "db", "--yes").returncode == 0
        assert pg.snapshot() == seed
    finally:
        remove_pg(other)


def _names_both(text: str, pg: PG, other: PG, service: str) -> None:
    assert f"{pg.host}:{pg.port}" in text and other.name in text, text
    assert f"PG_CONTAINER={service}" in text and "another PostgreSQL server" in text, text
    assert pg.password not in text


# item 6: any server encoding ------------------------------------------------------------------
@pytest.mark.sql_ascii_too
def test_check_tries_what_a_restore_needs(env: Env, pg: PG) -> None:
    """`check` was green on a SQL_ASCII cluster whose every restore crashed: it now creates,
    renames and drops a scratch database as a restore would, and says when it cannot."""
    encoding = pg.psql("SHOW server_encoding")
    before = databases(pg)
    result = env.cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
    restore = check_lines(result)["restore"]
    assert restore.startswith("ok") and f"server encoding {encoding}" in restore, restore
    assert databases(pg) == before  # the scratch database is gone again
    # a user that can dump but not create databases: backups work, restores would not
    pg.psql("CREATE ROLE dumper LOGIN PASSWORD 'dumper-pw'; GRANT pg_read_all_data TO dumper",
            db="postgres")
    as_dumper = {"POSTGRES_USER": "dumper", "POSTGRES_PASSWORD": "dumper-pw"}
    assert env.cli("backup", "logical", **as_dumper).returncode == 0
    result = env.cli("check", **as_dumper)
    assert result.returncode == 1
    restore = check_lines(result)["restore"]
    assert restore.startswith("FAIL") and "'dumper'" in restore and "CREATEDB" in restore, restore
    refused = env.cli("restore", "db", "--yes", **as_dumper)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr  # check was right
    assert databases(pg) == before


@pytest.mark.sql_ascii_too
def test_names_outside_ascii_survive_dump_and_restore(env: Env, pg: PG) -> None:
    """Owner, schema and table names in UTF-8 (raw bytes in a SQL_ASCII cluster)."""
    pg.psql('CREATE ROLE "データ係" LOGIN; ALTER DATABASE toybox OWNER TO "データ係"', db="postgres")
    pg.psql('CREATE SCHEMA "営業"; CREATE TABLE "営業"."注文" (id int PRIMARY KEY, memo text);'
            """ INSERT INTO "営業"."注文" SELECT i, 'メモ ' || i FROM generate_series(1, 30) i""")
    before = pg.rows('"営業"."注文"')
    result = env.cli("backup", "logical")
    assert result.returncode == 0, result.stderr
    [item] = artifacts(env)
    manifest = json.loads((env.backup_dir / (item.path + ".manifest.json")).read_text())
    assert manifest["extra"]["server_version"].startswith("15.")
    pg.psql('DELETE FROM "営業"."注文" WHERE id > 10')
    table = env.cli("restore", "db", "--table", "営業.注文", "--yes")
    assert table.returncode == 0, table.stderr
    assert pg.rows('"営業"."注文"') == before
    pg.psql('DROP SCHEMA "営業" CASCADE')
    whole = env.cli("restore", "db", "--yes")
    assert whole.returncode == 0, whole.stderr
    assert pg.rows('"営業"."注文"') == before
    owner = "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'toybox'"
    assert pg.psql(owner, db="postgres") == "データ係"
    assert check_lines(env.cli("check"))["restore"].startswith("ok")


def test_a_sql_ascii_owner_name_in_any_bytes_is_kept(plain_env: Env, docker_engine: Any,
                                                    images: dict[str, str]) -> None:
    """A legacy SQL_ASCII cluster holds names in whatever bytes its clients wrote (here EUC-JP,
    not UTF-8): the owner of the database survives a table and a whole restore."""
    pg = start_pg(docker_engine, encoding="SQL_ASCII")
    try:
        env = plain_env
        env.values.update(pg_values(pg))
        role = r'"\xb4\xc9\xcd\xfd"'  # printf escapes: 管理 in EUC-JP
        made = pg.container.exec_run(
            ["bash", "-c", f"printf 'CREATE ROLE {role}; ALTER DATABASE toybox OWNER TO {role};'"
             f" | psql -X -v ON_ERROR_STOP=1 -U {pg.user} -d postgres"],
            environment={"PGCLIENTENCODING": "SQL_ASCII"}, user="postgres")
        assert made.exit_code == 0, made.output
        owner = "SELECT datdba FROM pg_database WHERE datname = 'toybox'"
        oid = pg.psql(owner, db="postgres")
        assert oid != pg.psql("SELECT oid FROM pg_roles WHERE rolname = 'toybox'")
        seed = pg.snapshot()
        assert env.cli("backup", "logical").returncode == 0
        pg.psql("DELETE FROM orders")
        table = env.cli("restore", "db", "--table", "orders", "--yes")
        assert table.returncode == 0, table.stderr
        pg.psql("DELETE FROM media_items")
        whole = env.cli("restore", "db", "--yes")
        assert whole.returncode == 0, whole.stderr
        assert pg.snapshot() == seed and pg.psql(owner, db="postgres") == oid
        assert check_lines(env.cli("check"))["restore"].startswith("ok")
    finally:
        remove_pg(pg)
