"""`reindex` (local): a malformed manifest in BACKUP_DIR is skipped with its name and why, and
never stops the reindex nor leaves a half-cataloged artifact behind."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from conftest import Env
from test_integrity import TREE, _plant_dump, catalog, run_ok

from toybox_backupd.core import manifests
from toybox_backupd.store import Store

PAST = "2026-01-20T08:00:00+00:00"


def _rewrite(path: Path, **changes: object) -> None:
    manifest = manifests.manifest_path(path)
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, **changes}))


def _copy_full(source: Path, stamp: str, index: bytes) -> str:
    """A copy of the full at `source` under another stamp, with this file index; its path."""
    copy = source.with_name(source.name.replace(source.name.split("_")[-2], stamp))
    shutil.copyfile(source, copy)
    shutil.copyfile(manifests.manifest_path(source), manifests.manifest_path(copy))
    _rewrite(copy, file=copy.name, created_at=PAST)
    manifests.index_path(copy).write_bytes(index)
    return str(copy.relative_to(source.parents[2]))


def test_a_malformed_manifest_is_skipped_by_name_and_reindex_goes_on(
        plain_env: Env, make_volume: Callable[..., str]) -> None:
    env = plain_env
    volume = make_volume(TREE)
    env.values["BACKUP_VOLUMES"] = volume
    run_ok(env, "backup", "full")
    [full] = catalog(env)
    root = env.backup_dir
    bad = {  # each well-formed JSON by the tool, with one field of the wrong shape
        "logical/toybox/toybox_20260120-170001.sql.gz": {"extra": ["format", "plain"]},
        "logical/toybox/toybox_20260120-170002.sql.gz": {"base": {"path": "x"}},
        "logical/toybox/toybox_20260120-170003.sql.gz": {"deleted": [1, 2]},
        "logical/toybox/toybox_20260120-170004.sql.gz": {"deleted": "uploads/a.jpg"},
    }
    for relative, changes in bad.items():
        _rewrite(_plant_dump(root, relative, "SELECT 1;", created_at=PAST), **changes)
    # copies of the real full whose file index is not a gzip file, or not rows of files
    source = root / full.path
    for stamp, index in (("170005", b"not gzip"), ("170006", gzip.compress(b'["only", "two"]\n'))):
        bad[_copy_full(source, f"20260120-{stamp}", index)] = {}
    good = _plant_dump(root, "logical/toybox/toybox_20260120-170000.sql.gz", "SELECT 1;",
                       created_at=PAST)

    shutil.rmtree(env.state_dir)
    result = run_ok(env, "reindex")
    for relative in bad:
        assert f"skipped {relative}: " in result.stdout, result.stdout
    assert f"2 artifact(s) added to the catalog, {len(bad)} skipped" in result.stdout, result.stdout
    assert sorted(item.path for item in catalog(env, statuses=("ok", "corrupt", "deleted"))) == \
        sorted([full.path, str(good.relative_to(root))])
    [again] = catalog(env, tier="full")
    with Store(env.state_dir) as history:
        assert len(list(history.files(again.id))) == full.extra["files"]
