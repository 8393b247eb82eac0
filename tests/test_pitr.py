"""Point in time (issue 16): the route beside the database, WAL streaming, online base
backups and restores to a moment, against a real PostgreSQL 15 set up like the official image
(initdb's default pg_hba.conf: local and 127.0.0.1 trusted, replication included)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import PG, Env, remove_pg, start_pg
from test_daemon import Daemon, wait_for

from toybox_backupd.store import Store

PITR = {"PITR": "on"}


@pytest.fixture(autouse=True)
def _fresh_docker_caches() -> Iterator[None]:
    """Some tests here call the package in-process: what docker_api caches (this process's own
    container, seen as root) must not leak into later tests of the session."""
    yield
    from toybox_backupd.adapters import docker_api

    docker_api.own_container.cache_clear()
    docker_api.client.cache_clear()


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
    assert env.cli("backup", "logical").returncode == 0
    [dump] = artifacts(env, "logical")
    time.sleep(1.5)
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
    # a moment before the first base backup: the newest dump at or before it with --nearest
    # (tests/test_pitr_shapes.py: never by --yes alone), said so
    when = (dump.created_at + timedelta(seconds=1)).astimezone(ZoneInfo("Asia/Tokyo"))
    result = env.cli("restore", "db", "--at", when.strftime("%Y-%m-%dT%H:%M:%S"), "--into",
                     "before", "--yes", "--nearest", **PITR)
    assert result.returncode == 0, result.stderr
    assert "(no base backup finished at or before it)" in result.stdout, result.stdout
    assert "using the newest dump (--nearest)" in result.stdout, result.stdout
    assert pg.snapshot("before") == pg.snapshot()
    # the catalog rebuilt from the backup directory alone: the base backup comes back as it was
    # written; a copy of it without its pg_wal.tar.gz is not trusted, and said so
    broken = folder.parent / "toybox_20200101-000000"
    shutil.copytree(folder, broken)
    (broken / "pg_wal.tar.gz").unlink()
    shutil.rmtree(env.state_dir)
    result = env.cli("reindex", **PITR)
    assert result.returncode == 0, result.stderr
    assert "2 artifact(s) added" in result.stdout, result.stdout  # the dump and the base backup
    assert ("skipped base/toybox/toybox_20200101-000000/base.tar.gz: pg_wal.tar.gz is missing"
            in result.stdout), result.stdout
    [back] = artifacts(env, "base")
    assert (back.path, back.created_at, back.size, back.sha256, back.status) == (
        item.path, item.created_at, item.size, item.sha256, "ok")
    for key in ("start_lsn", "end_lsn", "start_segment", "timeline", "image", "files"):
        assert back.extra[key] == item.extra[key], key
    shutil.rmtree(broken)
    result = env.cli("verify", **PITR)
    assert result.returncode == 0 and "CORRUPT" not in result.stdout, result.stdout


# the streamer ----------------------------------------------------------------------------------
NO_JOBS = {"PGDUMP_SCHEDULE": "", "PITR_BASE_SCHEDULE": "", "CATCH_UP": "false"}


def wal_helpers(docker_engine: Any, env: Env) -> list[Any]:
    """The WAL streamer containers of this test's history."""
    with Store(env.state_dir) as history:
        owner = history.instance_id()
    return docker_engine.containers.list(filters={"label": [
        "toybox-backupd.beside=wal", f"toybox-backupd.owner={owner}"]})


def segments(env: Env) -> list[Any]:
    from toybox_backupd.tiers.pitr import wal

    return wal.segments(env.settings(**PITR))


@pytest.fixture
def streaming(env: Env, pg: PG, docker_engine: Any) -> Iterator[Daemon]:
    """The daemon with PITR on and no scheduled jobs, its streamer running."""
    with streaming_daemon(env, docker_engine) as daemon:
        yield daemon


@contextlib.contextmanager
def streaming_daemon(env: Env, docker_engine: Any) -> Iterator[Daemon]:
    """The daemon of `env` with PITR on and no scheduled jobs, its streamer running."""
    daemon = Daemon(env, **PITR, **NO_JOBS)
    try:
        wait_for("the WAL streamer", lambda: any(s.partial for s in segments(env)), 90,
                 lambda: daemon.log)
        yield daemon
    finally:
        daemon.kill()
    for container in wal_helpers(docker_engine, env):
        container.remove(force=True, v=True)


def streamer_pid(helper: Any) -> int:
    out = helper.exec_run(["sh", "-c", "for p in /proc/[0-9]*; do "
                           "grep -qa '^pg_receivewal' $p/cmdline 2>/dev/null && basename $p; done"])
    pids = [int(x) for x in out.output.decode().split()]
    assert pids, out.output
    return pids[0]


def test_the_streamer_comes_back_after_sigkill_with_no_gap(env: Env, pg: PG, streaming: Any,
                                                           docker_engine: Any) -> None:
    from toybox_backupd.tiers.pitr import wal

    pg.psql("CREATE TABLE ticks (n int, at timestamptz DEFAULT clock_timestamp())")
    [helper] = wal_helpers(docker_engine, env)
    first = streamer_pid(helper)
    for n in range(3):  # a few switched segments before and after the kill
        pg.psql(f"INSERT INTO ticks(n) VALUES ({n}); SELECT pg_switch_wal();")
    assert helper.exec_run(["kill", "-KILL", str(first)]).exit_code == 0
    wait_for("the supervisor to see it", lambda: "WAL streamer down" in streaming.log, 30)
    for n in range(3, 6):
        pg.psql(f"INSERT INTO ticks(n) VALUES ({n}); SELECT pg_switch_wal();")
    current = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")

    def caught_up() -> bool:
        names = {s.name for s in segments(env)}
        return current in names and any(s.partial and s.name == current for s in segments(env))

    wait_for("the streamer to come back and catch up", caught_up, 120, lambda: streaming.log)
    assert "killed (signal 9" in streaming.log or "exit status 137" in streaming.log
    found = segments(env)
    assert wal.gaps(found) == []
    assert len([s for s in found if not s.partial]) >= 6
    assert pg.psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'toybox_backupd'") \
        == "t"


def test_a_stopped_sidecar_leaves_no_slot_and_streams_on_when_started(
        env: Env, pg: PG, docker_engine: Any) -> None:
    """Stopped (SIGTERM, as `docker compose stop` does), the daemon drops its slot: nothing
    holds the database's WAL while nobody watches it. Started again, it streams on from its
    last segment with no gap (the server still has it)."""
    import signal as signals

    from toybox_backupd.tiers.pitr import wal

    slot = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'toybox_backupd'"
    first = Daemon(env, "first", **PITR, **NO_JOBS)
    try:
        wait_for("the WAL streamer", lambda: any(s.partial for s in segments(env)), 90,
                 lambda: first.log)
        assert pg.psql(slot) == "1"
        first.signal(signals.SIGTERM)
        assert first.wait(60) == 0, first.log
    finally:
        first.kill()
    assert "replication slot dropped at shut-down" in first.log
    assert pg.psql(slot) == "0" and not wal_helpers(docker_engine, env)
    pg.psql("CREATE TABLE while_stopped (x int); INSERT INTO while_stopped VALUES (1); "
            "SELECT pg_switch_wal()")
    current = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    second = Daemon(env, "second", **PITR, **NO_JOBS)
    try:
        wait_for("streaming on", lambda: any(s.partial and s.name == current
                                             for s in segments(env)), 90, lambda: second.log)
        assert wal.gaps(segments(env)) == [] and "has already been removed" not in second.log
        assert pg.psql(slot) == "1"
    finally:
        second.kill()
        for container in wal_helpers(docker_engine, env):
            container.remove(force=True, v=True)


SLOT_COUNT = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'"


def foreign_streamer(docker_engine: Any) -> Any:
    """A container labelled as another installation's WAL streamer."""
    from conftest import BASE_IMAGE

    return docker_engine.containers.run(
        BASE_IMAGE, ["sleep", "600"], detach=True, labels={
            "toybox-backupd.beside": "wal", "toybox-backupd.owner": "another-installation",
            "toybox-backupd.test": "1"})


def test_a_killed_daemon_started_with_pitr_off_leaves_no_streamer_and_no_slot(
        env: Env, pg: PG, docker_engine: Any) -> None:
    """SIGKILLed while it streams, then started with PITR=off: start-up recovery removes the
    streamer container it left (its pg_receivewal streamed on) and drops our replication slot,
    saying so, so that pg_wal cannot grow for a streamer that will not come back. Another
    installation's streamer and another slot on the same server are left alone."""
    other = foreign_streamer(docker_engine)
    pg.psql("SELECT pg_create_physical_replication_slot('someone_elses')")
    first = Daemon(env, "first", **PITR, **NO_JOBS)
    second = None
    try:
        wait_for("the WAL streamer", lambda: any(s.partial for s in segments(env)), 90,
                 lambda: first.log)
        assert pg.psql(SLOT_COUNT.format("toybox_backupd")) == "1"
        first.kill()
        assert wal_helpers(docker_engine, env)  # left streaming by the killed daemon
        second = Daemon(env, "second", PITR="off", **NO_JOBS)
        wait_for("start-up recovery", lambda: "start-up recovery" in second.log, 60,
                 lambda: second.log)
        assert not wal_helpers(docker_engine, env), second.log
        assert pg.psql(SLOT_COUNT.format("toybox_backupd")) == "0", second.log
        assert "WAL streamer container left by a killed daemon removed" in second.log
        assert "PITR is off: the replication slot it streamed through was dropped" in second.log
        other.reload()
        assert other.status == "running"
        assert pg.psql(SLOT_COUNT.format("someone_elses")) == "1"
    finally:
        first.kill()
        if second is not None:
            second.kill()
        other.remove(force=True)
        for container in wal_helpers(docker_engine, env):
            container.remove(force=True, v=True)


def test_a_killed_daemons_streamer_ends_by_itself(env: Env, pg: PG, docker_engine: Any) -> None:
    """No helper sleeps for years: the streamer's container ends (with its pg_receivewal) once
    the daemon that made it renews its lease no more, though no daemon starts again."""
    daemon = Daemon(env, **PITR, **NO_JOBS)
    try:
        wait_for("the WAL streamer", lambda: any(s.partial for s in segments(env)), 90,
                 lambda: daemon.log)
        [helper] = wal_helpers(docker_engine, env)
        assert "315360000" not in " ".join(helper.attrs["Config"]["Cmd"])
        daemon.kill()
        wait_for("the streamer to end by itself", lambda: not docker_engine.containers.list(
            all=True, filters={"id": helper.id}), 80)  # 2 x helper_lease.LEASE_SECONDS + 20
        assert pg.psql("SELECT count(*) FROM pg_stat_replication") == "0"
    finally:
        daemon.kill()
        for container in wal_helpers(docker_engine, env):
            container.remove(force=True, v=True)


@pytest.fixture
def pg_without_procps(docker_engine: Any, images: Any) -> Iterator[PG]:
    """A server from an image with no /bin/kill (like the official postgres image: no procps)."""
    import io

    from conftest import PG_IMAGE, unique

    tag = f"toybox-test/postgres-no-procps:{unique('t')}"
    dockerfile = f"FROM {PG_IMAGE}\nRUN rm -f /bin/kill /usr/bin/kill /bin/ps /usr/bin/ps\n"
    docker_engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True,
                               network_mode="none")
    instance = start_pg(docker_engine, image=tag)
    try:
        yield instance
    finally:
        remove_pg(instance)
        with contextlib.suppress(Exception):
            docker_engine.images.remove(tag)


def test_a_stop_is_prompt_where_the_image_has_no_kill_program(
        tmp_path: Any, pg_without_procps: PG, docker_engine: Any) -> None:
    """SIGTERM (`docker compose stop`) with PITR on: pg_receivewal is signalled through the
    shell (an image without procps has no `kill` program), so the daemon exits at once, its
    streamer container and slot gone."""
    from conftest import base_values, pg_values

    pg = pg_without_procps
    env = Env(tmp_path, {**base_values(tmp_path), **pg_values(pg)})
    daemon = Daemon(env, **PITR, **NO_JOBS)
    try:
        wait_for("the WAL streamer", lambda: any(s.partial for s in segments(env)), 90,
                 lambda: daemon.log)
        time.sleep(2)
        began = time.monotonic()
        daemon.signal(15)
        assert daemon.wait(60) == 0, daemon.log
        took = time.monotonic() - began
        sys.stderr.write(f"\nSIGTERM to exit, PITR on, an image without procps: {took:.1f} s\n")
        assert took < 10, f"the stop took {took:.1f} s:\n{daemon.log}"
        assert "replication slot dropped at shut-down" in daemon.log
        assert pg.psql(SLOT_COUNT.format("toybox_backupd")) == "0"
        assert not wal_helpers(docker_engine, env)
    finally:
        daemon.kill()
        for container in wal_helpers(docker_engine, env):
            container.remove(force=True, v=True)


# restore to a moment ---------------------------------------------------------------------------
# The issue asks for three minutes of writes; the suite must stay within its CI budget, so the
# writer runs WRITER_SECONDS (60 by default; TOYBOX_PITR_WRITER_SECONDS=180 for the full length).
WRITER_SECONDS = float(os.environ.get("TOYBOX_PITR_WRITER_SECONDS", "60"))
TICK = 0.2


class Writer:
    """Inserts a row stamped with its commit time (clock_timestamp(), in its own one-statement
    transaction) every 200 ms, on a thread, until stopped."""

    def __init__(self, pg: PG, create: bool = True):
        import psycopg

        self.conn = psycopg.connect(host=pg.host, port=pg.port, user=pg.user,
                                    password=pg.password, dbname=pg.db, autocommit=True)
        if create:
            self.conn.execute("CREATE TABLE stamps (id serial PRIMARY KEY, at timestamptz "
                              "NOT NULL)")
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

        self.committed: list[tuple[int, datetime]] = []  # what the server said it committed

    def _run(self) -> None:
        try:
            while not self.stop.wait(TICK):
                row = self.conn.execute("INSERT INTO stamps(at) VALUES (clock_timestamp()) "
                                        "RETURNING id, at").fetchone()
                self.committed.append((row[0], row[1].astimezone(UTC)))
        except BaseException as exc:
            self.error = exc

    def finish(self, failing: bool = False) -> None:
        self.stop.set()
        self.thread.join(10)
        with contextlib.suppress(Exception):
            self.conn.close()
        if not failing:
            assert self.error is None, self.error


def stamps(pg: PG, db: str | None = None) -> list[tuple[int, datetime]]:
    out = pg.psql("SELECT id, extract(epoch FROM at) FROM stamps ORDER BY id", db=db)
    return [(int(i), datetime.fromtimestamp(float(e), UTC))
            for i, e in (line.split("|") for line in out.splitlines())]


def random_moments(rows: list[tuple[int, datetime]], after: datetime, count: int,
                   seed: int) -> list[datetime]:
    """Whole seconds after `after` (and before the last row) with no row stamped within 0.1 s
    before them: a row committed within a millisecond of T could fall on either side."""
    last = rows[-1][1]
    seconds = [after.replace(microsecond=0) + timedelta(seconds=n)
               for n in range(2, int((last - after).total_seconds()) - 1)]
    clear = [t for t in seconds
             if not any(t - timedelta(seconds=0.1) < at <= t for _, at in rows)]
    assert len(clear) >= count, (after, last)
    return sorted(random.Random(seed).sample(clear, count))


def test_restore_db_at_a_moment_gives_exactly_the_rows_committed_by_then(
        env: Env, pg: PG, streaming: Daemon) -> None:
    writer = Writer(pg)
    try:
        time.sleep(min(5.0, WRITER_SECONDS / 6))
        result = env.cli("backup", "base", **PITR)  # online, while the writer writes
        assert result.returncode == 0, result.stderr
        [base] = artifacts(env, "base")
        time.sleep(max(0.0, WRITER_SECONDS - (base.created_at - stamps(pg)[0][1]).total_seconds()))
    finally:
        writer.finish()
    rows = stamps(pg)
    assert len(rows) >= WRITER_SECONDS / TICK / 2
    listed = env.cli("list", **PITR)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"point in time \(toybox\): from .* to .*, gaps: none", listed.stdout), \
        listed.stdout
    moments = random_moments(rows, base.created_at, 3, seed=len(rows))
    zone = ZoneInfo("Asia/Tokyo")
    for number, moment in enumerate(moments):
        when = moment.astimezone(zone).strftime("%Y-%m-%dT%H:%M:%S")
        expected = [row for row in rows if row[1] <= moment]
        last = number == len(moments) - 1
        into = [] if last else ["--into", f"at_{number}"]  # the last one replaces the database
        result = env.cli("restore", "db", "--at", when, *into, "--yes", **PITR)
        assert result.returncode == 0, result.stderr + result.stdout
        assert "recovering base backup" in result.stdout
        got = stamps(pg, db=None if last else f"at_{number}")
        assert got == expected, (when, len(got), len(expected))
    assert pg.rows("users") and len(stamps(pg)) < len(rows)  # the whole database came back
    # one table, to the first moment, into the live database
    when = moments[0].astimezone(zone).strftime("%Y-%m-%dT%H:%M:%S")
    result = env.cli("restore", "db", "--at", when, "--table", "stamps", "--yes", **PITR)
    assert result.returncode == 0, result.stderr + result.stdout
    assert stamps(pg) == [row for row in rows if row[1] <= moments[0]]


def test_with_pitr_a_full_run_keeps_the_database_running(env: Env, pg: PG,
                                                         make_volume: Any) -> None:
    from toybox_backupd.notify import report

    media = make_volume("mkdir uploads && echo hi > uploads/a.txt")
    started = pg.container.attrs["State"]["StartedAt"]
    values = {**PITR, "BACKUP_VOLUMES": f"{pg.volume},{media}", "STOP_DURING_BACKUP": pg.name}
    result = env.cli("backup", "full", **values)
    assert result.returncode == 0, result.stderr
    pg.container.reload()
    assert pg.container.attrs["State"]["StartedAt"] == started  # never stopped
    with Store(env.state_dir) as history:
        run = history.runs(limit=1)[0]
        message = report.compose_run(env.settings(**values), history, run, message_id="<t@x>")
    assert run.status == "ok" and run.details["downtime_seconds"] == 0
    assert [item.target for item in artifacts(env, "full")] == [media]
    text = message.get_body(("plain",)).get_content()
    assert "Point in time" in text and "base backups" in text
    # without PITR the same run stops the database for its volume, as before
    result = env.cli("backup", "full", **{**values, "PITR": "off"})
    assert result.returncode == 0, result.stderr
    with Store(env.state_dir) as history:
        assert history.runs(limit=1)[0].details["downtime_seconds"] > 0


def test_rpo_after_the_server_is_lost_and_restore_cluster(env: Env, pg: PG, streaming: Daemon,
                                                          docker_engine: Any) -> None:
    from toybox_backupd.tiers.pitr import wal

    writer = Writer(pg)
    try:
        time.sleep(2)
        result = env.cli("backup", "base", **PITR)
        assert result.returncode == 0, result.stderr
        time.sleep(8)
        pg.container.kill(signal="SIGKILL")  # the server is lost mid-write...
    finally:
        writer.finish(failing=True)
    pg.container.remove(force=True, v=True)
    docker_engine.volumes.get(pg.volume).remove(force=True)  # ...and its disk with it
    [base] = artifacts(env, "base")
    newest = wal.last_commit(env.settings(**PITR), base.extra["image"])
    last = writer.committed[-1][1]
    assert newest is not None
    rpo = max(0.0, (last - newest).total_seconds())
    sys.stderr.write(f"\nRPO: last committed row {last.isoformat()}, newest recoverable moment "
                     f"{newest.isoformat()}: {rpo:.3f} s of writes lost\n")
    assert rpo <= 60, rpo  # the bound (target 5 s)
    # the whole cluster back from the base backup and the WAL, into a new volume
    volume = pg.volume + "-back"
    result = env.cli("restore", "cluster", "--volume", volume, "--yes", **PITR)
    try:
        assert result.returncode == 0, result.stderr + result.stdout
        back = start_pg(docker_engine, volume=volume, seed=False)
        try:
            restored = stamps(back)
            committed = writer.committed
            assert restored[:len(committed)] == committed[:len(restored)]  # no row changed
            # every row committed before the newest recoverable moment (and at most the one
            # in flight when the server died beyond what the client saw committed)
            settled = [row for row in committed if row[1] <= newest - timedelta(seconds=0.1)]
            assert len(settled) <= len(restored) <= len(committed) + 1
            assert back.rows("users")  # the seeded tables too
        finally:
            back.container.remove(force=True, v=True)
    finally:
        with contextlib.suppress(Exception):
            docker_engine.volumes.get(volume).remove(force=True)


def between(rows: list[tuple[int, datetime]], after: datetime, before: datetime) -> datetime:
    """A moment halfway between two rows committed after `after` and before `before`, at least
    0.1 s apart (so no commit falls on either side of it by chance); the first such one."""
    for (_, a), (_, b) in itertools.pairwise(rows):
        if a > after and b < before and (b - a).total_seconds() >= 0.1:
            return a + (b - a) / 2
    raise AssertionError(f"no two rows between {after} and {before}: {rows[-5:]}")


def at_text(moment: datetime) -> str:
    return moment.astimezone(ZoneInfo("Asia/Tokyo")).isoformat()


@pytest.mark.fixed_port
def test_after_restore_cluster_streaming_follows_the_new_timeline(
        env: Env, pg: PG, streaming: Daemon, docker_engine: Any) -> None:
    """restore cluster --at T1 into the live volume, the daemon streaming: the server comes back
    on timeline 2; the streamer streams it with no gap, a base backup follows, and `restore db
    --at` reaches moments on either side: after the restore (timeline 2: the rows up to T1, then
    the new ones) and between T1 and the restore (timeline 1's abandoned branch)."""
    from toybox_backupd.tiers.pitr import wal

    writer = Writer(pg)
    try:
        time.sleep(2)
        result = env.cli("backup", "base", **PITR)
        assert result.returncode == 0, result.stderr
        [base] = artifacts(env, "base")
        time.sleep(4)
        switched = utc_now()
        for _ in range(3):  # timeline 1 goes on for segments past T1's before the restore
            time.sleep(1)
            pg.psql("SELECT pg_switch_wal()")
        time.sleep(2)
    finally:
        writer.finish()
    old = stamps(pg)
    t1 = between(old, base.created_at + timedelta(seconds=1), switched)
    branch = between(old, switched + timedelta(seconds=1), old[-1][1])  # timeline 1 after T1
    started = time.monotonic()
    result = env.cli("restore", "cluster", "--at", at_text(t1), "--yes", "--stop-containers",
                     **PITR)
    assert result.returncode == 0, result.stderr + result.stdout
    sys.stderr.write(f"\nrestore cluster: {time.monotonic() - started:.1f} s\n")
    pg.container.reload()
    pg.wait_ready()
    assert stamps(pg) == [row for row in old if row[1] <= t1]
    assert pg.psql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)") == "00000002"
    restored = utc_now()
    writer = Writer(pg, create=False)
    try:
        root = wal.wal_dir(env.settings(**PITR))
        wait_for("streaming on timeline 2", lambda: any(
            s.partial and s.timeline == 2 and s.path.parent == root for s in segments(env)),
            180, lambda: streaming.log)
        wait_for("a base backup after the restore", lambda: len(artifacts(env, "base")) == 2,
                 180, lambda: streaming.log)
        time.sleep(4)
    finally:
        writer.finish()
    final = stamps(pg)
    newer = max(artifacts(env, "base"), key=lambda item: item.created_at)
    assert newer.extra["timeline"] == 2
    assert (root / "00000002.history").is_file()
    crossing = between(final, restored, newer.created_at)  # from the first base, across
    latest = between(final, newer.created_at, final[-1][1])  # from the new base
    for name, moment, expected, start in (
            ("crossing", crossing, [row for row in final if row[1] <= crossing], base),
            ("latest", latest, [row for row in final if row[1] <= latest], newer),
            ("branch", branch, [row for row in old if row[1] <= branch], base)):
        result = env.cli("restore", "db", "--at", at_text(moment), "--into", name, "--yes",
                         **PITR)
        assert result.returncode == 0, result.stderr + result.stdout
        timeline = 1 if name == "branch" else 2
        assert f"recovering base backup {start.path} " in result.stdout, result.stdout
        assert (f"on timeline {timeline}" in result.stdout) == (timeline > 1), result.stdout
        got = stamps(pg, db=name)
        assert got == expected, (name, len(got), len(expected), got[-3:], expected[-3:])
    listed = env.cli("list", **PITR)
    assert re.search(r"point in time \(toybox\): from .* to .*, gaps: none, timelines: 1 "
                     r"until .*, then 2", listed.stdout), listed.stdout
    with Store(env.state_dir) as history:
        assert not history.get_state("pitr.gap")
        assert not history.get_state("pitr.down_since")
    assert "WAL gap" not in streaming.log
    assert pg.psql("SELECT active FROM pg_replication_slots WHERE slot_name = "
                   "'toybox_backupd'") == "t"


@pytest.mark.fixed_port
def test_a_replaced_cluster_sets_its_wal_aside_and_both_stay_recoverable(
        env: Env, pg: PG, streaming: Daemon, docker_engine: Any) -> None:
    """The database container replaced by a fresh cluster under the same name and port (a
    major-version upgrade by dump and restore into a new volume): the streamer sets the old
    cluster's archive aside (other-*), streams the new one with no "ahead of the WAL flush
    position" loop, a base backup of it follows, and `restore db --at` gives each cluster's rows
    at a moment in its own time, from its own base backup and its own WAL."""
    from toybox_backupd.tiers.pitr import wal

    old_system = pg.psql("SELECT system_identifier FROM pg_control_system()")
    writer = Writer(pg)
    try:
        time.sleep(2)
        result = env.cli("backup", "base", **PITR)
        assert result.returncode == 0, result.stderr
        time.sleep(3)
    finally:
        writer.finish()
    old_rows = stamps(pg)
    [old_base] = artifacts(env, "base")
    assert old_base.extra["system_identifier"] == old_system
    # each segment's own header names its cluster (xlp_sysid at the offset read)
    assert {s.system() for s in segments(env)} - {None} == {old_system}
    at_old = between(old_rows, old_base.created_at + timedelta(seconds=1), old_rows[-1][1])
    pg.container.remove(force=True)  # its volume stays: the fixture removes it
    new = start_pg(docker_engine, name=pg.name, port=pg.port, password=pg.password)
    try:
        new_system = new.psql("SELECT system_identifier FROM pg_control_system()")
        assert new_system != old_system
        writer = Writer(new)
        try:
            wait_for("a base backup of the new cluster", lambda: len(artifacts(env, "base")) == 2,
                     180, lambda: streaming.log)
            time.sleep(3)
        finally:
            writer.finish()
        new_rows = stamps(new)
        new_base = max(artifacts(env, "base"), key=lambda item: item.created_at)
        assert new_base.extra["system_identifier"] == new_system
        root = wal.wal_dir(env.settings(**PITR))
        [aside] = root.glob("other-*")
        assert (aside / "system_identifier").read_text().strip() == old_system
        assert (root / "system_identifier").read_text().strip() == new_system
        assert "the database cluster was replaced" in streaming.log
        assert "ahead of the WAL flush position" not in streaming.log
        at_new = between(new_rows, new_base.created_at + timedelta(seconds=1), new_rows[-1][1])
        for name, moment, rows, start in (("at_new", at_new, new_rows, new_base),
                                          ("at_old", at_old, old_rows, old_base)):
            result = env.cli("restore", "db", "--at", at_text(moment), "--into", name, "--yes",
                             **PITR)
            assert result.returncode == 0, result.stderr + result.stdout
            assert f"recovering base backup {start.path} " in result.stdout, result.stdout
            assert stamps(new, db=name) == [row for row in rows if row[1] <= moment], name
        listed = env.cli("list", **PITR)
        assert re.search(r"point in time \(toybox\): from .* to .*, gaps: none", listed.stdout), \
            listed.stdout
    finally:
        remove_pg(new)


def utc_now() -> datetime:
    return datetime.now(UTC)


@pytest.mark.fixed_port
def test_the_streamer_starts_again_when_the_database_container_does(
        env: Env, pg: PG, streaming: Daemon) -> None:
    """The database container stopped (as a restore with --stop-containers does): the
    streamer's retries fail and it backs off for a minute; the container started again, it
    streams again at once, not a minute later."""
    pg.stop()
    wait_for("the streamer to back off", lambda: "in_s=60.0" in streaming.log, 60,
             lambda: streaming.log)
    time.sleep(3)
    pg.start()
    started = time.monotonic()
    wait_for("streaming again", lambda: streaming.log.count("WAL streamer running") >= 2, 40,
             lambda: streaming.log)
    sys.stderr.write(f"\nstreaming again {time.monotonic() - started:.1f} s after the "
                     "database container started\n")
    assert "the database container was started again" in streaming.log
    wait_for("the slot in use", lambda: pg.psql(
        "SELECT active FROM pg_replication_slots WHERE slot_name = 'toybox_backupd'") == "t", 30)


def test_a_database_started_before_the_wait_began_ends_it_too(env: Env, pg: PG) -> None:
    """The race a restore makes: its container is started again just before the streamer's
    quick retry, which fails (the server is still starting) and begins a minute's wait. That
    start is still new to the streamer (it last streamed before it): the wait ends at once,
    once for that start."""
    from toybox_backupd.adapters import docker_api
    from toybox_backupd.daemon.streamer import WATCH_SECONDS, Streamer

    streamer = Streamer(env.settings(**PITR), lambda why: None)
    streamer.streamed_on = "a start before the restore"
    began = time.monotonic()
    assert streamer._pause(60)
    assert time.monotonic() - began < WATCH_SECONDS + 15
    assert streamer.woken_for == docker_api.started_at(pg.name)
    assert not streamer._pause(1)  # not again for the same start


def test_the_slot_is_dropped_past_pitr_max_slot_wal_and_a_base_backup_asked(
        env: Env, pg: PG) -> None:
    """The streamer is down (never started here) while the database writes: the slot would
    keep every segment; past PITR_MAX_SLOT_WAL the watch drops it and asks for a base backup."""
    from toybox_backupd.adapters import database
    from toybox_backupd.daemon.streamer import Streamer
    from toybox_backupd.tiers.pitr import wal

    settings = env.settings(**PITR, PITR_MAX_SLOT_WAL="64MB", NOTIFY_EMAIL_TO="ops@example.com",
                            SMTP_HOST="127.0.0.1", SMTP_FROM="backupd@example.com")
    asked: list[str] = []
    streamer = Streamer(settings, asked.append)
    gauge = database.SlotGauge(settings, wal.SLOT)
    assert database.ensure_slot(settings, wal.SLOT)
    pg.psql("CREATE TABLE filler (x text)")
    streamer.watch_slot(gauge)
    assert asked == [] and database.slot_retained(settings, wal.SLOT) is not None
    for _ in range(6):  # a little over 64 MiB of WAL the slot holds
        pg.psql("INSERT INTO filler SELECT repeat('x', 100) FROM generate_series(1, 1000); "
                "SELECT pg_switch_wal()")
    assert database.slot_retained(settings, wal.SLOT) > 64 * 1024 * 1024
    streamer.watch_slot(gauge)
    gauge.close()
    assert asked == ["replication slot dropped"]
    assert database.slot_retained(settings, wal.SLOT) is None
    pg.psql("CHECKPOINT")
    # pg_wal is the server's own again: what min_wal_size keeps for reuse, and the current
    # segment and the next (the slot no longer holds any)
    kept = int(pg.psql("SELECT count(*) FROM pg_ls_waldir()"))
    reuse = int(pg.psql("SELECT pg_size_bytes(current_setting('min_wal_size'))"))
    assert kept * wal.SEGMENT_SIZE <= max(64 * 1024 * 1024, reuse) + 2 * wal.SEGMENT_SIZE
    with Store(env.state_dir) as history:
        assert "PITR_MAX_SLOT_WAL" in (history.get_state("pitr.gap") or "")
        queued = history.db.execute("SELECT subject FROM outbox").fetchall()
    assert any("replication slot dropped" in row[0] for row in queued)


def test_completed_segments_and_the_current_one_go_off_site(env: Env, pg: PG,
                                                            streaming: Daemon) -> None:
    import hashlib

    from toybox_backupd.places.offsite.target import OffsiteError
    from toybox_backupd.tiers.pitr import wal, wal_offsite

    for _ in range(2):
        pg.psql("CREATE TABLE IF NOT EXISTS t (x int); INSERT INTO t VALUES (1); "
                "SELECT pg_switch_wal()")
    current = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    wait_for("the switched segments", lambda: current in {s.name for s in segments(env)}, 60)
    remote = env.tmp / "offsite"
    remote.mkdir()
    settings = env.settings(**PITR, OFFSITE_URL=f"file://{remote}")
    with Store(env.state_dir) as history:
        stamp = wal_offsite.copy_offsite(settings, history, float("-inf"), 100.0)
        assert stamp == 100.0  # the segment being written went too
        completed = [s for s in wal.segments(settings) if not s.partial]
        assert history.get_state(wal_offsite.STATE_OFFSITE) == completed[-1].name
        # a second pass copies nothing new, and not the partial again within the minute
        assert wal_offsite.copy_offsite(settings, history, stamp, 130.0) == stamp
    for segment in wal.segments(settings):
        copy = remote / segment.path.relative_to(env.backup_dir)
        if segment.partial:  # compressed: mostly the zeros it was padded with
            packed = copy.with_name(copy.name + ".zst")
            assert not copy.exists() and packed.stat().st_size < wal.SEGMENT_SIZE // 4
            plain = subprocess.run(["zstd", "-d", "-c", str(packed)], capture_output=True,
                                   check=True).stdout
            assert len(plain) == wal.SEGMENT_SIZE
            summed = copy.with_name(copy.name + ".sha256")  # of the plain bytes, signed
            assert summed.read_text() == f"{hashlib.sha256(plain).hexdigest()}  {copy.name}\n"
            assert summed.with_name(summed.name + ".sig").exists()
            continue
        assert copy.read_bytes()[:1024] == segment.path.read_bytes()[:1024]
        assert copy.stat().st_size == wal.SEGMENT_SIZE
        summed = copy.with_name(segment.path.name + ".sha256")  # sha256sum's format
        assert summed.exists() and copy.with_name(summed.name + ".sig").exists()  # signed
        if not segment.partial:  # (the one being written has grown since)
            digest = hashlib.sha256(segment.path.read_bytes()).hexdigest()
            assert summed.read_text() == f"{digest}  {segment.name}\n"
    # fetched back where none are here: every segment, checked; a damaged copy never lands
    copies = {p.name.removesuffix(".zst"): p for p in (remote / "wal" / "toybox").iterdir()
              if not p.name.endswith((".sha256", ".sig"))}
    fetched = wal_offsite.fetch(settings, "toybox", 0, [], env.tmp / "fetched")
    assert sorted(p.name for p in fetched) == sorted(copies)
    assert all(p.read_bytes() == copies[p.name].read_bytes() for p in fetched if not p.name.endswith(
        ".partial"))
    [partial] = [p for p in fetched if p.name.endswith(".partial")]
    assert partial.read_bytes() == subprocess.run(["zstd", "-d", "-c", str(copies[partial.name])],
                                                  capture_output=True, check=True).stdout
    local = wal.segments(settings)
    assert wal_offsite.fetch(settings, "toybox", 0, local, env.tmp / "none") == []
    first = remote / completed[0].path.relative_to(env.backup_dir)
    first.write_bytes(first.read_bytes()[:-1] + b"!")
    with pytest.raises(OffsiteError, match=r"does not match its \.sha256"):
        wal_offsite.fetch(settings, "toybox", 0, [], env.tmp / "damaged")
    assert not [p for p in (env.tmp / "damaged").rglob("*") if p.is_file()]
    # pruned off-site: the segments before the one given, with their .sha256; nothing foreign
    (remote / "wal" / "toybox" / "README").write_text("not ours")
    gone = wal_offsite.prune(settings, completed[1].number, "toybox")
    name = str(completed[0].path.relative_to(env.backup_dir))
    assert sorted(gone) == sorted([name, name + ".sha256", name + ".sha256.sig"])
    assert not first.exists() and (remote / "wal" / "toybox" / "README").exists()
    assert (remote / completed[1].path.relative_to(env.backup_dir)).exists()


def test_a_gap_is_reported_and_closed_by_a_base_backup(env: Env, pg: PG, docker_engine: Any) -> None:
    """The WAL the archive needs next is gone from the server (the streamer was away and its
    slot dropped): the archive so far is set aside, streaming starts again at the server's
    position, and a base backup is taken at once."""
    first = Daemon(env, "first", **PITR, **NO_JOBS)
    try:
        wait_for("the WAL streamer", lambda: any(s.partial for s in segments(env)), 90,
                 lambda: first.log)
    finally:
        first.kill()
        for container in wal_helpers(docker_engine, env):
            container.remove(force=True, v=True)
    pg.psql("SELECT pg_drop_replication_slot('toybox_backupd')")
    pg.psql("CREATE TABLE filler (x text)")
    for _ in range(8):  # the server moves on and recycles what the archive would need next
        pg.psql("INSERT INTO filler SELECT repeat('x', 100) FROM generate_series(1, 1000); "
                "SELECT pg_switch_wal()")
    pg.psql("CHECKPOINT")
    second = Daemon(env, "second", **PITR, **NO_JOBS)
    try:
        wait_for("a base backup after the gap", lambda: artifacts(env, "base"), 180,
                 lambda: second.log)
        assert "has already been removed" in second.log
        root = env.backup_dir / "wal" / "toybox"
        wait_for("streaming in a new chain", lambda: any(
            s.partial and s.path.parent == root for s in segments(env)), 60, lambda: second.log)
        with Store(env.state_dir) as history:
            said = history.get_state("pitr.gap") or ""
        assert "has a gap" in said and "/before-" in said
        # the archive before the gap was set aside, and retention then deleted it: no kept
        # base backup needs it (the only one came after the gap)
        assert "retention: WAL segments no kept base backup needs deleted" in second.log
        assert not list(root.glob("before-*"))
    finally:
        second.kill()
        for container in wal_helpers(docker_engine, env):
            container.remove(force=True, v=True)


def test_check_tries_the_route_and_says_what_fails(env: Env, pg: PG) -> None:
    result = env.cli("check", **PITR)
    line = next(x for x in result.stdout.splitlines() if "pitr route" in x)
    assert "replication over 127.0.0.1:5432 allowed" in line, result.stdout
    assert "pg_receivewal (PostgreSQL) 15" in line
    # a stack whose pg_hba.conf has no replication rule for 127.0.0.1: said in plain words
    pg.container.exec_run(["sh", "-c", "sed -i '/replication/d' \"$PGDATA/pg_hba.conf\""],
                          user="postgres")
    pg.psql("SELECT pg_reload_conf()")
    result = env.cli("check", **PITR)
    assert result.returncode != 0
    line = next(x for x in (result.stdout + result.stderr).splitlines() if "pitr route" in x)
    assert "does not work" in line and "pg_hba.conf" in line, line


def test_a_streamer_down_too_long_fails_healthcheck_and_emails_once(plain_env: Env) -> None:
    from toybox_backupd.core.basics import iso, utcnow
    from toybox_backupd.daemon import health
    from toybox_backupd.daemon.keys import STATE_HEARTBEAT, STATE_PITR_DOWN, STATE_PITR_ERROR
    from toybox_backupd.daemon.streamer import Streamer

    settings = plain_env.settings(**PITR, PG_CONTAINER="db", PITR_ALERT_MINUTES="10",
                                  NOTIFY_EMAIL_TO="ops@example.com", SMTP_HOST="127.0.0.1",
                                  SMTP_FROM="backupd@example.com", POSTGRES_HOST="127.0.0.1",
                                  POSTGRES_PORT="9")
    streamer = Streamer(settings, lambda why: None)

    def subjects() -> list[str]:
        with Store(plain_env.state_dir) as history:
            return [row[0] for row in history.db.execute("SELECT subject FROM outbox")]

    with Store(plain_env.state_dir) as history:
        history.set_state(STATE_HEARTBEAT, iso())
        history.set_state(STATE_PITR_DOWN, iso(utcnow() - timedelta(minutes=9)))
        history.set_state(STATE_PITR_ERROR, "pg_receivewal ended with exit status 1: no route")
    streamer.watch()
    assert subjects() == []
    healthy, lines = health.healthcheck(settings)
    assert "WAL streamer starting" in lines[0]
    with Store(plain_env.state_dir) as history:
        history.set_state(STATE_PITR_DOWN, iso(utcnow() - timedelta(minutes=11)))
    streamer.watch()
    streamer.watch()
    assert [s for s in subjects() if "WAL streamer down" in s] == [subjects()[0]]
    healthy, lines = health.healthcheck(settings)
    assert not healthy
    assert any("the WAL streamer has been down for 11 min" in line and "no route" in line
               for line in lines), lines


# The issue asks for a 10-minute outage; OUTAGE_SECONDS keeps the suite's budget (default 45;
# TOYBOX_PITR_OUTAGE_SECONDS=600 runs the full length).
OUTAGE_SECONDS = float(os.environ.get("TOYBOX_PITR_OUTAGE_SECONDS", "45"))


class StreamerKiller:
    """Keeps the WAL streamer down: SIGKILLs every pg_receivewal the supervisor starts."""

    def __init__(self, docker_engine: Any, env: Env):
        self.engine, self.env, self.kills = docker_engine, env, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.2):
            with contextlib.suppress(Exception):  # a helper removed while we look
                for helper in wal_helpers(self.engine, self.env):
                    out = helper.exec_run(["sh", "-c", "for p in /proc/[0-9]*; do grep -qa "
                                           "'^pg_receivewal' $p/cmdline 2>/dev/null && "
                                           "kill -KILL ${p#/proc/} && echo k; done"])
                    self.kills += out.output.decode().count("k")

    def stop(self) -> None:
        self.done.set()
        self.thread.join(10)


class WalSampler:
    """pg_wal's size and the WAL our slot holds, four times a second (None: no slot)."""

    def __init__(self, pg: PG):
        import psycopg

        self.conn = psycopg.connect(host=pg.host, port=pg.port, user=pg.user,
                                    password=pg.password, dbname="postgres", autocommit=True)
        self.samples: list[tuple[int, int | None]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.25):
            row = self.conn.execute(
                "SELECT (SELECT sum(size) FROM pg_ls_waldir()), (SELECT pg_wal_lsn_diff("
                "pg_current_wal_lsn(), restart_lsn) FROM pg_replication_slots WHERE "
                "slot_name = 'toybox_backupd')").fetchone()
            self.samples.append((int(row[0]), None if row[1] is None else int(row[1])))

    def stop(self) -> None:
        self.done.set()
        self.thread.join(10)
        self.conn.close()


def test_pg_wal_stays_bounded_while_the_streamer_is_down(env: Env, pg: PG, docker_engine: Any
                                                         ) -> None:
    """The streamer is kept down (every pg_receivewal SIGKILLed as it starts) while the
    database writes a segment a second and checkpoints as a busy server does: the slot would
    keep everything; the watch, once a second, drops it past PITR_MAX_SLOT_WAL. The WAL the
    slot holds never exceeds that plus a segment; pg_wal holds at most that beyond what the
    server keeps on its own (min_wal_size's recycled segments), far less than the outage wrote;
    the drop is said in the log and a base backup follows."""
    limit, segment = 64 * 1024 * 1024, 16 * 1024 * 1024
    daemon = Daemon(env, **PITR, **NO_JOBS, PITR_MAX_SLOT_WAL="64MB")
    killer = sampler = None
    try:
        wait_for("the WAL streamer", lambda: any(s.partial for s in segments(env)), 90,
                 lambda: daemon.log)
        killer = StreamerKiller(docker_engine, env)
        wait_for("the streamer down", lambda: "WAL streamer down" in daemon.log, 30,
                 lambda: daemon.log)
        pg.psql("CREATE TABLE filler (x text)")
        sampler, deadline = WalSampler(pg), time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < deadline:
            pg.psql("INSERT INTO filler SELECT repeat('x', 100) FROM generate_series(1, 500); "
                    "SELECT pg_switch_wal(); CHECKPOINT")
            time.sleep(1)
        written = int(pg.psql("SELECT count(*) FROM filler")) // 500 * segment
        sampler.stop()
        assert "replication slot dropped" in daemon.log
        wait_for("a base backup", lambda: artifacts(env, "base"), 180, lambda: daemon.log)
        held = [h for _, h in sampler.samples if h is not None]
        with_slot = [size for size, h in sampler.samples if h is not None]
        own = [size for size, h in sampler.samples if h is None]
        sys.stderr.write(
            f"\npg_wal over a {OUTAGE_SECONDS:.0f} s outage ({killer.kills} streamer starts "
            f"killed, {written / 2**20:.0f} MiB of WAL written, PITR_MAX_SLOT_WAL 64 MiB, "
            f"{len(sampler.samples)} samples): the slot held at most {max(held) / 2**20:.1f} "
            f"MiB; pg_wal at most {max(with_slot) / 2**20:.0f} MiB with the slot, "
            f"{max(own) / 2**20:.0f} MiB without it; drops: "
            f"{daemon.log.count('limit=67108864')}\n")
        assert held and own and killer.kills >= 1
        assert max(held) <= limit + segment, [h // 2**20 for h in held]
        assert max(with_slot) <= max(own) + limit + segment
        assert max(with_slot) < written / 2
    finally:
        for part in (killer, sampler):
            if part is not None:
                part.stop()
        daemon.kill()
        for container in wal_helpers(docker_engine, env):
            container.remove(force=True, v=True)


def test_a_segment_killed_while_padded_is_streamed_again(plain_env: Env) -> None:
    """pg_receivewal SIGKILLed while it zero-fills a new segment leaves a short file of zeros,
    which it refuses at its next start: that file (no WAL in it) is removed first; a short one
    with data in it is left alone."""
    from toybox_backupd.tiers.pitr import wal

    settings = plain_env.settings(**PITR, PG_CONTAINER="db")
    root = wal.wal_dir(settings)
    root.mkdir(parents=True)
    (root / "000000010000000000000003").write_bytes(b"\1" * wal.SEGMENT_SIZE)
    (root / "000000010000000000000004.partial").write_bytes(bytes(11 * 1024 * 1024))
    assert wal.remove_unpadded(settings) == ["000000010000000000000004.partial"]
    assert sorted(p.name for p in root.iterdir()) == ["000000010000000000000003"]
    (root / "000000010000000000000004.partial").write_bytes(b"\0" * 1000 + b"\1")
    assert wal.remove_unpadded(settings) == []


def test_a_recovery_reads_one_timelines_path(plain_env: Env) -> None:
    """Timeline 2 forked from 1 in segment 3: a recovery to timeline 2 reads 1's segments
    before 3 and 2's from 3 on; one to timeline 1 reads 1's only, its branch's copies (what
    it streamed while it was the server's) over one streamed again up to the fork."""
    from toybox_backupd.tiers.pitr import wal
    from toybox_backupd.tiers.pitr.timelines import Timelines, parse_history

    settings = plain_env.settings(**PITR, PG_CONTAINER="db")
    root = wal.wal_dir(settings)
    (root / "branch-x").mkdir(parents=True)
    (root / "00000002.history").write_text("1\t0/3000580\tbefore 2026-01-26 05:00:00+00\n")
    for name in ("000000010000000000000001", "000000010000000000000002",
                 "000000010000000000000003.partial", "000000020000000000000003",
                 "000000020000000000000004.partial", "branch-x/000000010000000000000003",
                 "branch-x/000000010000000000000004.partial"):
        (root / name).write_bytes(b"")
    found = wal.segments(settings)
    lines = wal.timelines(settings)
    assert lines.histories == {2: parse_history("1\t0/3000580\n")}
    assert lines.begins(2) == 3 and lines.begins(1) is None
    two = [str(s.path.relative_to(root)) for s in wal.on_path(found, lines, 2)]
    assert two == ["000000010000000000000001", "000000010000000000000002",
                   "000000020000000000000003", "000000020000000000000004.partial"]
    one = [str(s.path.relative_to(root)) for s in wal.on_path(found, lines, 1, first=2)]
    assert one == ["000000010000000000000002", "branch-x/000000010000000000000003",
                   "branch-x/000000010000000000000004.partial"]
    # a base backup taken on timeline 1 before the fork is on timeline 2's path; after, not
    assert lines.contains(2, 1, 0x3000580) and not lines.contains(2, 1, 0x3000581)
    assert not Timelines().contains(2, 1, 0)
    # the moment decides: up to timeline 1's last commit, timeline 1; later, timeline 2
    end = datetime(2026, 1, 26, 5, 1, tzinfo=UTC)
    spans = [(1, end), (2, None)]
    assert wal.timeline_at(end, spans) == 1
    assert wal.timeline_at(end + timedelta(microseconds=1), spans) == 2
    assert wal.timeline_at(end, [(1, None), (2, None)]) == 2  # no commit on 1: the newest
