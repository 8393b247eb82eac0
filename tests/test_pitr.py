"""Point in time (issue 16): the route beside the database, WAL streaming, online base
backups and restores to a moment, against a real PostgreSQL 15 set up like the official image
(initdb's default pg_hba.conf: local and 127.0.0.1 trusted, replication included)."""

from __future__ import annotations

import json
from typing import Any

from conftest import PG, Env

from toybox_backupd.store import Store

PITR = {"PITR": "on"}


def artifacts(env: Env, tier: str) -> list[Any]:
    with Store(env.state_dir) as history:
        return history.artifacts(tier=tier)


def test_the_test_image_has_the_official_defaults(pg: PG) -> None:
    assert pg.psql("SHOW wal_level") == "replica"
    assert pg.psql("SHOW max_wal_senders") == "10"
    rules = pg.psql("SELECT type, database[1], address, auth_method FROM pg_hba_file_rules "
                    "WHERE database = '{replication}'").splitlines()
    assert "host|replication|127.0.0.1|trust" in rules
    assert pg.psql("SELECT auth_method FROM pg_hba_file_rules WHERE address = 'all'") == \
        "scram-sha-256"


def test_an_online_base_backup_through_the_route(env: Env, pg: PG) -> None:
    result = env.cli("backup", "base", **PITR)
    assert result.returncode == 0, result.stderr
    [item] = artifacts(env, "base")
    folder = (env.backup_dir / item.path).parent
    assert sorted(p.name for p in folder.iterdir()) == [
        "backup_manifest", "base.tar.gz", "base.tar.gz.manifest.json", "pg_wal.tar.gz"]
    manifest = json.loads((folder / "backup_manifest").read_text())
    assert manifest["Files"] and manifest["Files"][0]["Checksum-Algorithm"] == "SHA256"
    assert item.extra["start_lsn"] and item.extra["end_lsn"]
    with Store(env.state_dir) as history:
        run = history.runs(limit=1)[0]
    assert run.status == "ok" and run.details["downtime_seconds"] == 0.0
    assert env.cli("verify", **PITR).returncode == 0
