"""The data path between this process and a helper container, around dockerd.

A `docker exec` stream carries every byte through dockerd and containerd-shim, in frames of at
most 32 KiB: on a 2 GB volume that cost the engine more CPU than tar and zstd together. So tar in
the helper reads or writes a named pipe (FIFO) in a directory both sides see instead: a private
directory under `STATE_DIR/spool`, which the helper mounts read-only (a FIFO can be opened for
writing on a read-only mount; nothing else there can be changed). `docker exec` only starts tar
and brings back its stderr and exit status.

Where the engine cannot mount STATE_DIR (a tmpfs, a remote engine) or the helper does not see
the FIFO (Docker Desktop's VM), the exec stream carries the data as before, and a log line says
so. `TOYBOX_BACKUPD_TRANSPORT=exec` forces the exec stream (tests compare the two).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...adapters import docker_api
from ...core.atomic import CHUNK
from ...core.logs import get

log = get("toybox_backupd.transfer")
SPOOL = "/spool"  # where a helper mounts the spool directory's volume or host path
FORCE = "TOYBOX_BACKUPD_TRANSPORT"
FALLBACK = "volume data goes over the docker exec stream (slower)"
PIPE_SIZE = 1024 * 1024  # the most an unprivileged process may ask (fs.pipe-max-size)
POLL_MS = 200


@dataclass
class Fifo:
    """A named pipe here (`local`) that a helper mounting its spool's `mounts()` sees at
    `inside`."""

    local: Path
    inside: str
    source: str

    def mounts(self) -> dict[str, tuple[str, str]]:
        """What to add to the helper's volumes."""
        return {self.source: (SPOOL, "ro")}


def mounts(channel: Fifo | Spool | None) -> dict[str, tuple[str, str]]:
    """The helper's extra mounts for `channel` (none for the exec stream)."""
    return channel.mounts() if channel is not None else {}


@dataclass
class Spool:
    """`STATE_DIR/spool` as the engine can mount it into a helper (`source`, with `sub` the
    spool's path inside that source): one helper mounting it sees every FIFO made in it,
    before or after the helper started."""

    root: Path
    source: str
    sub: str

    def mounts(self) -> dict[str, tuple[str, str]]:
        """What to add to the helper's volumes."""
        return {self.source: (SPOOL, "ro")}

    @contextmanager
    def fifo(self, helper_writes: bool) -> Iterator[Fifo]:
        """A new FIFO in a private directory of the spool, removed afterwards. `helper_writes`:
        the helper opens it for writing, with no capability but DAC_READ_SEARCH, so others may
        write it (only through this 0700 directory, which only root and this user can enter)."""
        directory = Path(tempfile.mkdtemp(prefix="fifo-", dir=self.root))
        try:
            path = directory / "stream"
            os.mkfifo(path)
            os.chmod(path, 0o602 if helper_writes else 0o600)
            inside = "/".join(part for part in (SPOOL, self.sub, directory.name, path.name)
                              if part)
            yield Fifo(path, inside, self.source)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def checked_in_background(where: Spool | None, helper: Any) -> Callable[[], Spool | None]:
    """Whether `helper` sees FIFOs made in the spool `where`, found out on a thread (a probe
    FIFO and a `docker exec`, ~70 ms) while the caller goes on; call the result for the answer:
    `where`, or None (with a log line) when the exec stream has to carry the data."""
    if where is None:
        return lambda: None
    pool = ThreadPoolExecutor(1, "fifo-probe")
    seen = pool.submit(_probe, where, helper)
    pool.shutdown(wait=False)  # no more tasks; this one runs on
    return lambda: where if seen.result() else None


def _probe(where: Spool, helper: Any) -> bool:
    try:
        with where.fifo(helper_writes=False) as probe:
            return seen_by(probe, helper) is not None
    except Exception as exc:  # the check itself failed: the exec stream is always there
        log.info(FALLBACK, reason=f"the FIFO check failed: {exc}")
        return False


def spool(state_dir: Path) -> Spool | None:
    """The spool under `state_dir`, or None (and a log line) when the engine cannot mount it or
    TOYBOX_BACKUPD_TRANSPORT=exec."""
    root = state_dir.resolve() / "spool"
    if os.environ.get(FORCE, "") == "exec":
        log.info(FALLBACK, reason=f"{FORCE}=exec")
        return None
    root.mkdir(mode=0o700, exist_ok=True)
    where = docker_api.mountable(root)
    if where is None:
        log.info(FALLBACK, reason=f"the Docker engine cannot mount {root}")
        return None
    return Spool(root, *where)


@contextmanager
def fifo(state_dir: Path, helper_writes: bool) -> Iterator[Fifo | None]:
    """A new FIFO in the spool under `state_dir` (see Spool.fifo), or None when the engine
    cannot mount it."""
    where = spool(state_dir)
    if where is None:
        yield None
        return
    with where.fifo(helper_writes) as channel:
        yield channel


def seen_by(channel: Fifo | None, helper: Any) -> Fifo | None:
    """`channel` if the helper sees it as a FIFO, else None (with a log line)."""
    if channel is None:
        return None
    result, _ = docker_api.run(helper, ["test", "-p", channel.inside])
    if result.exit_code == 0:
        return channel
    log.info(FALLBACK, reason=f"the helper container does not see {channel.local}")
    return None


class Waiter:
    """`proc.wait()` on a thread: its stderr drained and its exit status read while the
    data goes through the FIFO."""

    def __init__(self, proc: docker_api.Exec):
        self.proc = proc
        self.done = threading.Event()
        self._result: docker_api.ExecResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="exec-wait", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self.proc.wait()
        except BaseException as exc:
            self._error = exc
        finally:
            self.done.set()

    def result(self) -> docker_api.ExecResult:
        """The command's result, once it has ended; raises what `Exec.wait` raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def _bigger(fd: int) -> None:
    """A 1 MiB pipe buffer instead of 64 KiB: fewer, larger reads and writes."""
    with contextlib.suppress(OSError):  # a lower fs.pipe-max-size: the default works too
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def chunks_from(channel: Fifo, done: threading.Event) -> Iterator[bytes]:
    """What the helper writes into the FIFO, to its end; nothing if the command ends (`done`)
    without opening it."""
    fd = os.open(channel.local, os.O_RDONLY | os.O_NONBLOCK)  # never waits for a writer
    try:
        _bigger(fd)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        # before a writer comes, a FIFO polls as nothing at all (not even hang-up)
        while not poller.poll(POLL_MS):
            if done.is_set():
                return
        os.set_blocking(fd, True)
        while chunk := os.read(fd, CHUNK):
            yield chunk
    finally:
        os.close(fd)


def send(channel: Fifo, chunks: Iterable[bytes], done: threading.Event) -> bool:
    """Write `chunks` into the FIFO for the helper to read; False if it stopped reading (or
    never started: `done`) before it had them all."""
    fd = _open_for_writing(channel.local, done)
    if fd is None:
        return False
    try:
        _bigger(fd)
        os.set_blocking(fd, True)
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
    except BrokenPipeError:
        return False
    finally:
        os.close(fd)
    return True


def _open_for_writing(path: Path, done: threading.Event) -> int | None:
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # ENXIO: no reader yet
            if exc.errno != errno.ENXIO:
                raise
        if done.wait(0.01):
            return None


def remove_leftovers(state_dir: Path) -> list[str]:
    """Remove the FIFO directories a killed run left under `state_dir`/spool (call with the
    run lock held: then no run uses one); their names."""
    root = state_dir / "spool"
    gone = []
    for directory in sorted(root.glob("fifo-*")) if root.is_dir() else []:
        shutil.rmtree(directory, ignore_errors=True)
        gone.append(directory.name)
    return gone
