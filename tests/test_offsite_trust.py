"""Issue 23, item 3: nothing read back from off-site is believed before it is checked.

Manifests and WAL checksums are signed with the installation's Ed25519 key
(OFFSITE_SIGNING_KEY_FILE; the tests' key comes from conftest.signing_key), so a restore point
or a WAL segment planted by someone who can write to the bucket, with valid sha256s and valid
age encryption (the recipients are public), is refused; so is an object that is not encrypted
when OFFSITE_AGE_RECIPIENTS is set, and a completed segment without a verified `.sha256` is
never replayed. The targets are real: SeaweedFS (s3_bucket) and a directory; the WAL segments
are whole 16 MiB files with a real long page header (test_pitr_offsite._fake_segment).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyrage
import pytest
from conftest import Bucket, Env
from test_pitr import PITR
from test_pitr_offsite import _fake_segment

from toybox_backupd.actions.verify import verify_offsite
from toybox_backupd.catalog.reindex_offsite import reindex_offsite
from toybox_backupd.places.offsite import signing, trust
from toybox_backupd.places.offsite.fetch import bring_back
from toybox_backupd.places.offsite.target import open_target
from toybox_backupd.store import Store
from toybox_backupd.tiers.pitr import wal, wal_offsite

SEGMENTS = [f"0000000100000000000000{n:02X}" for n in range(1, 5)]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def age(tmp_path: Path) -> dict[str, str]:
    """OFFSITE_AGE_RECIPIENTS and AGE_IDENTITY_FILE of a new age key pair."""
    key = pyrage.x25519.Identity.generate()
    path = tmp_path / "age-identity.txt"
    path.write_text(f"{key}\n")
    path.chmod(0o600)
    return {"OFFSITE_AGE_RECIPIENTS": str(key.to_public()), "AGE_IDENTITY_FILE": str(path)}


def _plant(settings: Any, stamp: str, *, sign: bool = False, encrypt: bool = True) -> str:
    """A restore point written into the target as someone who can write there would: a "dump"
    (encrypted for the public recipients unless `encrypt` is False) and a manifest that passes
    every check of `reindex --offsite` but the signature's (signed with the settings' key when
    `sign`). Its path."""
    target = open_target(settings)
    assert target is not None
    path = f"logical/toybox/toybox_{stamp}.dump"
    plain = b"PGDMP planted " + os.urandom(2048)
    recipients = [pyrage.x25519.Recipient.from_str(r) for r in settings.offsite_age_recipients]
    data = pyrage.encrypt(plain, recipients) if encrypt else plain
    key = path + (".age" if encrypt else "")
    stored = target.put(key, io.BytesIO(data))
    manifest = {
        "tool": "toybox-backupd", "tier": "logical", "target": "toybox",
        "file": path.rsplit("/", 1)[-1], "created_at": "2026-12-01T03:00:00+00:00",
        "size": len(plain), "sha256": _sha(plain), "extra": {},
        "offsite": {"objects": [{
            "key": key, "source": path, "size": stored.size, "sha256": stored.sha256,
            "etag": stored.etag, "source_size": len(plain), "source_sha256": _sha(plain),
            "encrypted": encrypt, "verified_by": stored.verified_by}],
            "recipients": settings.offsite_age_recipients if encrypt else [],
            "encryption": "age" if encrypt else None, "copied_at": "2026-12-01T03:01:00+00:00"}}
    if sign:
        trust.sign_manifest(settings, manifest, path + ".manifest.json")
    target.put(path + ".manifest.json", io.BytesIO(json.dumps(manifest).encode()))
    return path


def _skipped(done: Any) -> dict[str, str]:
    return dict(done.skipped)


# manifests ----------------------------------------------------------------------------------
def test_a_planted_restore_point_is_refused_unless_signed_by_a_trusted_key(
        plain_env: Env, s3_bucket: Bucket, age: dict[str, str], tmp_path: Path) -> None:
    settings = plain_env.settings(**s3_bucket.values(), **age)
    planted = _plant(settings, "20261201-120000")
    done = reindex_offsite(settings)
    assert done.added == [], done
    assert "is not signed" in _skipped(done)[planted] and "--trust-unsigned" in _skipped(done)[planted]
    # the plant is otherwise valid: a host told to trust unsigned copies takes it
    trusting = plain_env.cli("reindex", "--offsite", "--trust-unsigned", **s3_bucket.values(),
                             **age, STATE_DIR=str(tmp_path / "other"))
    assert "reindex: 1 artifact(s) added" in trusting.stdout, trusting
    # signed by this installation's key: accepted; changed after signing, or by another key: not
    signed = _plant(settings, "20261201-130000", sign=True)
    other_key = tmp_path / "other-signing-key.pem"
    signing.new_key_file(other_key)
    foreign = _plant(plain_env.settings(**s3_bucket.values(), **age,
                                        OFFSITE_SIGNING_KEY_FILE=str(other_key)),
                     "20261201-140000", sign=True)
    target = open_target(settings)
    assert target is not None
    changed = _plant(settings, "20261201-150000", sign=True)
    with target.open(changed + ".manifest.json") as stream:
        data = json.loads(stream.read())
    data["created_at"] = "2026-12-01T02:00:00+00:00"
    target.put(changed + ".manifest.json", io.BytesIO(json.dumps(data).encode()))
    done = reindex_offsite(settings)
    assert done.added == [signed], done
    assert "not one of OFFSITE_VERIFY_KEYS" in _skipped(done)[foreign]
    assert "does not match its signature" in _skipped(done)[changed]
    # a signature binds the manifest to its own key: the same manifest elsewhere is refused
    assert trust.manifest_problem(settings, data, "logical/toybox/elsewhere.manifest.json")


def _refused_fetch(settings: Any, path: str, why: str) -> Any:
    """Fetching the restore point at `path` is refused for `why`, and nothing of it is written
    into BACKUP_DIR; its catalog row."""
    with Store(settings.state_dir) as store:
        item = store.artifact_by_path(path)
        assert item is not None
        with pytest.raises(trust.Untrusted, match=why):
            bring_back(settings, store, item)
    assert not (settings.backup_dir / path).exists()
    assert not (settings.backup_dir / (path + ".manifest.json")).exists()
    return item


def test_a_manifest_replaced_after_reindex_is_refused_by_fetch_and_verify(
        plain_env: Env, age: dict[str, str], tmp_path: Path) -> None:
    nas = tmp_path / "nas"
    nas.mkdir()
    settings = plain_env.settings(OFFSITE_URL=f"file://{nas}", **age)
    path = _plant(settings, "20261201-120000", sign=True)
    assert reindex_offsite(settings).added == [path]
    assert [r.ok for r in verify_offsite(settings)] == [True]
    manifest = nas / (path + ".manifest.json")
    data = json.loads(manifest.read_text())
    data.pop("signature")
    data["extra"] = {"planted": True}
    manifest.write_text(json.dumps(data))
    item = _refused_fetch(settings, path, "is not signed")
    [checked] = verify_offsite(settings)
    assert not checked.ok and "is not signed" in str(checked.problem), checked
    with Store(plain_env.state_dir) as store:
        assert store.offsite_copy(item.id).status == "corrupt"  # type: ignore[union-attr]


def test_an_unencrypted_copy_is_refused_when_recipients_are_set(
        plain_env: Env, age: dict[str, str], tmp_path: Path) -> None:
    """Whatever its (even signed) manifest says: this installation encrypts every copy."""
    nas = tmp_path / "nas"
    nas.mkdir()
    settings = plain_env.settings(OFFSITE_URL=f"file://{nas}", **age)
    path = _plant(settings, "20261201-120000", sign=True, encrypt=False)
    assert reindex_offsite(settings).added == [path]
    _refused_fetch(settings, path, "not age-encrypted")
    # the WAL too: a plain segment beside the encrypted ones, with a good signed checksum
    archive = wal.wal_dir(settings)
    _fake_segment(archive / SEGMENTS[0], 111)
    with Store(plain_env.state_dir) as store:
        wal_offsite.copy_offsite(settings, store, 0.0, 0.0)
    remote = nas / "wal" / "toybox"
    (remote / (SEGMENTS[0] + ".age")).unlink()
    shutil.copy(archive / SEGMENTS[0], remote / SEGMENTS[0])
    said: list[str] = []
    assert wal_offsite.fetch(settings, "toybox", 0, [], tmp_path / "got", said.append) == []
    assert any("not age-encrypted" in line and "not replayed" in line for line in said), said


# the WAL ------------------------------------------------------------------------------------
def _archive(plain_env: Env, tmp_path: Path, **extra: str) -> tuple[Any, Path, Path]:
    """Settings with a directory target, and the WAL SEGMENTS (cluster 111) copied there with
    a `.partial` of the next one and a timeline history file; (settings, archive, remote)."""
    nas = tmp_path / "nas"
    nas.mkdir(exist_ok=True)
    settings = plain_env.settings(**PITR, PG_CONTAINER="db", OFFSITE_URL=f"file://{nas}", **extra)
    archive = wal.wal_dir(settings)
    for name in SEGMENTS:
        _fake_segment(archive / name, 111)
    _fake_segment(archive / "000000010000000000000005.partial", 111)
    (archive / "00000002.history").write_bytes(b"1\t0/5000000\tno recovery target specified\n")
    with Store(plain_env.state_dir) as store:
        wal_offsite.copy_offsite(settings, store, float("-inf"), 0.0)
    return settings, archive, nas / "wal" / "toybox"


def _fetched(settings: Any, into: Path, said: list[str] | None = None) -> list[str]:
    shutil.rmtree(into, ignore_errors=True)
    got = wal_offsite.fetch(settings, "toybox", 0, [], into,
                            said.append if said is not None else lambda line: None)
    return sorted(path.name for path in got)


def test_every_wal_checksum_is_signed_and_still_read_by_sha256sum(
        plain_env: Env, tmp_path: Path) -> None:
    settings, archive, remote = _archive(plain_env, tmp_path)
    for name in [*SEGMENTS, "000000010000000000000005.partial", "00000002.history"]:
        line = (remote / f"{name}.sha256").read_text()
        assert line == f"{_sha((archive / name).read_bytes())}  {name}\n"  # sha256sum -c reads it
        record = json.loads((remote / f"{name}.sha256.sig").read_text())
        assert record["key"] == trust.signer(settings).verify_key  # type: ignore[union-attr]
    assert json.loads((remote / f"{SEGMENTS[0]}.sha256.sig").read_text())["system"] == "111"
    assert _fetched(settings, tmp_path / "got") == [*SEGMENTS, "000000010000000000000005.partial"]
    # off-site retention takes a segment's checksum and signature with it
    wal_offsite.prune(settings, wal.parse_segment(Path(SEGMENTS[2])).number, "toybox")  # type: ignore[union-attr]
    assert not list(remote.glob(f"{SEGMENTS[0]}*")) and not list(remote.glob(f"{SEGMENTS[1]}*"))
    assert (remote / f"{SEGMENTS[2]}.sha256.sig").is_file()


def test_a_segment_without_its_checksum_is_never_replayed(plain_env: Env, tmp_path: Path) -> None:
    """A crash between a segment's copy and its checksum's: recovery stops before it."""
    settings, _archive_dir, remote = _archive(plain_env, tmp_path)
    (remote / f"{SEGMENTS[1]}.sha256").unlink()
    said: list[str] = []
    assert _fetched(settings, tmp_path / "got", said) == [SEGMENTS[0]]
    assert any(f"not replayed from {SEGMENTS[1]} on" in line and "no .sha256" in line
               and "Recovery stops before it" in line for line in said), said


def test_a_swapped_segment_with_a_matching_checksum_is_refused(plain_env: Env, tmp_path: Path) -> None:
    """Someone who can write to the target puts another cluster's segment in place of one, with
    a `.sha256` that matches it: its signature does not."""
    settings, _archive_dir, remote = _archive(plain_env, tmp_path)
    other = tmp_path / "other" / SEGMENTS[2]
    _fake_segment(other, 999)
    shutil.copy(other, remote / SEGMENTS[2])
    (remote / f"{SEGMENTS[2]}.sha256").write_text(f"{_sha(other.read_bytes())}  {SEGMENTS[2]}\n")
    said: list[str] = []
    assert _fetched(settings, tmp_path / "got", said) == SEGMENTS[:2]
    assert any("does not match its signature" in line for line in said), said
    # without its signature (as a planted one would be): refused the same
    (remote / f"{SEGMENTS[2]}.sha256.sig").unlink()
    said.clear()
    assert _fetched(settings, tmp_path / "got", said) == SEGMENTS[:2]
    assert any("is not signed" in line for line in said), said


def test_a_planted_partial_and_history_file_are_not_used(plain_env: Env, tmp_path: Path) -> None:
    settings, archive, remote = _archive(plain_env, tmp_path)
    partial = "000000010000000000000005.partial"
    other = tmp_path / "other" / partial
    _fake_segment(other, 999)
    shutil.copy(other, remote / partial)
    (remote / f"{partial}.sha256").write_text(f"{_sha(other.read_bytes())}  {partial}\n")
    said: list[str] = []
    assert _fetched(settings, tmp_path / "got", said) == SEGMENTS
    assert any(partial in line and "not used" in line for line in said), said
    # a timeline history file planted beside the real one (a matching, unsigned .sha256)
    history = b"1\t0/3000000\tplanted\n"
    (remote / "00000003.history").write_bytes(history)
    (remote / "00000003.history.sha256").write_text(f"{_sha(history)}  00000003.history\n")
    shutil.rmtree(archive)  # a new host
    said.clear()
    assert wal_offsite.fetch_histories(settings, "toybox", said.append) == ["00000002.history"]
    assert not (archive / "00000003.history").exists()
    assert any("00000003.history" in line and "is not signed" in line for line in said), said


def test_unsigned_copies_need_the_flag_and_a_new_host_needs_only_the_verify_key(
        plain_env: Env, tmp_path: Path) -> None:
    """Copies made before signing (a `.sha256`, no `.sig`) are replayed only with
    OFFSITE_TRUST_UNSIGNED (`--trust-unsigned`); a new host with OFFSITE_VERIFY_KEYS alone
    takes signed ones; after a rotation the old key's copies stay good."""
    settings, _archive_dir, remote = _archive(plain_env, tmp_path)
    own = trust.signer(settings)
    assert own is not None
    new_host = {"OFFSITE_SIGNING_KEY_FILE": "", "OFFSITE_VERIFY_KEYS": own.verify_key}
    assert _fetched(plain_env.settings(**PITR, OFFSITE_URL=settings.offsite_url, **new_host),
                    tmp_path / "got")[:4] == SEGMENTS
    nobody = plain_env.settings(**PITR, OFFSITE_URL=settings.offsite_url,
                                OFFSITE_SIGNING_KEY_FILE="")
    said: list[str] = []
    assert _fetched(nobody, tmp_path / "got", said) == []
    assert any("no verify key is set" in line and "OFFSITE_VERIFY_KEYS" in line for line in said)
    # rotation: a new signing key; the old one's verify key kept in OFFSITE_VERIFY_KEYS
    rotated = tmp_path / "new-signing-key.pem"
    signing.new_key_file(rotated)
    after = plain_env.settings(**PITR, OFFSITE_URL=settings.offsite_url,
                               OFFSITE_SIGNING_KEY_FILE=str(rotated),
                               OFFSITE_VERIFY_KEYS=own.verify_key)
    _fake_segment(wal.wal_dir(after) / "000000010000000000000005", 111)
    with Store(plain_env.state_dir) as store:
        wal_offsite.copy_offsite(after, store, 0.0, 0.0)
    assert _fetched(after, tmp_path / "got") == [*SEGMENTS, "000000010000000000000005"]
    # copies from before signing
    for sig in remote.glob("*.sig"):
        sig.unlink()
    said.clear()
    assert _fetched(settings, tmp_path / "got", said) == []
    assert any("is not signed" in line and "--trust-unsigned" in line for line in said), said
    trusting = plain_env.settings(**PITR, OFFSITE_URL=settings.offsite_url,
                                  OFFSITE_TRUST_UNSIGNED="true")
    assert _fetched(trusting, tmp_path / "got") == [*SEGMENTS, "000000010000000000000005"]
    # a history file copied before checksums were written (none at all): with the flag only
    (remote / "00000002.history.sha256").unlink()
    shutil.rmtree(wal.wal_dir(settings))
    assert wal_offsite.fetch_histories(settings, "toybox") == []
    assert wal_offsite.fetch_histories(trusting, "toybox") == ["00000002.history"]


# the key ------------------------------------------------------------------------------------
def test_keys_new_makes_a_private_key_once_and_check_prints_its_verify_key(
        plain_env: Env, tmp_path: Path) -> None:
    path = tmp_path / "operator" / "signing-key.pem"
    path.parent.mkdir()
    made = plain_env.cli("keys", "new", "--out", str(path))
    assert made.returncode == 0, made.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    verify_key = signing.load(path).verify_key
    assert f"verify key: {verify_key}" in made.stdout
    body = path.read_bytes()
    again = plain_env.cli("keys", "new", "--out", str(path))
    assert again.returncode != 0 and "not overwritten" in again.stderr, again
    assert path.read_bytes() == body
    nas = tmp_path / "nas"
    nas.mkdir()
    checked = plain_env.cli("check", OFFSITE_URL=f"file://{nas}", OFFSITE_SIGNING_KEY_FILE=str(path),
                            POSTGRES_DB="", PGDUMP_SCHEDULE="")
    line = next(x for x in checked.stdout.splitlines() if "signing key" in x)
    assert line.startswith("ok") and verify_key in line, checked.stdout
    unset = plain_env.cli("check", OFFSITE_URL=f"file://{nas}", OFFSITE_SIGNING_KEY_FILE="",
                          POSTGRES_DB="", PGDUMP_SCHEDULE="")
    line = next(x for x in unset.stdout.splitlines() if "signing key" in x)
    assert line.startswith("WARN") and "OFFSITE_SIGNING_KEY_FILE is not set" in line
    assert "keys new --out" in line
    inside = plain_env.cli("check", OFFSITE_URL=f"file://{nas}", POSTGRES_DB="", PGDUMP_SCHEDULE="",
                           OFFSITE_SIGNING_KEY_FILE=str(plain_env.state_dir / "signing-key.pem"))
    assert inside.returncode == 2 and "OFFSITE_SIGNING_KEY_FILE" in inside.stderr, inside
    bad = plain_env.cli("check", OFFSITE_URL=f"file://{nas}", POSTGRES_DB="", PGDUMP_SCHEDULE="",
                        OFFSITE_VERIFY_KEYS="age1notakey")
    assert bad.returncode == 2 and "OFFSITE_VERIFY_KEYS" in bad.stderr, bad
