"""What a new user trips on (issue 17), said in words they can act on: a schedule typo, other
unusable settings, an unwritable backup directory, a wrong DOCKER_GID, a volume name with a
typo, a volume-only setup, and the host's name in emails. Real daemon, engine and SMTP server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI, Env, base_values
from smtp_server import SMTPServer, smtp_server
from test_daemon import Daemon, wait_for

from toybox_backupd.adapters import docker_api, hints
from toybox_backupd.store import Store
from toybox_backupd.tiers import registry as jobs

CHECK_AN_EDIT = "docker compose run --rm backupd toybox-backupd check"


@pytest.fixture
def smtp() -> Iterator[SMTPServer]:
    with smtp_server(tls="none") as server:
        yield server


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(env: Env, name: str = "daemon") -> Daemon:
        started.append(Daemon(env, name))
        return started[-1]

    yield start
    for instance in started:
        instance.kill()


def body(received: Any) -> str:
    part = received.message.get_body(("plain",))
    return str(part.get_content())


def outbox_rows(env: Env) -> list[dict[str, Any]]:
    with Store(env.state_dir) as history:
        return [dict(row) for row in history.db.execute("SELECT * FROM outbox ORDER BY id")]


# 1. a schedule typo turns its job off, loudly --------------------------------------------------
def test_schedule_typo_disables_only_that_job_and_says_so(
        plain_env: Env, smtp: SMTPServer, daemons: Callable[..., Daemon]) -> None:
    plain_env.values.update(smtp.settings_values(to="ops@example.org"),
                            PGDUMP_SCHEDULE="0 25 * * *", BACKUP_HOST_NAME="toybox-prod")
    settings = plain_env.settings()
    problem = jobs.get("logical").problem(settings)
    assert problem is not None and problem.startswith("PGDUMP_SCHEDULE: '0 25 * * *'")
    assert not jobs.get("logical").enabled(settings)

    daemon = daemons(plain_env)
    wait_for("the warning", lambda: "no job is enabled" in daemon.log, 30, lambda: daemon.log)
    assert daemon.proc.poll() is None  # up, not in a restart loop
    assert "NOT SCHEDULED: PGDUMP_SCHEDULE: '0 25 * * *'" in daemon.log
    assert CHECK_AN_EDIT in daemon.log
    [mail] = smtp.wait_for(1, timeout=30)
    assert "SETTINGS PROBLEM on toybox-prod" in mail.message["Subject"]
    text = body(mail)
    assert "PGDUMP_SCHEDULE: '0 25 * * *' is not a valid crontab expression" in text
    assert CHECK_AN_EDIT in text and "the logical job does not run" in text
    wait_for("the outbox's log line", lambda: "email sent" in daemon.log, 10, lambda: daemon.log)
    # the outbox job ran (at start): APScheduler's "Running job"/"executed" lines stay out
    assert "Running job" not in daemon.log and "executed successfully" not in daemon.log

    result = plain_env.cli("healthcheck")
    assert result.returncode == 1 and "PGDUMP_SCHEDULE" in result.stdout, result.stdout
    result = plain_env.cli("check")
    assert result.returncode == 1
    [line] = [line for line in result.stdout.splitlines() if " settings " in line]
    assert line.startswith("FAIL") and "PGDUMP_SCHEDULE" in line, result.stdout
    result = plain_env.cli("schedule", "--json")
    assert result.returncode == 0 and '"enabled": false' in result.stdout
    assert "\"problem\": \"PGDUMP_SCHEDULE: '0 25 * * *'" in result.stdout, result.stdout

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    # the same problem is not emailed again on every restart
    again = daemons(plain_env, "again")
    wait_for("the warning", lambda: "no job is enabled" in again.log, 30, lambda: again.log)
    assert len(outbox_rows(plain_env)) == 1
    again.signal(signal.SIGTERM)
    assert again.wait(30) == 0


def test_unusable_settings_keep_the_daemon_up_and_email_them(
        plain_env: Env, smtp: SMTPServer, daemons: Callable[..., Daemon]) -> None:
    plain_env.values.update(smtp.settings_values(to="ops@example.org"),
                            TZ="Asia/Tokio", PGDUMP_SCHEDULE="@dialy")
    daemon = daemons(plain_env)
    [mail] = smtp.wait_for(1, timeout=30)
    text = body(mail)
    assert "TZ: 'Asia/Tokio' is not an IANA time zone" in text
    assert "PGDUMP_SCHEDULE: '@dialy' is not a crontab nickname" in text
    assert "No backup runs until this is fixed" in text and CHECK_AN_EDIT in text
    wait_for("the log", lambda: "settings: TZ:" in daemon.log, 10, lambda: daemon.log)
    assert "the settings are not usable" in daemon.log
    assert daemon.proc.poll() is None
    result = plain_env.cli("healthcheck")
    assert result.returncode == 2 and "TZ:" in result.stderr
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 2

    # a cross-field problem: `healthcheck` itself could load the settings, and still fails
    plain_env.values.update(TZ="Asia/Tokyo", PGDUMP_SCHEDULE="@daily", VOLUME_FULL_SCHEDULE="@weekly")
    daemon = daemons(plain_env, "cross")
    wait_for("the log", lambda: "settings: BACKUP_VOLUMES" in daemon.log, 30, lambda: daemon.log)
    result = plain_env.cli("healthcheck")
    assert result.returncode == 1
    assert "runs no backup until its settings are fixed: BACKUP_VOLUMES" in result.stdout
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 2


# 7. volume backups only: no database needed ---------------------------------------------------
def test_postgres_db_is_required_only_with_the_logical_tier(plain_env: Env, make_volume: Any) -> None:
    volume = make_volume("echo hello > a.txt")
    values = {**plain_env.values, "POSTGRES_DB": "", "BACKUP_VOLUMES": volume,
              "VOLUME_FULL_SCHEDULE": "@weekly"}
    result = plain_env.cli("schedule", **values)  # `check` and `run` are strict
    assert result.returncode == 0, result.stderr
    result = plain_env.cli("check", **values)
    assert result.returncode == 2
    assert "POSTGRES_DB: required while the logical tier is on" in result.stderr
    result = plain_env.cli("check", **{**values, "PGDUMP_SCHEDULE": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    names = [line.split()[1] for line in result.stdout.splitlines()]
    assert "database" not in names and "volumes" in names
    result = plain_env.cli("backup", "full", **{**values, "PGDUMP_SCHEDULE": ""})
    assert result.returncode == 0, result.stderr
    for command in (("backup", "logical"), ("restore", "db", "--yes")):
        result = plain_env.cli(*command, **{**values, "PGDUMP_SCHEDULE": ""})
        assert result.returncode == 1 and "POSTGRES_DB is empty" in result.stderr, result.stderr


# 9. a volume name with a typo -------------------------------------------------------------------
def test_unknown_volume_gets_a_did_you_mean(plain_env: Env, make_volume: Any) -> None:
    volume = make_volume("true")
    typo = volume[:-3] + volume[-2:]  # one character dropped
    assert hints.missing_volumes([volume]) is None
    text = hints.missing_volumes([typo, "zzzz-nothing-like-it"])
    assert text is not None
    assert f"{typo} (did you mean {volume}?)" in text
    assert "zzzz-nothing-like-it" in text and "zzzz-nothing-like-it (did" not in text
    values = {"BACKUP_VOLUMES": typo, "VOLUME_FULL_SCHEDULE": "@weekly", "PGDUMP_SCHEDULE": ""}
    result = plain_env.cli("check", **values)
    [line] = [line for line in result.stdout.splitlines() if " volumes " in line]
    assert line.startswith("FAIL") and f"did you mean {volume}?" in line
    result = plain_env.cli("backup", "full", **values)
    assert result.returncode == 1 and f"did you mean {volume}?" in result.stderr


# 2. an unwritable backup directory ---------------------------------------------------------------
def need(ok: bool, why: str) -> None:
    """Skip without what the test needs; under CI=true, fail instead (never a silent skip)."""
    if not ok:
        if IN_CI:
            pytest.fail(f"{why} (CI=true: this test never skips)")
        pytest.skip(why)


def in_child_as(uid: int, work: Callable[[], str]) -> str:
    """`work()` in a forked child that dropped root (root ignores permissions)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            text = work()
        except BaseException as exc:
            text = f"{exc.__class__.__name__}: {exc}"
        os.write(write, text.encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="tbt-i17-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_unwritable_backup_dir_names_owner_uid_and_chown(open_tmp: Path) -> None:
    need(os.getuid() == 0, "needs root to drop to another uid")
    backups = open_tmp / "backups"
    backups.mkdir()
    os.chmod(backups, 0o755)  # as Docker makes a missing bind-mount directory: root's
    host_dir = "/srv/backups/toybox"

    def attempt() -> str:
        # in the sidecar, compose's env_file passes BACKUP_HOST_DIR from .env; the engine
        # (refused here) would name the bind mount's source itself
        os.environ["BACKUP_HOST_DIR"] = host_dir
        return hints.require_writable(backups / "logical", backups)

    text = in_child_as(65534, attempt)
    assert text.startswith("Unwritable: cannot write in " + str(backups)), text
    assert "uid 65534" in text and "belongs to uid 0 (root)" in text and "mode 0755" in text
    assert "Docker creates a bind-mounted host directory as root" in text
    in_container = Path("/.dockerenv").exists()
    assert f"sudo chown -R 65534:65534 {host_dir if in_container else backups} (BACKUP_HOST_DIR)" in text
    assert "Errno" not in text

    # a scheduled run fails with the same words (its email says what the history says)
    state = open_tmp / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    settings = Env(open_tmp, {**base_values(open_tmp), "BACKUP_DIR": str(backups),
                              "STATE_DIR": str(state)}).settings()

    def scheduled_run() -> str:
        from toybox_backupd.actions import runner

        os.environ["BACKUP_HOST_DIR"] = host_dir
        return str(runner.run_job(settings, "logical", trigger="schedule"))

    run_id = int(in_child_as(65534, scheduled_run))
    with Store(state) as history:
        run = history.run(run_id)
    assert run is not None and run.status == "failed"
    assert run.error and run.error.startswith(f"cannot write in {backups}") and "Errno" not in run.error
    assert "sudo chown -R 65534:65534" in run.error

    # a private root-owned directory (as made under a umask of 077): not even looked into
    os.chmod(backups, 0o700)
    text = in_child_as(65534, attempt)
    assert text.startswith(f"Unwritable: cannot write in {backups} "), text
    assert "mode 0700" in text and "Errno" not in text

    os.chown(backups, 65534, 65534)
    assert in_child_as(65534, attempt).startswith(f"{backups / 'logical'} writable")


# 3. a wrong DOCKER_GID ---------------------------------------------------------------------------
def test_docker_socket_refused_names_docker_gid(docker_engine: Any) -> None:
    socket_path = "/var/run/docker.sock"
    need(os.getuid() == 0 and os.path.exists(socket_path) and not os.environ.get("DOCKER_HOST"),
         "needs root and the engine on /var/run/docker.sock")
    gid = os.stat(socket_path).st_gid

    def attempt() -> str:
        docker_api.client.cache_clear()
        return docker_api.ping()

    text = in_child_as(65534, attempt)
    assert text.startswith("DockerError: cannot reach the Docker engine"), text
    assert "Permission denied" in text and "uid 65534" in text
    assert "Set DOCKER_GID in .env to the socket's group id" in text
    assert f"`stat -c %g {socket_path}` prints it ({gid} here)" in text


# 4. the host's name in emails -----------------------------------------------------------------------
def test_host_name_is_the_docker_hosts_unless_set(plain_env: Env, docker_engine: Any) -> None:
    from toybox_backupd.notify import report

    engine = docker_engine.info()["Name"]
    assert report.host_name(plain_env.settings()) == engine
    assert report.host_name(plain_env.settings(BACKUP_HOST_NAME="toybox-prod")) == "toybox-prod"


def test_restore_point_table_has_one_aligned_row_per_volume(plain_env: Env) -> None:
    from datetime import timedelta

    from toybox_backupd.core.basics import utcnow
    from toybox_backupd.notify import report

    settings = plain_env.settings(BACKUP_HOST_NAME="toybox-prod")
    now = utcnow()
    with Store(settings.state_dir) as history:
        run_id = history.open_run("full", "a,b", "manual")
        for days, target in ((3, "backend_media"), (2, "backend_postgres_data"), (1, "backend_media")):
            history.add_artifact(run_id=run_id, tier="full", target=target,
                                 path=f"volumes/{target}/{target}_{days}_full.tar.zst",
                                 created_at=now - timedelta(days=days), size=1, sha256="ab" * 32)
        history.close_run(run_id, "ok")
        text = report.render_text(report.gather(settings, history, history.run(run_id), now))
    lines = text.split("Restore points (kept, status ok):\n")[1].split("\n\n")[0].splitlines()
    assert lines[0].split() == ["tier", "target", "count", "oldest", "newest"]
    media = next(line for line in lines if "backend_media" in line)
    data = next(line for line in lines if "backend_postgres_data" in line)
    assert media.split()[:3] == ["full", "backend_media", "2"]
    assert data.split()[:3] == ["full", "backend_postgres_data", "1"]
    # aligned: each column starts where its heading does, on every row
    oldest, newest = lines[0].index("oldest"), lines[0].index("newest")
    for line in (media, data):
        assert line[oldest:oldest + 2] == "20" and line[newest:newest + 2] == "20", lines
    assert next(line for line in lines if line.split()[0] == "logical")[oldest] == "-", text
    assert "toybox-prod" in text


# 5. logs ---------------------------------------------------------------------------------------------
def test_apscheduler_chatter_is_dropped_but_job_errors_stay() -> None:
    import io
    import logging

    from toybox_backupd.core import logs

    stream = io.StringIO()
    logs.setup("json", "INFO", stream=stream)
    for executor in ("default", "mail", "offsite"):  # one logger per executor
        chatty = logging.getLogger(f"apscheduler.executors.{executor}")
        chatty.info('Running job "email outbox" (trigger: interval[0:01:00])')
        chatty.info('Job "email outbox" executed successfully')
        chatty.error('Job "email outbox" raised an exception')
    logging.getLogger("apscheduler.scheduler").info("Added job")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and all("raised an exception" in line for line in lines), lines


def run_on_a_tty(env: Env, *args: str, **overrides: str) -> tuple[int, str]:
    """The real CLI with its stdout and stderr on a pseudo-terminal; (exit code, output)."""
    import pty
    import subprocess
    import sys

    controller, terminal = pty.openpty()
    environ = {**os.environ, **env.values, **overrides}
    environ.pop("TOYBOX_ENV_FILE", None)
    proc = subprocess.Popen([sys.executable, "-m", "toybox_backupd.cli", "--env-file",
                             str(env.tmp / "none.env"), *args], stdout=terminal, stderr=terminal,
                            stdin=subprocess.DEVNULL, env=environ, cwd=str(env.tmp))
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return proc.wait(60), b"".join(chunks).decode(errors="replace")


def test_manual_commands_reach_the_daemons_log_and_a_tty_gets_console_lines(
        plain_env: Env, docker_engine: Any) -> None:
    import json

    mirror = plain_env.tmp / "pid1-stdout"
    mirror.touch()
    values = {"LOG_FORMAT": "json", "TOYBOX_LOG_MIRROR": str(mirror),
              "BACKUP_VOLUMES": "tbt-no-such-volume-i17", "VOLUME_FULL_SCHEDULE": "@weekly"}
    # not a terminal: JSON on stderr, as the daemon writes
    result = plain_env.cli("backup", "full", **values)
    assert result.returncode == 1
    json.loads(next(line for line in result.stderr.splitlines() if "run started" in line))
    records = [json.loads(line) for line in mirror.read_text().splitlines()]
    assert records[0]["event"].startswith("manual command: toybox-backupd --env-file")
    assert records[0]["event"].endswith("backup full")
    assert all(record["command"] == "backup" for record in records)
    events = [record["event"] for record in records]
    assert "run started" in events and "run finished" in events
    assert records[-1]["event"] == "manual command finished" and records[-1]["exit_code"] == 1

    # at a terminal: console lines there, JSON still in the daemon's log
    mirror.write_text("")
    code, output = run_on_a_tty(plain_env, "backup", "full", **values)
    assert code == 1
    started = next(line for line in output.splitlines() if "run started" in line)
    started = re.sub(r"\x1b\[[0-9;]*m", "", started)  # a terminal gets colours
    assert not started.lstrip().startswith("{") and "job=full" in started, started
    assert "run started" in [json.loads(line)["event"] for line in mirror.read_text().splitlines()]

    # a failing command says so in the daemon's log; `list` (changes nothing) is not copied
    mirror.write_text("")
    assert plain_env.cli("restore", "volume", "tbt-none-i17", "--yes", **values).returncode == 1
    last = json.loads(mirror.read_text().splitlines()[-1])
    assert last["event"] == "manual command failed" and "tbt-none-i17" in last["error"]
    mirror.write_text("")
    assert plain_env.cli("list", **values).returncode == 0
    assert mirror.read_text() == ""


# 6. a table a view depends on: refused, with what to do instead of CASCADE ----------------------
def test_table_restore_refused_by_a_view_says_not_to_cascade(env: Env, pg: Any) -> None:
    pg.psql("CREATE VIEW big_orders AS SELECT * FROM orders")
    assert env.cli("backup", "logical").returncode == 0
    before = pg.rows("orders")
    result = env.cli("restore", "db", "--table", "public.orders", "--yes")
    assert result.returncode == 1
    assert "depend on it" in result.stderr and "DROP ... CASCADE, would drop them too" in result.stderr
    assert "--into" in result.stderr
    assert pg.rows("orders") == before  # nothing changed, the view is still there
    assert pg.psql("SELECT count(*) FROM pg_views WHERE viewname = 'big_orders'") == "1"


def test_messages_name_where_the_settings_came_from(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from toybox_backupd.core.settings import where

    file = tmp_path / "backupd.env"
    file.write_text("POSTGRES_DB=toybox\n")
    assert where(file) == f"{file} and the environment"
    # the image: TOYBOX_ENV_FILE names a file nobody mounts; compose's env_file is .env
    monkeypatch.setenv("TOYBOX_ENV_FILE", "/etc/toybox-backupd/env")
    text = where("/etc/toybox-backupd/env")
    assert ".env beside docker-compose.yml" in text and "/etc/toybox-backupd" not in text
    monkeypatch.delenv("TOYBOX_ENV_FILE")
    assert where(tmp_path / "none.env") == f"the environment ({tmp_path / 'none.env'} does not exist)"
