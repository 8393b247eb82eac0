"""The daemon: the real `toybox-backupd run` process, real pg_dump and volume runs.

A pg_dump is made to hang for as long as a test wants by holding an ACCESS EXCLUSIVE lock on a
table from the test (pg_dump waits for its share lock), so "mid-run" is reliable and real.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import BASE_IMAGE, PG, Env

from toybox_backupd.core.basics import iso
from toybox_backupd.daemon import catchup, health, keys, loop, recovery
from toybox_backupd.store import Run, Store
from toybox_backupd.tiers import registry as jobs

TOKYO_OFFSET = timedelta(hours=9)


# helpers -----------------------------------------------------------------------------------------
class Daemon:
    """`python -m toybox_backupd.cli run` in a subprocess, its log in a file."""

    def __init__(self, env: Env, name: str = "daemon", **overrides: str):
        self.env = env
        self.log_path = env.tmp / f"{name}.log"
        environ = {**os.environ, **env.values, **overrides}
        environ.pop("TOYBOX_ENV_FILE", None)
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "toybox_backupd.cli", "--env-file", str(env.tmp / "none.env"),
             "run"], stdout=self._log, stderr=subprocess.STDOUT, env=environ, cwd=str(env.tmp))

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not exit within {timeout} s:\n{self.log}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        remove_kept_helpers(self.env)


def remove_kept_helpers(env: Env) -> None:
    """The helper a killed daemon kept (start-up recovery would remove it), so that the test's
    volumes can go."""
    from toybox_backupd.adapters import docker_api

    if not (env.state_dir / "history.sqlite3").exists():
        return
    with Store(env.state_dir) as history:
        owner = history.instance_id()
    with contextlib.suppress(Exception):
        docker_api.remove_kept_helpers(owner)


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(env: Env, name: str = "daemon", **overrides: str) -> Daemon:
        instance = Daemon(env, name, **overrides)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.kill()


def wait_for(what: str, check: Callable[[], Any], timeout: float, log: Callable[[], str] | None = None,
             interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{log()}" if log else ""))


def runs(env: Env) -> list[Run]:
    if not (env.state_dir / "history.sqlite3").exists():
        return []
    with Store(env.state_dir) as history:
        return sorted(history.runs(limit=100), key=lambda run: run.id)


def partials(env: Env) -> list[Path]:
    return list(env.backup_dir.rglob("*.partial")) if env.backup_dir.exists() else []


def installed_days_ago(env: Env, days: float) -> None:
    """As if the daemon had first been started `days` ago (so missed runs are caught up)."""
    with Store(env.state_dir) as history:
        history.set_state(keys.STATE_FIRST_STARTED, iso(datetime.now(UTC) - timedelta(days=days)))


def daily_at(moment: datetime) -> str:
    """A crontab line for `moment`'s time of day in Tokyo."""
    local = moment.astimezone(UTC) + TOKYO_OFFSET
    return f"{local.minute} {local.hour} * * *"


class TableLock:
    """Hold ACCESS EXCLUSIVE on a table: a pg_dump started meanwhile waits until release()."""

    def __init__(self, pg: PG, table: str = "orders"):
        self.conn = psycopg.connect(host=pg.host, port=pg.port, user=pg.user,
                                    password=pg.password, dbname=pg.db, autocommit=False)
        self.conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

    def release(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


@pytest.fixture
def table_lock(pg: PG) -> Iterator[TableLock]:
    lock = TableLock(pg)
    yield lock
    lock.release()


def dump_waiting(pg: PG) -> bool:
    """pg_dump is connected and blocked on our lock."""
    out = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name='toybox-backupd'"
                  " AND wait_event_type='Lock'")
    return out.strip() not in ("", "0")


# schedule: one job at a time, in order -------------------------------------------------------
def test_jobs_due_together_run_in_order_without_overlap(env: Env, pg: PG, make_volume: Any,
                                                        table_lock: TableLock,
                                                        daemons: Callable[..., Daemon]) -> None:
    volume = make_volume("mkdir -p uploads && for i in $(seq 1 20); do "
                         "head -c 20000 /dev/urandom > uploads/f$i.bin; done")
    now = datetime.now(UTC)
    due = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
    if due - now < timedelta(seconds=8):
        due += timedelta(minutes=1)
    expr = daily_at(due)
    proc = daemons(env, PGDUMP_SCHEDULE=expr, VOLUME_FULL_SCHEDULE=expr,
                   VOLUME_DIFF_SCHEDULE=expr, BACKUP_VOLUMES=volume, HELPER_IMAGE=BASE_IMAGE,
                   CATCH_UP="false")
    wait_for("the start-up summary", lambda: "diff: '" in proc.log, 20, lambda: proc.log)
    summary = proc.log
    for job in ("logical", "full", "diff"):
        assert f"{job}: '{expr}' in Asia/Tokyo, next run " in summary
    assert runs(env) == []
    # at `due` all three are due; the dump hangs on our lock, the others must wait for it
    wait_for("the dump to start", lambda: [r for r in runs(env) if r.status == "running"],
             (due - datetime.now(UTC)).total_seconds() + 30, lambda: proc.log)
    wait_for("pg_dump to wait for the lock", lambda: dump_waiting(pg), 20)
    time.sleep(2)
    assert [(r.job, r.status) for r in runs(env)] == [("logical", "running")]
    table_lock.release()
    done = wait_for("three finished runs",
                    lambda: (lambda rs: rs if len(rs) == 3 and all(r.ended_at for r in rs)
                             else None)(runs(env)), 90, lambda: proc.log)
    assert [r.job for r in done] == ["logical", "full", "diff"]
    assert all(r.status == "ok" for r in done), [(r.job, r.status, r.error) for r in done]
    assert all(r.trigger == "schedule" for r in done)
    assert done[0].started_at >= due
    for earlier, later in pairwise(done):
        assert earlier.ended_at is not None and later.started_at >= earlier.ended_at
    assert (done[0].ended_at - done[0].started_at) >= timedelta(seconds=2)  # type: ignore[operator]
    with Store(env.state_dir) as history:
        tiers = [(item.tier, item.target) for item in history.artifacts()]
    assert sorted(tiers) == sorted([("logical", "toybox"), ("full", volume), ("diff", volume)])
    assert "next run" in proc.log
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not partials(env)


# start-up recovery and catch-up ---------------------------------------------------------------
def test_kill_9_mid_run_then_recovery_and_catch_up(env: Env, pg: PG, make_volume: Any,
                                                   table_lock: TableLock,
                                                   daemons: Callable[..., Daemon]) -> None:
    volume = make_volume("echo hello > a.txt")
    installed_days_ago(env, 2)
    # both were due 10 minutes ago, while "the daemon was down": both are caught up at start,
    # the dump first (it hangs on our lock), the differential queued behind it
    expr = daily_at(datetime.now(UTC) - timedelta(minutes=10))
    settings = dict(PGDUMP_SCHEDULE=expr, VOLUME_DIFF_SCHEDULE=expr, BACKUP_VOLUMES=volume)
    first = daemons(env, "first", **settings)
    wait_for("the catch-up dump to hang", lambda: dump_waiting(pg), 30, lambda: first.log)
    assert "catching up now" in first.log
    # the dump's partial (the roles, dumped alongside, wait as a partial too until the dump ends)
    [partial] = wait_for("the partial dump", lambda: [
        p for p in partials(env) if p.name.endswith(".dump.partial")], 10)
    [interrupted] = runs(env)
    assert (interrupted.job, interrupted.status, interrupted.trigger) == ("logical", "running",
                                                                          "catchup")
    first.proc.send_signal(signal.SIGKILL)
    first.wait(10)
    assert partial.exists()
    table_lock.release()

    second = daemons(env, "second", **settings)
    wait_for("the caught-up differential", lambda: [
        r for r in runs(env) if r.job == "diff" and r.ended_at], 60, lambda: second.log)
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0
    log = second.log
    everything = runs(env)
    dump = next(r for r in everything if r.id == interrupted.id)
    assert dump.status == "interrupted"
    assert dump.error and "stopped or crashed" in dump.error
    assert dump.details.get("recovered_by") == "start-up recovery"
    assert not partial.exists() and not partials(env)
    assert "marked interrupted" in log and "partial file removed" in log
    # the differential missed its slot: it ran once, as a catch-up; the interrupted catch-up
    # of the dump is not retried again (a crash at start-up never loops)
    diffs = [r for r in everything if r.job == "diff"]
    assert [(r.trigger, r.status) for r in diffs] == [("catchup", "ok")], [
        (r.trigger, r.status, r.error) for r in diffs]
    assert [r.id for r in everything if r.job == "logical"] == [interrupted.id]
    # a third start: nothing more to recover or catch up
    third = daemons(env, "third", **settings)
    wait_for("start-up", lambda: "next run" in third.log, 20, lambda: third.log)
    time.sleep(1)
    third.signal(signal.SIGTERM)
    assert third.wait(30) == 0
    assert "nothing to recover" in third.log
    assert len(runs(env)) == len(everything)


def test_recover_restarts_containers_and_removes_helpers(plain_env: Env, docker_engine: Any,
                                                         images: Any) -> None:
    from toybox_backupd.adapters import docker_api

    settings = plain_env.settings(BACKUP_VOLUMES="media")
    with Store(settings.state_dir) as history:
        instance = history.instance_id()

    def sleeper(**labels: str) -> Any:
        return docker_engine.containers.run(BASE_IMAGE, ["sleep", "300"], detach=True,
                                            labels={"toybox-backupd.test": "1", **labels})

    app = sleeper()
    helper = sleeper(**{docker_api.HELPER_LABEL: "backup", docker_api.OWNER_LABEL: instance})
    # another installation's helper (another STATE_DIR on the same engine) is not ours
    others = sleeper(**{docker_api.HELPER_LABEL: "backup",
                        docker_api.OWNER_LABEL: "another-instance"})
    try:
        app.stop(timeout=1)
        settings.backup_dir.mkdir(parents=True)
        keep = settings.backup_dir / "logical" / "toybox" / "x.dump"
        keep.parent.mkdir(parents=True)
        keep.write_bytes(b"done")
        (keep.parent / "toybox_20260126-170000.dump.partial").write_bytes(b"half")
        # a user's files restored into BACKUP_DIR are not ours, whatever their names
        theirs = [settings.backup_dir / "restore" / "uploads" / "photo.jpg.partial",
                  settings.backup_dir / "logical" / "toybox" / "notes.partial",
                  settings.backup_dir / "upload.partial"]
        for path in theirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"a user's file")
        with Store(settings.state_dir) as history:
            run_id = history.open_run("full", "media", "schedule", pid=999999)
            history.record_stopped(app.id, app.name, run_id)
            history.record_stopped("0" * 64, "gone-container", run_id)
        result = recovery.recover(settings)
        assert result["interrupted"] == [run_id]
        assert result["partials_removed"] == ["logical/toybox/toybox_20260126-170000.dump.partial"]
        assert all(path.read_bytes() == b"a user's file" for path in theirs)
        assert result["containers_started"] == [app.name]
        assert result["helpers_removed"] >= 1
        app.reload()
        assert app.status == "running"
        assert keep.exists()
        with Store(settings.state_dir) as history:
            assert history.stopped_containers() == []
            run = history.run(run_id)
            assert run is not None and run.status == "interrupted" and run.ended_at
        assert result["helpers_removed"] == 1
        assert not docker_engine.containers.list(all=True, filters={"id": helper.id})
        assert docker_engine.containers.list(all=True, filters={"id": others.id})
    finally:
        for container in (app, helper, others):
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)


def test_missed_jobs_rules(plain_env: Env) -> None:
    settings = plain_env.settings(PGDUMP_SCHEDULE="0 17 * * *", BACKUP_VOLUMES="media",
                                  VOLUME_FULL_SCHEDULE="30 17 * * 0",
                                  VOLUME_DIFF_SCHEDULE="45 17 * * *")
    tokyo = settings.zone
    now = datetime(2026, 1, 26, 18, 10, tzinfo=tokyo)  # Monday; back after a 16:55 reboot
    installed = datetime(2026, 1, 1, tzinfo=tokyo)
    with Store(settings.state_dir) as history:
        def run(job: str, at: datetime, status: str, trigger: str = "schedule") -> None:
            run_id = history.open_run(job, "x", trigger, started_at=at)
            history.close_run(run_id, status)

        run("logical", datetime(2026, 1, 25, 17, 0, tzinfo=tokyo), "ok")
        run("full", datetime(2026, 1, 25, 17, 30, tzinfo=tokyo), "ok")
        run("diff", datetime(2026, 1, 25, 17, 45, tzinfo=tokyo), "ok")
        # missed today's 17:00 dump and 17:45 differential; the Sunday full ran
        assert catchup.missed_jobs(settings, history, now, installed) == {
            "logical": datetime(2026, 1, 26, 17, 0, tzinfo=tokyo),
            "diff": datetime(2026, 1, 26, 17, 45, tzinfo=tokyo)}
        run("diff", datetime(2026, 1, 26, 18, 10, tzinfo=tokyo), "ok", "manual")
        assert list(catchup.missed_jobs(settings, history, now, installed)) == ["logical"]
        # a new installation catches nothing up
        assert catchup.missed_jobs(settings, history, now, now - timedelta(minutes=5)) == {}
        assert catchup.missed_jobs(settings, history, now, None) == {}
        # once per slot however many were missed: two days down is still one dump
        assert list(catchup.missed_jobs(settings, history, now + timedelta(days=2), installed)) \
            == ["logical", "diff"]
        # a failed run served its slot (its failure was reported; no retry at start)
        run("logical", datetime(2026, 1, 26, 17, 0, tzinfo=tokyo), "failed")
        assert catchup.missed_jobs(settings, history, now, installed) == {}
        # an interrupted scheduled run did not: the backup did not happen, so it runs once more
        with history.tx() as db:
            db.execute("UPDATE runs SET status='interrupted' WHERE status='failed'")
        assert list(catchup.missed_jobs(settings, history, now, installed)) == ["logical"]
        # ...but an interrupted catch-up is not retried again (no crash loop)
        run("logical", datetime(2026, 1, 26, 18, 10, tzinfo=tokyo), "interrupted", "catchup")
        assert catchup.missed_jobs(settings, history, now + timedelta(minutes=1), installed) == {}
        # a disabled job is never caught up
        off = plain_env.settings(PGDUMP_SCHEDULE="", BACKUP_VOLUMES="media",
                                 VOLUME_FULL_SCHEDULE="", VOLUME_DIFF_SCHEDULE="45 17 * * *")
        assert list(catchup.missed_jobs(off, history, now + timedelta(days=2), installed)) == [
            "diff"]


# shutdown -------------------------------------------------------------------------------------------
def start_hung_dump(env: Env, pg: PG, daemons: Callable[..., Daemon], **overrides: str) -> Daemon:
    installed_days_ago(env, 1)
    expr = daily_at(datetime.now(UTC) - timedelta(minutes=5))
    proc = daemons(env, PGDUMP_SCHEDULE=expr, **overrides)
    wait_for("the dump to hang", lambda: dump_waiting(pg), 30, lambda: proc.log)
    wait_for("the partial file", lambda: partials(env), 10)
    return proc


def test_sigterm_lets_the_run_finish(env: Env, pg: PG, table_lock: TableLock,
                                     daemons: Callable[..., Daemon]) -> None:
    proc = start_hung_dump(env, pg, daemons)
    proc.signal(signal.SIGTERM)
    wait_for("the stop message", lambda: "waiting for the current logical run" in proc.log, 10,
             lambda: proc.log)
    time.sleep(1.5)
    assert proc.proc.poll() is None  # still finishing the run
    [run] = runs(env)
    assert run.status == "running"
    table_lock.release()
    assert proc.wait(60) == 0
    [run] = runs(env)
    assert run.status == "ok", run.error
    assert not partials(env)
    with Store(env.state_dir) as history:
        [item] = history.artifacts(tier="logical")
        assert history.get_state(keys.STATE_STOPPED)
    assert (env.backup_dir / item.path).stat().st_size == item.size


def test_second_signal_aborts_the_run_cleanly(env: Env, pg: PG, table_lock: TableLock,
                                              daemons: Callable[..., Daemon]) -> None:
    proc = start_hung_dump(env, pg, daemons)
    proc.signal(signal.SIGTERM)
    wait_for("the stop message", lambda: "waiting for the current logical run" in proc.log, 10,
             lambda: proc.log)
    started = time.monotonic()
    proc.signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert time.monotonic() - started < 20
    [run] = runs(env)
    assert run.status == "interrupted"
    assert run.error == loop.ABORT_REASON
    assert not partials(env)
    with Store(env.state_dir) as history:
        assert history.artifacts(tier="logical") == []
    assert "aborting the current run" in proc.log


SLOW_TAR_IMAGE = "toybox-test/slow-tar:latest"


@pytest.fixture
def slow_tar_image(docker_engine: Any, images: Any) -> str:
    """The test base image whose `tar` waits 60 s before it runs the real GNU tar."""
    import io

    dockerfile = (f"FROM {BASE_IMAGE}\n"
                  "RUN printf '#!/bin/sh\\nsleep 60\\nexec /usr/bin/tar \"$@\"\\n' "
                  "> /usr/local/bin/tar && chmod 755 /usr/local/bin/tar\n")
    docker_engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=SLOW_TAR_IMAGE,
                               rm=True, network_mode="none")
    return SLOW_TAR_IMAGE


def labelled_app(docker_engine: Any, make_volume: Any) -> tuple[str, Any]:
    """A volume, and a running container using it that asks to be stopped during backups."""
    from toybox_backupd.adapters import docker_api

    volume = make_volume("mkdir -p uploads && echo one > uploads/a.txt")
    app = docker_engine.containers.run(
        BASE_IMAGE, ["bash", "-c", "trap 'exit 0' TERM; sleep 300 & wait"], detach=True,
        volumes={volume: {"bind": "/data", "mode": "rw"}},
        labels={docker_api.STOP_LABEL: "true", "toybox-backupd.test": "1"})
    return volume, app


def test_second_signal_aborts_a_volume_run_and_restarts_containers(
        plain_env: Env, docker_engine: Any, make_volume: Any, slow_tar_image: str,
        daemons: Callable[..., Daemon]) -> None:
    from toybox_backupd.adapters import docker_api

    volume, app = labelled_app(docker_engine, make_volume)
    try:
        installed_days_ago(plain_env, 1)
        expr = daily_at(datetime.now(UTC) - timedelta(minutes=5))
        proc = daemons(plain_env, PGDUMP_SCHEDULE="", VOLUME_FULL_SCHEDULE=expr,
                       BACKUP_VOLUMES=volume, HELPER_IMAGE=slow_tar_image)

        def app_state() -> str:
            app.reload()
            return str(app.status)

        # mid-run: the app is stopped for a consistent archive and tar is streaming (slowly)
        wait_for("the app to be stopped", lambda: app_state() == "exited", 30, lambda: proc.log)
        wait_for("the partial archive", lambda: partials(plain_env), 20, lambda: proc.log)
        with Store(plain_env.state_dir) as history:
            assert [row["name"] for row in history.stopped_containers()] == [app.name]
        proc.signal(signal.SIGTERM)
        wait_for("the stop message", lambda: "waiting for the current full run" in proc.log, 10)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(45) == 0
        assert time.monotonic() - started < 30
        [run] = runs(plain_env)
        assert (run.job, run.status, run.error) == ("full", "interrupted", loop.ABORT_REASON)
        assert not partials(plain_env)
        assert app_state() == "running"
        with Store(plain_env.state_dir) as history:
            assert history.stopped_containers() == []
            assert history.artifacts(tier="full") == []
        helpers = docker_engine.containers.list(
            all=True, filters={"label": docker_api.HELPER_LABEL, "volume": volume})
        assert helpers == []
    finally:
        app.remove(force=True, v=True)


def test_time_limit_ends_a_hung_run(env: Env, pg: PG, table_lock: TableLock,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    settings = env.settings()
    monkeypatch.setattr(jobs.Job, "time_limit_seconds", lambda self, settings: 3)
    worker = loop.Daemon(settings)
    started = time.monotonic()
    run_id = worker.execute("logical")
    assert time.monotonic() - started < 20
    assert run_id is not None
    with Store(settings.state_dir) as history:
        run = history.run(run_id)
    assert run is not None and run.status == "failed"
    assert run.error and "time limit" in run.error
    assert not partials(env)
    # the dump itself is ended, not just our end of its stream: no pg_dump process is left in
    # the database container and no session of ours holds its snapshot and locks
    assert wait_for("pg_dump and its session to end",
                    lambda: not pg_dumps(pg) and not our_sessions(pg), 15,
                    lambda: f"{pg_dumps(pg)} {our_sessions(pg)}")


def pg_dumps(pg: PG) -> list[str]:
    """Command lines of pg_dump processes in the database container."""
    script = ('for f in /proc/[0-9]*/cmdline; do tr "\\0" " " < "$f" 2>/dev/null; echo; done'
              " | grep '^pg_dump' || true")
    out = pg.container.exec_run(["sh", "-c", script]).output.decode()
    return [line for line in out.splitlines() if line.strip()]


def our_sessions(pg: PG) -> str:
    return pg.psql("SELECT string_agg(pid::text, ',') FROM pg_stat_activity"
                   " WHERE application_name='toybox-backupd'", db="postgres")


def test_one_daemon_per_state_dir(plain_env: Env, daemons: Callable[..., Daemon]) -> None:
    first = daemons(plain_env, "first")
    wait_for("start-up", lambda: "next run" in first.log, 20, lambda: first.log)
    second = daemons(plain_env, "second")
    assert second.wait(20) == 1
    assert "another toybox-backupd daemon already runs" in second.log
    first.signal(signal.SIGINT)
    assert first.wait(20) == 0


# health ---------------------------------------------------------------------------------------------
def test_required_slot() -> None:
    from zoneinfo import ZoneInfo

    tokyo = ZoneInfo("Asia/Tokyo")
    # daily 17:00: 6 h (25 % of a day) to succeed
    due = health.required_slot("0 17 * * *", tokyo, datetime(2026, 1, 26, 22, 59, tzinfo=tokyo))
    assert due is not None and due.slot == datetime(2026, 1, 25, 17, 0, tzinfo=tokyo)
    assert due.interval == timedelta(days=1) and due.margin == timedelta(hours=6)
    due = health.required_slot("0 17 * * *", tokyo, datetime(2026, 1, 26, 23, 0, tzinfo=tokyo))
    assert due is not None and due.slot == datetime(2026, 1, 26, 17, 0, tzinfo=tokyo)
    # weekly: 42 h
    due = health.required_slot("30 17 * * 0", tokyo, datetime(2026, 1, 27, 11, 30, tzinfo=tokyo))
    assert due is not None and due.slot == datetime(2026, 1, 25, 17, 30, tzinfo=tokyo)
    assert due.margin == timedelta(hours=42)
    # every 15 minutes: at least an hour
    due = health.required_slot("*/15 * * * *", tokyo, datetime(2026, 1, 26, 12, 5, tzinfo=tokyo))
    assert due is not None and due.slot == datetime(2026, 1, 26, 11, 0, tzinfo=tokyo)
    assert due.margin == timedelta(hours=1)


def test_healthcheck(plain_env: Env) -> None:
    settings = plain_env.settings(PGDUMP_SCHEDULE="0 17 * * *")
    tokyo = settings.zone
    now = datetime(2026, 1, 27, 9, 0, tzinfo=tokyo)
    healthy, lines = health.healthcheck(settings, now=now)
    assert not healthy and len(lines) == 1 and "no heartbeat" in lines[0]
    with Store(settings.state_dir) as history:
        history.set_state(keys.STATE_HEARTBEAT, iso(now - timedelta(seconds=20)))
        history.set_state(keys.STATE_FIRST_STARTED, iso(now - timedelta(hours=2)))
        # installed this morning: the dump has not been due since
        healthy, lines = health.healthcheck(settings, now=now)
        assert healthy, lines
        assert lines[0].startswith("healthy:") and "logical not due yet" in lines[0]
        # installed two days ago, never succeeded
        history.set_state(keys.STATE_FIRST_STARTED, iso(now - timedelta(days=2)))
        run_id = history.open_run("logical", "toybox", "schedule",
                                  started_at=datetime(2026, 1, 26, 17, 0, tzinfo=tokyo))
        history.close_run(run_id, "failed", error="pg_dump: connection refused")
        healthy, lines = health.healthcheck(settings, now=now)
        assert not healthy
        [line] = lines
        assert line.startswith("logical: no successful run since the one due Mon 2026-01-26 17:00")
        assert "never succeeded" in line and "connection refused" in line
        # a later run of that slot succeeded
        run_id = history.open_run("logical", "toybox", "schedule",
                                  started_at=datetime(2026, 1, 26, 17, 0, 1, tzinfo=tokyo))
        history.close_run(run_id, "ok")
        assert health.healthcheck(settings, now=now)[0]
        # today's 17:00 dump has 6 h (25 % of its day) before its absence counts
        history.set_state(keys.STATE_HEARTBEAT, iso(datetime(2026, 1, 27, 22, 58, tzinfo=tokyo)))
        assert health.healthcheck(settings, now=datetime(2026, 1, 27, 22, 59, tzinfo=tokyo))[0]
        history.set_state(keys.STATE_HEARTBEAT, iso(datetime(2026, 1, 27, 23, 0, tzinfo=tokyo)))
        healthy, lines = health.healthcheck(settings, now=datetime(2026, 1, 27, 23, 1, tzinfo=tokyo))
        assert not healthy and lines[0].startswith("logical: no successful run since the one due "
                                                   "Tue 2026-01-27 17:00")
        # a stale heartbeat is its own line
        healthy, lines = health.healthcheck(settings, now=datetime(2026, 1, 27, 23, 10, tzinfo=tokyo))
        assert not healthy and any(line.startswith("daemon: last heartbeat 10 min ago")
                                   for line in lines)


def test_cli_healthcheck_exit_codes(plain_env: Env) -> None:
    result = plain_env.cli("healthcheck")
    assert result.returncode == 1 and "no heartbeat" in result.stdout
    with Store(plain_env.state_dir) as history:
        history.set_state(keys.STATE_HEARTBEAT, iso())
        history.set_state(keys.STATE_FIRST_STARTED, iso())
    result = plain_env.cli("healthcheck")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("healthy:")


def test_kill_9_of_a_backup_mid_archive_then_daemon_start_restarts_the_container(
        plain_env: Env, docker_engine: Any, make_volume: Any, slow_tar_image: str,
        daemons: Callable[..., Daemon]) -> None:
    from toybox_backupd.adapters import docker_api

    volume, app = labelled_app(docker_engine, make_volume)
    environ = {**os.environ, **plain_env.values, "BACKUP_VOLUMES": volume,
               "HELPER_IMAGE": slow_tar_image}
    backup = subprocess.Popen(
        [sys.executable, "-m", "toybox_backupd.cli", "--env-file", str(plain_env.tmp / "none.env"),
         "backup", "full"], env=environ, cwd=str(plain_env.tmp),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def app_state() -> str:
            app.reload()
            return str(app.status)

        wait_for("the app to be stopped", lambda: app_state() == "exited", 30)
        wait_for("the partial archive", lambda: partials(plain_env), 20)
        backup.send_signal(signal.SIGKILL)  # no finally, no cleanup: a crash
        backup.wait(10)
        time.sleep(1)
        assert app_state() == "exited"
        proc = daemons(plain_env, PGDUMP_SCHEDULE="", VOLUME_FULL_SCHEDULE="",
                       VOLUME_DIFF_SCHEDULE="", BACKUP_VOLUMES=volume, CATCH_UP="false")
        wait_for("the app to run again", lambda: app_state() == "running", 30, lambda: proc.log)
        wait_for("recovery to finish", lambda: "start-up recovery done" in proc.log, 30,
                 lambda: proc.log)
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        [run] = runs(plain_env)
        assert (run.job, run.status) == ("full", "interrupted")
        assert not partials(plain_env)
        with Store(plain_env.state_dir) as history:
            assert history.stopped_containers() == []
        helpers = docker_engine.containers.list(
            all=True, filters={"label": docker_api.HELPER_LABEL, "volume": volume})
        assert helpers == []
    finally:
        if backup.poll() is None:
            backup.kill()
        app.remove(force=True, v=True)
