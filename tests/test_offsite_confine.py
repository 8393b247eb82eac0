"""Issue 23, items 1, 2 and 9a: nothing read back from off-site is believed before it is checked.

A real logical backup (PostgreSQL 15 in a container) is copied to a real target: SeaweedFS on
loopback and a directory. Then restore points are planted beside it, in the tool's layout,
whose remote manifests point an object at a file outside BACKUP_DIR (the state database, /tmp,
`../../x`) or at another restore point's objects, or are of the wrong shape. `reindex --offsite`
must name each and skip it, reindex the genuine one, write nothing outside BACKUP_DIR, and a
later prune must delete none of the genuine restore point's objects. A directory target never
follows a symbolic link planted on the share.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Env

from toybox_backupd.actions import offsite_retention
from toybox_backupd.catalog import restore_points
from toybox_backupd.core.basics import CatalogError, iso, utcnow
from toybox_backupd.places.offsite import fetch, trust
from toybox_backupd.places.offsite.directory import DirectoryTarget
from toybox_backupd.places.offsite.target import OffsiteError, Target, open_target
from toybox_backupd.store import Store

pytestmark = pytest.mark.docker

MANIFEST = ".manifest.json"


@dataclass
class Copied:
    """A genuine logical restore point copied off-site, and a new host that has only .env."""

    env: Env  # the old host
    new: Env  # the new host (same target, empty BACKUP_DIR and STATE_DIR)
    target: Target
    path: str  # the genuine restore point's artifact path
    manifest: dict[str, Any]  # its remote manifest
    outside: Path  # a directory outside both hosts' BACKUP_DIR (for /tmp-like sources)

    def genuine_keys(self) -> set[str]:
        return {obj["key"] for obj in self.manifest["offsite"]["objects"]} | {self.path + MANIFEST}

    def stamp_path(self, n: int) -> str:
        """Another artifact path in the layout, of the same database, `n` days older."""
        db = self.manifest["target"]
        return f"logical/{db}/{db}_20250101-0000{n:02d}.dump"


def _put(target: Target, key: str, body: bytes) -> dict[str, Any]:
    stored = target.put(key, io.BytesIO(body))
    sha = hashlib.sha256(body).hexdigest()
    return {"key": key, "source": key, "size": stored.size, "sha256": stored.sha256,
            "etag": stored.etag, "source_size": len(body), "source_sha256": sha,
            "encrypted": False, "verified_by": stored.verified_by}


def plant(copied: Copied, relative: str, extra_objects: list[dict[str, Any]],
          artifact_key: str | None = None, age_days: int = 30) -> None:
    """A complete-looking restore point at `relative`: the genuine dump's bytes as its
    artifact (at `artifact_key`, default its own key), plus `extra_objects`."""
    with copied.target.open(copied.path) as stream:
        body = stream.read()
    artifact = _put(copied.target, artifact_key or relative, body)
    artifact["source"] = relative
    manifest = copy.deepcopy(copied.manifest)
    manifest["file"] = relative.rsplit("/", 1)[-1]
    manifest["created_at"] = iso(utcnow() - timedelta(days=age_days))
    (manifest.get("extra") or {}).pop("globals", None)
    manifest["offsite"]["objects"] = [artifact, *extra_objects]
    raw(copied, relative, manifest)


def raw(copied: Copied, relative: str, manifest: Any) -> None:
    """Put `manifest` at `relative`'s manifest key, signed with the installation's own key when
    it is an object: what is refused here is refused for what it says, not for its signature
    (a signed manifest is confined too: an older version's copy, a leaked signing key)."""
    if isinstance(manifest, dict):
        manifest.pop("signature", None)
        trust.sign_manifest(copied.env.settings(), manifest, relative + MANIFEST)
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    copied.target.put(relative + MANIFEST, io.BytesIO(body))


def hostile_object(copied: Copied, source: str, key: str) -> dict[str, Any]:
    body = gzip.compress(b"")  # an empty file index, were it read as one
    obj = _put(copied.target, key, body)
    obj["source"] = source
    return obj


@pytest.fixture(params=["directory", "s3"])
def copied(request: pytest.FixtureRequest, env: Env, tmp_path: Path) -> Copied:
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        env.values.update(bucket.values(prefix="toybox"))
    else:
        (tmp_path / "nas").mkdir()
        env.values["OFFSITE_URL"] = f"file://{tmp_path / 'nas'}"
    env.values.update({"PGDUMP_SCHEDULE": "", "OFFSITE_KEEP_DAYS": "5"})
    result = env.cli("backup", "pgdump")
    assert result.returncode == 0, result.stdout + result.stderr
    with Store(env.state_dir) as store:
        [item] = store.artifacts(tier="logical")
        assert store.offsite_copy(item.id).status == "ok"  # type: ignore[union-attr]
    target = open_target(env.settings())
    assert target is not None
    with target.open(item.path + MANIFEST) as stream:
        manifest = json.loads(stream.read())
    new_tmp = tmp_path / "new-host"
    new_tmp.mkdir()
    new = Env(new_tmp, {**env.values, "BACKUP_DIR": str(new_tmp / "backups"),
                        "STATE_DIR": str(new_tmp / "state")})
    outside = tmp_path / "outside"
    outside.mkdir()
    return Copied(env, new, target, item.path, manifest, outside)


def _outside_files(copied: Copied) -> dict[str, bytes]:
    """Every file under the test's directory that is not in either BACKUP_DIR or the share."""
    root = copied.env.tmp
    skip = (copied.env.backup_dir, copied.new.backup_dir, root / "nas", copied.env.state_dir,
            copied.new.state_dir)
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not any(path.is_relative_to(s) for s in skip):
            found[str(path)] = path.read_bytes()
    return found


def _fetch_all(new: Env) -> list[str]:
    """Fetch every off-site-only restore point the new host's catalog has; the errors."""
    settings = new.settings()
    errors = []
    with Store(new.state_dir) as store:
        for item in store.artifacts(tier="logical", statuses=("remote",)):
            try:
                restore_points.local_copy(settings, store, item)
            except (CatalogError, OffsiteError) as exc:
                errors.append(str(exc))
    return errors


def test_reindex_offsite_skips_manifests_whose_objects_leave_backup_dir_or_are_not_their_own(
        copied: Copied) -> None:
    state_db = copied.new.state_dir / "history.sqlite3"
    planted_tmp = copied.outside / f"planted-{secrets.token_hex(4)}"
    cases = {  # artifact path -> (its extra object's source, the word the skip must name)
        copied.stamp_path(1): (str(state_db), str(state_db)),
        copied.stamp_path(2): (str(planted_tmp), str(planted_tmp)),
        copied.stamp_path(3): ("../../x", "../../x"),
        copied.stamp_path(4): (f"logical/../../{copied.stamp_path(4)}.index.jsonl.gz", ".."),
    }
    for relative, (source, _) in cases.items():
        plant(copied, relative, [hostile_object(copied, source, relative + ".index.jsonl.gz")])
    # its artifact's key is the genuine restore point's: a prune of it would delete that
    foreign = copied.stamp_path(5)
    plant(copied, foreign, [], artifact_key=copied.path)
    # its index object's key is another (planted) restore point's
    foreign_index = copied.stamp_path(6)
    plant(copied, foreign_index, [hostile_object(copied, foreign_index + ".index.jsonl.gz",
                                                 copied.stamp_path(1) + ".index.jsonl.gz")])
    before = _outside_files(copied)

    result = copied.new.cli("reindex", "--offsite")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "1 artifact(s) added" in out, out
    for relative, (_, word) in cases.items():
        line = next((line for line in out.splitlines() if line.startswith(f"skipped {relative}:")),
                    None)
        assert line is not None and word in line, out
    for relative in (foreign, foreign_index):
        line = next((line for line in out.splitlines() if line.startswith(f"skipped {relative}:")),
                    None)
        assert line is not None and "key" in line, out

    assert _fetch_all(copied.new) == []  # the genuine restore point comes back
    assert (copied.new.backup_dir / copied.path).is_file()
    assert _outside_files(copied) == before
    assert state_db.read_bytes().startswith(b"SQLite format 3")
    assert not (copied.new.tmp.parent / "x").exists() and not planted_tmp.exists()
    with Store(copied.new.state_dir) as store:
        gone = offsite_retention.apply(copied.new.settings(), store, "logical",
                                       [copied.manifest["target"]])
    assert gone == []
    assert copied.genuine_keys() <= set(copied.target.keys())


def test_a_fetch_and_a_prune_check_the_catalog_s_copy_before_using_it(copied: Copied) -> None:
    """Defence in depth: the catalog was rebuilt from a hostile bucket by an older version."""
    state_db = copied.env.state_dir / "history.sqlite3"
    db_before = state_db.read_bytes()
    planted_tmp = copied.outside / "planted"
    relative = copied.stamp_path(7)
    with copied.target.open(copied.path) as stream:
        body = stream.read()
    art = _put(copied.target, relative, body)
    hostile = [
        [art, hostile_object(copied, str(planted_tmp), relative + ".index.jsonl.gz")],
        [art, hostile_object(copied, "../../x", relative + ".index.jsonl.gz")],
        [art, hostile_object(copied, str(state_db), relative + ".index.jsonl.gz")],
        [{**art, "key": copied.path}],  # another restore point's object
    ]
    settings = copied.env.settings()
    for objects in hostile:
        with Store(copied.env.state_dir) as store:
            item_id = store.add_artifact(
                run_id=None, tier="logical", target=copied.manifest["target"], path=relative,
                created_at=utcnow() - timedelta(days=30), size=len(body),
                sha256=hashlib.sha256(body).hexdigest(), status="remote")
            store.copy_done(item_id, url=copied.target.url, objects=objects, recipients=[],
                            now=utcnow() - timedelta(days=30), retain_until=None)
            item = store.artifact(item_id)
            assert item is not None
            with pytest.raises((CatalogError, OffsiteError), match=r"refusing|not its own"):
                fetch.bring_back(settings, store, item)
            assert not (settings.backup_dir / relative).exists()
            gone = offsite_retention.apply(settings, store, "logical", [copied.manifest["target"]])
            assert relative not in gone
            with store.tx() as db:
                db.execute("DELETE FROM offsite_copies WHERE artifact_id=?", (item_id,))
                db.execute("DELETE FROM artifacts WHERE id=?", (item_id,))
    assert not planted_tmp.exists() and not (copied.env.tmp.parent / "x").exists()
    assert state_db.read_bytes()[:16] == db_before[:16]
    assert copied.genuine_keys() <= set(copied.target.keys())

    # the genuine restore point's own folder here is a link out of BACKUP_DIR: never written
    folder = (settings.backup_dir / copied.path).parent
    shutil.rmtree(folder)
    (copied.outside / "linked").mkdir()
    folder.symlink_to(copied.outside / "linked")
    with Store(copied.env.state_dir) as store:
        [item] = store.artifacts(tier="logical")
        with pytest.raises(CatalogError, match="leads out of"):
            restore_points.local_copy(settings, store, item)
    assert list((copied.outside / "linked").iterdir()) == []


def test_one_malformed_manifest_is_skipped_with_its_name_and_the_others_are_reindexed(
        copied: Copied) -> None:
    good = copy.deepcopy(copied.manifest)
    (good.get("extra") or {}).pop("globals", None)

    def shaped(n: int, change: Any) -> str:
        relative = copied.stamp_path(n)
        plant(copied, relative, [])
        with copied.target.open(relative + MANIFEST) as stream:
            data = json.loads(stream.read())
        raw(copied, relative, change(data))
        return relative

    def index_missing(data: dict[str, Any]) -> dict[str, Any]:
        data["offsite"]["objects"].append(
            {**data["offsite"]["objects"][0], "key": data["offsite"]["objects"][0]["key"]
             + ".index.jsonl.gz", "source": data["offsite"]["objects"][0]["source"]
             + ".index.jsonl.gz"})  # listed, but not in the target
        return data

    cases = {
        shaped(10, lambda data: [data]): "not a JSON object",
        shaped(11, lambda data: {**data, "offsite": {**data["offsite"], "objects": ["x", 1]}}):
            "object",
        shaped(12, lambda data: {**data, "offsite": "yes"}): "off-site",
        shaped(13, lambda data: {**data, "offsite": {**data["offsite"], "copied_at": 5}}):
            "copied_at",
        shaped(14, lambda data: {**data, "extra": ["a list"]}): "extra",
        shaped(15, lambda data: {**data, "offsite": {**data["offsite"], "objects": [
            data["offsite"]["objects"][0], {"key": "k", "source": 5}]}}): "source",
        shaped(16, lambda data: {**data, "offsite": {**data["offsite"], "objects": [
            {k: v for k, v in data["offsite"]["objects"][0].items() if k != "key"}]}}): "key",
        shaped(17, lambda data: {**data, "offsite": {**data["offsite"], "recipients": "age1x"}}):
            "recipients",
        shaped(18, index_missing): "index",
        shaped(19, lambda data: b"\xff\xfe not json"): "not a JSON object",
    }
    if isinstance(copied.target, DirectoryTarget):  # a manifest that cannot be read
        unreadable = copied.stamp_path(20)
        os.symlink(copied.outside / "nothing-here", copied.target.root / (unreadable + MANIFEST))
        cases[unreadable] = "cannot be read"

    result = copied.new.cli("reindex", "--offsite")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "1 artifact(s) added" in out, out
    for relative, word in cases.items():
        line = next((line for line in out.splitlines() if line.startswith(f"skipped {relative}:")),
                    None)
        assert line is not None and word in line, (relative, word, out)
    with Store(copied.new.state_dir) as store:
        assert [item.path for item in store.artifacts(tier="logical", statuses=("remote",))] == [
            copied.path]


# a directory target never follows a link planted on the share ----------------------------------
def test_a_directory_target_refuses_a_symlinked_folder_on_the_share(plain_env: Env,
                                                                    tmp_path: Path) -> None:
    nas, elsewhere = tmp_path / "nas", tmp_path / "elsewhere"
    nas.mkdir()
    (elsewhere / "toybox").mkdir(parents=True)
    (elsewhere / "toybox" / "old.dump").write_bytes(b"someone else's file")
    (nas / "logical").symlink_to(elsewhere)
    target = DirectoryTarget(plain_env.settings(OFFSITE_URL=f"file://{nas}"))
    key = "logical/toybox/toybox_20260101-000000.dump"

    with pytest.raises(OffsiteError, match=f"{nas / 'logical'}.*symbolic link"):
        target.put(key, io.BytesIO(b"dump"))
    assert sorted(p.name for p in (elsewhere / "toybox").iterdir()) == ["old.dump"]
    with pytest.raises(OffsiteError, match="symbolic link"):
        target.open("logical/toybox/old.dump")
    with pytest.raises(OffsiteError, match="symbolic link"):
        target.delete("logical/toybox/old.dump")
    assert (elsewhere / "toybox" / "old.dump").read_bytes() == b"someone else's file"
    assert "logical/toybox/old.dump" not in set(target.keys())

    # a link as the object itself is never read through either, and a check names it
    (nas / "volumes").mkdir()
    (nas / "volumes" / "v.tar").symlink_to(elsewhere / "toybox" / "old.dump")
    with pytest.raises(OffsiteError, match="symbolic link"):
        target.open("volumes/v.tar")
    from toybox_backupd.places.offsite.base import Stored
    problem = target.check(Stored("volumes/v.tar", 19, "0" * 64, "read-back"))
    assert problem is not None and "symbolic link" in problem
    # and a put replaces the link, never writes through it
    target.put("volumes/v.tar", io.BytesIO(b"ours"))
    assert (elsewhere / "toybox" / "old.dump").read_bytes() == b"someone else's file"
    assert not (nas / "volumes" / "v.tar").is_symlink()
