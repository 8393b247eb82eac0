"""The physical tiers against a real Docker engine (issue 4)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import BASE_IMAGE, PG, Env, fill_volume, remove_pg, start_pg, unique

from toybox_backupd.adapters import docker_api
from toybox_backupd.core import atomic, manifests
from toybox_backupd.store import Store
from toybox_backupd.tiers.volumes import archive as volumes

TREE = r"""
mkdir -p docs/deep/er empty-dir 'with space' uploads/2026-01-25
echo 'hello world' > docs/deep/er/note.txt
printf 'root-owned\n' > docs/root.txt
printf 'app data\n' > docs/app.dat && chown 999:999 docs/app.dat
printf 'private\n' > docs/secret.key && chmod 0600 docs/secret.key
ln -s deep/er/note.txt docs/link-to-note
ln docs/deep/er/note.txt docs/hardlink-to-note
printf 'ünïcödé\n' > 'with space/日本語 ファイル.txt'
head -c 200000 /dev/urandom > uploads/2026-01-25/photo1.jpg
chown -R 999:999 uploads
touch -d '2025-12-31 23:59:58.123456789' docs/root.txt
"""
CHANGES = r"""
sleep 1.1
echo 'new upload' > uploads/2026-01-25/photo2.jpg
mkdir -p uploads/2026-01-26 && head -c 50000 /dev/urandom > uploads/2026-01-26/photo3.jpg
echo 'appended' >> docs/deep/er/note.txt
rm docs/app.dat
rm -r empty-dir
chmod 0640 docs/root.txt
chown 1000:1000 'with space/日本語 ファイル.txt'
mkdir new-empty
"""
STATE = r"""find . -printf '%p|%y|%m|%U|%G|%T@|%l|%n|' -exec sh -c '
  if [ -f "$1" ] && [ ! -L "$1" ]; then md5sum < "$1" | cut -c1-32; else echo; fi' _ {} \; | sort"""


def state(docker_engine: Any, volume: str) -> str:
    return fill_volume(docker_engine, volume, STATE)


def host_state(directory: Path) -> str:
    out = subprocess.run(["bash", "-c", STATE], cwd=directory, capture_output=True, text=True,
                         check=True)
    return out.stdout


def catalog(env: Env, tier: str | None = None, target: str | None = None) -> list[Any]:
    with Store(env.state_dir) as history:
        return history.artifacts(tier=tier, target=target)


def last_run(env: Env) -> Any:
    with Store(env.state_dir) as history:
        return history.runs(limit=1)[0]


@pytest.fixture
def vol_env(plain_env: Env) -> Env:
    return plain_env


def run_ok(env: Env, *args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
    result = env.cli(*args, **overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def full_then_diff(env: Env, docker_engine: Any, make_volume: Callable[..., str]) -> str:
    """A volume with TREE, a full of it, CHANGES, a differential; return the volume's name."""
    volume = make_volume(TREE)
    env.values["BACKUP_VOLUMES"] = volume
    run_ok(env, "backup", "full")
    fill_volume(docker_engine, volume, CHANGES)
    run_ok(env, "backup", "diff")
    return volume


def when(item: Any) -> str:
    return item.created_at.isoformat()


def test_full_diff_and_restore_at_each_point(vol_env: Env, docker_engine: Any,
                                             make_volume: Callable[..., str]) -> None:
    env = vol_env
    volume = make_volume(TREE)
    env.values["BACKUP_VOLUMES"] = volume
    run_ok(env, "backup", "full")
    at_full = state(docker_engine, volume)
    fill_volume(docker_engine, volume, CHANGES)
    run_ok(env, "backup", "diff")
    at_diff = state(docker_engine, volume)
    [full] = catalog(env, "full")
    [diff] = catalog(env, "diff")
    assert diff.base_id == full.id
    with Store(env.state_dir) as history:
        changed = {row["path"] for row in history.files(diff.id)}
        deleted = set(history.deleted_paths(diff.id))
        full_files = {row["path"]: row for row in history.files(full.id)}
    assert deleted == {"docs/app.dat", "empty-dir"}
    assert {"uploads/2026-01-25/photo2.jpg", "uploads/2026-01-26/photo3.jpg",
            "docs/deep/er/note.txt", "docs/hardlink-to-note", "docs/root.txt",
            "with space/日本語 ファイル.txt", "new-empty"} <= changed
    assert "uploads/2026-01-25/photo1.jpg" not in changed  # unchanged files stay out
    assert full_files["docs/secret.key"]["mode"] == 0o600
    assert full_files["docs/app.dat"]["uid"] == 999
    assert full_files["docs/root.txt"]["mtime_ns"] % 1_000_000_000 == 123456789
    assert full_files["docs/link-to-note"]["link"] == "deep/er/note.txt"
    assert full_files["uploads/2026-01-25/photo1.jpg"]["hash"]
    assert diff.size < full.size / 2

    # the volume is lost; it comes back as it was at the differential
    docker_engine.volumes.get(volume).remove()
    run_ok(env, "restore", "volume", volume, "--at", when(diff))
    assert state(docker_engine, volume) == at_diff
    # and as it was at the full (an existing volume: replaced after --yes)
    refused = env.cli("restore", "volume", volume, "--at", when(full))
    assert refused.returncode != 0 and "refusing without --yes" in refused.stderr
    run_ok(env, "restore", "volume", volume, "--at", when(full), "--yes")
    assert state(docker_engine, volume) == at_full
    # into another volume
    other = unique("tbt-vol")
    try:
        run_ok(env, "restore", "volume", volume, "--to", other)
        assert state(docker_engine, other) == at_diff
    finally:
        docker_engine.volumes.get(other).remove(force=True)
    verify = run_ok(env, "verify")
    assert "2 of 2 artifacts verified" in verify.stdout


def runs_details(env: Env) -> list[dict[str, Any]]:
    with Store(env.state_dir) as history:
        return [run.details or {} for run in reversed(history.runs(limit=100))]


EXEC = {"TOYBOX_BACKUPD_TRANSPORT": "exec"}  # the fallback: the data over the docker exec stream


def test_the_fifo_and_the_exec_stream_make_the_same_archives(
        vol_env: Env, docker_engine: Any, make_volume: Callable[..., str]) -> None:
    """The data path around dockerd (a FIFO in a directory the helper mounts) and its fallback
    (the exec stream) write the same bytes, and restore the same tree."""
    env = vol_env
    volume = make_volume(TREE + "head -c 5000000 /dev/urandom > uploads/big.bin\n"
                         "seq 1 400000 > docs/numbers.txt\n")
    env.values["BACKUP_VOLUMES"] = volume
    run_ok(env, "backup", "full")
    run_ok(env, "backup", "full", **EXEC)
    fill_volume(docker_engine, volume, CHANGES)
    verbose = run_ok(env, "backup", "diff", "--verbose").stdout
    assert re.search(r"^  helper container: start \d+\.\d\d s, remove \d+\.\d\d s$", verbose, re.M)
    assert re.search(rf"^  {volume} \(fifo\): stop .*, scan .*, tar .*, fsync .*$", verbose, re.M)
    run_ok(env, "backup", "diff", **EXEC)
    expected = state(docker_engine, volume)
    transports = [d["volumes"][volume]["transport"] for d in runs_details(env)]
    assert transports == ["fifo", "exec", "fifo", "exec"]
    steps = runs_details(env)[0]["volumes"][volume]["seconds"]
    assert set(steps) == {"stop", "scan", "select", "fifo", "tar", "start", "index", "fsync",
                          "catalog"}
    assert set(runs_details(env)[0]["helper"]["seconds"]) == {"start", "remove"}
    fulls, diffs = catalog(env, "full"), catalog(env, "diff")
    assert len(fulls) == len(diffs) == 2 and fulls[0].size > 5_000_000  # more than a pipe holds
    for pair in (fulls, diffs):
        fifo_made, exec_made = ((env.backup_dir / item.path).read_bytes() for item in pair)
        assert fifo_made == exec_made and pair[0].sha256 == pair[1].sha256
    # both restore the tree the same way (the differential's chain: full, deleted, diff)
    for way, extra in (("fifo", {}), ("exec", EXEC)):
        other = unique("tbt-vol")
        try:
            result = run_ok(env, "restore", "volume", volume, "--to", other, **extra)
            assert ("docker exec stream" in result.stderr) == (way == "exec"), result.stderr
            assert state(docker_engine, other) == expected
        finally:
            docker_engine.volumes.get(other).remove(force=True)


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_archives_restore_by_hand_with_gnu_tar(vol_env: Env, docker_engine: Any,
                                               make_volume: Callable[..., str], tmp_path: Path,
                                               compression: str) -> None:
    env = vol_env
    volume = make_volume(TREE)
    env.values.update(BACKUP_VOLUMES=volume, VOLUME_COMPRESSION=compression)
    run_ok(env, "backup", "full")
    fill_volume(docker_engine, volume, CHANGES)
    run_ok(env, "backup", "diff")
    expected = state(docker_engine, volume)
    [full] = catalog(env, "full")
    [diff] = catalog(env, "diff")
    target = tmp_path / "by-hand"
    target.mkdir()
    tool = "zstd -dc" if compression == "zstd" else "gzip -dc"
    manifest = json.loads(manifests.manifest_path(env.backup_dir / diff.path).read_text())
    # the README's manual procedure: full, then remove the deleted paths, then the differential
    subprocess.run(f"{tool} '{env.backup_dir / full.path}' | tar -x --numeric-owner -p -C "
                   f"'{target}'", shell=True, check=True)
    for path in manifest["deleted"]:
        subprocess.run(["rm", "-rf", "--", str(target / path)], check=True)
    subprocess.run(f"{tool} '{env.backup_dir / diff.path}' | tar -x --numeric-owner -p -C "
                   f"'{target}'", shell=True, check=True)
    assert host_state(target) == expected


def test_one_helper_reads_every_volume_of_a_run(
        vol_env: Env, docker_engine: Any, make_volume: Callable[..., str]) -> None:
    """A run over several volumes starts one helper container (its start-up paid once), and
    each volume's archive holds that volume's files only, as if read alone."""
    env = vol_env
    first = make_volume("mkdir -p a && echo one > a/1.txt && echo shared > same.txt")
    second = make_volume("mkdir -p b && echo two > b/2.txt && echo other > same.txt")
    env.values["BACKUP_VOLUMES"] = f"{first},{second}"
    since = time.time()
    run_ok(env, "backup", "full")
    with Store(env.state_dir) as history:
        owner = history.instance_id()
    created = docker_engine.events(
        since=int(since), until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "event": "create",
                 "label": [f"{docker_api.HELPER_LABEL}=backup",
                           f"{docker_api.OWNER_LABEL}={owner}"]})
    assert len(list(created)) == 1
    members = {}
    for item in catalog(env, "full"):
        with Store(env.state_dir) as history:
            members[item.target] = {row["path"] for row in history.files(item.id)}
    assert members == {first: {".", "a", "a/1.txt", "same.txt"},
                       second: {".", "b", "b/2.txt", "same.txt"}}
    for volume in (first, second):
        restored = unique("tbt-restored")
        try:
            run_ok(env, "restore", "volume", volume, "--to", restored)
            assert state(docker_engine, restored) == state(docker_engine, volume)
        finally:
            docker_engine.volumes.get(restored).remove(force=True)


def docker_events(docker_engine: Any, container_id: str, since: float) -> list[str]:
    events = docker_engine.events(since=int(since), until=int(time.time()) + 1, decode=True,
                                  filters={"container": container_id, "type": "container"})
    return [event["status"] for event in events if event.get("status") in ("die", "start")]


def test_labelled_container_is_stopped_during_archive_and_started_after(
        vol_env: Env, docker_engine: Any, make_volume: Callable[..., str], tmp_path: Path) -> None:
    env = vol_env
    volume = make_volume(TREE)
    env.values["BACKUP_VOLUMES"] = volume
    app = docker_engine.containers.run(
        BASE_IMAGE, ["sleep", "infinity"], detach=True, name=unique("tbt-app"), init=True,
        labels={"toybox-backupd.stop-during-backup": "true", "toybox-backupd.test": "1"},
        volumes={volume: {"bind": "/data", "mode": "rw"}}, network_mode="none")
    bystander = docker_engine.containers.run(
        BASE_IMAGE, ["sleep", "infinity"], detach=True, name=unique("tbt-other"), init=True,
        labels={"toybox-backupd.test": "1"},
        volumes={volume: {"bind": "/data", "mode": "ro"}}, network_mode="none")
    try:
        time.sleep(1.1)  # events are filtered by whole seconds
        since = time.time()
        run_ok(env, "backup", "full")
        app.reload()
        assert app.status == "running"
        assert docker_events(docker_engine, app.id, since) == ["die", "start"]
        assert docker_events(docker_engine, bystander.id, since) == []  # not labelled
        run = last_run(env)
        assert run.details["downtime"][app.name] > 0
        # named in STOP_DURING_BACKUP instead of labelled
        since = time.time()
        run_ok(env, "backup", "full", STOP_DURING_BACKUP=bystander.name)
        assert docker_events(docker_engine, bystander.id, since) == ["die", "start"]

        # the archive fails (backup dir full): the container is started all the same
        fill_volume(docker_engine, volume, "head -c 6000000 /dev/urandom > big.bin")
        tiny = tmp_path / "tiny"
        tiny.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(tiny)], check=True)
        try:
            since = time.time()
            failed = env.cli("backup", "full", BACKUP_DIR=str(tiny))
            assert failed.returncode != 0
            assert "full" in last_run(env).error
            assert not list(tiny.rglob("*.partial"))
        finally:
            subprocess.run(["umount", "-l", str(tiny)], check=False)
        app.reload()
        assert app.status == "running"
        assert docker_events(docker_engine, app.id, since) == ["die", "start"]
        with Store(env.state_dir) as history:
            assert history.stopped_containers() == []
    finally:
        app.remove(force=True)
        bystander.remove(force=True)


def test_database_volume_restored_into_new_volume_serves_rows(
        vol_env: Env, docker_engine: Any, images: dict[str, str]) -> None:
    env = vol_env
    pg = start_pg(docker_engine, labels={"toybox-backupd.stop-during-backup": "true"})
    restored_pg: PG | None = None
    new_volume = unique("tbt-pgrestored")
    try:
        seed = pg.snapshot()
        env.values["BACKUP_VOLUMES"] = pg.volume
        run_ok(env, "backup", "full")
        pg.container.reload()
        assert pg.container.status == "running"
        run_ok(env, "restore", "volume", pg.volume, "--to", new_volume)
        restored_pg = start_pg(docker_engine, volume=new_volume, seed=False, password=pg.password)
        assert restored_pg.snapshot() == seed
        # the original database kept working
        pg.wait_ready()
        assert pg.snapshot() == seed
        # restoring over a volume a running container uses is refused unless told to stop it
        busy = env.cli("restore", "volume", pg.volume, "--yes")
        assert busy.returncode != 0 and pg.name in busy.stderr
        pg.psql("DELETE FROM media_items")
        run_ok(env, "restore", "volume", pg.volume, "--yes", "--stop-containers")
        pg.wait_ready()
        assert pg.snapshot() == seed
    finally:
        remove_pg(pg)
        if restored_pg is not None:
            remove_pg(restored_pg)
        else:
            with contextlib.suppress(Exception):
                docker_engine.volumes.get(new_volume).remove(force=True)


def test_files_changed_while_read_are_reported_not_fatal(
        vol_env: Env, docker_engine: Any, make_volume: Callable[..., str]) -> None:
    env = vol_env
    volume = make_volume("head -c 150000000 /dev/zero > growing.log; mkdir churn")
    env.values["BACKUP_VOLUMES"] = volume
    writer = docker_engine.containers.run(
        BASE_IMAGE, ["bash", "-c", "i=0; while true; do head -c 4096 /dev/urandom >> growing.log;"
                     " touch churn/f$i; rm -f churn/f$((i-1)); i=$((i+1)); done"],
        detach=True, working_dir="/data", labels={"toybox-backupd.test": "1"},
        volumes={volume: {"bind": "/data", "mode": "rw"}}, network_mode="none")
    try:
        time.sleep(0.5)
        run_ok(env, "backup", "full")
    finally:
        writer.remove(force=True)
    run = last_run(env)
    assert run.status == "ok"
    warnings = " ".join(run.details["warnings"])
    assert "growing.log: file changed as we read it" in warnings
    verify = run_ok(env, "verify")
    assert "1 of 1 artifacts verified" in verify.stdout


STABLE = "for s in 1 2 3 4 5; do mkdir -p tmp/stable$s; touch tmp/stable$s/f{1..1000}; done"
CHURN = r"""
churn() { n=0; while true; do n=$((n+1)); d=tmp/job$1-$n; mkdir $d; touch $d/a $d/b
                               sleep 0.02; rm -rf $d; done; }
for w in 1 2 3; do churn $w & done
echo churning; wait
"""


def test_a_busy_volume_is_archived_with_warnings_not_failures(
        vol_env: Env, docker_engine: Any, make_volume: Callable[..., str]) -> None:
    """An app keeps creating and deleting temp directories and files while `backup full` and
    `backup diff` read the volume: paths that vanish between find's readdir and its stat (or
    before it opens a directory it listed) are warnings, never a failed run (issue 13.4)."""
    env = vol_env
    volume = make_volume(STABLE)
    env.values["BACKUP_VOLUMES"] = volume
    app = docker_engine.containers.run(
        BASE_IMAGE, ["bash", "-c", CHURN], detach=True, working_dir="/data",
        labels={"toybox-backupd.test": "1"}, volumes={volume: {"bind": "/data", "mode": "rw"}},
        network_mode="none")
    try:
        while b"churning" not in app.logs():
            app.reload()
            assert app.status in ("created", "running"), app.logs()
            time.sleep(0.1)
        full = env.cli("backup", "full")
        full_run = last_run(env)
        diff = env.cli("backup", "diff")
        diff_run = last_run(env)
    finally:
        app.remove(force=True)
    for result, run in ((full, full_run), (diff, diff_run)):
        assert result.returncode == 0 and run.status == "ok", (run.error, result.stderr[-2000:])
    assert (full_run.job, diff_run.job) == ("full", "diff")
    [full_item] = catalog(env, "full")
    [diff_item] = catalog(env, "diff")
    assert diff_item.base_id == full_item.id
    with Store(env.state_dir) as history:
        listed = {row["path"] for row in history.files(full_item.id)}
    stable = {f"tmp/stable{s}/f{i}" for s in range(1, 6) for i in range(1, 1001)}
    assert stable <= listed  # nothing that stayed was lost to the churn
    churned = re.compile(r": (vanished while (listed|read): )?tmp(/job[\d-]+(/[ab])?)?(:|$)")
    for warning in full_run.details["warnings"] + diff_run.details["warnings"]:
        assert churned.search(warning), warning  # only the churned paths are reported
    assert "2 of 2 artifacts verified" in run_ok(env, "verify").stdout


def test_only_vanished_paths_are_forgiven_in_finds_errors() -> None:
    gone = "find: '/vol/1/tmp/job1-3': No such file or directory"
    assert volumes._vanished(gone, "/vol/1") == ["tmp/job1-3"]
    assert volumes._vanished(gone + "\nfind: '/vol/1/x': Permission denied", "/vol/1") is None
    assert volumes._vanished("find: '/vol/1/y': Input/output error", "/vol/1") is None
    assert volumes._vanished("", "/vol/1") is None  # exit status 1 without a message: an error
    cut = "ob1-2': No such file or directory\n" + "\n".join([gone] * 2000)  # a kept tail
    assert volumes._vanished(cut, "/vol/1") == ["tmp/job1-3"] * 2000


def test_differential_without_full_makes_a_full(vol_env: Env,
                                               make_volume: Callable[..., str]) -> None:
    env = vol_env
    volume = make_volume("echo a > a")
    env.values["BACKUP_VOLUMES"] = volume
    run_ok(env, "backup", "diff")
    assert [a.tier for a in catalog(env)] == ["full"]
    assert "made a full instead" in " ".join(last_run(env).details["warnings"])


def test_restore_files_from_differential(vol_env: Env, docker_engine: Any,
                                         make_volume: Callable[..., str], tmp_path: Path) -> None:
    env = vol_env
    volume = full_then_diff(env, docker_engine, make_volume)
    fill_volume(docker_engine, volume, "rm -rf uploads")
    dest = tmp_path / "out"
    run_ok(env, "restore", "files", volume, "uploads/2026-01-2*/*.jpg", "--dest", str(dest))
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["uploads/2026-01-25/photo1.jpg", "uploads/2026-01-25/photo2.jpg",
                   "uploads/2026-01-26/photo3.jpg"]
    assert (dest / "uploads/2026-01-25/photo2.jpg").read_text() == "new upload\n"
    # at the full's time, photo2 did not exist yet
    [full] = catalog(env, "full")
    early = tmp_path / "early"
    run_ok(env, "restore", "files", volume, "uploads", "--at", when(full), "--dest", str(early))
    assert sorted(p.name for p in early.rglob("*.jpg")) == ["photo1.jpg"]
    nothing = env.cli("restore", "files", volume, "nope/*", "--dest", str(tmp_path / "x"))
    assert nothing.returncode != 0 and "matches" in nothing.stderr


def test_restore_files_from_off_site_when_the_local_archives_are_gone(
        vol_env: Env, docker_engine: Any, make_volume: Callable[..., str], tmp_path: Path) -> None:
    import pyrage
    key = pyrage.x25519.Identity.generate()
    (tmp_path / "age.key").write_text(str(key) + "\n")
    (tmp_path / "nas").mkdir()  # a mounted share
    env = vol_env
    env.values.update({"OFFSITE_URL": f"file://{tmp_path / 'nas'}",
                       "OFFSITE_AGE_RECIPIENTS": str(key.to_public()),
                       "AGE_IDENTITY_FILE": str(tmp_path / "age.key")})
    volume = full_then_diff(env, docker_engine, make_volume)
    assert sorted(p.name for p in (tmp_path / "nas" / "volumes" / volume).iterdir()
                  if p.name.endswith(".age")) and not list((tmp_path / "nas").rglob("*.tar.zst"))
    shutil.rmtree(env.backup_dir / "volumes")  # the host's copies are gone, and its catalog
    shutil.rmtree(env.state_dir)
    # a new host indexes the bucket before it has the identity: no file index yet
    result = run_ok(env, "reindex", "--offsite", AGE_IDENTITY_FILE="")
    assert "2 artifact(s) added" in result.stdout, result.stdout
    dest = tmp_path / "out"
    result = run_ok(env, "restore", "files", volume, "uploads/2026-01-2*/*.jpg", "--dest", str(dest))
    assert "from off-site" in result.stdout, result.stdout
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["uploads/2026-01-25/photo1.jpg", "uploads/2026-01-25/photo2.jpg",
                   "uploads/2026-01-26/photo3.jpg"]
    assert (dest / "uploads/2026-01-25/photo2.jpg").read_text() == "new upload\n"
    assert [a.tier for a in catalog(env)] == ["full", "diff"]  # local again, both


def _hostile_archive() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes = b"x", **kw: Any) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data) if kw.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
            for key, value in kw.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if info.size else None)
        add("good.txt", b"good\n")
        add("../escaped-dotdot.txt")
        add("/tmp/escaped-absolute.txt")
        add("evil-link", type=tarfile.SYMTYPE, linkname="../../..")
        add("evil-link/escaped-through-link.txt")
        add("abs-link", type=tarfile.SYMTYPE, linkname="/etc")
        add("hard-out", type=tarfile.LNKTYPE, linkname="../../etc/hostname")
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def test_hostile_member_names_never_escape(vol_env: Env, tmp_path: Path) -> None:
    env = vol_env
    volume = "evil"
    directory = env.backup_dir / "volumes" / volume
    directory.mkdir(parents=True)
    path = directory / "evil_20260126-173000_full.tar.zst"
    path.write_bytes(_hostile_archive())
    names = ["good.txt", "../escaped-dotdot.txt", "/tmp/escaped-absolute.txt", "evil-link",
             "evil-link/escaped-through-link.txt", "abs-link", "hard-out"]
    manifests.write_manifest(path, {
        "tool": "toybox-backupd", "tier": "full", "target": volume,
        "created_at": "2026-01-26T08:30:00+00:00", "size": path.stat().st_size,
        "sha256": atomic.sha256_of(path), "file": path.name, "base": None, "deleted": [],
        "extra": {"compression": "zstd", "files": len(names)},
    })


    manifests.write_index(path, [(n, "f", 1, 0, 0, 0, 0o644, 0, 0, None, None) for n in names])
    reindexed = run_ok(env, "reindex")
    assert "1 artifact" in reindexed.stdout
    sandbox = tmp_path / "sandbox"
    dest = sandbox / "dest"
    result = env.cli("restore", "files", volume, "*", "--dest", str(dest))
    assert result.returncode == 0, result.stderr
    assert "refused" in result.stdout
    assert (dest / "good.txt").read_text() == "good\n"
    outside = [p for p in sandbox.rglob("*") if dest not in p.parents and p != dest]
    assert outside == []
    assert not Path("/tmp/escaped-absolute.txt").exists()
    for p in dest.rglob("*"):
        assert p.resolve().is_relative_to(dest.resolve()) or p.is_symlink()
        if p.is_symlink():
            assert (dest / p.readlink()).resolve().is_relative_to(dest.resolve())


def test_corrupt_archive_is_refused(vol_env: Env, docker_engine: Any,
                                    make_volume: Callable[..., str]) -> None:
    env = vol_env
    volume = make_volume(TREE)
    env.values["BACKUP_VOLUMES"] = volume
    run_ok(env, "backup", "full")
    before = state(docker_engine, volume)
    [full] = catalog(env, "full")
    path = env.backup_dir / full.path
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x55
    path.write_bytes(bytes(data))
    result = env.cli("restore", "volume", volume, "--yes")
    assert result.returncode != 0 and "corrupt" in result.stderr
    assert state(docker_engine, volume) == before  # untouched
    verify = env.cli("verify")
    assert verify.returncode != 0 and "CORRUPT" in verify.stdout


def test_a_checksum_mismatch_found_at_the_end_changes_nothing(
        vol_env: Env, docker_engine: Any, make_volume: Callable[..., str]) -> None:
    """The sha256 is checked while the archive streams, not in a pass before: a damaged byte
    that tar does not notice (an uncompressed archive, inside a file's content) is found at the
    end, and the restore stops before the swap: the volume keeps what it held."""
    env = vol_env
    volume = make_volume(TREE + "head -c 3000000 /dev/urandom > uploads/big.bin\n")
    env.values.update(BACKUP_VOLUMES=volume, VOLUME_COMPRESSION="none")
    run_ok(env, "backup", "full")
    fill_volume(docker_engine, volume, CHANGES)
    before = state(docker_engine, volume)
    [full] = catalog(env, "full")
    path = env.backup_dir / full.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55  # inside big.bin's content
    path.write_bytes(bytes(data))
    result = env.cli("restore", "volume", volume, "--yes")
    assert result.returncode != 0 and "is corrupt" in result.stderr, result.stderr
    assert "old contents are in place again" in result.stderr
    assert state(docker_engine, volume) == before
    leftovers = fill_volume(docker_engine, volume, "ls -A")
    assert ".toybox-restore-" not in leftovers


def test_missing_volume_is_a_clear_failure(vol_env: Env) -> None:
    env = vol_env
    result = env.cli("backup", "full", BACKUP_VOLUMES="tbt-no-such-volume")
    assert result.returncode != 0
    assert "no such Docker volume: tbt-no-such-volume" in last_run(env).error
    assert datetime.fromisoformat(last_run(env).started_at.isoformat())


def test_reindex_rebuilds_the_catalog_from_the_backup_dir_alone(
        vol_env: Env, docker_engine: Any, make_volume: Callable[..., str]) -> None:
    import shutil

    env = vol_env
    volume = full_then_diff(env, docker_engine, make_volume)
    expected = state(docker_engine, volume)
    before = json.loads(run_ok(env, "list", "--json").stdout)
    shutil.rmtree(env.state_dir)  # the host is gone; only the backup dir was copied over
    assert json.loads(run_ok(env, "list", "--json").stdout) == []
    assert "2 artifact(s) added" in run_ok(env, "reindex").stdout
    after = json.loads(run_ok(env, "list", "--json").stdout)
    keys = ("tier", "target", "path", "created_at", "size", "sha256")
    assert [{k: a[k] for k in keys} for a in after] == [{k: b[k] for k in keys} for b in before]
    assert after[1]["base_id"] == after[0]["id"]
    assert "0 artifact(s) added" in run_ok(env, "reindex").stdout  # idempotent
    docker_engine.volumes.get(volume).remove()
    run_ok(env, "restore", "volume", volume)
    assert state(docker_engine, volume) == expected
