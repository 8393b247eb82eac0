"""Off-site copies through the product's own paths: the run's copy step, the retry queue,
fetch on restore, `reindex --offsite`, off-site retention, `verify --offsite`, health, `check`.

The restore points come from the directory-snapshot tier of tests/fake_tier.py (fast, no
Docker); the targets are real: SeaweedFS on loopback (tests/s3_server.py) and a directory.
The Docker-backed restores from off-site (db, volume) run end to end in
tests/test_e2e_offsite.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import redirect_stdout
from datetime import timedelta
from pathlib import Path

import pyrage
import pytest
from conftest import Bucket, Env, signing_key
from pydantic import Field
from s3_server import ACCESS_KEY, SECRET_KEY, S3Server
from test_daemon import Daemon, wait_for
from test_new_tier import SNAPSHOT

from toybox_backupd import cli
from toybox_backupd.actions import checks, offsite_retention, runner
from toybox_backupd.catalog import reindex, restore_points
from toybox_backupd.catalog import reindex_offsite as reindex_offsite_module
from toybox_backupd.catalog.reindex_offsite import reindex_offsite
from toybox_backupd.core.basics import iso, utcnow
from toybox_backupd.core.settings import Settings
from toybox_backupd.daemon import health, keys
from toybox_backupd.notify import report
from toybox_backupd.places.offsite import copy as offsite_copy
from toybox_backupd.store import Store
from toybox_backupd.tiers import registry as jobs


class SnapshotSettings(Settings):
    snapshot_schedule: str = Field("0 3 * * *", alias="SNAPSHOT_SCHEDULE")
    snapshot_keep_days: int = Field(2, alias="SNAPSHOT_KEEP_DAYS")
    snapshot_time_limit_min: int = Field(5, alias="SNAPSHOT_TIME_LIMIT_MIN")
    snapshot_dirs: str = Field("", alias="SNAPSHOT_DIRS")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def identity(tmp_path: Path) -> tuple[str, Path]:
    key = pyrage.x25519.Identity.generate()
    path = tmp_path / "age-identity.txt"
    path.write_text(str(key) + "\n")
    path.chmod(0o600)
    return str(key.to_public()), path


def _settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **extra: str) -> SnapshotSettings:
    source = tmp_path / "site"
    (source / "img").mkdir(parents=True, exist_ok=True)
    (source / "img" / "a.png").write_bytes(b"\x89PNG" + b"PLAINTEXT-MARKER" * 500)
    (source / "index.html").write_text("<h1>hi</h1>")
    values = {"BACKUP_DIR": str(tmp_path / "backups"), "STATE_DIR": str(tmp_path / "state"),
              "TZ": "Asia/Tokyo", "POSTGRES_DB": "toybox", "PGDUMP_SCHEDULE": "",
              "VOLUME_FULL_SCHEDULE": "", "VOLUME_DIFF_SCHEDULE": "", "BACKUP_VOLUMES": "",
              "NOTIFY_EMAIL_TO": "", "SNAPSHOT_DIRS": str(source),
              "OFFSITE_SIGNING_KEY_FILE": str(signing_key()), **extra}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return SnapshotSettings(_env_file=None)  # type: ignore[call-arg]


@pytest.fixture(autouse=True)
def snapshot_tier() -> Iterator[None]:
    jobs.register(SNAPSHOT)
    try:
        yield
    finally:
        jobs.unregister("snapshot")


def _bucket(s3: S3Server, name: str) -> str:
    s3.client().create_bucket(Bucket=name)
    return name


def _s3_env(s3: S3Server, bucket: str, **extra: str) -> dict[str, str]:
    return {"OFFSITE_URL": f"s3://{bucket}/toybox", "S3_ENDPOINT_URL": s3.endpoint,
            "S3_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY, **extra}


def _cli(settings: Settings, *args: str) -> tuple[int, str]:
    env = Path(settings.state_dir).parent / "none.env"
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with redirect_stdout(out):
            code = cli.main(["--env-file", str(env), *args])
    finally:
        root.handlers[:], root.level = handlers, level
    return code, out.getvalue()


def _objects(s3: S3Server, bucket: str) -> dict[str, bytes]:
    client = s3.client()
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            for item in listed}


# the copy step --------------------------------------------------------------------------------
def test_a_run_copies_its_restore_point_encrypted_and_list_says_where(
        s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        identity: tuple[str, Path]) -> None:
    public, key_file = identity
    bucket = _bucket(s3, "copy-step")
    settings = _settings(tmp_path, monkeypatch, **_s3_env(
        s3, bucket, OFFSITE_AGE_RECIPIENTS=public, AGE_IDENTITY_FILE=str(key_file)))
    run_id = runner.run_job(settings, "snapshot")
    with Store(settings.state_dir) as store:
        run = store.run(run_id)
        assert run is not None and run.status == "ok", run
        [item] = store.artifacts(tier="snapshot")
        copy = store.offsite_copy(item.id)
        message = report.compose_run(settings, store, run, message_id="<t@x>")
    assert copy is not None and copy.status == "ok" and copy.recipients == [public]
    assert run.details["offsite_copied"] == [item.path]
    objects = _objects(s3, bucket)
    archive = objects[f"toybox/{item.path}.age"]
    local = (settings.backup_dir / item.path).read_bytes()
    assert archive.startswith(b"age-encryption.org/v1\n")
    assert b"PLAINTEXT-MARKER" in local and b"PLAINTEXT-MARKER" not in archive
    assert pyrage.decrypt(archive, [pyrage.x25519.Identity.from_str(
        key_file.read_text().strip())]) == local
    manifest = json.loads(objects[f"toybox/{item.path}.manifest.json"])
    assert manifest["sha256"] == item.sha256
    assert manifest["offsite"]["recipients"] == [public]
    assert manifest["offsite"]["objects"][0]["key"] == f"{item.path}.age"
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert f"copied to s3://{bucket}/toybox, verified" in text
    code, out = _cli(settings, "list", "--json")
    assert code == 0
    [listed] = json.loads(out)
    assert listed["location"] == "both" and listed["offsite"]["encrypted"] is True


def test_s3_down_leaves_the_backup_ok_and_the_copy_pending_until_it_is_back(
        s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = _bucket(s3, "down-and-back")
    settings = _settings(tmp_path, monkeypatch, **_s3_env(s3, bucket))
    s3.stop()
    try:
        started = time.monotonic()
        run_id = runner.run_job(settings, "snapshot")
        took = time.monotonic() - started
    finally:
        s3.start()
    with Store(settings.state_dir) as store:
        run = store.run(run_id)
        assert run is not None and run.status == "ok", run
        [item] = store.artifacts(tier="snapshot")
        copy = store.offsite_copy(item.id)
        message = report.compose_run(settings, store, run, message_id="<t@x>")
    assert took < 120, took
    assert copy is not None and copy.status == "pending" and copy.attempts == 1
    assert "cannot reach" in (copy.last_error or ""), copy.last_error
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert message["Subject"].startswith("[toybox-backupd] OK snapshot")
    assert "off-site copy pending" in text and "retried automatically" in text
    assert SECRET_KEY not in text
    _code, out = _cli(settings, "list")
    assert "local (off-site copy pending)" in out

    # not due yet: nothing is tried
    assert offsite_copy.retry_due(settings, runner.offsite_keep_days(settings)) == []
    with Store(settings.state_dir) as store, store.tx() as db:  # a minute later
        db.execute("UPDATE offsite_copies SET next_try_at=?", (iso(utcnow()),))
    assert offsite_copy.retry_due(settings, runner.offsite_keep_days(settings)) == [item.path]
    assert offsite_copy.retry_due(settings, runner.offsite_keep_days(settings)) == []  # once
    with Store(settings.state_dir) as store:
        copy = store.offsite_copy(item.id)
    assert copy is not None and copy.status == "ok"
    archive = next(obj for obj in copy.objects if obj["source"] == item.path)
    assert archive["verified_by"] in ("etag", "read-back")
    assert archive["sha256"] == item.sha256 == archive["source_sha256"]  # not encrypted here
    assert _objects(s3, bucket)[f"toybox/{item.path}"] == (
        settings.backup_dir / item.path).read_bytes()


def test_wrong_credentials_are_said_plainly_without_the_secret(
        s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = _bucket(s3, "wrong-key")
    wrong = "not-the-right-secret-Zk38Qp"
    settings = _settings(tmp_path, monkeypatch, **_s3_env(
        s3, bucket, AWS_SECRET_ACCESS_KEY=wrong))
    [outcome] = [o for o in checks.run_checks(settings) if o.name == "off-site"]
    assert not outcome.ok and "secret key does not match" in outcome.text, outcome
    assert wrong not in outcome.text and SECRET_KEY not in outcome.text
    run_id = runner.run_job(settings, "snapshot")
    with Store(settings.state_dir) as store:
        run = store.run(run_id)
        copies = store.offsite_copies(("pending",))
    assert run is not None and run.status == "ok"
    assert "secret key does not match" in run.details["offsite_pending"]
    assert wrong not in json.dumps(run.details) and wrong not in (copies[0].last_error or "")
    assert wrong not in traceback.format_exc()

    good = _settings(tmp_path, monkeypatch, **_s3_env(s3, bucket))
    [outcome] = [o for o in checks.run_checks(good) if o.name == "off-site"]
    assert outcome.ok and outcome.warning and "NOT encrypted" in outcome.text
    missing = _settings(tmp_path, monkeypatch, **_s3_env(s3, "no-such-bucket-here"))
    [outcome] = [o for o in checks.run_checks(missing) if o.name == "off-site"]
    assert not outcome.ok and "no-such-bucket-here" in outcome.text and "exist" in outcome.text


# restores and a new host -----------------------------------------------------------------------
def test_a_restore_point_gone_or_corrupt_here_is_fetched_and_a_new_host_reindexes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, identity: tuple[str, Path]) -> None:
    public, key_file = identity
    nas = tmp_path / "nas"
    nas.mkdir()
    env = {"OFFSITE_URL": f"file://{nas}", "OFFSITE_AGE_RECIPIENTS": public,
           "AGE_IDENTITY_FILE": str(key_file)}
    settings = _settings(tmp_path, monkeypatch, **env)
    runner.run_job(settings, "snapshot")
    with Store(settings.state_dir) as store:
        [item] = store.artifacts(tier="snapshot")
    local = settings.backup_dir / item.path
    original = local.read_bytes()

    local.write_bytes(original[:-10] + b"x" * 10)  # corrupt here: fetched again
    said: list[str] = []
    with Store(settings.state_dir) as store:
        assert restore_points.local_copy(settings, store, item, said.append) == local
    assert local.read_bytes() == original and any("off-site" in line for line in said)

    # a new host: nothing but the settings, the identity and the directory target
    # (the test tier's layout accepted as reindex accepts the real tiers' ones: its targets are
    # paths, not directory names; tests/test_e2e_offsite.py does this with the real tiers)
    monkeypatch.setitem(reindex.TOP_TIERS, "snapshot", ("snapshot",))
    monkeypatch.setattr(reindex_offsite_module, "manifest_problem",
                        lambda top, target, name, data, now: None if data.get("tier") == "snapshot"
                        else "not a snapshot")
    new = _settings(tmp_path / "new-host", monkeypatch, **env)
    assert not new.backup_dir.exists()
    done = reindex_offsite(new)
    assert (done.added, done.skipped) == ([item.path], [])
    _code, out = _cli(new, "list", "--json")
    [listed] = json.loads(out)
    assert listed["location"] == "off-site" and listed["sha256"] == item.sha256
    with Store(new.state_dir) as store:
        [point] = restore_points.restorable(store, "snapshot", item.target)
        assert point.status == "remote"
        path = restore_points.local_copy(new, store, point)
        assert path.read_bytes() == original
        assert store.artifact(point.id).status == "ok"  # type: ignore[union-attr]
    assert reindex_offsite(new).added == []  # nothing twice

    # without the identity an encrypted copy cannot come back, and says why
    bare = _settings(tmp_path / "bare-host", monkeypatch, **{**env, "AGE_IDENTITY_FILE": ""})
    reindex_offsite(bare)
    with Store(bare.state_dir) as store:
        [point] = restore_points.restorable(store, "snapshot", item.target)
        with pytest.raises(Exception, match="AGE_IDENTITY_FILE"):
            restore_points.local_copy(bare, store, point)
    assert not (bare.backup_dir / item.path).exists()


def test_a_wrong_or_tampered_off_site_copy_never_reaches_the_backup_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, identity: tuple[str, Path]) -> None:
    nas = tmp_path / "nas"
    nas.mkdir()
    settings = _settings(tmp_path, monkeypatch, OFFSITE_URL=f"file://{nas}")
    runner.run_job(settings, "snapshot")
    with Store(settings.state_dir) as store:
        [item] = store.artifacts(tier="snapshot")
    remote = nas / item.path
    remote.write_bytes(remote.read_bytes()[:-1] + b"!")
    code, out = _cli(settings, "verify", "--offsite")
    assert code == 1 and "CORRUPT" in out, out
    with Store(settings.state_dir) as store:
        assert store.offsite_copy(item.id).status == "corrupt"  # type: ignore[union-attr]
        with store.tx() as db:  # pretend verify had not run: the fetch itself must check
            db.execute("UPDATE offsite_copies SET status='ok'")
    (settings.backup_dir / item.path).unlink()
    with Store(settings.state_dir) as store, pytest.raises(Exception, match="does not match"):
        restore_points.local_copy(settings, store, item)
    assert not (settings.backup_dir / item.path).exists()
    assert not list(settings.backup_dir.rglob("*.partial"))


# retention and health --------------------------------------------------------------------------
def test_off_site_retention_keeps_its_own_days_the_newest_and_foreign_objects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nas = tmp_path / "nas"
    settings = _settings(tmp_path, monkeypatch, OFFSITE_URL=f"file://{nas}",
                         OFFSITE_KEEP_DAYS="5", SNAPSHOT_SCHEDULE="0 3 * * 0")
    (nas / "snapshot").mkdir(parents=True)  # and nas itself: a mounted share
    (nas / "snapshot" / "not-ours.txt").write_text("someone else's")
    made = []
    for _ in range(3):
        made.append(runner.run_job(settings, "snapshot"))
        time.sleep(1.1)
    with Store(settings.state_dir) as store, store.tx() as db:  # 9, 8 and 7 days old
        for age, run_id in zip((9, 8, 7), made, strict=True):
            db.execute("UPDATE artifacts SET created_at=? WHERE run_id=?",
                       (iso(utcnow() - timedelta(days=age)), run_id))
    with Store(settings.state_dir) as store:
        items = store.artifacts(tier="snapshot")
        gone = offsite_retention.apply(settings, store, "snapshot", [settings.snapshot_dirs])
        # older than OFFSITE_KEEP_DAYS=5, but the newest good copy stays whatever its age
        assert gone == [items[0].path, items[1].path]
        assert [store.offsite_copy(item.id).status for item in items] == [  # type: ignore[union-attr]
            "deleted", "deleted", "ok"]
    for item in items[:2]:
        assert not (nas / item.path).exists()
        assert not (nas / (item.path + ".manifest.json")).exists()
    assert (nas / items[2].path).exists() and (nas / (items[2].path + ".manifest.json")).exists()
    assert (nas / "snapshot" / "not-ours.txt").read_text() == "someone else's"


def test_healthcheck_fails_when_the_newest_off_site_copy_is_too_old(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nas = tmp_path / "nas"
    nas.mkdir()
    settings = _settings(tmp_path, monkeypatch, OFFSITE_URL=f"file://{nas}",
                         OFFSITE_MAX_LAG_HOURS="30", SNAPSHOT_SCHEDULE="")
    runner.run_job(settings, "snapshot")
    now = utcnow()
    with Store(settings.state_dir) as store:
        store.set_state(keys.STATE_HEARTBEAT, iso(now))
        store.set_state(keys.STATE_FIRST_STARTED, iso(now - timedelta(days=5)))
    healthy, lines = health.healthcheck(settings, now=now)
    assert healthy, lines
    assert "newest off-site restore point" in lines[0]
    later = now + timedelta(hours=31)
    with Store(settings.state_dir) as store:
        store.set_state(keys.STATE_HEARTBEAT, iso(later))
    healthy, lines = health.healthcheck(settings, now=later)
    assert not healthy
    assert any(line.startswith("off-site:") and "OFFSITE_MAX_LAG_HOURS=30" in line
               for line in lines), lines


def test_local_retention_keeps_what_is_not_off_site_yet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nas = tmp_path / "nas"
    settings = _settings(tmp_path, monkeypatch, OFFSITE_URL=f"file://{nas}")
    first = runner.run_job(settings, "snapshot")  # the NAS is not mounted: the copy is pending
    nas.mkdir()
    with Store(settings.state_dir) as store:
        [old] = store.run_artifacts(first)
        assert store.offsite_copy(old.id).status == "pending"  # type: ignore[union-attr]
        with store.tx() as db:  # three days old, its next attempt an hour away
            db.execute("UPDATE artifacts SET created_at=? WHERE id=?",
                       (iso(utcnow() - timedelta(days=3)), old.id))
            db.execute("UPDATE offsite_copies SET next_try_at=?",
                       (iso(utcnow() + timedelta(hours=1)),))
    for _ in range(2):  # two newer ones, copied: SNAPSHOT_KEEP_DAYS=2 would take the old one
        time.sleep(1.1)
        run_id = runner.run_job(settings, "snapshot")
    with Store(settings.state_dir) as store:
        run = store.run(run_id)
        assert run is not None and run.status == "ok" and "retention_refused" not in run.details
        assert store.artifact(old.id).status == "ok"  # type: ignore[union-attr]
        assert len(store.offsite_copies(("ok",))) == 2
    assert (settings.backup_dir / old.path).exists()


def test_restore_points_made_before_off_site_was_on_are_copied_by_the_queue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _settings(tmp_path, monkeypatch)
    runner.run_job(before, "snapshot")
    nas = tmp_path / "nas"
    nas.mkdir()
    after = _settings(tmp_path, monkeypatch, OFFSITE_URL=f"file://{nas}")
    with Store(after.state_dir) as store:
        [item] = store.artifacts(tier="snapshot")
        assert store.offsite_copy(item.id) is None
    assert offsite_copy.retry_due(after, runner.offsite_keep_days(after)) == [item.path]
    assert (nas / item.path).read_bytes() == (after.backup_dir / item.path).read_bytes()
    # a copy found corrupt off-site is made again from the good local one
    (nas / item.path).write_bytes(b"damaged")
    code, _ = _cli(after, "verify", "--offsite")
    assert code == 1
    assert offsite_copy.retry_due(after, runner.offsite_keep_days(after)) == [item.path]
    assert (nas / item.path).read_bytes() == (after.backup_dir / item.path).read_bytes()
    with Store(after.state_dir) as store:
        assert store.offsite_copy(item.id).status == "ok"  # type: ignore[union-attr]


def test_an_object_lock_bucket_gets_retain_until_dates_and_retention_waits_for_them(
        s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = "locked-copies"
    s3.client().create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    settings = _settings(tmp_path, monkeypatch, **_s3_env(s3, bucket),
                         OFFSITE_KEEP_DAYS="3", SNAPSHOT_SCHEDULE="0 3 * * 0")
    runner.run_job(settings, "snapshot")
    time.sleep(1.1)
    runner.run_job(settings, "snapshot")
    with Store(settings.state_dir) as store:
        old, _new = store.artifacts(tier="snapshot")
        copy = store.offsite_copy(old.id)
    assert copy is not None and copy.retain_until is not None
    assert copy.retain_until - old.created_at == timedelta(days=4)  # keep days + 1
    head = s3.client().head_object(Bucket=bucket, Key=f"toybox/{old.path}")
    assert head["ObjectLockMode"] == "COMPLIANCE"
    # five days on the old one is past OFFSITE_KEEP_DAYS but still locked: left alone
    with Store(settings.state_dir) as store:
        later = old.created_at + timedelta(days=3, hours=12)
        assert offsite_retention.apply(settings, store, "snapshot", [settings.snapshot_dirs],
                                       now=later) == []
        assert store.offsite_copy(old.id).status == "ok"  # type: ignore[union-attr]
        # a clock running days ahead: the server still holds the lock and refuses the delete;
        # the copy stays recorded as there
        past = old.created_at + timedelta(days=4, hours=1)
        assert offsite_retention.apply(settings, store, "snapshot", [settings.snapshot_dirs],
                                       now=past) == []
        assert store.offsite_copy(old.id).status == "ok"  # type: ignore[union-attr]
    assert f"toybox/{old.path}" in _objects(s3, bucket)


def test_an_endpoint_the_sdk_refuses_leaves_the_backup_ok_and_the_copy_pending(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path, monkeypatch, OFFSITE_URL="s3://bucket/toybox",
                         S3_ENDPOINT_URL="not an url at all")
    run_id = runner.run_job(settings, "snapshot")
    with Store(settings.state_dir) as store:
        run = store.run(run_id)
        [copy] = store.offsite_copies(("pending",))
    assert run is not None and run.status == "ok", run
    assert "not an url at all" in run.details["offsite_pending"]
    assert copy.attempts == 1 and copy.last_error == run.details["offsite_pending"]
    # the daemon's queue says the same, and raises nothing
    with Store(settings.state_dir) as store, store.tx() as db:
        db.execute("UPDATE offsite_copies SET next_try_at=?", (iso(utcnow()),))
    assert offsite_copy.retry_due(settings, runner.offsite_keep_days(settings)) == []
    with Store(settings.state_dir) as store:
        assert store.offsite_copies(("pending",))[0].attempts == 2


def test_off_site_settings_are_checked_and_the_secret_file_is_read_and_masked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from toybox_backupd.core import redact
    from toybox_backupd.core.settings import SettingsError, load

    secret = tmp_path / "aws-secret"
    secret.write_text("file-held-secret-Hq81Zx0\n")
    settings = _settings(tmp_path, monkeypatch, OFFSITE_URL="s3://bucket/prefix/",
                         AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY_FILE=str(secret))
    assert settings.offsite_url == "s3://bucket/prefix"
    assert settings.aws_secret_access_key_value == "file-held-secret-Hq81Zx0"
    assert redact.redact("key file-held-secret-Hq81Zx0 here") == "key *** here"
    for var, value, words in (
            ("OFFSITE_URL", "ftp://host/x", "use s3://bucket/prefix or file:///"),
            ("OFFSITE_URL", "s3:///prefix", "names no bucket"),
            ("OFFSITE_AGE_RECIPIENTS", "AGE-SECRET-KEY-1QQQ", "holds a private key"),
            ("OFFSITE_AGE_RECIPIENTS", "age1ok,bob@example.com", "not an age recipient"),
            ("OFFSITE_KEEP_DAYS", "0", "greater than or equal to 1")):
        monkeypatch.setenv(var, value)
        with pytest.raises(SettingsError) as caught:
            load(None)
        assert any(line.startswith(f"{var}: ") and words in line
                   for line in caught.value.problems), caught.value.problems
        assert "AGE-SECRET-KEY-1QQQ" not in str(caught.value)  # a pasted identity never echoed
        monkeypatch.delenv(var)


# a copy cut short leaves nothing behind ------------------------------------------------------
def _uploads(bucket: Bucket) -> dict[str, int]:
    """The bucket's unfinished multipart uploads: id -> parts uploaded so far."""
    found = {}
    for item in bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []):
        parts = bucket.client.list_parts(Bucket=bucket.name, Key=item["Key"], UploadId=item["UploadId"])
        found[item["UploadId"]] = len(parts.get("Parts", []))
    return found


def _big_restore_point(env: Env, size: int) -> tuple[int, str]:
    """A restore point of `size` random bytes in BACKUP_DIR and the catalog (a dump's place)."""
    relative = "logical/2026-12-07/toybox-big.pgdump"
    path = env.backup_dir / relative
    path.parent.mkdir(parents=True)
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(size // (1 << 20)):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            out.write(chunk)
    with Store(env.state_dir) as store:
        artifact_id = store.add_artifact(run_id=None, tier="logical", target="toybox", path=relative,
                                         created_at=utcnow(), size=size, sha256=digest.hexdigest())
    return artifact_id, relative


def _copied(env: Env, artifact_id: int) -> bool:
    with Store(env.state_dir) as store:
        copy = store.offsite_copy(artifact_id)
    return copy is not None and copy.status == "ok"


def test_a_copy_cut_by_the_store_then_by_a_kill_completes_once_and_leaves_no_parts(
        plain_env: Env, s3_bucket: Bucket) -> None:
    """The S3 server killed mid-upload (the queue's attempt fails: pending), then the daemon
    SIGKILLed mid-retry: the next daemon aborts the unfinished uploads at start-up and copies the
    restore point once, with the local bytes; ListMultipartUploads is empty (no lifecycle rule
    needed)."""
    plain_env.values.update(s3_bucket.values(S3_PART_SIZE_MB="5"), PGDUMP_SCHEDULE="",
                            CATCH_UP="false")
    settings = plain_env.settings()
    artifact_id, relative = _big_restore_point(plain_env, 256 << 20)
    keep = runner.offsite_keep_days(settings)
    attempt = threading.Thread(target=offsite_copy.retry_due, args=(settings, keep))
    attempt.start()
    try:
        wait_for("the first upload's parts", lambda: any(_uploads(s3_bucket).values()), 60)
        s3_bucket.server.stop()
        attempt.join(120)
    finally:
        s3_bucket.server.start()
    first = set(_uploads(s3_bucket))
    with Store(plain_env.state_dir) as store, store.tx() as db:
        copy = store.offsite_copy(artifact_id)
        assert copy is not None and copy.status == "pending", copy
        db.execute("UPDATE offsite_copies SET next_try_at=?", (iso(utcnow()),))  # due now

    daemon = Daemon(plain_env, "killed")
    try:
        wait_for("the daemon's retry to upload parts", lambda: any(
            count >= 2 for upload_id, count in _uploads(s3_bucket).items() if upload_id not in first),
            150, lambda: daemon.log)
    finally:
        daemon.kill()  # SIGKILL, mid-upload
    with Store(plain_env.state_dir) as store:
        copy = store.offsite_copy(artifact_id)
    assert copy is not None and copy.status == "pending", copy
    assert _uploads(s3_bucket), "the killed retry left no unfinished upload: nothing was tested"

    daemon = Daemon(plain_env, "next")
    try:
        wait_for("the copy", lambda: _copied(plain_env, artifact_id), 180, lambda: daemon.log)
    finally:
        daemon.kill()
    assert _uploads(s3_bucket) == {}
    assert "unfinished upload left by an interrupted copy aborted" in daemon.log
    assert "uploads_aborted=1" in daemon.log  # by start-up recovery, before any copy
    assert daemon.log.count("off-site copy done") == 1
    listed = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]
    assert sorted(item["Key"] for item in listed) == [
        f"toybox/{relative}", f"toybox/{relative}.manifest.json"]
    stored = hashlib.sha256()
    body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"toybox/{relative}")["Body"]
    for chunk in body.iter_chunks(1 << 20):
        stored.update(chunk)
    assert stored.hexdigest() == hashlib.sha256((plain_env.backup_dir / relative).read_bytes()).hexdigest()
    assert not list((plain_env.state_dir / "s3-uploads").glob("*.json"))
