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

from toybox_backupd.places.offsite import crypto, s3
from toybox_backupd.places.offsite.directory import DirectoryTarget
from toybox_backupd.places.offsite.s3 import PART_SIZE, S3Target
from toybox_backupd.places.offsite.target import OffsiteError, Stored, open_target

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
    """A provider that computes multipart ETags otherwise (here: the prediction is made not to
    match what SeaweedFS computes): the copy is read back and its sha256 compared instead."""
    monkeypatch.setattr(s3._Parts, "expected_etag", lambda self: "0" * 32 + "-1")
    target = s3_target(plain_env, s3_bucket)
    data = payload(PART_SIZE + 5)
    stored = target.put("a", Trickle(data))
    assert stored.verified_by == "read-back"
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert read_all(target, "a") == data


# any size, any S3 ----------------------------------------------------------------------------
TIB, GIB, MIB = 2**40, 2**30, 2**20


@pytest.mark.parametrize("first_mib", [5, 8, 16, 100, 5120])
def test_s3_part_sizes_grow_so_5_tib_fits_in_10000_parts(first_mib: int) -> None:
    """The part-size schedule from any allowed S3_PART_SIZE_MB: no part over S3's 5 GiB, none
    below its 5 MiB, never shrinking, and more than 5 TiB (S3's largest object) within S3's
    10,000 parts (a fixed 16 MiB stopped at 156 GiB)."""
    sizes = [s3.part_size(first_mib * MIB, number) for number in range(1, s3.MAX_PARTS + 1)]
    assert sizes[0] == first_mib * MIB
    assert all(5 * MIB <= size <= 5 * GIB for size in sizes)
    assert sizes == sorted(sizes)
    assert sum(sizes) > 5 * TIB
    # a part is held in memory only up to SPOOL (the rest waits in a temporary file)
    assert (s3.CONCURRENCY + 1) * s3.SPOOL <= 80 * MIB


def test_s3_upload_crossing_part_size_steps_keeps_every_byte(
        plain_env: Env, s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    """5 MiB first parts doubling every 2 parts (every 900 in real use): 5, 5, 10, 10, 20 MiB
    and a last one; the object reads back byte for byte and its ETag is the one those parts
    give (6 parts; a fixed part size would have made 11)."""
    monkeypatch.setattr(s3, "GROW_EVERY", 2)
    target = s3_target(plain_env, s3_bucket, S3_PART_SIZE_MB="5")
    data = payload(50 * MIB + 12345)
    stored = target.put("full/big.tar.zst", Trickle(data))
    assert stored.verified_by == "etag" and stored.etag is not None and stored.etag.endswith("-6")
    assert stored.size == len(data) and stored.sha256 == hashlib.sha256(data).hexdigest()
    assert read_all(target, "full/big.tar.zst") == data
    sizes = [s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="toybox/full/big.tar.zst",
                                          PartNumber=number)["ContentLength"] for number in range(1, 7)]
    assert sizes == [5 * MIB, 5 * MIB, 10 * MIB, 10 * MIB, 20 * MIB, 12345]


def test_s3_requests_carry_no_checksum_a_store_may_refuse(plain_env: Env, s3_bucket: Bucket) -> None:
    """botocore >= 1.36 adds a CRC32 (sent as an aws-chunked trailer) to every upload and asks
    for checksums on every download, which stores such as older MinIO, B2 or Garage refuse;
    the client sends them only where an operation requires one (the parts carry Content-MD5)."""
    target = s3_target(plain_env, s3_bucket)
    sent: list[dict[str, str]] = []
    target._client.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append(
            {key.lower(): value.decode() if isinstance(value, bytes) else str(value)
             for key, value in request.headers.items()}))
    target.put("a", io.BytesIO(b"small"))
    target.put("b", Trickle(payload(PART_SIZE + 1)))
    assert read_all(target, "b")[:1] and target.check(target.put("c", io.BytesIO(b"c"))) is None
    assert len(sent) > 8
    for headers in sent:
        assert not [key for key in headers if key.startswith(("x-amz-checksum", "x-amz-sdk-checksum",
                                                              "x-amz-trailer"))], headers
        assert "aws-chunked" not in headers.get("content-encoding", ""), headers
    bodies = [headers for headers in sent if "content-md5" in headers]
    assert len(bodies) >= 4  # 1 PUT + 2 parts + 1 PUT
    # the signed Content-MD5 stands for the body (no sha256 of it computed for the signature)
    assert {headers.get("x-amz-content-sha256") for headers in bodies} == {"UNSIGNED-PAYLOAD"}


def test_s3_standard_aws_variables_are_read(plain_env: Env, s3_bucket: Bucket) -> None:
    """AWS_ENDPOINT_URL_S3 and AWS_REGION (the SDKs' standard names) do what S3_ENDPOINT_URL
    and S3_REGION do; the latter win when both are set."""
    values = s3_bucket.values()
    endpoint, region = values.pop("S3_ENDPOINT_URL"), values.pop("S3_REGION")
    settings = plain_env.settings(**values, AWS_ENDPOINT_URL_S3=endpoint, AWS_REGION=region)
    assert (settings.s3_endpoint_url, settings.s3_region) == (endpoint, region)
    target = open_target(settings)
    assert isinstance(target, S3Target) and target.where == endpoint
    round_trip(target, b"standard names")
    both = plain_env.settings(**values, AWS_ENDPOINT_URL_S3="http://127.0.0.1:9", S3_ENDPOINT_URL=endpoint,
                              AWS_REGION="eu-west-3", S3_REGION=region)
    assert (both.s3_endpoint_url, both.s3_region) == (endpoint, region)


class StopsTheServer:
    """A source that stops the S3 server once `after` bytes have been read (mid-upload)."""

    def __init__(self, data: bytes, server: Any, after: int) -> None:
        self._source, self._server, self._after, self._read = io.BytesIO(data), server, after, 0

    def read(self, size: int = -1) -> bytes:
        if self._read >= self._after:
            self._server.stop()
        piece = self._source.read(size)
        self._read += len(piece)
        return piece


def test_s3_upload_cut_by_the_server_going_down_is_aborted_by_the_next_put(
        plain_env: Env, s3_bucket: Bucket) -> None:
    """The store goes down mid-upload: the put fails plainly, its upload stays recorded in
    STATE_DIR, and the next put (once the store is back) aborts it: no parts are left."""
    target = s3_target(plain_env, s3_bucket, S3_PART_SIZE_MB="5")
    ledger = plain_env.state_dir / "s3-uploads"
    try:
        with pytest.raises(OffsiteError, match="cannot reach the S3 endpoint"):
            target.put("full/cut.tar.zst", StopsTheServer(payload(40 * MIB), s3_bucket.server, 17 * MIB))
    finally:
        s3_bucket.server.start()
    left = s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", [])
    assert [item["Key"] for item in left] == ["toybox/full/cut.tar.zst"]
    target.put("logical/next.pgdump", io.BytesIO(b"next"))
    assert s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", []) == []
    assert list(ledger.iterdir()) == []  # its record went with it


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
    # it aborted the multipart upload it started (so the key may abort uploads cut short)
    assert s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", []) == []
    assert list((plain_env.state_dir / "s3-uploads").iterdir()) == []


def test_s3_clean_up_aborts_only_our_unheld_uploads(plain_env: Env, s3_bucket: Bucket) -> None:
    """What `clean_up` aborts: a recorded upload whose process died before it could write its id
    down (found by its key), but not an upload still held by a live put (another thread), nor
    one of a key no record names (not ours)."""
    from toybox_backupd.places.offsite.uploads import Ledger

    client, name = s3_bucket.client, s3_bucket.name
    target = s3_target(plain_env, s3_bucket)
    ledger = Ledger(plain_env.state_dir)
    with ledger.begin(target.endpoint, name, "toybox/full/died.tar.zst"):
        died = client.create_multipart_upload(Bucket=name, Key="toybox/full/died.tar.zst")["UploadId"]
    foreign = client.create_multipart_upload(Bucket=name, Key="toybox/full/foreign")["UploadId"]
    with ledger.begin(target.endpoint, name, "toybox/full/live.tar.zst") as live:
        live.record(client.create_multipart_upload(Bucket=name, Key="toybox/full/live.tar.zst")["UploadId"])
        assert target.clean_up() == ["toybox/full/died.tar.zst"]
        left = {item["UploadId"] for item in client.list_multipart_uploads(Bucket=name)["Uploads"]}
        assert died not in left and {foreign, live.upload_id} <= left
        live.forget()
    assert target.clean_up() == []
    for upload_id, key in ((foreign, "toybox/full/foreign"), (live.upload_id, "toybox/full/live.tar.zst")):
        client.abort_multipart_upload(Bucket=name, Key=key, UploadId=upload_id)


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
