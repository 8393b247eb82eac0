"""Point in time off-site (issue 16): base backups and the WAL copied off-site (encrypted with
age), pruned there chain-aware, and a lost server (nothing left but the settings, the identity
and the target) restored to a moment from the target alone: a directory, and the same objects
in a real S3 bucket (SeaweedFS). A restore to a moment killed mid-way leaves its scratch to
start-up recovery, which leaves a running one's alone."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pyrage
from conftest import PG, Bucket, Env, start_pg
from test_daemon import Daemon, wait_for
from test_pitr import NO_JOBS, PITR, Writer, artifacts, segments, stamps, wal_helpers

from toybox_backupd.core.basics import iso, utcnow
from toybox_backupd.store import Store

AGE_HEADER = b"age-encryption.org/v1"
ZONE = ZoneInfo("Asia/Tokyo")


def _wipe(env: Env) -> None:
    """The server is lost: its state goes, its backup directory is empty (a new disk)."""
    for path in (env.backup_dir, env.state_dir):
        shutil.rmtree(path, ignore_errors=True)
    env.backup_dir.mkdir(mode=0o700)


def _remote_segments(root: Path) -> dict[str, Path]:
    """{segment file name without .age (and a partial's .zst): path} of the WAL objects in a
    directory target."""
    found = {}
    for path in (root / "wal" / "toybox").rglob("*.age"):
        found[path.name.removesuffix(".age").removesuffix(".zst")] = path
    return found


def _moments(rows: list[tuple[int, datetime]], after: datetime) -> list[datetime]:
    """Two moments a second or more after `after`, each halfway between two rows (rows are
    ~0.2 s apart: a commit lands well on its side)."""
    later = [at for _, at in rows if at > after + timedelta(seconds=1)]
    assert len(later) >= 8, (after, rows[-1])
    return [a + (b - a) / 2 for a, b in (later[2:4], later[-4:-2])]


def _when(moment: datetime) -> str:
    return moment.astimezone(ZONE).isoformat(timespec="microseconds")


def test_a_lost_server_is_restored_to_a_moment_from_off_site_alone(
        env: Env, pg: PG, docker_engine: Any, s3_bucket: Bucket) -> None:
    from toybox_backupd.actions import offsite_retention
    from toybox_backupd.daemon import recovery
    from toybox_backupd.tiers.pitr import wal, wal_offsite

    key = pyrage.x25519.Identity.generate()
    identity = env.tmp / "age-identity.txt"
    identity.write_text(f"{key}\n")
    identity.chmod(0o600)
    nas = env.tmp / "nas"
    nas.mkdir()
    off = {**PITR, "OFFSITE_URL": f"file://{nas}", "OFFSITE_AGE_RECIPIENTS": str(key.to_public()),
           "AGE_IDENTITY_FILE": str(identity), "PITR_BASE_SCHEDULE": "", "PITR_KEEP_DAYS": "1",
           "OFFSITE_KEEP_DAYS": "30"}
    settings = env.settings(**off)

    def ship() -> None:  # the streamer's off-site step (the daemon's watch), now
        wal.make_recent_recoverable(settings)
        with Store(env.state_dir) as history:
            wal_offsite.copy_offsite(settings, history, float("-inf"), time.monotonic())

    daemon = Daemon(env, **PITR, **NO_JOBS)
    try:
        wait_for("the WAL streamer", lambda: any(s.partial for s in segments(env)), 90,
                 lambda: daemon.log)
        # 1. a first base backup, then (as if days had passed) a dump and more WAL ------------
        result = env.cli("backup", "base", **off)
        assert result.returncode == 0, result.stderr
        [first] = artifacts(env, "base")
        with Store(env.state_dir) as history, history.tx() as db:
            db.execute("UPDATE artifacts SET created_at=? WHERE id=?",
                       (iso(utcnow() - timedelta(days=3)), first.id))
        assert env.cli("backup", "logical", **off).returncode == 0
        for _ in range(2):
            pg.psql("CREATE TABLE IF NOT EXISTS early (x int); INSERT INTO early VALUES (1); "
                    "SELECT pg_switch_wal()")
        ship()
        # 2. a second base backup while rows are written: the first goes here, stays off-site,
        # and so does the WAL it needs, here and off-site -----------------------------------
        writer = Writer(pg)
        try:
            time.sleep(3)
            result = env.cli("backup", "base", **off)
            assert result.returncode == 0, result.stderr
            time.sleep(6)
        finally:
            writer.finish()
        rows = stamps(pg)
        ship()
        with Store(env.state_dir) as history:
            second = next(item for item in history.artifacts(tier="base") if item.id != first.id)
            assert history.artifact(first.id).status == "deleted"  # type: ignore[union-attr]
            assert history.offsite_copy(first.id).status == "ok"  # type: ignore[union-attr]
            assert {o["source"] for o in history.offsite_copy(second.id).objects} == {  # type: ignore[union-attr]
                second.path, second.path + ".manifest.json",
                *(second.path.replace("base.tar.gz", name)
                  for name in ("pg_wal.tar.gz", "backup_manifest"))}
        start, needed = first.extra["start_segment"], second.extra["start_segment"]
        assert start < needed
        assert any(s.number == start for s in wal.segments(settings))
        remote = _remote_segments(nas)
        assert any(wal.parse_segment(Path(name)).number == start for name in remote)
        assert all(path.read_bytes().startswith(AGE_HEADER) for path in remote.values())
        # 3. off-site retention after the copies of the first pass their days: that base
        # backup goes, with the WAL before the second's start and the superseded .partial ----
        with Store(env.state_dir) as history:
            gone = offsite_retention.apply(env.settings(**{**off, "OFFSITE_KEEP_DAYS": "1"}),
                                           history, "base", ["toybox"])
        assert first.path in gone and any("off-site WAL object(s)" in line for line in gone)
        remote = _remote_segments(nas)
        numbers = [wal.parse_segment(Path(name)).number for name in remote]
        assert min(numbers) == needed, (gone, sorted(remote))
        assert not [n for n in remote if n.endswith(".partial") and n[:-8] in remote]
        assert all((nas / "wal" / "toybox" / f"{name}.sha256").exists()
                   for name in remote if not name.endswith(".partial"))
        assert not (nas / first.path).exists()
        # the segment being written is there compressed (zstd, then age), as its local copy
        [current] = [s for s in wal.segments(settings) if s.partial]
        packed = nas / f"{current.path.relative_to(env.backup_dir)}.zst.age"
        plain = subprocess.run(["zstd", "-d", "-c"], input=pyrage.decrypt(  # age -d | zstd -d
            packed.read_bytes(), [key]), capture_output=True, check=True).stdout
        assert len(plain) == wal.SEGMENT_SIZE and packed.stat().st_size < wal.SEGMENT_SIZE // 8
        # the same objects in a real S3 bucket, for the second new host below
        for path in nas.rglob("*"):
            if path.is_file():
                s3_bucket.client.upload_file(str(path), s3_bucket.name,
                                             f"toybox/{path.relative_to(nas)}")
    finally:
        daemon.kill()
        for container in wal_helpers(docker_engine, env):
            container.remove(force=True, v=True)
    at_db, at_cluster = _moments(rows, second.created_at)

    # 4. a new host with the directory target: reindex --offsite, then a restore to a moment
    # killed mid-way while the daemon starts (its scratch stays while it runs, then goes) ---
    _wipe(env)
    result = env.cli("reindex", "--offsite", **off)
    assert result.returncode == 0 and "2 artifact(s) added" in result.stdout, result.stdout
    _killed_restore(env, docker_engine, off, _when(at_db), recovery)
    started = time.monotonic()
    result = env.cli("restore", "db", "--at", _when(at_db), "--into", "at_db", "--yes", **off)
    took_db = time.monotonic() - started
    assert result.returncode == 0, result.stderr + result.stdout
    assert "WAL segment(s)" in result.stdout and "from off-site" in result.stdout, result.stdout
    assert stamps(pg, db="at_db") == [row for row in rows if row[1] <= at_db]
    assert not list(env.backup_dir.glob(".pitr-*"))
    # issue 23: the first segment the recovery needs lost its .sha256 (a crash between the
    # copies): it is never replayed; the restore says where the WAL stops and what it reaches,
    # and takes the newest dump instead
    after = sorted(name for name in _remote_segments(nas) if not name.endswith(".partial")
                   and wal.parse_segment(Path(name)).number >= needed)  # type: ignore[union-attr]
    assert after, sorted(_remote_segments(nas))
    (nas / "wal" / "toybox" / f"{after[0]}.sha256").unlink()
    result = env.cli("restore", "db", "--at", _when(at_db), "--into", "at_cut", "--yes", **off)
    assert result.returncode != 0 and "pass --nearest" in result.stderr, result.stdout  # --yes alone
    result = env.cli("restore", "db", "--at", _when(at_db), "--into", "at_cut", "--yes",
                     "--nearest", **off)
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"not replayed from {after[0]} on" in result.stdout, result.stdout
    assert "Recovery stops before it" in result.stdout, result.stdout
    assert ("the WAL archive reaches only" in result.stdout
            or "the WAL archive holds no commit" in result.stdout), result.stdout
    assert "using the newest dump" in result.stdout, result.stdout

    # 5. another new host with the S3 bucket: the whole cluster to a moment, into a new volume
    _wipe(env)
    s3 = {**off, **s3_bucket.values(prefix="toybox")}
    result = env.cli("reindex", "--offsite", **s3)
    assert result.returncode == 0 and "2 artifact(s) added" in result.stdout, result.stdout
    volume = pg.volume + "-at"
    started = time.monotonic()
    result = env.cli("restore", "cluster", "--at", _when(at_cluster), "--volume", volume,
                     "--yes", **s3)
    sys.stderr.write(f"\nfrom off-site alone: restore db --at {took_db:.1f} s (directory), "
                     f"restore cluster --at {time.monotonic() - started:.1f} s (S3)\n")
    try:
        assert result.returncode == 0, result.stderr + result.stdout
        assert f"fetching {second.path}" in result.stdout, result.stdout
        assert "WAL segment(s)" in result.stdout, result.stdout
        back = start_pg(docker_engine, volume=volume, seed=False)
        try:
            assert stamps(back) == [row for row in rows if row[1] <= at_cluster]
        finally:
            back.container.remove(force=True, v=True)
        # issue 23: the same with a segment it needs unchecked (its .sha256 gone): refused, and
        # says what the WAL reaches; the volume is left as it is
        s3_bucket.client.delete_object(Bucket=s3_bucket.name,
                                       Key=f"toybox/wal/toybox/{after[0]}.sha256")
        result = env.cli("restore", "cluster", "--at", _when(at_cluster), "--volume", volume,
                         "--yes", **s3)
        assert result.returncode != 0, result.stdout
        assert f"not replayed from {after[0]} on" in result.stdout, result.stdout
        assert "the WAL here and off-site holds no commit after the base backup" in result.stderr
        assert "nothing was changed" in result.stderr, result.stderr
    finally:
        with contextlib.suppress(Exception):
            docker_engine.volumes.get(volume).remove(force=True)


def _killed_restore(env: Env, docker_engine: Any, values: dict[str, str], when: str,
                    recovery: Any) -> None:
    """`restore db --at` is frozen (SIGSTOP: still running, its locks held) once its throwaway
    server's volume is in use; start-up recovery leaves it all. Killed (SIGKILL), its scratch
    (volume, the container on it, the fetched WAL) is removed; what is not ours stays."""
    from toybox_backupd.adapters import docker_api

    settings = env.settings(**values)
    with Store(env.state_dir) as history:
        owner = history.instance_id()
    foreign = docker_engine.volumes.create(f"toybox-backupd-recover-{secrets.token_hex(5)}")
    theirs = env.backup_dir / ".pitr-notes.txt"
    theirs.write_text("a user's file")
    environ = {**os.environ, **env.values, **values}
    environ.pop("TOYBOX_ENV_FILE", None)
    output = env.tmp / "killed-restore.log"
    with open(output, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "toybox_backupd.cli", "--env-file", str(env.tmp / "none.env"),
             "restore", "db", "--at", when, "--into", "killed", "--yes"], env=environ,
            cwd=str(env.tmp), stdout=log, stderr=subprocess.STDOUT)

    def in_use() -> list[Any]:
        volumes = docker_engine.volumes.list(filters={"label": [
            docker_api.SCRATCH_LABEL, f"{docker_api.OWNER_LABEL}={owner}"]})
        return [(v.name, c) for v in volumes for c in docker_engine.containers.list(
            all=True, filters={"volume": v.name})]

    try:
        [(volume, container)] = wait_for("the restore's scratch volume in use", in_use, 180,
                                         output.read_text, interval=0.1)
        proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 60
        result = recovery.recover(settings, stop_requested=lambda: time.monotonic() > deadline)
        assert result["scratch_removed"] == [], result
        assert docker_engine.volumes.get(volume)
        assert list(env.backup_dir.glob(".pitr-*-wal"))
        proc.kill()
        proc.wait(30)
        result = recovery.recover(settings)
        assert volume in result["scratch_removed"], result
        assert not docker_engine.volumes.list(filters={"name": volume})
        assert not docker_engine.containers.list(all=True, filters={"id": container.id})
        assert [p.name for p in env.backup_dir.glob(".pitr-*")] == [theirs.name]
        assert docker_engine.volumes.get(foreign.name)  # not ours: no label, another instance
    finally:
        if proc.poll() is None:
            proc.kill()
        foreign.remove(force=True)
        theirs.unlink()


def _encrypted_nas(plain_env: Env) -> tuple[Any, Path, Any]:
    """An age identity, an empty directory target, and PITR settings copying there encrypted."""
    key = pyrage.x25519.Identity.generate()
    identity = plain_env.tmp / "identity.txt"
    identity.write_text(str(key) + "\n")
    identity.chmod(0o600)
    nas = plain_env.tmp / "nas"
    nas.mkdir()
    settings = plain_env.settings(**PITR, PG_CONTAINER="db", OFFSITE_URL=f"file://{nas}",
                                  OFFSITE_AGE_RECIPIENTS=str(key.to_public()),
                                  AGE_IDENTITY_FILE=str(identity))
    return key, nas, settings


def test_timeline_history_files_go_off_site_once_and_come_back(plain_env: Env) -> None:
    """A cluster restore's 00000002.history is copied off-site (encrypted) once, and fetched
    back into an empty archive before a restore chooses its timeline; other names are left."""
    from toybox_backupd.tiers.pitr import wal, wal_offsite

    _key, nas, settings = _encrypted_nas(plain_env)
    archive = wal.wal_dir(settings)
    archive.mkdir(parents=True)
    history = b"1\t0/5000000\tno recovery target specified\n"
    (archive / "00000002.history").write_bytes(history)
    (archive / "notes.history").write_text("not ours\n")
    with Store(plain_env.state_dir) as store:
        wal_offsite.copy_offsite(settings, store, float("-inf"), 0.0)
        copied = nas / "wal" / "toybox" / "00000002.history.age"
        assert copied.read_bytes().startswith(AGE_HEADER)
        stamp = copied.stat().st_mtime_ns
        wal_offsite.copy_offsite(settings, store, float("-inf"), 0.0)
        assert copied.stat().st_mtime_ns == stamp  # once
    assert not (nas / "wal" / "toybox" / "notes.history").exists()
    shutil.rmtree(archive)  # a new host
    said: list[str] = []
    assert wal_offsite.fetch_histories(settings, "toybox", said.append) == ["00000002.history"]
    assert (archive / "00000002.history").read_bytes() == history
    assert "00000002.history" in said[0]
    assert wal.timelines(settings).histories  # the restore now knows timeline 2's fork
    assert wal_offsite.fetch_histories(settings, "toybox") == []  # already here


def _fake_segment(path: Path, system: int) -> None:
    """A whole 16 MiB WAL file whose first page's long header names cluster `system`."""
    from toybox_backupd.tiers.pitr import wal

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(wal.LONG_HEADER.pack(0xD110, wal.XLP_LONG_HEADER, 1, 0, 0, system,
                                       wal.SEGMENT_SIZE, 8192))
        out.write(system.to_bytes(8, "little") * 16)  # content that differs per cluster
        out.truncate(wal.SEGMENT_SIZE)


def test_a_replacing_clusters_wal_goes_off_site_beside_the_first_ones(plain_env: Env) -> None:
    """The cluster that replaced the first one writes segments of the same names: off-site they
    go to wal/<db>/cluster-<system>/ with their own progress, the first cluster's objects are
    never overwritten, and a restore on a new host gets both back, told apart by header."""
    from toybox_backupd.tiers.pitr import wal, wal_offsite

    nas = plain_env.tmp / "nas"
    nas.mkdir()
    settings = plain_env.settings(**PITR, PG_CONTAINER="db", OFFSITE_URL=f"file://{nas}")
    archive = wal.wal_dir(settings)
    names = ["000000010000000000000001", "000000010000000000000002"]
    for name in names:
        _fake_segment(archive / name, 111)
    remote = nas / "wal" / "toybox"
    with Store(plain_env.state_dir) as store:
        wal_offsite.copy_offsite(settings, store, 0.0, 0.0)
        first = {name: (remote / name).read_bytes() for name in names}
        assert wal.segment_system(remote / names[0]) == "111"
        # cluster 222 replaced it (the streamer's follow_system): the chain set aside, a new one
        wal.set_aside([archive / name for name in names], archive / "other-20261201-1200")
        for name in names:
            _fake_segment(archive / name, 222)
        (archive / wal.SYSTEM_FILE).write_text("222\n")
        wal_offsite.copy_offsite(settings, store, 0.0, 0.0)
        wal_offsite.copy_offsite(settings, store, 0.0, 0.0)
    assert {name: (remote / name).read_bytes() for name in names} == first  # untouched
    for name in names:
        assert wal.segment_system(remote / "cluster-222" / name) == "222"
        assert (remote / "cluster-222" / f"{name}.sha256").is_file()
    into = plain_env.tmp / "fetched"
    got = wal_offsite.fetch(settings, "toybox", 0, [], into)
    systems = sorted(wal.segment_system(path) or "" for path in got)
    assert systems == ["111", "111", "222", "222"]


def test_the_segment_being_written_goes_off_site_compressed_and_only_when_it_changed(
        plain_env: Env) -> None:
    """An idle database costs nothing off-site: the segment being written is copied again only
    when it has changed since its last copy, zstd-compressed then encrypted (its zeros are
    nearly nothing); `zstd -d` reads it by hand, and a fetch gives back the segment itself."""
    from toybox_backupd.tiers.pitr import wal, wal_offsite

    key, nas, settings = _encrypted_nas(plain_env)
    local = wal.wal_dir(settings) / "000000010000000000000003.partial"
    _fake_segment(local, 111)
    packed = nas / "wal" / "toybox" / "000000010000000000000003.partial.zst.age"
    with Store(plain_env.state_dir) as store:
        assert wal_offsite.copy_offsite(settings, store, float("-inf"), 0.0) == 0.0
        stamp = packed.stat().st_mtime_ns
        assert packed.stat().st_size < 4096
        for now in (60.0, 120.0, 180.0):  # idle: three more minutes, nothing copied
            assert wal_offsite.copy_offsite(settings, store, now - 60, now) == now
            assert packed.stat().st_mtime_ns == stamp
        with open(local, "r+b") as out:  # pg_receivewal writes more WAL into it
            out.seek(8192)
            out.write(os.urandom(100_000))
        wal_offsite.copy_offsite(settings, store, 180.0, 240.0)
        assert packed.stat().st_mtime_ns != stamp
        assert not (nas / "wal" / "toybox" / local.name).exists()
    plain = subprocess.run(["zstd", "-d", "-c"], input=pyrage.decrypt(packed.read_bytes(), [key]),
                           capture_output=True, check=True).stdout  # age -d … | zstd -d
    assert plain == local.read_bytes()
    [got] = wal_offsite.fetch(settings, "toybox", 0, [], plain_env.tmp / "fetched")
    assert got.name == local.name and got.read_bytes() == local.read_bytes()
    (nas / "wal" / "toybox" / local.name).write_bytes(bytes(wal.SEGMENT_SIZE))  # an older copy
    [got] = wal_offsite.fetch(settings, "toybox", 0, [], plain_env.tmp / "again")
    assert got.read_bytes() == local.read_bytes()
