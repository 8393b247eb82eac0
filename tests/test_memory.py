"""The daemon's allocator settings (daemon/memory.py): they take on this glibc system, and a
freed burst of thread-allocated buffers goes back to the system."""

from __future__ import annotations

import threading
from pathlib import Path

from toybox_backupd.daemon import memory


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_arenas_are_limited_and_freed_memory_goes_back() -> None:
    assert memory.limit_arenas()
    before = _rss_kb()
    held: list[bytearray] = []
    kept: list[bytearray] = []  # small objects that outlive the run, between its buffers

    def burst() -> None:  # many mid-sized buffers, as a run's threads make them
        for _ in range(2000):
            held.append(bytearray(64 * 1024))
            kept.append(bytearray(600))

    workers = [threading.Thread(target=burst) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    peak = _rss_kb()
    assert peak - before > 200_000  # ~256 MB touched
    held.clear()
    memory.release()
    assert _rss_kb() - before < (peak - before) / 4, (before, peak, _rss_kb())
