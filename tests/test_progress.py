"""Progress of restores, verify and manual backups: an updating line on a terminal (bytes done
of the total, rate, ETA), plain lines otherwise; the daemon (nobody listening) prints nothing."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from test_restore_db import _on_a_terminal

from toybox_backupd import cli
from toybox_backupd.core import progress


def test_progress_counts_into_the_innermost_task_and_says_what_is_left() -> None:
    seen: list[tuple[str, int, bool]] = []
    progress.advance(10)  # nobody listens: nothing happens
    listener = lambda item: seen.append((item.label, item.done, item.ended))  # noqa: E731
    with progress.listening(listener), progress.task("outer", 100):
        progress.advance(30)
        with progress.task("inner", 10):
            progress.advance(10)
        progress.advance(20)
    assert seen[0] == ("outer", 0, False) and seen[-1] == ("outer", 50, True)
    assert ("inner", 10, True) in seen
    item = progress.Progress("restoring x", total=4 << 30, done=1 << 30)
    item.started -= 8  # 1 GiB in 8 s: 3 GiB left at 128 MiB/s is 24 s
    text = cli.progress_text(item)
    assert re.fullmatch(r"restoring x: 1\.0 GiB of 4\.0 GiB \(25%\), 12\d\.\d MiB/s, 2\d\.\d s left",
                        text), text
    item.ended = True
    assert cli.progress_text(item).startswith("restoring x: 1.0 GiB in 8.0 s (")


def run_on_a_terminal(env: Any, *args: str) -> tuple[int, str]:
    """The real command on a pseudo-terminal; (exit status, everything it showed)."""
    proc, master = _on_a_terminal(env, *args)
    shown = b""
    try:
        while chunk := os.read(master, 65536):
            shown += chunk
    except OSError:  # the terminal closed: the command ended
        pass
    finally:
        os.close(master)
    return proc.wait(timeout=600), shown.decode(errors="replace")


@pytest.mark.docker
def test_backup_verify_and_restore_show_their_progress(env: Any, pg: Any,
                                                       make_volume: Any) -> None:
    first = env.cli("backup", "logical")
    assert first.returncode == 0, first.stderr
    # no earlier backup: the total is unknown, the end line says how much and how fast
    assert re.search(rf"^logical backup of {pg.db}: [\d.]+ KiB in [\d.]+ s \([\d.]+ [KM]iB/s\)$",
                     first.stderr, re.M), first.stderr
    second = env.cli("backup", "logical")
    assert f"logical backup of {pg.db} (total: the last one's size): " in second.stderr

    verify = env.cli("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    lines = [line for line in verify.stderr.splitlines() if "verifying logical/" in line]
    assert [line[:5] for line in lines] == ["[1/2]", "[2/2]"], verify.stderr
    assert all(" in " in line and "/s)" in line for line in lines)

    status, shown = run_on_a_terminal(env, "restore", "db", "--yes")
    assert status == 0, shown
    # one line rewritten in place: carriage return + erase, from 0 % to the end
    assert "\r\x1b[Kchecking the sha256 of logical/" in shown
    assert re.search(r"\r\x1b\[Krestoring logical/\S+: 0 B of [\d.]+ KiB \(0%\)", shown), shown
    assert re.search(r"\r\x1b\[Krestoring logical/\S+: [\d.]+ KiB in [\d.]+ s", shown), shown

    volume = make_volume("head -c 3000000 /dev/urandom > big.bin")
    env.values["BACKUP_VOLUMES"] = volume
    assert env.cli("backup", "full").returncode == 0
    restored = env.cli("restore", "volume", volume, "--yes")
    assert restored.returncode == 0, restored.stderr
    # no terminal: no rewritten line, only the end of each piece of work
    assert "\r" not in restored.stderr
    assert re.search(rf"^restoring volumes/{volume}/\S+_full\.tar\.zst: [\d.]+ MiB in [\d.]+ s ",
                     restored.stderr, re.M), restored.stderr
