"""`restore volume` never makes things worse; `restore files` copes with hard links (issue 12).

The old tree stays in the volume until the new one is complete: a restore killed with SIGKILL
mid-extraction, or one that finds the volume too small to hold both trees, leaves the old
PostgreSQL data directory serving its old rows.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import BASE_IMAGE, Env, fill_volume, remove_pg, start_pg, unique
from test_volumes import CHANGES, TREE, catalog, full_then_diff, run_ok, state, when

from toybox_backupd.core import atomic, manifests
from toybox_backupd.daemon import recovery
from toybox_backupd.store import Store

STOP_LABEL = {"toybox-backupd.stop-during-backup": "true"}
PGDATA = "/var/lib/postgresql/data"
LATER_SQL = "DELETE FROM orders WHERE id > 100; UPDATE users SET name = name || '-renamed';"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def mountpoint(docker_engine: Any, volume: str) -> Path:
    return Path(docker_engine.volumes.get(volume).attrs["Mountpoint"])


def staging_dirs(root: Path) -> list[Path]:
    return sorted(root.glob(".toybox-restore-*"))


def bookkeeping(env: Env) -> tuple[list[str], list[Any]]:
    """(names of containers recorded as stopped, restores recorded as in progress)."""
    with Store(env.state_dir) as history:
        return [row["name"] for row in history.stopped_containers()], history.pending_restores()


def helper_processes(docker_engine: Any, instance: str) -> str:
    """The command lines running in this installation's restore helpers."""
    lines = []
    for helper in docker_engine.containers.list(filters={"label": [
            "toybox-backupd.helper=restore", f"toybox-backupd.owner={instance}"]}):
        lines += [" ".join(p) for p in helper.top(ps_args="-o pid,args")["Processes"] or []]
    return "\n".join(lines)


def remove_helpers(docker_engine: Any, env: Env) -> None:
    """Helpers a killed restore of this test left running (after a failure of the test)."""
    with Store(env.state_dir) as history:
        instance = history.instance_id()
    for helper in docker_engine.containers.list(all=True, filters={
            "label": f"toybox-backupd.owner={instance}"}):
        helper.remove(force=True)


def start_restore(env: Env, volume: str) -> subprocess.Popen[str]:
    """`restore volume VOLUME --yes --stop-containers` in a subprocess, its output kept."""
    return subprocess.Popen(
        [sys.executable, "-m", "toybox_backupd.cli", "--env-file", str(env.tmp / "none.env"),
         "restore", "volume", volume, "--yes", "--stop-containers"],
        env={**os.environ, **env.values}, cwd=str(env.tmp), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def extraction_under_way(docker_engine: Any, env: Env, volume: str) -> Path:
    """Wait until tar writes the new tree into the staging dir; return that dir."""
    with Store(env.state_dir) as history:
        instance = history.instance_id()
    root = mountpoint(docker_engine, volume)
    [staging] = wait_for("the extraction beside the old tree", lambda: [
        d for d in staging_dirs(root) if (d / "new").is_dir() and any((d / "new").iterdir())
        and "--extract" in helper_processes(docker_engine, instance)])
    return staging


# killed with SIGKILL in the middle of the extraction --------------------------------------------
def test_restore_killed_mid_extraction_keeps_the_old_database(
        plain_env: Env, docker_engine: Any, images: dict[str, str]) -> None:
    env = plain_env
    pg = start_pg(docker_engine, labels=STOP_LABEL)
    try:
        # 200 MB of noise in the data directory: the extraction lasts long enough to be caught
        pg.container.exec_run(["sh", "-c", f"head -c 200000000 /dev/urandom > {PGDATA}/ballast"])
        env.values["BACKUP_VOLUMES"] = pg.volume
        run_ok(env, "backup", "full")
        pg.wait_ready()
        pg.psql(LATER_SQL)
        old = pg.snapshot()
        with Store(env.state_dir) as history:
            instance = history.instance_id()
        root = mountpoint(docker_engine, pg.volume)
        proc = start_restore(env, pg.volume)
        try:
            staging = extraction_under_way(docker_engine, env, pg.volume)
            os.kill(proc.pid, signal.SIGSTOP)
            # still half way: tar waits for the rest of the archive, nothing was swapped yet
            assert "--extract" in helper_processes(docker_engine, instance)
            assert not (staging / "old").exists()
        finally:
            proc.kill()
            proc.communicate(timeout=30)
        assert (root / "PG_VERSION").exists() and (root / "ballast").exists()
        stopped, pending = bookkeeping(env)
        assert stopped == [pg.name]  # recorded before it was stopped, like a backup's
        assert [p["volume"] for p in pending] == [pg.volume]
        pg.container.reload()
        assert pg.container.status != "running"

        # the daemon's start-up recovery: the staging dir goes, the database starts again
        result = recovery.recover(env.settings())
        assert result["containers_started"] == [pg.name]
        assert [(r["volume"], r["outcome"]) for r in result["restores"]] == [
            (pg.volume, "removed the unfinished restore")]
        assert staging_dirs(root) == []
        assert bookkeeping(env) == ([], [])
        pg.wait_ready()
        assert pg.snapshot() == old
    finally:
        remove_helpers(docker_engine, env)
        remove_pg(pg)


def test_restore_interrupted_with_ctrl_c_puts_the_old_tree_back(
        plain_env: Env, docker_engine: Any, make_volume: Callable[..., str]) -> None:
    env = plain_env
    volume = make_volume(TREE + "head -c 200000000 /dev/urandom > ballast\n")
    env.values["BACKUP_VOLUMES"] = volume
    run_ok(env, "backup", "full")
    fill_volume(docker_engine, volume, CHANGES)
    before = state(docker_engine, volume)
    app = docker_engine.containers.run(
        BASE_IMAGE, ["sleep", "infinity"], detach=True, name=unique("tbt-app"), init=True,
        labels={"toybox-backupd.test": "1"}, volumes={volume: {"bind": "/data", "mode": "rw"}},
        network_mode="none")
    try:
        proc = start_restore(env, volume)
        try:
            extraction_under_way(docker_engine, env, volume)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 1
        assert f"restoring volume {volume} failed: interrupted" in stderr
        assert "old contents are in place" in stderr and f"docker start {app.name}" in stderr
        app.reload()
        assert app.status != "running"
        assert state(docker_engine, volume) == before
        assert bookkeeping(env) == ([], [])
    finally:
        remove_helpers(docker_engine, env)
        app.remove(force=True)


# a volume without room for both trees --------------------------------------------------------
@pytest.fixture
def small_volume(tmp_path: Path, docker_engine: Any) -> Iterator[tuple[str, Path]]:
    """A Docker volume on a 64 MB file system (a tmpfs bound into a local volume)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    name = unique("tbt-small")
    docker_engine.volumes.create(name, driver="local", driver_opts={
        "type": "none", "o": "bind", "device": str(disk)})
    try:
        yield name, disk
    finally:
        with contextlib.suppress(Exception):
            docker_engine.volumes.get(name).remove(force=True)
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_restore_on_a_full_volume_keeps_the_old_database_and_the_app_stopped(
        plain_env: Env, docker_engine: Any, images: dict[str, str],
        small_volume: tuple[str, Path]) -> None:
    env = plain_env
    volume, disk = small_volume
    pg = start_pg(docker_engine, volume=volume, labels=STOP_LABEL)
    try:
        env.values["BACKUP_VOLUMES"] = volume
        run_ok(env, "backup", "full")
        pg.wait_ready()
        pg.psql(LATER_SQL)
        old = pg.snapshot()
        used = shutil.disk_usage(disk).used
        assert used > shutil.disk_usage(disk).free  # two copies of it do not fit

        failed = env.cli("restore", "volume", volume, "--yes", "--stop-containers")
        assert failed.returncode != 0
        message = failed.stderr
        assert f"volume {volume} lacks room to restore beside its current contents" in message
        assert "old contents are in place" in message
        assert f"{pg.name} stay(s) stopped" in message
        assert f"docker start {pg.name}" in message
        pg.container.reload()
        assert pg.container.status != "running"
        assert staging_dirs(disk) == []
        assert bookkeeping(env) == ([], [])  # nothing left for start-up recovery to start
        assert recovery.recover(env.settings())["containers_started"] == []
        pg.start()
        assert pg.snapshot() == old
    finally:
        remove_pg(pg)


# any other failure: the old tree exactly as it was, the app stopped ---------------------------
def _truncate_diff(env: Env) -> None:
    """Cut the differential's tar stream inside a member (a damaged archive, checksum matching)."""
    [diff] = catalog(env, "diff")
    path = env.backup_dir / diff.path
    raw = zstandard.ZstdDecompressor().stream_reader(path.read_bytes()).read()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        member = tar.getmember("uploads/2026-01-26/photo3.jpg")
    path.write_bytes(zstandard.ZstdCompressor().compress(raw[: member.offset_data + 1000]))
    manifest = manifests.manifest_path(path)
    data = json.loads(manifest.read_text())
    data.update(sha256=atomic.sha256_of(path), size=path.stat().st_size)
    manifest.write_text(json.dumps(data))
    shutil.rmtree(env.state_dir)
    run_ok(env, "reindex")


def test_failed_restore_puts_the_old_tree_back_and_leaves_the_app_stopped(
        plain_env: Env, docker_engine: Any, make_volume: Callable[..., str]) -> None:
    env = plain_env
    volume = full_then_diff(env, docker_engine, make_volume)
    _truncate_diff(env)
    fill_volume(docker_engine, volume, "echo later > .dotfile && rm -r uploads && chmod 0750 .")
    before = state(docker_engine, volume)
    app = docker_engine.containers.run(
        BASE_IMAGE, ["sleep", "infinity"], detach=True, name=unique("tbt-app"), init=True,
        labels={"toybox-backupd.test": "1"}, volumes={volume: {"bind": "/data", "mode": "rw"}},
        network_mode="none")
    try:
        failed = env.cli("restore", "volume", volume, "--yes", "--stop-containers")
        assert failed.returncode != 0
        assert "extracting" in failed.stderr
        assert "old contents are in place" in failed.stderr
        assert f"{app.name} stay(s) stopped" in failed.stderr
        assert f"docker start {app.name}" in failed.stderr
        app.reload()
        assert app.status != "running"
        assert state(docker_engine, volume) == before  # every path, owner, mode and mtime
        assert bookkeeping(env) == ([], [])
    finally:
        app.remove(force=True)


def test_successful_restore_over_a_used_volume_starts_the_app_again(
        plain_env: Env, docker_engine: Any, make_volume: Callable[..., str]) -> None:
    env = plain_env
    volume = make_volume(TREE)
    env.values["BACKUP_VOLUMES"] = volume
    run_ok(env, "backup", "full")
    at_full = state(docker_engine, volume)
    fill_volume(docker_engine, volume, CHANGES + "\necho x > .hidden && chmod 0700 .")
    app = docker_engine.containers.run(
        BASE_IMAGE, ["sleep", "infinity"], detach=True, name=unique("tbt-app"), init=True,
        labels={"toybox-backupd.test": "1"}, volumes={volume: {"bind": "/data", "mode": "rw"}},
        network_mode="none")
    try:
        done = run_ok(env, "restore", "volume", volume, "--yes", "--stop-containers")
        assert "restored volume" in done.stdout
        app.reload()
        assert app.status == "running"
        assert state(docker_engine, volume) == at_full
        assert bookkeeping(env) == ([], [])
    finally:
        app.remove(force=True)


# a restore left at any step is settled by the next start-up -----------------------------------
OLD = "mkdir -p a/b && echo old > a/b/f && echo old > .dot && ln -s a top-link && chmod 0751 ."
NEW = "mkdir -p n && echo new > n/f && echo new > .dot && chmod 0755 ."
# the steps of a restore (tiers/volume_swap.py), each one cut short at some point
PREPARE = ("S=.toybox-restore-x && touch -r . /tmp/m && mkdir -m 0700 $S $S/new && "
           "touch -r /tmp/m $S/old.mtime && (cd $S/new && " + NEW + ")")
ASIDE = (" && touch -r $S/new $S/new.mtime && mkdir $S/old.tmp && chown --reference=. $S/old.tmp"
         " && chmod --reference=. $S/old.tmp && mv $S/old.tmp $S/old")
STEPS = {
    "staging": (PREPARE, "old", "removed the unfinished restore"),
    "moving aside": (PREPARE + ASIDE + " && mv a .dot $S/old/", "old",
                     "put the old contents back"),
    "moving in": (PREPARE + ASIDE + " && mv a .dot top-link $S/old/ && touch $S/aside && "
                  "mv $S/new/n . && chmod 0700 .", "old", "put the old contents back"),
    "removing the old tree": (PREPARE + ASIDE + " && mv a .dot top-link $S/old/ && touch $S/aside"
                              " && mv $S/new/n $S/new/.dot . && chmod --reference=$S/new . && "
                              "touch $S/swapped && rm -r $S/old/a", "new",
                              "finished swapping in the restored contents"),
}


def _mtimes_aside(listing: str) -> list[str]:
    """The listing without mtimes (the new tree here is made apart, at another time)."""
    lines = []
    for line in listing.splitlines():
        fields = line.split("|")
        fields[5] = "-"
        lines.append("|".join(fields))
    return lines


@pytest.mark.parametrize("step", list(STEPS))
def test_start_up_recovery_settles_a_restore_left_at_any_step(
        plain_env: Env, docker_engine: Any, make_volume: Callable[..., str], step: str) -> None:
    env = plain_env
    script, expected, outcome = STEPS[step]
    volume = make_volume(OLD)
    old = state(docker_engine, volume)
    new = state(docker_engine, make_volume(NEW))
    fill_volume(docker_engine, volume, script)
    assert state(docker_engine, volume) != old
    app = docker_engine.containers.create(
        BASE_IMAGE, ["sleep", "infinity"], name=unique("tbt-app"), init=True,
        labels={"toybox-backupd.test": "1"}, volumes={volume: {"bind": "/data", "mode": "rw"}},
        network_mode="none")
    try:
        with Store(env.state_dir) as history:
            history.begin_restore(volume, ".toybox-restore-x", [(app.id, app.name)])
            history.record_stopped(app.id, app.name, None)
        result = recovery.recover(env.settings())
        assert [(r["volume"], r["outcome"]) for r in result["restores"]] == [(volume, outcome)]
        assert result["containers_started"] == [app.name]
        settled = state(docker_engine, volume)
        if expected == "old":
            assert settled == old  # the root's owner, mode and mtime too
        else:
            assert _mtimes_aside(settled) == _mtimes_aside(new)
        assert bookkeeping(env) == ([], [])
        app.reload()
        assert app.status == "running"
    finally:
        app.remove(force=True)


# restore files: a hard link whose target is not selected ---------------------------------------
def test_restore_files_hard_link_whose_target_is_not_selected(
        plain_env: Env, docker_engine: Any, make_volume: Callable[..., str],
        tmp_path: Path) -> None:
    env = plain_env
    volume = full_then_diff(env, docker_engine, make_volume)
    [full] = catalog(env, "full")
    # in the archive, docs/hardlink-to-note is a link to the earlier docs/deep/er/note.txt
    alone = tmp_path / "alone"
    run_ok(env, "restore", "files", volume, "docs/hardlink-to-note", "--at", when(full),
           "--dest", str(alone))
    link = alone / "docs/hardlink-to-note"
    assert link.is_file() and not link.is_symlink()
    assert link.read_text() == "hello world\n"
    assert not (alone / "docs/deep").exists()
    assert [p.name for p in alone.iterdir()] == ["docs"]  # no scratch files left behind
    # the same from the differential (both names changed: both are in it)
    later = tmp_path / "later"
    run_ok(env, "restore", "files", volume, "docs/hardlink-to-note", "--dest", str(later))
    assert (later / "docs/hardlink-to-note").read_text() == "hello world\nappended\n"
    assert not (later / "docs/deep").exists()
    # both selected: still one file with two names
    both = tmp_path / "both"
    run_ok(env, "restore", "files", volume, "docs", "--at", when(full), "--dest", str(both))
    assert (both / "docs/hardlink-to-note").stat().st_ino == (
        both / "docs/deep/er/note.txt").stat().st_ino
    assert not [p for p in both.rglob("*") if p.name.startswith(".toybox")]


def test_a_staging_dir_left_by_a_killed_restore_is_not_backed_up(
        plain_env: Env, make_volume: Any) -> None:
    volume = make_volume("echo data > a.txt && mkdir -p .toybox-restore-0123456789/new"
                         " && echo half > .toybox-restore-0123456789/new/a.txt")
    result = plain_env.cli("backup", "full", BACKUP_VOLUMES=volume)
    assert result.returncode == 0, result.stderr
    with Store(plain_env.state_dir) as store:
        [full] = store.artifacts(tier="full")
        paths = {row["path"] for row in store.files(full.id)}
    assert "a.txt" in paths and not [p for p in paths if p.startswith(".toybox-restore-")]


def test_recovery_removes_the_fifo_directories_a_killed_run_left(plain_env: Env) -> None:
    settings = plain_env.settings(BACKUP_VOLUMES="")
    spool = settings.state_dir / "spool"
    (spool / "fifo-abc123").mkdir(parents=True)
    os.mkfifo(spool / "fifo-abc123" / "stream")
    (spool / "not-ours").mkdir()
    result = recovery.recover(settings)
    assert result["spool_removed"] == ["fifo-abc123"]
    assert sorted(p.name for p in spool.iterdir()) == ["not-ours"]
