"""A backup by hand handed to the running daemon (launcher → STATE_DIR/daemon.sock), and the
helper container the daemon keeps between runs: the real command, daemon and Docker engine.

Who ran a run is in its history row: the daemon's pid, or the command's own.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from conftest import PG, ROOT, Env
from test_daemon import Daemon, TableLock, daemons, dump_waiting, runs, table_lock, wait_for

from toybox_backupd import launcher
from toybox_backupd.adapters import docker_api
from toybox_backupd.daemon import handoff
from toybox_backupd.store import Store

__all__ = ["daemons", "table_lock"]  # fixtures from test_daemon
HEAVY = ("pydantic", "pydantic_settings", "structlog", "docker", "psycopg", "apscheduler",
         "toybox_backupd.cli", "toybox_backupd.core.settings")
SECRET = "pw-handoff-Zq7!$"
FILES = "mkdir -p uploads && for i in $(seq 1 50); do echo $i > uploads/f$i.txt; done"


def socket_of(env: Env) -> str:
    return handoff.socket_path(env.state_dir)


def answering(env: Env) -> bool:
    """A daemon says hello on the socket."""
    try:
        with socket.socket(socket.AF_UNIX) as probe, handoff.address(socket_of(env)) as where:
            probe.settimeout(5)
            probe.connect(where)
            return handoff.Channel(probe).receive() is not None
    except (OSError, ValueError):
        return False


def start(daemons: Callable[..., Daemon], env: Env, **overrides: str) -> Daemon:
    proc = daemons(env, **overrides)
    wait_for("the daemon's socket", lambda: answering(env), 60, lambda: proc.log)
    return proc


def ran_in(env: Env, run_id: int) -> int | None:
    with Store(env.state_dir) as history:
        run = history.run(run_id)
    assert run is not None
    return run.pid


def run_id(result: subprocess.CompletedProcess[str]) -> int:
    match = re.search(r"^run (\d+): ", result.stdout + result.stderr, re.M)
    assert match, result.stdout + result.stderr
    return int(match.group(1))


def helper_events(docker_engine: Any, env: Env, since: float, action: str) -> list[dict[str, Any]]:
    with Store(env.state_dir) as history:
        owner = history.instance_id()
    events = docker_engine.api.events(
        since=int(since), until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "event": action,
                 "label": f"{docker_api.OWNER_LABEL}={owner}"})
    return [event for event in events if event["timeNano"] >= since * 1e9]  # `since`: seconds


def kept(docker_engine: Any, env: Env) -> list[Any]:
    with Store(env.state_dir) as history:
        owner = history.instance_id()
    return docker_engine.containers.list(all=True, filters={
        "label": [docker_api.KEPT_LABEL, f"{docker_api.OWNER_LABEL}={owner}"]})


def shape(result: subprocess.CompletedProcess[str]) -> tuple[int, list[str], list[str]]:
    """Exit status, stdout, and the events of the log lines and the other lines on stderr, in
    order, with numbers, sizes and the kept helper masked: what an in-process run and a
    handed-over one must share."""
    def masked(line: str) -> str:
        line = re.sub(r"_\d{8}-\d{6}(-\d+)?_", "_STAMP_", line)  # -2: a second one that second
        line = re.sub(r"[\d.]+ (B|KiB|MiB|GiB)\b", "SIZE", line)
        return re.sub(r"\d+", "N", line.replace(" (kept from the last run)", ""))

    out = [masked(line) for line in result.stdout.splitlines()
           if not line.startswith("  helper container")]
    err = [masked(match.group(1).strip() if (match := re.search(
        r"\] (.+?)\s+\[toybox_backupd", line)) else line)
        for line in result.stderr.splitlines()]
    return result.returncode, out, err


# the thin client ------------------------------------------------------------------------------
def test_the_command_imports_nothing_heavy_and_knows_the_cli_s_backup_options() -> None:
    code = ("import sys, toybox_backupd.launcher as l; "
            "l.backup_request(['backup', 'diff', '-v', '--volume', 'x']); "
            f"print([m for m in sys.modules if m in {HEAVY!r} or m.split('.')[0] in {HEAVY!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[]"
    from toybox_backupd import cli
    from toybox_backupd.core.settings import Settings

    parser = cli.build_parser()
    backup = parser._subparsers._group_actions[0].choices["backup"]  # type: ignore[union-attr]
    options = {s for action in backup._actions for s in action.option_strings} - {"-h", "--help"}
    assert options == set(launcher.FLAGS) | set(launcher.VALUED)
    assert str(Settings.model_fields["state_dir"].default) == launcher.DEFAULT_STATE_DIR
    assert launcher.backup_request(["--env-file", "x", "backup", "full", "--volume=a", "-v"]) == {
        "job": "full", "volumes": ["a"], "verbose": True, "protocol": handoff.PROTOCOL,
        "argv": ["--env-file", "x", "backup", "full", "--volume=a", "-v"], "env_file": "x"}
    for args in (["backup", "full", "--no-daemon"], ["backup", "--verb", "full"], ["list"],
                 ["backup"], ["backup", "full", "extra"], ["backup", "full", "--volume"]):
        assert launcher.backup_request(args) is None, args


# handed over -----------------------------------------------------------------------------------
def test_a_backup_by_hand_is_run_by_the_daemon_as_the_command_would(
        plain_env: Env, make_volume: Any, docker_engine: Any, daemons: Callable[..., Daemon]) -> None:
    env = plain_env
    volume = make_volume(FILES)
    env.values.update(BACKUP_VOLUMES=volume, PGDUMP_SCHEDULE="", POSTGRES_DB="",
                      POSTGRES_PASSWORD=SECRET, LOG_LEVEL="DEBUG")
    # a socket a killed daemon left: nobody answers, the command runs the backup itself
    env.state_dir.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as stale, handoff.address(socket_of(env)) as where:
        stale.bind(where)
    first = env.cli("backup", "full")
    assert first.returncode == 0, first.stderr
    proc = start(daemons, env)
    assert stat.S_IMODE(os.stat(socket_of(env)).st_mode) == 0o600
    assert ran_in(env, run_id(first)) != proc.proc.pid

    since = time.time()
    full = env.cli("backup", "full", "-v")
    diff = env.cli("backup", "diff", "-v")
    for result in (full, diff):
        assert result.returncode == 0, result.stdout + result.stderr
        assert ran_in(env, run_id(result)) == proc.proc.pid
    assert "helper container (kept from the last run): start" in diff.stdout
    assert len(helper_events(docker_engine, env, since, "create")) == 1  # one for two runs
    log = proc.log
    assert "manual command: toybox-backupd --env-file" in log and "backup diff -v" in log
    assert log.count("run started") == 2 and "command=backup" in log
    with Store(env.state_dir) as history:
        assert [(a.tier, a.run_id) for a in history.artifacts()][-2:] == [
            ("full", run_id(full)), ("diff", run_id(diff))]

    # the same output and exit status as the command's own run, success or failure
    alone = env.cli("backup", "diff", "-v", "--no-daemon")
    handed = env.cli("backup", "diff", "-v")  # as alone was: after a diff (progress has a total)
    assert ran_in(env, run_id(alone)) != proc.proc.pid
    assert ran_in(env, run_id(handed)) == proc.proc.pid
    assert shape(handed) == shape(alone)
    failed = env.cli("backup", "full", "--volume", "tbt-no-such-volume")
    failed_alone = env.cli("backup", "full", "--volume", "tbt-no-such-volume",
                           TOYBOX_NO_DAEMON="1")
    assert failed.returncode == 1 and "no such Docker volume: tbt-no-such-volume" in failed.stderr
    assert ran_in(env, run_id(failed)) == proc.proc.pid
    assert ran_in(env, run_id(failed_alone)) != proc.proc.pid
    assert shape(failed) == shape(failed_alone)
    unknown = env.cli("backup", "nightly")
    assert unknown.returncode == 2 and "unknown job 'nightly'" in unknown.stderr

    # other settings: the command runs it itself (the daemon says why, naming no value)
    other = env.cli("backup", "diff", VOLUME_COMPRESSION_LEVEL="5")
    assert other.returncode == 0 and ran_in(env, run_id(other)) != proc.proc.pid
    assert "the settings differ: VOLUME_COMPRESSION_LEVEL" in proc.log

    # a restore of the volume: the kept helper goes first; the next run starts another
    [helper] = kept(docker_engine, env)
    since = time.time()
    restored = env.cli("restore", "volume", volume, "--yes")
    assert restored.returncode == 0, restored.stderr
    gone = [e["timeNano"] for e in helper_events(docker_engine, env, since, "destroy")
            if e["id"] == helper.id]
    made = [e["timeNano"] for e in helper_events(docker_engine, env, since, "create")]
    assert gone and made and gone[0] < min(made), (gone, made)
    again = env.cli("backup", "diff", "-v")
    assert again.returncode == 0 and ran_in(env, run_id(again)) == proc.proc.pid
    assert "kept from the last run" not in again.stdout and kept(docker_engine, env)

    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not os.path.exists(socket_of(env))
    assert kept(docker_engine, env) == []  # removed at shutdown
    assert SECRET not in proc.log


def hung_dump(env: Env, pg: PG, proc: Daemon) -> subprocess.Popen[str]:
    """`backup logical` handed to the daemon, its pg_dump waiting for our table lock."""
    command = subprocess.Popen(
        ["python", "-m", "toybox_backupd.launcher", "--env-file", str(env.tmp / "none.env"),
         "backup", "logical"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in {**os.environ, **env.values}.items() if k != "TOYBOX_ENV_FILE"},
        cwd=str(env.tmp))
    try:
        wait_for("pg_dump to wait for the lock", lambda: dump_waiting(pg), 60, lambda: proc.log)
    except BaseException:
        command.kill()
        raise
    return command


def test_ctrl_c_in_the_command_cancels_the_daemons_run(env: Env, pg: PG, table_lock: TableLock,
                                                      daemons: Callable[..., Daemon]) -> None:
    env.values.update(PGDUMP_SCHEDULE="")
    proc = start(daemons, env)
    command = hung_dump(env, pg, proc)
    try:
        command.send_signal(signal.SIGINT)
        out, err = command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == 130, out + err
    assert err.rstrip().endswith("interrupted") and "run 1:" not in out + err
    [run] = runs(env)
    assert run.pid == proc.proc.pid and run.status == "interrupted", (run.status, run.error)
    assert "Ctrl-C" in (run.error or "")
    assert not dump_waiting(pg)
    assert "ending the run" in proc.log and "manual command interrupted (Ctrl-C)" in proc.log


def test_a_stopping_daemon_finishes_the_run_it_carries_out_for_a_command(
        env: Env, pg: PG, table_lock: TableLock, daemons: Callable[..., Daemon]) -> None:
    env.values.update(PGDUMP_SCHEDULE="")
    proc = start(daemons, env)
    command = hung_dump(env, pg, proc)
    try:
        proc.signal(signal.SIGTERM)
        wait_for("the stop message", lambda: "waiting for the current manual run" in proc.log,
                 10, lambda: proc.log)
        assert not answering(env)  # a new command runs its backup itself
        time.sleep(1)
        assert proc.proc.poll() is None and command.poll() is None
        table_lock.release()
        out, err = command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == 0, out + err
    assert proc.wait(30) == 0
    [run] = runs(env)
    assert (run.status, run.pid) == ("ok", proc.proc.pid) and f"run {run.id}: ok, " in out


# the helper kept between runs ------------------------------------------------------------------
def test_the_kept_helper_expires(plain_env: Env, make_volume: Any, docker_engine: Any,
                                 daemons: Callable[..., Daemon]) -> None:
    env = plain_env
    volume = make_volume(FILES)
    env.values.update(BACKUP_VOLUMES=volume, PGDUMP_SCHEDULE="", POSTGRES_DB="",
                      HELPER_KEEP_SECONDS="3")
    proc = start(daemons, env)
    result = env.cli("backup", "full")
    assert result.returncode == 0 and ran_in(env, run_id(result)) == proc.proc.pid
    [helper] = kept(docker_engine, env)
    assert volume in docker_api.mounted_volumes(helper)
    wait_for("the kept helper to expire", lambda: not kept(docker_engine, env), 30)
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_a_state_dir_too_long_for_a_socket_address_still_has_its_socket(tmp_path: Any) -> None:
    directory = tmp_path / ("d" * 60) / ("e" * 60)
    directory.mkdir(parents=True)
    path = handoff.socket_path(directory)
    assert len(path) > 108
    with socket.socket(socket.AF_UNIX) as server, handoff.address(path) as where:
        server.bind(where)
        server.listen(1)
        with socket.socket(socket.AF_UNIX) as client, handoff.address(path) as there:
            client.connect(there)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
