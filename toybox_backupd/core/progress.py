"""Progress of long work: bytes done of a total, told to whoever listens (the CLI prints it).

Library code marks a piece of work with `task(label, total)` and the readers and writers of the
data path call `advance(n)` for the bytes they move (the artifact files read by a restore or
`verify`, written by a backup). Nobody listens in the daemon: then both cost next to nothing.
The CLI listens (`listening(callback)`) and decides how to show it (an updating line on a
terminal, plain lines otherwise). The callback runs on whichever thread moved the bytes, at
most every REPORT_SECONDS, and once more when the task ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

REPORT_SECONDS = 0.25


@dataclass
class Progress:
    label: str
    total: int | None  # bytes expected (None: unknown)
    done: int = 0
    ended: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-6)

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.done / self.elapsed

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far (None if unknown)."""
        if not self.total or not self.done or self.done >= self.total:
            return None
        return (self.total - self.done) / self.rate


Listener = Callable[[Progress], None]

_lock = threading.Lock()
_listener: Listener | None = None
_tasks: list[Progress] = []
_last = 0.0


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Tell `listener` about every task's progress while inside."""
    global _listener
    _listener = listener
    try:
        yield
    finally:
        _listener = None


@contextmanager
def task(label: str, total: int | None) -> Iterator[None]:
    """A piece of work moving about `total` bytes; `advance` counts into the innermost one."""
    listener = _listener
    if listener is None:
        yield
        return
    current = Progress(label, total)
    with _lock:
        _tasks.append(current)
    listener(current)
    try:
        yield
    finally:
        with _lock:
            if current in _tasks:
                _tasks.remove(current)
        current.ended = True
        listener(current)


def advance(count: int) -> None:
    """`count` more bytes of the current task were moved."""
    global _last
    listener = _listener
    if listener is None or not count:
        return
    with _lock:
        if not _tasks:
            return
        current = _tasks[-1]
        current.done += count
        now = time.monotonic()
        if now - _last < REPORT_SECONDS:
            return
        _last = now
    listener(current)
