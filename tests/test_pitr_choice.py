"""Point in time on both shapes of PostgreSQL image (issue 23, items 4 and 5): the official
layout (the server's version directory on PATH) and a plain Debian-package install (only
pg_wrapper's links on PATH: no pg_waldump, pg_ctl nor postgres there); a restore to a moment
never quietly becomes another restore point, and says the moment it reached."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from conftest import BASE_IMAGE, PG, Env, remove_pg, start_pg
from test_daemon import Daemon, wait_for
from test_pitr import (
    PITR,
    Writer,
    artifacts,
    at_text,
    between,
    stamps,
    streaming_daemon,
)


@pytest.fixture
def streaming_debian(env_debian: Env, pg_debian: PG, docker_engine: Any) -> Iterator[Daemon]:
    """The daemon with PITR on beside the Debian-shaped database, its streamer running."""
    with streaming_daemon(env_debian, docker_engine) as daemon:
        yield daemon


@pytest.fixture
def streaming_pg(env: Env, pg: PG, docker_engine: Any) -> Iterator[Daemon]:
    """The daemon with PITR on beside `pg`, its streamer running."""
    with streaming_daemon(env, docker_engine) as daemon:
        yield daemon


def test_a_debian_package_image_restores_to_the_moment_and_check_runs_every_tool(
        env_debian: Env, pg_debian: PG, streaming_debian: Daemon) -> None:
    """pg_waldump and postgres are not on the Debian image's PATH: the window, `restore db
    --at` and `check` find them in the server's version directory; a moment outside the WAL is
    refused with --yes alone, and the nearest restore point named with its distance."""
    from toybox_backupd.tiers.pitr import restore as pitr_restore

    env, pg = env_debian, pg_debian
    check = env.cli("check", **PITR)
    assert check.returncode == 0, check.stdout + check.stderr
    line = next(x for x in check.stdout.splitlines() if "pitr route" in x)
    for tool in ("pg_receivewal", "pg_basebackup", "pg_waldump", "postgres", "pg_dump"):
        assert tool in line, line
    assert env.cli("backup", "logical").returncode == 0
    [dump] = artifacts(env, "logical")
    time.sleep(1.5)
    writer = Writer(pg)
    try:
        time.sleep(2)
        result = env.cli("backup", "base", **PITR)
        assert result.returncode == 0, result.stderr
        [base] = artifacts(env, "base")
        time.sleep(6)
    finally:
        writer.finish()
    rows = stamps(pg)
    shown = pitr_restore.window(env.settings(**PITR))
    assert shown is not None and shown.end is not None
    assert shown.end >= rows[-1][1] - timedelta(seconds=0.5), (shown.end, rows[-1][1])
    moment = between(rows, base.created_at + timedelta(seconds=1), rows[-1][1])
    result = env.cli("restore", "db", "--at", at_text(moment), "--into", "at_1", "--yes", **PITR)
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"recovering base backup {base.path} " in result.stdout, result.stdout
    expected = [row for row in rows if row[1] <= moment]
    assert stamps(pg, db="at_1") == expected
    reached = re.search(r"reached (\S+ \S+)", result.stdout)
    assert reached, result.stdout  # the last commit replayed, in TZ
    assert reached.group(1) == expected[-1][1].astimezone(env.settings().zone).strftime(
        "%Y-%m-%d %H:%M:%S"), result.stdout
    # before the first base backup: outside what the WAL reaches. --yes alone changes nothing
    early = dump.created_at + timedelta(seconds=1)
    result = env.cli("restore", "db", "--at", at_text(early), "--into", "early", "--yes",
                     **PITR)
    assert result.returncode != 0, result.stdout
    said = result.stdout + result.stderr
    assert "no base backup finished at or before it" in said, said
    assert re.search(r"the newest dump at or before it \(\S+ \S+ \S+\) is [\d.]+ s before it", said), said
    assert "--nearest" in said, said
    assert pg.psql("SELECT count(*) FROM pg_database WHERE datname = 'early'") == "0"
    result = env.cli("restore", "db", "--at", at_text(early), "--into", "early", "--yes",
                     "--nearest", **PITR)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "using the newest dump" in result.stdout
    assert pg.rows("users", db="early") == pg.rows("users")
    # the image a restore would recover the newest base backup with is checked too: one without
    # PostgreSQL's programs (the base image) in its record fails `check`, saying what is missing
    with sqlite3.connect(env.state_dir / "history.sqlite3") as db:
        db.execute("UPDATE artifacts SET extra = json_set(extra, '$.image', ?) WHERE id = ?",
                   (BASE_IMAGE, base.id))
    check = env.cli("check", **PITR)
    assert check.returncode != 0, check.stdout
    said = check.stdout + check.stderr
    assert f"recovers base backup {base.path} with the image it was taken with" in said, said
    assert "pg_waldump is not in the image" in said, said


@pytest.mark.fixed_port
def test_after_a_cluster_restore_and_a_replacement_the_new_cluster_is_recovered(
        env: Env, pg: PG, streaming_pg: Daemon, docker_engine: Any) -> None:
    """PITR on → `restore cluster --at` (the old cluster goes on on timeline 2) → the cluster
    replaced under the same container (timeline 1 again, its own WAL): `restore cluster`
    (no --at) recovers the new cluster's base backup and WAL, not the old cluster's newer
    timeline, and `restore db --at` a moment after the replacement does too."""
    writer = Writer(pg)
    try:
        time.sleep(2)
        assert env.cli("backup", "base", **PITR).returncode == 0
        [first] = artifacts(env, "base")
        time.sleep(4)
    finally:
        writer.finish()
    old = stamps(pg)
    t1 = between(old, first.created_at + timedelta(seconds=1), old[-1][1])
    result = env.cli("restore", "cluster", "--at", at_text(t1), "--yes", "--stop-containers",
                     **PITR)
    assert result.returncode == 0, result.stderr + result.stdout
    pg.container.reload()
    pg.wait_ready()
    assert pg.psql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)") == "00000002"
    wait_for("a base backup on timeline 2", lambda: len(artifacts(env, "base")) == 2, 180,
             lambda: streaming_pg.log)
    pg.psql("CREATE TABLE old_only (x int); SELECT pg_switch_wal()")  # timeline 2 goes on
    time.sleep(2)
    pg.container.remove(force=True)  # its volume stays: the fixture removes it
    new = start_pg(docker_engine, name=pg.name, port=pg.port, password=pg.password)
    back = None
    volume = pg.volume + "-back"
    try:
        writer = Writer(new)
        try:
            wait_for("a base backup of the new cluster", lambda: len(artifacts(env, "base")) == 3,
                     180, lambda: streaming_pg.log)
            time.sleep(4)
        finally:
            writer.finish()
        rows = stamps(new)
        newest = max(artifacts(env, "base"), key=lambda item: item.created_at)
        assert newest.extra["timeline"] == 1
        listed = env.cli("list", **PITR)
        assert listed.returncode == 0, listed.stderr
        line = next(x for x in listed.stdout.splitlines() if x.startswith("point in time"))
        assert "timelines:" not in line, line  # the old cluster's timeline 2 is not this one's
        moment = between(rows, newest.created_at + timedelta(seconds=1), rows[-1][1])
        result = env.cli("restore", "db", "--at", at_text(moment), "--into", "at_new", "--yes",
                         **PITR)
        assert result.returncode == 0, result.stderr + result.stdout
        assert f"recovering base backup {newest.path} " in result.stdout, result.stdout
        assert stamps(new, db="at_new") == [row for row in rows if row[1] <= moment]
        result = env.cli("restore", "cluster", "--volume", volume, "--yes", **PITR)
        assert result.returncode == 0, result.stderr + result.stdout
        assert f"recovering base backup {newest.path} " in result.stdout, result.stdout
        assert "on timeline" not in result.stdout, result.stdout
        assert "reached " in result.stdout, result.stdout
        back = start_pg(docker_engine, volume=volume, seed=False)
        assert stamps(back) == rows
        assert back.psql("SELECT count(*) FROM pg_class WHERE relname = 'old_only'") == "0"
    finally:
        remove_pg(new)
        if back is not None:
            remove_pg(back)
        with contextlib.suppress(Exception):
            docker_engine.volumes.get(volume).remove(force=True)


def test_the_tools_path_starts_at_the_servers_version_directory(images: dict[str, str]) -> None:
    from toybox_backupd.adapters import pgtools

    image = images["postgres-debian"]
    assert pgtools.server_tools(image, "15.18 (Debian 15.18-0+deb12u1)") == {
        "PATH": "/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                "/sbin:/bin"}
    assert pgtools.server_tools(image, None) == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def test_a_missing_pg_waldump_is_an_error_never_no_commit(plain_env: Env,
                                                          images: dict[str, str]) -> None:
    """Without the server's version (so without its directory on PATH) the Debian image has no
    pg_waldump: the WAL's newest commit is then not "none" but an error saying so."""
    from toybox_backupd.core.basics import JobError
    from toybox_backupd.tiers.pitr import wal

    settings = plain_env.settings(**PITR)
    root = wal.wal_dir(settings)
    root.mkdir(parents=True)
    path = root / "000000010000000000000003"
    header = wal.LONG_HEADER.pack(0xD110, wal.XLP_LONG_HEADER, 1, 3 << 24, 0, 7312345678901234567,
                                  16 << 20, 8192)
    path.write_bytes(header + bytes(8192 - len(header)))
    found = wal.segments(settings)
    with pytest.raises(JobError, match="pg_waldump is not in this image"):
        wal.last_commit(settings, images["postgres-debian"], files=found)
    # found: a segment with no record in it is no commit, and a segment it cannot read an error
    assert wal.last_commit(settings, images["postgres-debian"], files=found,
                           version="15.18") is None
    path.chmod(0)
    with pytest.raises(JobError, match="pg_waldump could not read"):
        wal.last_commit(settings, images["postgres-debian"], files=found, version="15.18")


def test_outside_the_wal_the_nearest_dump_is_asked_for_never_taken_by_yes(
        plain_env: Env, docker_engine: Any) -> None:
    """No base backup by then: the newest dump is named with its distance from the moment;
    --yes alone (confirm None) and a no when asked change nothing; only a yes goes on."""
    from datetime import UTC, datetime

    from toybox_backupd.core.basics import JobError
    from toybox_backupd.store import Store
    from toybox_backupd.tiers.pitr import restore as pitr_restore

    settings = plain_env.settings(**PITR)
    made = datetime(2026, 1, 25, 8, 0, 4, tzinfo=UTC)
    with Store(settings.state_dir) as store:
        store.add_artifact(run_id=None, tier="logical", target="toybox", path="logical/x.dump",
                           created_at=made, size=1, sha256="0" * 64)
    at = made + timedelta(hours=21, minutes=3)
    asked: list[str] = []
    with pytest.raises(JobError, match=r"--nearest"):
        pitr_restore.restore_db_at(settings, at)
    with pytest.raises(JobError, match="cancelled; nothing was changed"):
        pitr_restore.restore_db_at(settings, at, confirm=lambda q: asked.append(q) or False)
    assert ("(no base backup finished at or before it); the newest dump at or before it "
            "(2026-01-25 17:00:04 JST) is 21 h 03 min before it. Restore that dump instead?"
            ) in asked[0], asked
