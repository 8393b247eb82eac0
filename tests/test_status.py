"""`toybox-backupd status`: last and next runs, restore points per tier and target, off-site lag,
free space, and what needs attention (failed runs, overdue jobs, low disk, stuck reports)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from test_new_tier import SnapshotSettings, snapshot  # noqa: F401 - the fake tier's fixture

from toybox_backupd import cli
from toybox_backupd.actions import runner
from toybox_backupd.core.basics import iso, utcnow
from toybox_backupd.daemon import keys
from toybox_backupd.daemon import status as state
from toybox_backupd.store import Store


def render(settings: Any, capsys: pytest.CaptureFixture[str], as_json: bool = False) -> str:
    capsys.readouterr()
    assert cli.cmd_status(settings, argparse.Namespace(json=as_json)) == 0
    return capsys.readouterr().out


def test_status_shows_runs_points_and_what_needs_attention(
        snapshot: SnapshotSettings, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    settings = snapshot.model_copy(update={"snapshot_schedule": "0 3 * * *"})
    good = runner.run_job(settings, "snapshot", trigger="schedule")
    with Store(settings.state_dir) as store:
        store.set_state(keys.STATE_HEARTBEAT, iso(utcnow() - timedelta(seconds=20)))
        store.set_state(keys.STATE_FIRST_STARTED, iso(utcnow() - timedelta(hours=1)))
    text = render(settings, capsys)
    assert "daemon heartbeat 2" in text.splitlines()[0]
    [row] = [line for line in text.splitlines() if line.startswith("snapshot  0 3 * * *")]
    assert f"#{good} " in row and " ok " in row and "(disabled)" not in row
    [points] = [line for line in text.splitlines() if settings.snapshot_dirs in line]
    assert points.startswith("snapshot ") and " 1 " in points
    assert "off-site   off (OFFSITE_URL is empty)" in text
    assert "free of" in text and str(settings.backup_dir) in text
    assert text.rstrip().endswith("nothing needs attention")

    # a failed last run, and a chat message stuck in the outbox since long ago
    broken = settings.model_copy(update={"snapshot_dirs": str(Path(snapshot.snapshot_dirs) / "gone")})
    bad = runner.run_job(broken, "snapshot")
    with Store(settings.state_dir) as store:
        run = store.run(bad)
        assert run is not None
        store.outbox_add(run_id=bad, message_id="<stuck@test>", subject="FAILED snapshot",
                         message=b"{}", recipients=["json://127.0.0.1:9"],
                         now=utcnow() - timedelta(hours=3), channel="apprise")
        store.outbox_failed(1, "retrying", utcnow() + timedelta(hours=1), "connection refused")
    found = state.gather(settings)
    assert [line.split(":")[0] for line in found.attention] == ["snapshot", "outbox"]
    assert f"the last run #{bad} failed" in found.attention[0]
    assert "is not a directory" in found.attention[0]
    assert "chat message 'FAILED snapshot'" in found.attention[1]
    assert "retrying (0 attempt(s)): connection refused" in found.attention[1]
    text = render(settings, capsys)
    assert "NEEDS ATTENTION:" in text and "outbox     1 report(s) waiting" in text

    data = json.loads(render(settings, capsys, as_json=True))
    job = {entry["job"]: entry for entry in data["jobs"]}["snapshot"]
    assert not {entry["job"]: entry for entry in data["jobs"]}["logical"]["enabled"]
    assert job["last_run"]["id"] == bad and job["last_run"]["status"] == "failed"
    assert job["last_success"] and job["next_run"]
    assert data["restore_points"][0]["count"] == 1
    assert data["attention"] == found.attention


def test_status_names_an_overdue_job_a_silent_daemon_and_low_disk(
        snapshot: SnapshotSettings, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    with Store(snapshot.state_dir) as store:
        store.set_state(keys.STATE_HEARTBEAT, iso(utcnow() - timedelta(hours=2)))
        store.set_state(keys.STATE_FIRST_STARTED, iso(utcnow() - timedelta(days=2)))
    runner.run_job(snapshot, "snapshot")  # a restore point, so the next run's size is known
    monkeypatch.setattr(state, "LOW_DISK", 1.01)  # as if the disk were (nearly) full
    found = state.gather(snapshot, utcnow() + timedelta(hours=2))
    kinds = [line.split(":")[0] for line in found.attention]
    assert kinds == ["daemon", "snapshot", "disk"], found.attention
    assert "last heartbeat 4.0 h ago" in found.attention[0]
    assert "no successful run since the one due" in found.attention[1]
    assert found.attention[2].startswith("disk: only ")


@pytest.mark.docker
def test_status_of_real_backups(env: Any, pg: Any, make_volume: Callable[..., str]) -> None:
    volume = make_volume("mkdir -p uploads && echo hello > uploads/a.txt")
    env.values.update(BACKUP_VOLUMES=volume, VOLUME_FULL_SCHEDULE="30 17 * * 0",
                      VOLUME_DIFF_SCHEDULE="45 17 * * *")
    for job in ("logical", "full", "diff"):
        result = env.cli("backup", job)
        assert result.returncode == 0, result.stderr
    result = env.cli("status")
    assert result.returncode == 0, result.stderr
    print(result.stdout)  # the README shows this output
    lines = result.stdout.splitlines()
    for job in ("logical", "full", "diff"):
        assert any(line.startswith(f"{job} ") and " ok " in line for line in lines), lines
    assert any(line.startswith("logical ") and pg.db in line for line in lines)
    assert any(line.startswith("full ") and volume in line for line in lines)
    assert "daemon has not run with this STATE_DIR" in lines[0]
    assert lines[-1].startswith("  - daemon: no heartbeat")
    data = json.loads(env.cli("status", "--json").stdout)
    assert {(p["tier"], p["target"], p["count"]) for p in data["restore_points"]} == {
        ("logical", pg.db, 1), ("full", volume, 1), ("diff", volume, 1)}


def test_metrics_endpoint_is_scraped(snapshot: SnapshotSettings) -> None:  # noqa: F811
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from toybox_backupd.daemon import loop

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    good = runner.run_job(snapshot, "snapshot", trigger="schedule")
    broken = snapshot.model_copy(update={"snapshot_dirs": str(Path(snapshot.snapshot_dirs) / "x")})
    runner.run_job(broken, "snapshot")
    server = loop.Daemon(snapshot.model_copy(update={"metrics_port": port})).serve_metrics()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
    finally:
        server.shutdown()
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    job = (("job", "snapshot"),)
    with Store(snapshot.state_dir) as store:
        ok_run = store.run(good)
        assert ok_run is not None
    assert samples[("toybox_backupd_last_success_timestamp_seconds", job)] == pytest.approx(
        ok_run.started_at.timestamp())
    assert samples[("toybox_backupd_last_run_ok", job)] == 0  # the last run failed
    assert ("toybox_backupd_last_run_duration_seconds", job) in samples
    target = (("target", snapshot.snapshot_dirs), ("tier", "snapshot"))
    assert samples[("toybox_backupd_restore_points", target)] == 1
    assert samples[("toybox_backupd_backup_dir_free_bytes", ())] > 0
    assert samples[("toybox_backupd_attention_items", ())] >= 1
    assert samples[("toybox_backupd_outbox_waiting", (("channel", "email"),))] == 0
