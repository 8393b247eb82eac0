"""Any file name a volume can hold is backed up and restored byte for byte (issue 13, item 2):
a Latin-1 name that is not UTF-8, a name with a newline, a 255-byte name. One such name used to
stop every volume backup, every day (UnicodeEncodeError when the index was stored)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Env, fill_volume

from toybox_backupd.store import Store

# printf escapes for the base image's bash: caf\xe9.jpg (Latin-1), a newline, 255 bytes
MAKE = r"""
mkdir -p 'uploads/zip-'$'\xe9''t'$'\xe9'
printf 'latin-1\n' > uploads/caf$'\xe9'.jpg
printf 'newline\n' > $'line\nbreak.txt'
printf 'long\n' > "$(printf 'n%.0s' $(seq 1 251)).txt"
printf 'inside\n' > 'uploads/zip-'$'\xe9''t'$'\xe9''/r'$'\xe9''sum'$'\xe9''.pdf'
printf 'plain\n' > plain.txt
"""
LIST = r"find . -mindepth 1 -printf '%P\0%s\0' | sort -z | od -An -c | tr -s ' '"


def listing(docker_engine: Any, volume: str) -> str:
    """Every path (as raw bytes, escaped by od) and size in the volume."""
    return fill_volume(docker_engine, volume, LIST)


def test_any_name_survives_full_diff_and_both_restores(
        plain_env: Env, docker_engine: Any, make_volume: Callable[..., str], tmp_path: Path) -> None:
    env = plain_env
    broken = make_volume(MAKE)
    healthy = make_volume("printf 'fine\n' > fine.txt")
    env.values["BACKUP_VOLUMES"] = f"{broken},{healthy}"
    before = listing(docker_engine, broken)
    assert "351" in before or "\\351" in before  # the raw 0xE9 byte is there
    full = env.cli("backup", "full")
    assert full.returncode == 0, full.stderr
    with Store(env.state_dir) as store:  # the healthy volume beside it is archived too
        assert {item.target for item in store.artifacts(tier="full")} == {broken, healthy}
    fill_volume(docker_engine, broken, "printf 'new\\n' > uploads/na$'\\xef've.txt")
    before = listing(docker_engine, broken)
    diff = env.cli("backup", "diff")
    assert diff.returncode == 0, diff.stderr

    # restore volume: into a new volume, then compare every name and size
    copy = make_volume("true")
    restored = env.cli("restore", "volume", broken, "--to", copy, "--yes")
    assert restored.returncode == 0, restored.stderr
    assert listing(docker_engine, copy) == before
    # restore files: the Latin-1 names, byte for byte, on this side
    dest = tmp_path / "out"
    files = env.cli("restore", "files", broken, "uploads", "--dest", str(dest))
    assert files.returncode == 0, files.stderr
    got = sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file())
    raw = sorted(bytes(str(p), "utf-8", "surrogateescape") for p in got)
    assert raw == [b"uploads/caf\xe9.jpg", b"uploads/na\xefve.txt",
                   b"uploads/zip-\xe9t\xe9/r\xe9sum\xe9.pdf"]
    assert (dest / b"uploads/caf\xe9.jpg".decode("utf-8", "surrogateescape")).read_bytes() \
        == b"latin-1\n"
