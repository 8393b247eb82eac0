"""Retention: backdated catalog rows with real files in a scratch BACKUP_DIR."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from toybox_backupd.actions import retention
from toybox_backupd.core import atomic, manifests
from toybox_backupd.core.manifests import INDEX_SUFFIX
from toybox_backupd.store import Artifact, Store

NOW = datetime(2026, 1, 26, 8, 45, tzinfo=UTC)  # 17:45 in Tokyo


@dataclass
class Catalog:
    settings: Any
    history: Store
    now: datetime = NOW

    @property
    def root(self) -> Path:
        return Path(self.settings.backup_dir)

    def add(self, tier: str, target: str, age_days: float, *, base: int | None = None,
            status: str = "ok", name: str | None = None, globals_file: bool = True,
            run_id: int | None = None) -> Artifact:
        created = self.now - timedelta(days=age_days)
        stamp = created.strftime("%Y%m%d-%H%M%S")
        if tier == "logical":
            relative = f"logical/{target}/{name or target}_{stamp}.dump"
        else:
            relative = f"{tier}/{target}/{name or target}_{stamp}.tar.zst"
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(100 + int(abs(age_days) * 10))
        path.write_bytes(data)
        manifests.write_manifest(path, {"tool": "toybox-backupd", "tier": tier, "target": target})
        extra: dict[str, Any] = {}
        if tier == "logical" and globals_file:
            gpath = path.with_name(path.name.removesuffix(".dump") + ".globals.sql.gz")
            gpath.write_bytes(b"globals")
            extra["globals"] = {"path": str(gpath.relative_to(self.root)), "size": 7}
        if tier in ("full", "diff"):
            (self.root / (relative + INDEX_SUFFIX)).write_bytes(b"index")
        artifact_id = self.history.add_artifact(
            run_id=run_id, tier=tier, target=target, path=relative, created_at=created,
            size=len(data), sha256=atomic.sha256_of(path), base_id=base, extra=extra)
        if status != "ok":
            self.history.set_artifact_status(artifact_id, status)
        item = self.history.artifact(artifact_id)
        assert item is not None
        return item

    def run(self, job: str, status: str = "ok") -> int:
        run_id = self.history.open_run(job, "x", "schedule")
        if status != "running":
            self.history.close_run(run_id, status, error=None if status == "ok" else "boom")
        return run_id

    def files(self) -> set[str]:
        return {str(path.relative_to(self.root)) for path in self.root.rglob("*") if path.is_file()}

    def status(self, item: Artifact) -> str:
        row = self.history.artifact(item.id)
        assert row is not None
        return row.status


@pytest.fixture
def cat(plain_env) -> Any:  # type: ignore[no-untyped-def]
    # No schedules: these tests are about which files go and which stay by age, chain and
    # ownership; a schedule's worth of newest backups kept has its own tests (`scheduled`).
    settings = plain_env.settings(PGDUMP_KEEP_DAYS="7", VOLUME_KEEP_DAYS="14",
                                  BACKUP_VOLUMES="media", PGDUMP_SCHEDULE="")
    settings.backup_dir.mkdir(parents=True, exist_ok=True)
    with Store(settings.state_dir) as history:
        yield Catalog(settings, history)


@pytest.fixture
def scheduled(plain_env) -> Any:  # type: ignore[no-untyped-def]
    """The seed's schedules: daily dumps kept 7 days, weekly fulls and daily diffs 14 days."""
    settings = plain_env.settings(PGDUMP_KEEP_DAYS="7", VOLUME_KEEP_DAYS="14",
                                  BACKUP_VOLUMES="media", PGDUMP_SCHEDULE="0 17 * * *",
                                  VOLUME_FULL_SCHEDULE="30 17 * * 0",
                                  VOLUME_DIFF_SCHEDULE="45 17 * * *")
    settings.backup_dir.mkdir(parents=True, exist_ok=True)
    with Store(settings.state_dir) as history:
        yield Catalog(settings, history)


def companions(item: Artifact) -> set[str]:
    names = {item.path, item.path + manifests.MANIFEST_SUFFIX}
    if item.tier == "logical":
        names |= {item.extra["globals"]["path"]}
    else:
        names |= {item.path + INDEX_SUFFIX}
    return names


# the pure plan ---------------------------------------------------------------------------------
def test_plan_keeps_young_and_newest(cat: Catalog) -> None:
    dumps = [cat.add("logical", "toybox", age) for age in (9, 8, 7.01, 6.9, 3, 0)]
    decided = retention.plan(dumps, now=NOW, keep_days={"logical": 7, "full": 14, "diff": 14})
    assert decided.delete_ids == [dumps[0].id, dumps[1].id, dumps[2].id]
    assert "PGDUMP_KEEP_DAYS" in decided.reasons[dumps[0].id]
    assert set(decided.kept) == {d.id for d in dumps[3:]}


def test_plan_newest_good_survives_any_age(cat: Catalog) -> None:
    # the daemon was off for a month: every dump is old, the newest good one stays
    old = [cat.add("logical", "toybox", age) for age in (40, 35, 31)]
    corrupt = cat.add("logical", "toybox", 30, status="corrupt")
    items = [*old, corrupt]
    decided = retention.plan(items, now=NOW, keep_days={"logical": 7, "full": 14, "diff": 14})
    assert decided.delete_ids == [old[0].id, old[1].id, corrupt.id]
    assert "newest good" in decided.kept[old[2].id]
    # per target: another database's newest dump is kept too
    other = cat.add("logical", "other", 50)
    decided = retention.plan([*items, other], now=NOW,
                             keep_days={"logical": 7, "full": 14, "diff": 14})
    assert other.id in decided.kept


def test_plan_chain_keeps_the_full_a_kept_diff_needs(cat: Catalog) -> None:
    f1 = cat.add("full", "media", 20)
    d1a = cat.add("diff", "media", 18, base=f1.id)
    d1b = cat.add("diff", "media", 13, base=f1.id)  # young: its full must stay
    f2 = cat.add("full", "media", 12)
    d2 = cat.add("diff", "media", 1, base=f2.id)
    items = [f1, d1a, d1b, f2, d2]
    keep = {"logical": 7, "full": 14, "diff": 14}
    decided = retention.plan(items, now=NOW, keep_days=keep)
    assert decided.delete_ids == [d1a.id]
    assert "base of kept differential" in decided.kept[f1.id]
    # two days later d1b is past 14 days: the full it needed goes with it, diff first
    decided = retention.plan(items, now=NOW + timedelta(days=2), keep_days=keep)
    assert decided.delete_ids == [d1a.id, d1b.id, f1.id]
    # a week later still: f2 is the newest full, so it stays, and d2 (the newest diff) needs it
    decided = retention.plan(items, now=NOW + timedelta(days=40), keep_days=keep)
    assert set(decided.kept) == {f2.id, d2.id}


def test_plan_newest_diff_keeps_its_old_full(cat: Catalog) -> None:
    # no full for a long time (the weekly full has been failing): the chain stays restorable
    f1 = cat.add("full", "media", 30)
    f2 = cat.add("full", "media", 25, status="corrupt")
    d = cat.add("diff", "media", 20, base=f1.id)
    decided = retention.plan([f1, f2, d], now=NOW, keep_days={"logical": 7, "full": 14, "diff": 14})
    assert decided.delete_ids == [f2.id]
    assert set(decided.kept) == {f1.id, d.id}


# applying it -------------------------------------------------------------------------------------
def test_apply_deletes_files_and_marks_rows(cat: Catalog) -> None:
    dumps = [cat.add("logical", "toybox", age) for age in (9, 8, 1)]
    cat.run("logical", "ok")
    deleted = retention.apply(cat.settings, cat.history, "logical", ["toybox"], now=NOW)
    assert deleted == [dumps[0].path, dumps[1].path]
    files = cat.files()
    for item in dumps[:2]:
        assert not companions(item) & files
        assert cat.status(item) == "deleted"
    assert companions(dumps[2]) <= files
    assert cat.status(dumps[2]) == "ok"
    # nothing left to do on a second pass
    assert retention.apply(cat.settings, cat.history, "logical", ["toybox"], now=NOW) == []


def test_apply_chain_on_disk(cat: Catalog) -> None:
    f1 = cat.add("full", "media", 20)
    d1a = cat.add("diff", "media", 18, base=f1.id)
    d1b = cat.add("diff", "media", 13, base=f1.id)
    f2 = cat.add("full", "media", 12)
    d2 = cat.add("diff", "media", 1, base=f2.id)
    cat.history.add_files(f1.id, [("a.txt", "f", 1, 1, 1, 1, 0o644, 0, 0, None, None)])
    cat.run("diff", "ok")
    assert retention.apply(cat.settings, cat.history, "diff", ["media"], now=NOW) == [d1a.path]
    files = cat.files()
    assert companions(f1) <= files and companions(d1b) <= files
    assert list(cat.history.files(f1.id))
    later = NOW + timedelta(days=2)
    assert retention.apply(cat.settings, cat.history, "diff", ["media"], now=later) == [
        d1b.path, f1.path]
    files = cat.files()
    assert not (companions(f1) | companions(d1b)) & files
    assert companions(f2) | companions(d2) <= files
    assert not list(cat.history.files(f1.id))  # the file index of a deleted full is dropped


def test_foreign_files_are_never_deleted(cat: Catalog, tmp_path: Path) -> None:
    root = cat.root
    old = cat.add("logical", "toybox", 30)
    cat.add("logical", "toybox", 0)
    # files the catalog did not write, right next to ours, some looking like ours
    foreign = {
        "logical/toybox/notes.txt": b"keep me",
        "logical/toybox/toybox_20250101-170000.dump": b"PGDMP a dump made by hand",
        "logical/toybox/toybox_20250101-170000.dump.manifest.json": b'{"tool": "other"}',
        "README": b"operator notes",
    }
    for relative, data in foreign.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    # a catalog row pointing outside BACKUP_DIR, and one whose file was replaced by another
    outside = tmp_path / "outside.dump"
    outside.write_bytes(b"not in the backup dir")
    escaped = cat.history.add_artifact(
        run_id=None, tier="logical", target="toybox", path="../outside.dump",
        created_at=NOW - timedelta(days=40), size=outside.stat().st_size, sha256="0" * 64)
    replaced = cat.add("logical", "toybox", 20)
    (root / replaced.path).write_bytes(b"someone else's file now, of another size")
    # a manifest at our companion's path that is not ours
    (root / (old.path + manifests.MANIFEST_SUFFIX)).write_text(json.dumps({"tool": "other"}))
    cat.run("logical", "ok")

    deleted = retention.apply(cat.settings, cat.history, "logical", ["toybox"], now=NOW)

    assert deleted == [old.path]
    files = cat.files()
    assert set(foreign) <= files
    assert outside.exists()
    assert replaced.path in files  # left alone...
    assert cat.status(replaced) == "deleted"  # ...and no longer offered as a restore point
    assert old.path + manifests.MANIFEST_SUFFIX in files  # not ours: kept
    assert old.path not in files and old.extra["globals"]["path"] not in files
    row = cat.history.artifact(escaped)
    assert row is not None and row.status == "ok"


def test_symlinked_artifact_is_not_followed(cat: Catalog, tmp_path: Path) -> None:
    target = tmp_path / "precious.bin"
    target.write_bytes(b"x" * 50)
    item = cat.add("logical", "toybox", 30)
    cat.add("logical", "toybox", 0)
    path = cat.root / item.path
    path.unlink()
    path.symlink_to(target)
    cat.run("logical", "ok")
    assert retention.apply(cat.settings, cat.history, "logical", ["toybox"], now=NOW) == []
    assert target.read_bytes() == b"x" * 50


@pytest.mark.parametrize("last", ["failed", "interrupted", "other-process", None])
def test_no_prune_after_a_failed_run(cat: Catalog, last: str | None) -> None:
    dumps = [cat.add("logical", "toybox", age) for age in (30, 20, 10)]
    cat.run("logical", "ok")
    cat.run("full", "ok")  # another job's success does not count
    if last == "other-process":
        run_id = cat.run("logical", "running")
        with cat.history.tx() as db:
            db.execute("UPDATE runs SET pid=? WHERE id=?", (os.getpid() + 100000, run_id))
    elif last is not None:
        cat.run("logical", last)
    else:
        with cat.history.tx() as db:
            db.execute("DELETE FROM runs WHERE job='logical'")
    before = cat.files()
    assert retention.apply(cat.settings, cat.history, "logical", ["toybox"], now=NOW) == []
    assert cat.files() == before
    assert all(cat.status(item) == "ok" for item in dumps)


def test_running_row_of_this_process_counts_as_success(cat: Catalog) -> None:
    # the runner prunes before it closes its own (successful) run row
    dumps = [cat.add("logical", "toybox", age) for age in (30, 0)]
    cat.run("logical", "running")
    assert retention.apply(cat.settings, cat.history, "logical", ["toybox"], now=NOW) == [
        dumps[0].path]


def test_only_the_jobs_targets_are_pruned(cat: Catalog) -> None:
    mine = [cat.add("full", "media", age) for age in (30, 0)]
    theirs = [cat.add("full", "other", age) for age in (30, 0)]
    cat.run("full", "ok")
    assert retention.apply(cat.settings, cat.history, "full", ["media"], now=NOW) == [mine[0].path]
    assert cat.status(theirs[0]) == "ok"


def test_runner_prunes_after_a_real_successful_dump(env) -> None:  # type: ignore[no-untyped-def]
    """End to end: a real pg_dump run through the runner prunes older dumps, keeps the new one."""
    from toybox_backupd.actions.runner import run_job

    settings = env.settings(PGDUMP_KEEP_DAYS="7")  # and the default daily PGDUMP_SCHEDULE
    settings.backup_dir.mkdir(parents=True, exist_ok=True)
    with Store(settings.state_dir) as history:
        cat = Catalog(settings, history, now=datetime.now(UTC))
        old = cat.add("logical", "toybox", 10)
        young = [cat.add("logical", "toybox", age) for age in range(6, 0, -1)]
    run_id = run_job(settings, "logical", trigger="manual")
    with Store(settings.state_dir) as history:
        run = history.run(run_id)
        assert run is not None and run.status == "ok", run.error if run else None
        assert run.details["retention_deleted"] == [old.path]
        assert history.artifact(old.id).status == "deleted"  # type: ignore[union-attr]
        assert all(history.artifact(item.id).status == "ok"  # type: ignore[union-attr]
                   for item in young)
        newest = history.artifacts(tier="logical", target="toybox")[-1]
        assert newest.run_id == run_id
    files = cat.files()
    assert not companions(old) & files
    assert {item.path for item in young} <= files and newest.path in files
    assert newest.extra["globals"]["path"] in files


# a schedule's worth of newest backups, and a clock that jumped ----------------------------------
def test_plan_keeps_a_schedules_worth_of_newest(cat: Catalog) -> None:
    dumps = [cat.add("logical", "toybox", age) for age in (10, 9, 8, 7.5)]
    keep = {"logical": 7, "full": 14, "diff": 14}
    decided = retention.plan(dumps, now=NOW, keep_days=keep, keep_counts={"logical": 3})
    assert decided.delete_ids == [dumps[0].id]
    assert "3 newest good" in decided.kept[dumps[1].id]
    # without counts, only the newest good one outlives its age (as before)
    assert retention.plan(dumps, now=NOW, keep_days=keep).delete_ids == [d.id for d in dumps[:3]]


def test_keep_counts_follow_the_schedules(scheduled: Catalog, plain_env) -> None:  # type: ignore[no-untyped-def]
    assert retention.keep_counts(scheduled.settings, NOW) == {"logical": 7, "full": 2, "diff": 14,
                                                            "base": 7}
    manual = plain_env.settings(PGDUMP_SCHEDULE="", PGDUMP_KEEP_DAYS="7")
    assert retention.keep_counts(manual, NOW)["logical"] == 1


def _run_of(cat: Catalog, job: str) -> int:
    return cat.run(job, "running")


def _finish(cat: Catalog, run_id: int) -> None:
    cat.history.close_run(run_id, "ok")


def test_a_clock_a_year_ahead_costs_no_dumps(scheduled: Catalog) -> None:
    cat = scheduled
    real = [cat.add("logical", "toybox", age) for age in range(6, -1, -1)]  # 7 daily dumps
    jumped = NOW + timedelta(days=365)
    # the first run with the wrong clock: its own dump is stamped a year ahead too
    run_id = _run_of(cat, "logical")
    cat.add("logical", "toybox", -365, run_id=run_id)
    with pytest.raises(retention.Refused, match="clock"):
        retention.apply(cat.settings, cat.history, "logical", ["toybox"], now=jumped)
    _finish(cat, run_id)
    assert all(cat.status(item) == "ok" for item in real)
    # the next days see a one-day gap; each day costs one real dump, as with a right clock,
    # so there are always as many dumps as the schedule makes in the keep window
    gone: list[str] = []
    for day in range(1, 7):  # by then the seven days of the wrong clock made seven dumps
        run_id = _run_of(cat, "logical")
        cat.add("logical", "toybox", -365 - day, run_id=run_id)
        gone += retention.apply(cat.settings, cat.history, "logical", ["toybox"],
                                now=jumped + timedelta(days=day))
        _finish(cat, run_id)
        assert len(cat.history.artifacts(tier="logical", target="toybox")) == 7
        assert [item.path for item in real if cat.status(item) == "deleted"] == [
            item.path for item in real[:day + 1]]
    assert gone == [item.path for item in real]


def test_a_clock_a_year_ahead_costs_no_volume_archives(scheduled: Catalog) -> None:
    cat = scheduled
    fulls = {age: cat.add("full", "media", age) for age in (14.01, 7.01, 0.01)}
    diffs = [cat.add("diff", "media", age, base=fulls[min(a for a in fulls if a > age)].id)
             for age in range(13, -1, -1)]
    jumped = NOW + timedelta(days=365)
    run_id = _run_of(cat, "full")
    future_full = cat.add("full", "media", -365, run_id=run_id)
    with pytest.raises(retention.Refused, match="keep window"):
        retention.apply(cat.settings, cat.history, "full", ["media"], now=jumped)
    _finish(cat, run_id)
    assert len(cat.history.artifacts(target="media")) == 3 + 14 + 1
    # the next day's differential: only the oldest differential goes, as on any normal day
    run_id = _run_of(cat, "diff")
    cat.add("diff", "media", -366, base=future_full.id, run_id=run_id)
    deleted = retention.apply(cat.settings, cat.history, "diff", ["media"],
                              now=jumped + timedelta(days=1))
    _finish(cat, run_id)
    assert deleted == [diffs[0].path]
    assert len(cat.history.artifacts(tier="diff", target="media")) == 14
    assert all(cat.status(item) == "ok" for item in fulls.values())


def test_runner_says_why_it_deleted_nothing_after_a_long_gap(env) -> None:  # type: ignore[no-untyped-def]
    """A real dump after 30 days without one: retention deletes nothing and says why."""
    from toybox_backupd.actions.runner import run_job

    settings = env.settings(PGDUMP_KEEP_DAYS="7")
    settings.backup_dir.mkdir(parents=True, exist_ok=True)
    with Store(settings.state_dir) as history:
        cat = Catalog(settings, history, now=datetime.now(UTC))
        old = [cat.add("logical", "toybox", age) for age in (32, 31, 30)]
    run_id = run_job(settings, "logical", trigger="manual")
    with Store(settings.state_dir) as history:
        run = history.run(run_id)
        assert run is not None and run.status == "ok", run.error if run else None
        assert run.details["retention_deleted"] == []
        assert "clock jumped ahead or nothing was backed up" in run.details["retention_refused"]
        assert all(history.artifact(item.id).status == "ok"  # type: ignore[union-attr]
                   for item in old)
