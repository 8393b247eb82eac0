"""The daemon's helper container, kept between runs: the next volume run `docker exec`s into it
instead of paying for a container's create, start and removal (~0.3 s, most of a small
differential).

Only the daemon keeps one (`enable(HELPER_KEEP_SECONDS)` when it starts); a command run by hand
removes its helper at the end as before. After a volume run that went well its helper stays
for HELPER_KEEP_SECONDS; the next run takes it when it wants the same image and mounts and the
helper's own lifetime (its `sleep`) still covers that run's time limit; otherwise the kept one is
removed and a new one started. A kept helper is removed when its time is up, when the daemon
stops (`shutdown`), by start-up recovery (a killed daemon's, by its labels), and by a restore of
a volume it mounts (docker_api.remove_kept_helpers, under the run lock): the daemon then finds
it gone and starts another.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ...adapters import docker_api

Key = tuple[str, tuple[tuple[str, tuple[str, str]], ...], str, str]


@dataclass
class Lease:
    """A helper container for one run; `discard()` when it must not be kept. `facts`: what
    earlier runs found out about this container (kept with it)."""

    container: Any
    reused: bool
    keep: bool = True
    facts: dict[str, Any] = field(default_factory=dict)

    def discard(self) -> None:
        self.keep = False


@dataclass
class _Kept:
    container: Any
    key: Key
    ends: float  # time.monotonic() when its sleep ends (it then removes itself)
    facts: dict[str, Any] = field(default_factory=dict)
    timer: threading.Timer | None = field(default=None, repr=False)


_lock = threading.Lock()
_seconds = 0
_kept: _Kept | None = None


def enable(seconds: int) -> None:
    """Keep a helper `seconds` after each run from now on (0: never; this process is the
    daemon)."""
    global _seconds
    with _lock:
        _seconds = max(0, int(seconds))


def shutdown() -> None:
    """Keep no more helpers, and remove the one kept now (the daemon stops)."""
    global _seconds
    with _lock:
        _seconds = 0
    _drop(_take_any())


@contextmanager
def helper(image: str, volumes: dict[str, tuple[str, str]], purpose: str, owner: str,
           lifetime: int) -> Iterator[Lease]:
    """A helper as docker_api.helper makes one, for a run of at most `lifetime` seconds: the
    kept one when it fits, else a new one. Kept afterwards (when keeping is on, the run left no
    exception and did not `discard()` it), else removed."""
    with _lock:
        seconds = _seconds
    if not seconds:
        with docker_api.helper(image, volumes, purpose, owner, lifetime) as container:
            yield Lease(container, reused=False, keep=False)
        return
    key: Key = (image, tuple(sorted(volumes.items())), purpose, owner)
    kept = _fitting(_take_any(), key, lifetime)
    reused = kept is not None
    if kept is None:
        ends = time.monotonic() + lifetime + seconds
        kept = _Kept(docker_api.start_helper(image, volumes, purpose, owner,
                                             lifetime=lifetime + seconds, kept=True), key, ends)
    lease = Lease(kept.container, reused=reused, facts=kept.facts)
    try:
        yield lease
    except BaseException:
        docker_api.remove_helper(kept.container)
        raise
    if lease.keep:
        _keep(kept)
    else:
        docker_api.remove_helper(kept.container)


def _take_any() -> _Kept | None:
    """The kept helper, no longer kept (its timer stopped), if there is one."""
    global _kept
    with _lock:
        kept, _kept = _kept, None
    if kept is not None and kept.timer is not None:
        kept.timer.cancel()
    return kept


def _fitting(kept: _Kept | None, key: Key, lifetime: int) -> _Kept | None:
    """`kept` if a run of `lifetime` seconds wanting `key` can use it; else None (and it is
    removed)."""
    if kept is None:
        return None
    if (kept.key == key and kept.ends - time.monotonic() >= lifetime
            and docker_api.helper_running(kept.container)):
        return kept
    _drop(kept)
    return None


def _keep(kept: _Kept) -> None:
    global _kept
    previous = None
    with _lock:
        seconds = _seconds
        if seconds:
            previous, _kept = _kept, kept
            kept.timer = threading.Timer(seconds, _expire, args=(kept,))
            kept.timer.daemon = True
            kept.timer.start()
    if not seconds:  # shut down meanwhile
        _drop(kept)
    elif previous is not None:  # not while runs are one at a time; never leak one
        _drop(previous)


def _expire(kept: _Kept) -> None:
    global _kept
    with _lock:
        if _kept is not kept:  # taken by a run meanwhile
            return
        _kept = None
    _drop(kept)


def _drop(kept: _Kept | None) -> None:
    if kept is not None:
        docker_api.remove_helper(kept.container)
