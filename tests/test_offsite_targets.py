"""The off-site targets against real storage: a SeaweedFS S3 server on loopback (tests/s3_server.py)
and a directory. Round trips at the multipart boundaries, damage found by `check`, the server
going down, wrong keys and a missing bucket in plain words (the secret in no message), age
encryption, and Object Lock."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import time
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Bucket, Env

from toybox_backupd.offsite import crypto, s3
from toybox_backupd.offsite.directory import DirectoryTarget
from toybox_backupd.offsite.s3 import PART_SIZE, S3Target
from toybox_backupd.offsite.target import OffsiteError, Stored, open_target

SIZES = [0, 1, PART_SIZE - 1, PART_SIZE, PART_SIZE + 1, 3 * PART_SIZE + 12345]
SIZE_IDS = ["empty", "1B", "part-1", "part", "part+1", "3parts+"]
PLAINTEXT_MARK = b"TOYBOX-PLAINTEXT-MARKER "


class Trickle:
    """A non-seekable source that returns short, uneven reads (like a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._turn = 0

    def read(self, size: int = -1) -> bytes:
        self._turn += 1
        limit = 65536 + 4099 * (self._turn % 7)
        size = limit if size is None or size < 0 else min(size, limit)
        piece, self._data = self._data[:size], self._data[size:]
        return bytes(piece)


def payload(size: int) -> bytes:
    return os.urandom(size)


def s3_target(plain_env: Env, bucket: Bucket, **overrides: str) -> S3Target:
    target = open_target(plain_env.settings(**bucket.values(**overrides)))
    assert isinstance(target, S3Target)
    return target


def dir_target(plain_env: Env, directory: Path) -> DirectoryTarget:
    target = open_target(plain_env.settings(OFFSITE_URL=f"file://{directory}"))
    assert isinstance(target, DirectoryTarget)
    return target


def read_all(target: Any, key: str) -> bytes:
    with target.open(key) as stream:
        chunks = []
        while chunk := stream.read(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks)


def round_trip(target: Any, data: bytes, key: str = "logical/2026/dump one.pgdump") -> Stored:
    stored = target.put(key, Trickle(data))
    assert stored.key == key and stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert read_all(target, key) == data
    assert target.check(stored) is None
    assert key in set(target.keys())
    assert key in set(target.keys("logical/"))
    assert set(target.keys("full/")) == set()
    assert target.delete(key) is True
    assert target.delete(key) is False
    assert key not in set(target.keys())
    assert "missing" in (target.check(stored) or "")
    return stored


# S3 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_s3_round_trip_verified_by_etag(plain_env: Env, s3_bucket: Bucket, size: int) -> None:
    target = s3_target(plain_env, s3_bucket)
    stored = round_trip(target, payload(size))
    assert stored.verified_by == "etag"
    parts = 0 if size < PART_SIZE else -(-size // PART_SIZE)
    assert stored.etag is not None and stored.etag.endswith(f"-{parts}") == bool(parts)


def test_s3_objects_live_under_the_prefix(plain_env: Env, s3_bucket: Bucket) -> None:
    target = s3_target(plain_env, s3_bucket, OFFSITE_URL=f"s3://{s3_bucket.name}/site/a")
    target.put("full/x.tar.zst", io.BytesIO(b"data"))
    listed = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]
    assert [item["Key"] for item in listed] == ["site/a/full/x.tar.zst"]
    assert list(target.keys()) == ["full/x.tar.zst"]
    target.probe()  # leaves nothing behind
    listed = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]
    assert [item["Key"] for item in listed] == ["site/a/full/x.tar.zst"]


def test_s3_read_back_when_the_etag_is_not_the_predicted_one(
        plain_env: Env, s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider that computes multipart ETags otherwise: here the parts really are 8 MiB while
    the prediction assumes PART_SIZE, so the ETag differs and the copy is read back instead."""
    from boto3.s3.transfer import TransferConfig

    small = 8 * 1024 * 1024
    monkeypatch.setattr(s3, "TRANSFER", TransferConfig(multipart_threshold=small,
                                                       multipart_chunksize=small))
    target = s3_target(plain_env, s3_bucket)
    data = payload(PART_SIZE + 5)
    stored = target.put("a", Trickle(data))
    assert stored.verified_by == "read-back"
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert read_all(target, "a") == data


def test_s3_clock_skew_is_said_plainly(plain_env: Env, s3_bucket: Bucket,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """This host's clock an hour behind (the requests' signatures carry its time): the server
    refuses them, and the message says to fix the clock."""
    import botocore.auth

    real = botocore.auth.datetime.datetime

    class Behind(real):  # type: ignore[misc, valid-type]
        @classmethod
        def utcnow(cls) -> Any:
            return real.utcnow() - timedelta(hours=1)

        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return real.now(tz) - timedelta(hours=1)

    monkeypatch.setattr(botocore.auth.datetime, "datetime", Behind)
    with pytest.raises(OffsiteError, match="clock differs from the server's by more than 15 "
                                           r"minutes; fix the clock"):
        s3_target(plain_env, s3_bucket).probe()


def test_s3_check_finds_a_replaced_or_damaged_object(plain_env: Env, s3_bucket: Bucket) -> None:
    target = s3_target(plain_env, s3_bucket)
    data = payload(1000)
    stored = target.put("k", io.BytesIO(data))
    assert target.check(stored) is None
    damaged = bytes([data[0] ^ 1]) + data[1:]
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="toybox/k", Body=damaged)
    assert "replaced" in (target.check(stored) or "")
    without_etag = Stored(stored.key, stored.size, stored.sha256, "read-back")
    assert "damaged" in (target.check(without_etag) or "")  # by streaming sha256
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="toybox/k", Body=data[:-1])
    assert "999 bytes" in (target.check(stored) or "")


def test_s3_refuses_keys_outside_the_prefix(plain_env: Env, s3_bucket: Bucket) -> None:
    target = s3_target(plain_env, s3_bucket)
    for key in ("../other/x", "/abs", "a/../../b", ""):
        with pytest.raises(OffsiteError, match="refusing key"):
            target.delete(key)
        with pytest.raises(OffsiteError, match="refusing key"):
            target.put(key, io.BytesIO(b"x"))


def test_s3_down_is_a_plain_error_soon(plain_env: Env, s3_bucket: Bucket) -> None:
    target = s3_target(plain_env, s3_bucket)
    stored = target.put("k", io.BytesIO(b"before"))
    s3_bucket.server.stop()
    try:
        for action in (target.probe, lambda: target.put("k2", io.BytesIO(b"x" * 1000)),
                       lambda: list(target.keys()), lambda: target.check(stored)):
            began = time.monotonic()
            with pytest.raises(OffsiteError) as caught:
                action()
            assert time.monotonic() - began < 30
            assert f"cannot reach the S3 endpoint {s3_bucket.server.endpoint}" in str(caught.value)
    finally:
        s3_bucket.server.start()
    assert target.check(stored) is None  # back, with what it held
    assert read_all(target, "k") == b"before"


def test_s3_wrong_secret_is_named_and_never_shown(plain_env: Env, s3_bucket: Bucket) -> None:
    wrong = "WrongSecretValue-9f3b1c7d2e"
    target = s3_target(plain_env, s3_bucket, AWS_SECRET_ACCESS_KEY=wrong)
    for action in (target.probe, lambda: target.put("k", io.BytesIO(b"x"))):
        try:
            action()
        except OffsiteError as exc:
            message, text = str(exc), traceback.format_exc()
        else:
            pytest.fail("a wrong secret key was accepted")
        assert "the secret key does not match the access key id (AWS_SECRET_ACCESS_KEY)" in message
        assert wrong not in message and wrong not in text
    unknown = s3_target(plain_env, s3_bucket, AWS_ACCESS_KEY_ID="NOSUCHKEYID12345")
    with pytest.raises(OffsiteError, match=r"does not know the access key id \(AWS_ACCESS_KEY_ID\)"):
        unknown.probe()


def test_s3_missing_bucket(plain_env: Env, s3_bucket: Bucket) -> None:
    target = s3_target(plain_env, s3_bucket, OFFSITE_URL="s3://tbt-no-such-bucket/p")
    expected = f"bucket tbt-no-such-bucket does not exist at {s3_bucket.server.endpoint}"
    with pytest.raises(OffsiteError, match=expected):
        target.probe()
    with pytest.raises(OffsiteError, match=expected):
        target.put("k", io.BytesIO(b"x"))
    with pytest.raises(OffsiteError, match=expected):
        list(target.keys())


def test_s3_encrypted_round_trip(plain_env: Env, s3_bucket: Bucket, tmp_path: Path) -> None:
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    identity_file = tmp_path / "age.key"
    identity_file.write_text(f"# a comment\n{identity}\n")
    target = s3_target(plain_env, s3_bucket)
    plaintext = PLAINTEXT_MARK * (PART_SIZE // len(PLAINTEXT_MARK) + 1000)
    with crypto.encrypting(Trickle(plaintext), [str(identity.to_public())]) as ciphertext:
        stored = target.put("logical/x.age", ciphertext)
    assert stored.verified_by == "etag" and stored.size > len(plaintext)
    raw = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="toybox/logical/x.age")["Body"].read()
    assert raw.startswith(crypto.AGE_HEADER) and PLAINTEXT_MARK not in raw
    assert hashlib.sha256(raw).hexdigest() == stored.sha256
    out = io.BytesIO()
    with target.open("logical/x.age") as stream:
        crypto.decrypt(stream, out, identity_file)
    assert out.getvalue() == plaintext
    other = tmp_path / "other.key"
    other.write_text(f"{pyrage.x25519.Identity.generate()}\n")
    with target.open("logical/x.age") as stream, pytest.raises(
            OffsiteError, match=r"cannot decrypt logical/x\.age: it was encrypted for other recipients"):
        crypto.decrypt(stream, io.BytesIO(), other, what="logical/x.age")


def locked_bucket(s3_bucket: Bucket) -> str:
    name = s3_bucket.name + "-locked"
    s3_bucket.client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


def test_s3_object_lock(plain_env: Env, s3_bucket: Bucket) -> None:
    plain = s3_target(plain_env, s3_bucket)
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert plain.lock_until(7, now) is None
    name = locked_bucket(s3_bucket)
    target = s3_target(plain_env, s3_bucket, OFFSITE_URL=f"s3://{name}/toybox")
    assert target.lock_until(7, now) == now + timedelta(days=8)
    until = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    stored = target.put("full/a.tar.zst", io.BytesIO(b"kept"), retain_until=until)
    assert stored.retain_until == until and target.check(stored) is None
    retention = s3_bucket.client.get_object_retention(Bucket=name, Key="toybox/full/a.tar.zst")
    assert retention["Retention"]["Mode"] == "COMPLIANCE"
    assert retention["Retention"]["RetainUntilDate"] == until
    with pytest.raises(OffsiteError, match=f"retained by the bucket's Object Lock until {until:%Y-%m-%d}"):
        target.delete("full/a.tar.zst")
    assert read_all(target, "full/a.tar.zst") == b"kept"
    # an object without retention in the same bucket is deleted, every version of it
    target.put("full/b", io.BytesIO(b"free"))
    assert target.delete("full/b") is True
    versions = s3_bucket.client.list_object_versions(Bucket=name, Prefix="toybox/full/b")
    assert versions.get("Versions", []) == [] and versions.get("DeleteMarkers", []) == []


def test_s3_probe_passes(plain_env: Env, s3_bucket: Bucket) -> None:
    target = s3_target(plain_env, s3_bucket)
    target.probe()
    assert list(target.keys()) == []


# a directory -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, PART_SIZE + 1], ids=["empty", "1B", "part+1"])
def test_directory_round_trip(plain_env: Env, tmp_path: Path, size: int) -> None:
    root = tmp_path / "nas"
    root.mkdir()
    target = dir_target(plain_env, root)
    data = payload(size)
    stored = target.put("logical/2026/x.pgdump", Trickle(data))
    assert stored.verified_by == "read-back"
    assert stat.S_IMODE((root / "logical").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "logical/2026/x.pgdump").stat().st_mode) == 0o600
    assert target.delete("logical/2026/x.pgdump")
    round_trip(target, data)
    assert [p.name for p in root.rglob("*") if p.is_file()] == []  # no temporary file left


def test_directory_check_finds_damage(plain_env: Env, tmp_path: Path) -> None:
    target = dir_target(plain_env, tmp_path)
    data = payload(5000)
    stored = target.put("k", io.BytesIO(data))
    (tmp_path / "k").write_bytes(bytes([data[0] ^ 1]) + data[1:])
    assert "damaged" in (target.check(stored) or "")
    (tmp_path / "k").write_bytes(data[:10])
    assert "10 bytes" in (target.check(stored) or "")
    (tmp_path / "k").unlink()
    assert "missing" in (target.check(stored) or "")


def test_directory_missing_or_refused(plain_env: Env, tmp_path: Path) -> None:
    target = dir_target(plain_env, tmp_path / "not-mounted")
    for action in (target.probe, lambda: target.put("k", io.BytesIO(b"x")), lambda: list(target.keys())):
        with pytest.raises(OffsiteError, match=f"directory {tmp_path}/not-mounted does not exist"):
            action()
    target = dir_target(plain_env, tmp_path)
    with pytest.raises(OffsiteError, match="refusing key"):
        target.put("../escape", io.BytesIO(b"x"))
    assert not (tmp_path.parent / "escape").exists()
    target.probe()
    assert list(target.keys()) == []


def test_directory_not_writable(plain_env: Env, tmp_path: Path) -> None:
    """Probed as an unprivileged user (root writes anywhere): a forked child that became uid
    65534, in a root-owned 0755 directory, as the sidecar's uid 10001 in a root-owned share."""
    share = tmp_path / "share"
    share.mkdir(mode=0o755)
    target = dir_target(plain_env, share)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, probe, report, exit without pytest's cleanup
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            else:
                share.chmod(0o500)
            target.probe()
            message = "probe succeeded"
        except Exception as exc:
            message = str(exc)
        os.write(write, f"{os.getuid()}:{message}".encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as handle:
        uid, _, message = handle.read().decode().partition(":")
    share.chmod(0o755)
    assert uid != "0" and f"not writable by uid {uid}" in message, message
    assert list(share.iterdir()) == []


# encryption --------------------------------------------------------------------------------
def test_encryption_to_a_directory_with_an_ssh_key(plain_env: Env, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    target = dir_target(plain_env, tmp_path / "nas")
    (tmp_path / "nas").mkdir()
    plaintext = PLAINTEXT_MARK * 10000
    with crypto.encrypting(io.BytesIO(plaintext), [key.with_suffix(".pub").read_text()]) as stream:
        target.put("x.age", stream)
    raw = (tmp_path / "nas/x.age").read_bytes()
    assert raw.startswith(crypto.AGE_HEADER) and PLAINTEXT_MARK not in raw
    out = io.BytesIO()
    with target.open("x.age") as stream:
        crypto.decrypt(stream, out, key)
    assert out.getvalue() == plaintext


def test_encryption_failures_reach_the_reader() -> None:
    import pyrage

    recipient = str(pyrage.x25519.Identity.generate().to_public())

    class Broken:
        def __init__(self) -> None:
            self.reads = 0

        def read(self, size: int = -1) -> bytes:
            self.reads += 1
            if self.reads > 3:
                raise OSError("the dump pipe broke")
            return b"x" * max(size, 1)

    with pytest.raises(OSError, match="the dump pipe broke"), \
            crypto.encrypting(Broken(), [recipient]) as stream:
        while stream.read(65536):
            pass
    began = time.monotonic()
    with crypto.encrypting(io.BytesIO(b"y" * 50_000_000), [recipient]) as stream:
        stream.read(10)  # leaving early: the thread must not hang on the full pipe
    assert time.monotonic() - began < 10
    with pytest.raises(OffsiteError, match="not an age recipient"):
        crypto.parse_recipients(["age1notakey"])


def test_identity_file_problems(tmp_path: Path) -> None:
    with pytest.raises(OffsiteError, match=f"AGE_IDENTITY_FILE {tmp_path}/none does not exist"):
        crypto.load_identities(tmp_path / "none")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(OffsiteError, match="holds no age identity"):
        crypto.load_identities(tmp_path / "empty")
    (tmp_path / "bad").write_text("AGE-SECRET-KEY-1NOTVALID\n")
    with pytest.raises(OffsiteError, match="not valid"):
        crypto.load_identities(tmp_path / "bad")
