"""Backups readable by no one else, and secrets masked without mangling text (issue 13,
items 1 and 7), through the real CLI against a real engine and PostgreSQL."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

from conftest import PG, Env

from toybox_backupd.store import Store


def modes(*roots: Path) -> dict[str, set[str]]:
    """{"files": {...modes}, "dirs": {...modes}} of everything under `roots` (roots included)."""
    found: dict[str, set[str]] = {"files": set(), "dirs": set()}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            mode = path.lstat().st_mode
            kind = "dirs" if stat.S_ISDIR(mode) else "files"
            found[kind].add(f"{stat.S_IMODE(mode):04o}")
    return found


def test_every_file_the_tool_writes_is_private(env: Env, pg: PG,
                                               make_volume: Callable[..., str]) -> None:
    volume = make_volume("mkdir -p uploads && echo photo > uploads/a.jpg")
    for args in (("backup", "logical"), ("backup", "full"), ("backup", "diff")):
        result = env.cli(*args, BACKUP_VOLUMES=volume)
        assert result.returncode == 0, result.stderr
    written = modes(env.backup_dir, env.state_dir)
    assert written == {"files": {"0600"}, "dirs": {"0700"}}, written
    assert (env.state_dir / "history.sqlite3").exists()
    assert len(list(env.backup_dir.rglob("*.manifest.json"))) == 3  # the dump, the full, the diff

    # for a backup-reading group
    group = env.tmp / "group"
    values = {"BACKUP_DIR": str(group / "backups"), "STATE_DIR": str(group / "state"),
              "BACKUP_FILE_MODE": "0640"}
    assert env.cli("backup", "logical", **values).returncode == 0
    assert modes(group) == {"files": {"0640"}, "dirs": {"0750"}}, modes(group)

    # check says when existing files are more open (written by an older version, or by hand)
    assert "ok    permissions" in env.cli("check").stdout
    dump = next(env.backup_dir.rglob("*.dump"))
    dump.chmod(0o644)
    checked = env.cli("check")
    line = next(line for line in checked.stdout.splitlines() if "permissions" in line)
    assert line.startswith("WARN") and f"{dump} 0644" in line and "chmod -R go-rwx" in line


def test_a_weak_password_is_not_masked_into_other_text(plain_env: Env) -> None:
    """With POSTGRES_PASSWORD=postgres the old masking showed `backend_***_data`: mangled, and
    telling the password. A weak secret is reported as weak instead."""
    weak = {"POSTGRES_PASSWORD": "postgres", "BACKUP_VOLUMES": "backend_postgres_data",
            "VOLUME_FULL_SCHEDULE": "30 17 * * 0"}
    result = plain_env.cli("backup", "full", **weak)
    assert result.returncode == 1
    assert "no such Docker volume: backend_postgres_data" in result.stderr, result.stderr
    assert "***" not in result.stderr
    with Store(plain_env.state_dir) as store:
        [run] = store.runs(limit=1)
    assert run.error and "backend_postgres_data" in run.error and "***" not in run.error
    checked = plain_env.cli("check", **weak)
    line = next(line for line in checked.stdout.splitlines() if "secrets" in line)
    assert line.startswith("WARN") and "POSTGRES_PASSWORD is weak" in line
    # a strong password is still masked wherever it would appear
    strong = "Xq7-long-and-random-9f3k"
    leaked = plain_env.cli("backup", "full", POSTGRES_PASSWORD=strong,
                           BACKUP_VOLUMES=f"vol-{strong}", VOLUME_FULL_SCHEDULE="30 17 * * 0")
    assert strong not in leaked.stderr and "vol-***" in leaked.stderr
    assert "ok    secrets" in plain_env.cli("check", POSTGRES_PASSWORD=strong).stdout
