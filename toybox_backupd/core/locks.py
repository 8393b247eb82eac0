"""Inter-process locks (flock in STATE_DIR): one run at a time, one daemon per STATE_DIR."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .basics import Cancelled

RUN_LOCK = "run.lock"
DAEMON_LOCK = "daemon.lock"


def _try(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def try_lock(handle: IO[str]) -> bool:
    """Take an exclusive flock on `handle` unless another holds one; whether it did."""
    return _try(handle)


def _write(handle: IO[str], text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()


def holder(state_dir: Path, name: str = RUN_LOCK) -> str:
    """What the lock file says about who holds it ("" when nobody wrote one)."""
    try:
        return (state_dir / name).read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def run_lock(state_dir: Path, what: str, wait_log: Callable[[str], None] | None = None,
             cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
    """Hold the run lock (one job, restore or recovery at a time across processes).

    Waits for the holder, telling `wait_log` who it is once; raises Cancelled when
    `cancelled()` turns true while waiting.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / RUN_LOCK, "a+") as handle:
        if not _try(handle):
            if wait_log:
                handle.seek(0)
                wait_log(handle.read().strip() or "another run")
            while not _try(handle):
                if cancelled and cancelled():
                    raise Cancelled("stopped while waiting for another run", "interrupted")
                time.sleep(0.5)
        _write(handle, f"{what} (pid {os.getpid()})")
        try:
            yield
        finally:
            _write(handle, "")
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def daemon_lock(state_dir: Path) -> Iterator[bool]:
    """One daemon per STATE_DIR: yields True if this process got it, False if another has it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / DAEMON_LOCK, "a+") as handle:
        if not _try(handle):
            yield False
            return
        _write(handle, f"pid {os.getpid()} on {socket.gethostname()}\n")
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def held(path: Path, what: str) -> Iterator[None]:
    """An exclusive lock on `path` (created) while the block runs, the file removed at its end.

    For work that leaves things behind if its process is killed (a restore's scratch volume):
    the kernel lets go of the lock when the process dies, so `in_use(path)` tells a live
    holder from a dead one, whatever process, container or host PID namespace asks."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle = _locked_file(path)
    try:
        _write(handle, f"{what} (pid {os.getpid()} on {socket.gethostname()})")
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _locked_file(path: Path) -> IO[str]:
    """`path` opened and locked; again if it was removed meanwhile (by a clean-up that found
    it unlocked), so that the lock held is always the one on the file at `path`."""
    while True:
        handle = open(path, "a+")  # noqa: SIM115 (closed by the caller)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()


def in_use(path: Path) -> bool:
    """Whether a live process holds the lock `held(path)` takes (False: none, or it died)."""
    try:
        handle = open(path)  # noqa: SIM115 (closed below, also when the lock is taken)
    except FileNotFoundError:
        return False
    try:
        if not _try(handle):
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
    finally:
        handle.close()
