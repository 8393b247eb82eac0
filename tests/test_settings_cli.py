"""Settings and the CLI surface (issue 2): no Docker needed."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from toybox_backupd.core import settings as settings_mod
from toybox_backupd.store import SCHEMA_VERSION, Store
from toybox_backupd.tiers import registry as jobs


def write_env(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "test.env"
    path.write_text(text, encoding="utf-8")
    return path


def cli(*args: str, env_file: Path, extra_env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "SMTP_"))}
    environ.pop("TZ", None)
    environ.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "toybox_backupd.cli", "--env-file", str(env_file),
                           *args], capture_output=True, text=True, env=environ, cwd=cwd,
                          timeout=60)


def test_help_lists_every_command(tmp_path: Path) -> None:
    result = cli("--help", env_file=tmp_path / "none.env")
    assert result.returncode == 0
    for command in ("run", "backup", "list", "history", "restore", "verify", "schedule", "check",
                    "healthcheck", "reindex", "notify"):
        assert command in result.stdout
    version = cli("--version", env_file=tmp_path / "none.env")
    assert version.returncode == 0 and "toybox-backupd 0." in version.stdout


def test_schedule_json_in_tokyo_matches_crontab(tmp_path: Path) -> None:
    env = write_env(tmp_path, "TZ=Asia/Tokyo\nPOSTGRES_DB=toybox\nBACKUP_VOLUMES=media\n"
                              f"STATE_DIR={tmp_path}/state\nBACKUP_DIR={tmp_path}/b\n")
    result = cli("schedule", "--json", env_file=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["timezone"] == "Asia/Tokyo"
    jobs = {job["job"]: job for job in data["jobs"]}
    assert jobs["logical"]["schedule"] == "0 17 * * *"
    for job, (hour, minute) in {"logical": (17, 0), "full": (17, 30), "diff": (17, 45)}.items():
        times = [datetime.fromisoformat(t) for t in jobs[job]["next"]]
        assert len(times) == 5
        assert all(t.utcoffset().total_seconds() == 9 * 3600 for t in times)  # type: ignore[union-attr]
        assert all((t.hour, t.minute) == (hour, minute) for t in times)
        assert times == sorted(times)
    fulls = [datetime.fromisoformat(t) for t in jobs["full"]["next"]]
    assert all(t.isoweekday() == 7 for t in fulls)  # crontab 0 = Sunday
    assert all((b - a).days == 7 for a, b in itertools.pairwise(fulls))
    dailies = [datetime.fromisoformat(t) for t in jobs["logical"]["next"]]
    assert all((b - a).days == 1 for a, b in itertools.pairwise(dailies))


def test_malformed_env_lists_every_problem_without_traceback(tmp_path: Path) -> None:
    env = write_env(tmp_path, "\n".join([
        "PGDUMP_SCHEDULE=0 25 * * *",
        "VOLUME_DIFF_SCHEDULE=every day",
        "TZ=Asia/Tokio",
        "PGDUMP_KEEP_DAYS=seven",
        "SMTP_SECURITY=tls",
        "POSTGRES_PASSWORD=Sup3r-Secret-pw",
        "",  # POSTGRES_DB missing
    ]))
    result = cli("check", env_file=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]
    assert any(line.startswith("PGDUMP_SCHEDULE:") for line in lines)
    assert any(line.startswith("VOLUME_DIFF_SCHEDULE:") for line in lines)
    assert any(line.startswith("TZ:") and "Asia/Tokio" in line for line in lines)
    assert any(line.startswith("PGDUMP_KEEP_DAYS:") and "whole number" in line for line in lines)
    assert any(line.startswith("SMTP_SECURITY:") for line in lines)
    assert any(line.startswith("POSTGRES_DB:") and "required" in line for line in lines)
    # what the bad values hid is listed too, so that one round of edits fixes everything
    assert any(line.startswith("BACKUP_VOLUMES:") for line in lines)
    assert len(lines) == 7
    assert "Sup3r-Secret-pw" not in result.stderr + result.stdout


def test_secret_file_variant_and_conflict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-a-file\n", encoding="utf-8")
    monkeypatch.setenv("POSTGRES_DB", "toybox")
    monkeypatch.setenv("POSTGRES_PASSWORD_FILE", str(secret))
    monkeypatch.delenv("POSTGRES_PASSWORD", raising=False)
    loaded = settings_mod.load(None, strict=False)
    assert loaded.postgres_password_value == "from-a-file"
    monkeypatch.setenv("POSTGRES_PASSWORD", "inline-secret")
    with pytest.raises(settings_mod.SettingsError) as info:
        settings_mod.load(None, strict=False)
    assert "POSTGRES_PASSWORD_FILE" in str(info.value)
    assert "inline-secret" not in str(info.value) and "from-a-file" not in str(info.value)
    monkeypatch.delenv("POSTGRES_PASSWORD")
    monkeypatch.setenv("POSTGRES_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(settings_mod.SettingsError) as info:
        settings_mod.load(None, strict=False)
    assert info.value.problems[0].startswith("POSTGRES_PASSWORD_FILE: cannot read")


def test_cross_field_problems_name_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_DB", "toybox")
    monkeypatch.setenv("NOTIFY_EMAIL_TO", "a@example.com, b@example.com")
    monkeypatch.setenv("VOLUME_COMPRESSION_LEVEL", "40")
    with pytest.raises(settings_mod.SettingsError) as info:
        settings_mod.load(None)
    text = str(info.value)
    for var in ("SMTP_HOST", "SMTP_FROM", "BACKUP_VOLUMES", "VOLUME_COMPRESSION_LEVEL"):
        assert f"{var}:" in text


def test_empty_schedule_disables_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_DB", "toybox")
    monkeypatch.setenv("BACKUP_VOLUMES", "a,b")
    monkeypatch.setenv("VOLUME_DIFF_SCHEDULE", "")
    loaded = settings_mod.load(None)
    assert loaded.backup_volumes == ["a", "b"]
    assert jobs.get("full").enabled(loaded) and not jobs.get("diff").enabled(loaded)
    assert jobs.get("diff").disabled_reason(loaded) == "VOLUME_DIFF_SCHEDULE is empty"


def test_history_schema_is_versioned_and_shared(tmp_path: Path) -> None:
    first = Store(tmp_path)
    second = Store(tmp_path)  # a CLI process beside the daemon
    assert first.version == SCHEMA_VERSION
    assert first.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    run_id = first.open_run("logical", "toybox")
    assert second.run(run_id) is not None and second.run(run_id).status == "running"  # type: ignore[union-attr]
    second.close_run(run_id, "ok", bytes_=10, artifact="x")
    assert first.run(run_id).status == "ok"  # type: ignore[union-attr]
    first.db.execute("PRAGMA user_version=99")
    with pytest.raises(RuntimeError, match="newer than this toybox-backupd"):
        Store(tmp_path)


def test_history_cli_on_empty_state(tmp_path: Path) -> None:
    env = write_env(tmp_path, f"POSTGRES_DB=toybox\nSTATE_DIR={tmp_path}/state\n")
    result = cli("history", "--json", env_file=env)
    assert result.returncode == 0 and json.loads(result.stdout) == []


def test_console_and_json_logs_carry_run_context(tmp_path: Path) -> None:
    import io
    import logging

    import structlog

    from toybox_backupd.core import logs, redact

    redact.register("pa55-word-xyz")
    for fmt in ("console", "json"):
        stream = io.StringIO()
        logs.setup(fmt, "INFO", stream=stream)
        with structlog.contextvars.bound_contextvars(job="logical", run_id=42):
            logs.get().info("run started", note="uses pa55-word-xyz")
            logging.getLogger("apscheduler.scheduler").warning("stdlib line")
        lines = stream.getvalue().strip().splitlines()
        assert len(lines) == 2
        assert "pa55-word-xyz" not in stream.getvalue()
        if fmt == "json":
            records = [json.loads(line) for line in lines]
            assert all(r["job"] == "logical" and r["run_id"] == 42 for r in records)
            assert records[1]["logger"] == "apscheduler.scheduler"
        else:
            assert all("job=logical" in line and "run_id=42" in line for line in lines)
            assert "\x1b[" not in stream.getvalue()  # no colour when not a TTY


def test_an_older_local_pg_dump_is_refused_naming_the_version_needed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PG_CONTAINER the host's pg_dump is used; an older one names what to install."""
    from toybox_backupd.adapters.pgtools import PgTools
    from toybox_backupd.core.basics import JobError

    fake = tmp_path / "bin" / "pg_dump"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 13.9'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("POSTGRES_DB", "toybox")
    tools = PgTools(settings_mod.load(None, strict=False))
    with pytest.raises(JobError) as info:
        tools.check_version("16.4 (Debian 16.4-1)")
    assert "local pg_dump is version 13 but the server is 16.4" in str(info.value)
    assert "install PostgreSQL 16 client tools" in str(info.value)  # was a literal {server}
    tools.check_version("13.2")  # the same major is fine


def test_runs_of_the_old_pgdump_job_read_as_logical(tmp_path: Path) -> None:
    """Schema 4: one vocabulary; a history written as `pgdump` (schema 3) reads as `logical`."""
    import sqlite3

    from toybox_backupd.store.schema import MIGRATIONS

    db = sqlite3.connect(tmp_path / "history.sqlite3")
    for script in MIGRATIONS[:3]:
        db.executescript(script)
    db.execute("PRAGMA user_version=3")
    db.execute("INSERT INTO runs(job, target, trigger, status, started_at)"
               " VALUES ('pgdump', 'toybox', 'schedule', 'ok', '2026-01-26T08:00:00+00:00')")
    db.commit()
    db.close()
    with Store(tmp_path) as store:
        assert store.version == SCHEMA_VERSION
        [run] = store.runs()
        assert run.job == "logical"
        assert store.last_run("logical", "ok") is not None
    assert jobs.get("pgdump") is jobs.get("logical")  # the old name still works at the CLI


def test_local_pg_tools_get_no_other_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PG_CONTAINER, pg_dump & co. run here: they see PGPASSWORD, not SMTP_PASSWORD."""
    from toybox_backupd.adapters.pgtools import LocalProc

    monkeypatch.setenv("SMTP_PASSWORD", "smtp-secret-value-123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-456")
    proc = LocalProc(["env"], {"PGPASSWORD": "db-pw"})
    seen = b"".join(proc.stdout()).decode()
    assert proc.wait().exit_code == 0
    assert "PGPASSWORD=db-pw" in seen and "PATH=" in seen
    assert "smtp-secret-value-123" not in seen and "aws-secret-value-456" not in seen


def test_another_process_s_settings_are_built_from_what_it_sent_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_given (the daemon checking a command's settings): the command's environment and
    env-file text, read as its own process reads them; none of this process's environment."""
    monkeypatch.setenv("BACKUP_VOLUMES", "ours-only")
    text = "export TZ=Asia/Tokyo\nBACKUP_VOLUMES='a,b'  # two\nSTATE_DIR=state\n"
    env_file = write_env(tmp_path, text)
    theirs = settings_mod.load_given({"tz": "UTC", "POSTGRES_PASSWORD": "s3cret"}, text)
    assert (theirs.tz, theirs.backup_volumes) == ("UTC", ["a", "b"])  # the environment wins
    monkeypatch.delenv("BACKUP_VOLUMES")
    monkeypatch.setenv("tz", "UTC")
    monkeypatch.setenv("POSTGRES_PASSWORD", "s3cret")
    same = settings_mod.load(env_file, strict=False)
    assert settings_mod.differences(theirs, "/x", same, "/x") == []
    assert settings_mod.differences(theirs, "/x", same, "/y") == ["STATE_DIR"]  # relative
    other = settings_mod.load_given({"tz": "UTC", "POSTGRES_PASSWORD": "other"}, text)
    assert settings_mod.differences(theirs, "/x", other, "/x") == ["POSTGRES_PASSWORD"]
    assert settings_mod.load_given({}, None).backup_volumes == []
    with pytest.raises(settings_mod.SettingsError):
        settings_mod.load_given({"TZ": "Mars/Olympus"}, None)
    assert "HELPER_KEEP_SECONDS" in settings_mod.variable_names()
