"""Issue 12, integrity: a cut tar stream is a failed run, reindex trusts only the tool's own
layout, deleted rows can come back, and a run leaves no orphans behind."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import BASE_IMAGE, PG, Env

from toybox_backupd.core import atomic, manifests
from toybox_backupd.store import Store

TREE = r"""
mkdir -p docs uploads/2026-01-25
echo 'hello world' > docs/note.txt
head -c 200000 /dev/urandom > uploads/2026-01-25/photo1.jpg
printf 'last\n' > zz-last.txt
"""

# A `tar` that runs the real GNU tar into a temporary file, finds where its last member starts
# (`tar -tvR` gives each member's header block and size; a pax header sits right before it),
# writes only the bytes before that member, and exits 0: a stream cut at a header boundary.
# GNU tar's archive, cut right before its last member's header, written where it was asked to
# go (--file=F: stdout, or the FIFO of the data path), and exit 0
CUT_TAR = r"""#!/bin/sh
tmp=$(mktemp)
out=-
for arg do
  shift
  case $arg in
    --file=*) out=${arg#--file=}; set -- "$@" "--file=$tmp" ;;
    *) set -- "$@" "$arg" ;;
  esac
done
/usr/bin/tar "$@" || exit $?
cut=$(/usr/bin/tar -tvR -f "$tmp" | awk '$1 == "block" && $3 != "**" {
    prev = block; prevsize = size; block = $2 + 0; size = $5 }
  END { print (prev + 1 + int((prevsize + 511) / 512)) * 512 }')
if [ "$out" = - ]; then head -c "$cut" "$tmp"; else head -c "$cut" "$tmp" > "$out"; fi
rm -f "$tmp"
exit 0
"""
CUT_TAR_DOCKERFILE = f"FROM {BASE_IMAGE}\nCOPY tar /usr/local/bin/tar\nRUN chmod 755 /usr/local/bin/tar\n"


def build_test_image(client: Any, name: str, files: dict[str, str]) -> str:
    """Build an image from these files once: its tag carries a hash of them, so it is reused."""
    digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:12]
    tag = f"{name}:{digest}"
    try:
        client.images.get(tag)
        return tag
    except Exception:
        pass
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for filename, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(filename)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True,
                        network_mode="none")
    return tag


@pytest.fixture(scope="session")
def cut_tar_image(docker_engine: Any, images: Any) -> str:
    return build_test_image(docker_engine, "toybox-test/cut-tar",
                            {"Dockerfile": CUT_TAR_DOCKERFILE, "tar": CUT_TAR})


def catalog(env: Env, tier: str | None = None, statuses: tuple[str, ...] = ("ok",)) -> list[Any]:
    with Store(env.state_dir) as history:
        return history.artifacts(tier=tier, statuses=statuses)


def last_run(env: Env) -> Any:
    with Store(env.state_dir) as history:
        return history.runs(limit=1)[0]


def files_under(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def run_ok(env: Env, *args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
    result = env.cli(*args, **overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# 7. a cut tar stream is a failed run, never an artifact ---------------------------------------
@pytest.mark.parametrize("transport", ["fifo", "exec"])
def test_archive_cut_at_a_header_boundary_fails_the_run(
        plain_env: Env, make_volume: Callable[..., str], cut_tar_image: str,
        transport: str) -> None:
    env = plain_env
    volume = make_volume(TREE)
    env.values.update(BACKUP_VOLUMES=volume, TOYBOX_BACKUPD_TRANSPORT=transport)
    result = env.cli("backup", "full", HELPER_IMAGE=cut_tar_image)
    assert result.returncode != 0, result.stdout + result.stderr
    run = last_run(env)
    assert run.status == "failed"
    assert "end-of-archive marker" in run.error, run.error
    assert catalog(env, statuses=("ok", "corrupt", "deleted")) == []
    assert files_under(env.backup_dir) == []
    # the same volume through the real tar is a good archive
    run_ok(env, "backup", "full")
    assert [item.tier for item in catalog(env)] == ["full"]


def _archive(names: list[str]) -> tuple[bytes, list[int]]:
    """A posix tar of small files, and where each member (with its pax header) starts."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            data = f"{name}\n".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"comment": "x"}  # every member has a pax header, as GNU tar's do
            tar.addfile(info, io.BytesIO(data))
    data = raw.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        offsets = [member.offset for member in tar.getmembers()]
    return data, offsets


def _plant_archive(env: Env, volume: str, data: bytes, files: int) -> Path:
    directory = env.backup_dir / "volumes" / volume
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{volume}_20260126-173000_full.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    manifests.write_manifest(path, {
        "tool": "toybox-backupd", "tier": "full", "target": volume,
        "created_at": "2026-01-26T08:30:00+00:00", "size": path.stat().st_size,
        "sha256": atomic.sha256_of(path), "file": path.name, "base": None, "deleted": [],
        "extra": {"compression": "zstd", "files": files},
    })
    return path


def test_verify_requires_the_end_of_archive_marker(plain_env: Env) -> None:
    env = plain_env
    data, offsets = _archive(["a.txt", "b.txt", "c.txt"])
    # cut where the last member's header starts: the checksum and the member count still match
    _plant_archive(env, "cutvol", data[:offsets[-1]], files=2)
    _plant_archive(env, "goodvol", data, files=3)
    run_ok(env, "reindex")
    verify = env.cli("verify", "--json")
    assert verify.returncode != 0, verify.stdout + verify.stderr
    verdicts = {item["target"]: item for item in json.loads(verify.stdout)}
    assert verdicts["goodvol"]["ok"], verdicts["goodvol"]
    assert not verdicts["cutvol"]["ok"]
    assert "end-of-archive marker" in verdicts["cutvol"]["problem"]


# 9. reindex trusts only the tool's own layout; pg tools run as postgres ---------------------------
def _plant_dump(root: Path, relative: str, sql: str, *, created_at: str, target: str = "toybox",
                tier: str = "logical", file: str | None = None) -> Path:
    """A plain-format dump and its manifest, as the tool would write them (or nearly)."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress((sql + "\n-- PostgreSQL database dump complete\n").encode()))
    manifests.write_manifest(path, {
        "tool": "toybox-backupd", "tier": tier, "target": target, "created_at": created_at,
        "size": path.stat().st_size, "sha256": atomic.sha256_of(path),
        "file": file or path.name, "extra": {"format": "plain", "database": target},
    })
    return path


WHOAMI = "\\! id -un > /tmp/toybox-whoami\nCREATE TABLE probe (x int);"


def test_reindex_accepts_only_the_tools_own_layout(env: Env, pg: PG) -> None:
    run_ok(env, "backup", "logical")
    [real] = catalog(env)
    root = env.backup_dir
    past, future = "2026-01-20T08:00:00+00:00", "2099-12-31T08:00:00+00:00"
    foreign = {
        # runbook 4 restored a user's upload into /backups/restore: a dump with its manifest
        "restore/uploads/toybox_20991231-170000.sql.gz": {"created_at": future},
        "restore/toybox_20260120-170000.sql.gz": {"created_at": past},
        # in the layout, but dated in the future: it would become the latest dump
        "logical/toybox/toybox_20991231-170000.sql.gz": {"created_at": future},
        # names that do not match: another database's directory, another file name, another tier
        "logical/other/toybox_20260120-170000.sql.gz": {"created_at": past},
        "logical/toybox/evil_20260120-170000.sql.gz": {"created_at": past},
        "logical/toybox/toybox_20260120-170001.sql.gz": {"created_at": past, "file": "x.sql.gz"},
        "volumes/toybox/toybox_20260120-170000_full.tar.gz": {"created_at": past},
        "logical/toybox/deeper/toybox_20260120-170000.sql.gz": {"created_at": past},
    }
    for relative, fields in foreign.items():
        _plant_dump(root, relative, WHOAMI, **fields)
    good = _plant_dump(root, "logical/toybox/toybox_20260120-170000-2.sql.gz", "SELECT 1;",
                       created_at=past)
    shutil.rmtree(env.state_dir)
    result = run_ok(env, "reindex")
    assert "2 artifact(s) added" in result.stdout, result.stdout
    for relative in foreign:
        if not relative.startswith("restore/") and "deeper" not in relative:
            assert f"skipped {relative}" in result.stdout, result.stdout
    assert sorted(item.path for item in catalog(env)) == sorted(
        [real.path, str(good.relative_to(root))])
    # the newest dump is the real one, and restoring it runs nothing of the planted ones
    run_ok(env, "restore", "db", "--into", "toybox_check")
    assert pg.snapshot("toybox_check") == pg.snapshot()
    assert pg.container.exec_run(["test", "-e", "/tmp/toybox-whoami"]).exit_code != 0


def test_pg_tools_run_as_postgres_in_the_database_container(env: Env, pg: PG) -> None:
    _plant_dump(env.backup_dir, "logical/toybox/toybox_20260120-170000.sql.gz", WHOAMI,
                created_at="2026-01-20T08:00:00+00:00")
    run_ok(env, "reindex")
    run_ok(env, "restore", "db", "--into", "toybox_probe")
    whoami = pg.container.exec_run(["cat", "/tmp/toybox-whoami"])
    assert whoami.exit_code == 0 and whoami.output.decode().strip() == "postgres"
    # and the tools still work as that user: a real dump, verified and restored
    run_ok(env, "backup", "logical")
    verified = run_ok(env, "verify").stdout
    assert ".dump" in verified and "CORRUPT" not in verified, verified
    run_ok(env, "restore", "db", "--into", "toybox_copy")
    assert pg.snapshot("toybox_copy") == pg.snapshot()


# 10. a backup deleted by retention and copied back by hand comes back with reindex --------------
def test_reindex_brings_back_a_deleted_backup_copied_back_by_hand(
        plain_env: Env, make_volume: Callable[..., str], tmp_path: Path) -> None:
    from toybox_backupd.actions import retention

    env = plain_env
    volume = make_volume(TREE)
    env.values["BACKUP_VOLUMES"] = volume
    run_ok(env, "backup", "full")
    [item] = catalog(env)
    offsite = tmp_path / "offsite"
    shutil.copytree(env.backup_dir, offsite)
    settings = env.settings()
    with Store(env.state_dir) as history:
        assert retention.delete_artifact(settings, history, item, "older than 14 days")
    assert catalog(env) == [] and files_under(env.backup_dir) == []
    # the operator copies it back from where the backups are kept, and reindexes
    shutil.copytree(offsite, env.backup_dir, dirs_exist_ok=True)
    result = run_ok(env, "reindex")
    assert "1 artifact(s) added" in result.stdout, result.stdout
    [back] = catalog(env)
    assert (back.id, back.path, back.sha256, back.status) == (item.id, item.path, item.sha256, "ok")
    with Store(env.state_dir) as history:
        assert len(list(history.files(back.id))) == item.extra["files"]  # its file index too
    dest = tmp_path / "out"
    run_ok(env, "restore", "files", volume, "docs", "--dest", str(dest))
    assert (dest / "docs/note.txt").read_text() == "hello world\n"
    assert "0 artifact(s) added" in run_ok(env, "reindex").stdout


# 11. no orphans: an artifact, its companions, manifest and catalog row come together or not at all
def test_a_dump_whose_roles_dump_fails_leaves_no_file(env: Env, pg: PG) -> None:
    run_ok(env, "backup", "logical")
    before = files_under(env.backup_dir)
    [older] = catalog(env)
    # pg_dump of the database works; pg_dumpall (which needs postgres or template1) cannot connect
    pg.psql("ALTER DATABASE postgres ALLOW_CONNECTIONS false; "
            "ALTER DATABASE template1 ALLOW_CONNECTIONS false")
    result = env.cli("backup", "logical")
    assert result.returncode != 0
    run = last_run(env)
    assert run.status == "failed" and "pg_dumpall" in run.error, run.error
    assert files_under(env.backup_dir) == before  # no dump without its roles, manifest and row
    assert catalog(env) == [older]


@pytest.mark.parametrize("obstacle", ["index", "catalog row"])
def test_an_archive_that_cannot_be_cataloged_leaves_no_file(
        plain_env: Env, make_volume: Callable[..., str], obstacle: str) -> None:
    from datetime import UTC, datetime, timedelta
    from zoneinfo import ZoneInfo

    env = plain_env
    volume = make_volume(TREE)
    env.values["BACKUP_VOLUMES"] = volume
    directory = env.backup_dir / "volumes" / volume
    directory.mkdir(parents=True)
    # for every name the archive may get in the next half hour, something in the way after the
    # archive is complete: a directory where its file index's partial goes, or a (deleted)
    # catalog row with its path, as after a clock that went back
    now = datetime.now(ZoneInfo("Asia/Tokyo"))
    with Store(env.state_dir) as history:
        for second in range(-5, 1800):
            stamp = (now + timedelta(seconds=second)).strftime("%Y%m%d-%H%M%S")
            name = f"{volume}_{stamp}_full.tar.zst"
            if obstacle == "index":
                (directory / f"{name}.index.jsonl.gz.partial").mkdir()
                continue
            row = history.add_artifact(
                run_id=None, tier="full", target=volume, path=f"volumes/{volume}/{name}",
                created_at=datetime(2025, 1, 1, tzinfo=UTC), size=1, sha256="0" * 64)
            history.set_artifact_status(row, "deleted")
    result = env.cli("backup", "full")
    assert result.returncode != 0
    assert last_run(env).status == "failed"
    assert catalog(env, statuses=("ok", "corrupt")) == []
    assert [p.name for p in directory.iterdir() if not p.is_dir()] == []


def test_unknown_files_lists_what_the_catalog_does_not_know(
        plain_env: Env, make_volume: Callable[..., str]) -> None:
    from toybox_backupd.catalog import reindex

    env = plain_env
    volume = make_volume(TREE)
    env.values["BACKUP_VOLUMES"] = volume
    run_ok(env, "backup", "full")
    [item] = catalog(env)
    root = env.backup_dir
    stray = {f"volumes/{volume}/{volume}_20260101-000000_full.tar.zst",  # an orphan archive
             f"volumes/{volume}/notes.txt", "logical/toybox/toybox_20260101-170000.dump"}
    for relative in stray:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x")
    (root / "restore").mkdir()
    (root / "restore" / "upload.jpg").write_bytes(b"not under logical/ or volumes/")
    (root / f"volumes/{volume}/in-progress.tar.zst.partial").write_bytes(b"being written")
    with Store(env.state_dir) as history:
        assert set(reindex.unknown_files(root, history)) == stray
        history.set_artifact_status(item.id, "deleted")  # dropped from the catalog
        assert set(reindex.unknown_files(root, history)) == stray | {
            item.path, item.path + manifests.MANIFEST_SUFFIX, item.path + manifests.INDEX_SUFFIX}


def test_write_behind_writes_every_byte_and_raises_the_writers_error(tmp_path: Path) -> None:
    """The thread that writes and hashes an archive's output: the same bytes and sha256 as a
    direct write, in order; a write error on that thread (a full disk) reaches the caller and
    no write after it blocks or lands."""
    chunks = [bytes([i % 251]) * (1000 + i) for i in range(300)]
    with atomic.AtomicFile(tmp_path / "out.bin") as out:
        with atomic.write_behind(out) as behind:
            for chunk in chunks:
                behind.write(memoryview(chunk))
        out.commit()
    data = (tmp_path / "out.bin").read_bytes()
    assert data == b"".join(chunks)
    assert out.sha256 == hashlib.sha256(data).hexdigest() and out.size == len(data)

    class Full(atomic.AtomicFile):
        def write(self, data: bytes | bytearray | memoryview) -> int:
            if self.size > 50_000:
                raise OSError(28, "No space left on device")
            return super().write(data)

    raised: list[BaseException] = []
    with Full(tmp_path / "full.bin") as out:
        try:
            with atomic.write_behind(out) as behind:
                for chunk in chunks * 10:  # far more than the queue holds
                    behind.write(chunk)
        except OSError as exc:
            raised.append(exc)
    assert raised and "No space left" in str(raised[0])
    assert not (tmp_path / "full.bin").exists() and not (tmp_path / "full.bin.partial").exists()
