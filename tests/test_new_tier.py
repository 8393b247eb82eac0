"""A new tier is one module (tests/fake_tier.py) plus one registry entry: with no other change
it is scheduled, run, listed, retained, verified, health-checked and reported."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, SecretStr

from toybox_backupd import cli
from toybox_backupd.actions import retention, runner, verify
from toybox_backupd.core.basics import iso, utcnow
from toybox_backupd.core.settings import Settings
from toybox_backupd.daemon import catchup, health, keys, loop
from toybox_backupd.notify import report
from toybox_backupd.store import Store
from toybox_backupd.tiers import registry as jobs

SNAPSHOT = jobs.Job(
    "snapshot", "directory snapshot", "fake_tier", "SNAPSHOT_SCHEDULE", "SNAPSHOT_KEEP_DAYS",
    "SNAPSHOT_TIME_LIMIT_MIN", "SNAPSHOT_DIRS", ("snapshot",))


class SnapshotSettings(Settings):
    """The settings a new tier brings (its own variables, next to the others)."""

    snapshot_schedule: str = Field("*/10 * * * *", alias="SNAPSHOT_SCHEDULE")
    snapshot_keep_days: int = Field(2, alias="SNAPSHOT_KEEP_DAYS")
    snapshot_time_limit_min: int = Field(5, alias="SNAPSHOT_TIME_LIMIT_MIN")
    snapshot_dirs: str = Field("", alias="SNAPSHOT_DIRS")
    ping_url_snapshot: SecretStr | None = Field(None, alias="PING_URL_SNAPSHOT")


@pytest.fixture
def snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SnapshotSettings]:
    source = tmp_path / "site"
    (source / "img").mkdir(parents=True)
    (source / "img" / "a.png").write_bytes(b"\x89PNG" + b"x" * 1000)
    (source / "index.html").write_text("<h1>hi</h1>")
    values = {"BACKUP_DIR": str(tmp_path / "backups"), "STATE_DIR": str(tmp_path / "state"),
              "TZ": "Asia/Tokyo", "POSTGRES_DB": "toybox", "PGDUMP_SCHEDULE": "",
              "VOLUME_FULL_SCHEDULE": "", "VOLUME_DIFF_SCHEDULE": "", "BACKUP_VOLUMES": "",
              "NOTIFY_EMAIL_TO": "", "SNAPSHOT_DIRS": str(source)}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    jobs.register(SNAPSHOT)
    try:
        yield SnapshotSettings(_env_file=None)  # type: ignore[call-arg]
    finally:
        jobs.unregister("snapshot")


def test_a_registered_tier_is_scheduled(snapshot: SnapshotSettings) -> None:
    now = datetime(2026, 1, 26, 18, 3, tzinfo=UTC)
    daemon = loop.Daemon(snapshot)
    scheduler = daemon.build_scheduler(now, {})
    assert [job.name for job in scheduler.get_jobs() if job.id != "outbox"] == ["snapshot"]
    assert scheduler.get_job(f"{len(jobs.names())}-snapshot") is not None
    with Store(snapshot.state_dir) as store:
        missed = catchup.missed_jobs(snapshot, store, now, now - timedelta(days=1))
    assert missed == {"snapshot": datetime(2026, 1, 26, 18, 0, tzinfo=UTC)}
    with Store(snapshot.state_dir) as store:
        store.set_state(keys.STATE_HEARTBEAT, iso(now - timedelta(seconds=10)))
        store.set_state(keys.STATE_FIRST_STARTED, iso(now - timedelta(days=1)))
    healthy, lines = health.healthcheck(snapshot, now=now)
    assert not healthy
    assert lines == [line for line in lines if line.startswith("snapshot: no successful run")]
    assert jobs.get("snapshot").disabled_reason(snapshot) is None
    assert jobs.get("snapshot").disabled_reason(
        snapshot.model_copy(update={"snapshot_dirs": ""})) == "SNAPSHOT_DIRS is empty"


def test_a_registered_tier_runs_lists_retains_verifies_and_reports(
        snapshot: SnapshotSettings, capsys: pytest.CaptureFixture[str]) -> None:
    # an old snapshot, older than SNAPSHOT_KEEP_DAYS: retention must take it after a success
    old = snapshot.backup_dir / "snapshot" / "site" / "site_old.tar"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old")
    with Store(snapshot.state_dir) as store:
        old_id = store.add_artifact(run_id=None, tier="snapshot", target=str(old.parent),
                                    path="snapshot/site/site_old.tar",
                                    created_at=utcnow() - timedelta(days=10), size=3,
                                    sha256="0" * 64)
    target = snapshot.snapshot_dirs
    with Store(snapshot.state_dir) as store:
        store.set_artifact_status(old_id, "ok")
        with store.tx() as db:  # the old one belongs to the same target
            db.execute("UPDATE artifacts SET target=? WHERE id=?", (target, old_id))

    # daily: a schedule's worth of newest snapshots (2 in SNAPSHOT_KEEP_DAYS) is kept
    daily = snapshot.model_copy(update={"snapshot_schedule": "0 3 * * *"})
    first = runner.run_job(daily, "snapshot")
    with Store(snapshot.state_dir) as store:
        # the newest earlier backup is 10 days old: retention deletes nothing, and says why
        assert "keep window" in store.run(first).details["retention_refused"]  # type: ignore[union-attr]
        with store.tx() as db:  # as if it had been made yesterday
            db.execute("UPDATE artifacts SET created_at=? WHERE run_id=?",
                       (iso(utcnow() - timedelta(days=1)), first))
    assert old.exists()
    time.sleep(1.1)  # a new second: a new file name
    run_id = runner.run_job(daily, "snapshot")
    with Store(snapshot.state_dir) as store:
        run = store.run(run_id)
        assert run is not None and run.status == "ok", run
        [yesterday, made] = store.artifacts(tier="snapshot")
        assert run.details["retention_deleted"] == ["snapshot/site/site_old.tar"]  # retained
        assert not old.exists()
        message = report.compose_run(daily, store, run, message_id="<t@x>")
    assert made.path.startswith("snapshot/site/site_") and made.size > 1000

    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert message["Subject"].startswith("[toybox-backupd] OK snapshot ")
    assert "OK: directory snapshot of" in text
    assert re.search(r"^ +snapshot +\S+ +2 +20", text, re.M), text  # its row among restore points
    assert "Next snapshot run" in text and "(0 3 * * *)" in text
    assert any(line.strip().startswith("snapshot") and "OK" in line for line in text.splitlines())

    checked = verify.verify_all(snapshot)
    assert [(item.tier, item.ok) for item in checked] == [("snapshot", True)] * 2

    env = Path(snapshot.state_dir).parent / "none.env"
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with redirect_stdout(out):
            assert cli.main(["--env-file", str(env), "list", "--tier", "snapshot", "--json"]) == 0
    finally:  # cli.main points logging at this test's stderr, which pytest closes after it
        root.handlers[:], root.level = handlers, level
    assert [item["path"] for item in json.loads(out.getvalue())] == [yesterday.path, made.path]


def test_retention_plans_a_registered_tier_by_its_own_setting(
        snapshot: SnapshotSettings) -> None:
    from toybox_backupd.store import Artifact

    now = datetime(2026, 1, 26, tzinfo=UTC)

    def item(number: int, days: int) -> Any:
        return Artifact(number, None, "snapshot", "/srv/site", f"s{number}.tar",
                        now - timedelta(days=days), 1, "0" * 64, "ok", None, {}, None)

    keep = retention.keep_days(snapshot)
    assert keep["snapshot"] == 2
    decided = retention.plan([item(1, 9), item(2, 5), item(3, 1)], now=now, keep_days=keep)
    assert decided.delete_ids == [1, 2]
    assert "SNAPSHOT_KEEP_DAYS" in decided.reasons[1]
