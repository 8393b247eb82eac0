"""A helper container that ends by itself once the daemon that made it is gone.

Instead of sleeping for a fixed life, the helper's main process removes a lease file every
LEASE_SECONDS and ends (Docker then ends whatever was exec'd in it, and removes it) when it
finds none; the daemon writes the file again every RENEW_SECONDS while it uses the helper. A
daemon killed outright (SIGKILL, out of memory, `docker compose down` of a hung one) renews
nothing: its helper ends within 2 x LEASE_SECONDS, or sooner when start-up recovery removes it.
For the WAL streamer, which runs for as long as the daemon does (no run's time limit bounds it).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

LEASE_SECONDS = 30
RENEW_SECONDS = 5.0
LEASE_FILE = ".helper-lease"


def command(inside: str) -> list[str]:
    """The helper's main process (sh, sleep and rm only: any image has them); `inside` is
    where the helper sees the lease file."""
    loop = f'while sleep {LEASE_SECONDS}; do [ -e "$1" ] || exit 0; rm -f "$1"; done'
    return ["sh", "-c", loop, "sh", inside]


@contextlib.contextmanager
def renewed(path: Path) -> Iterator[None]:
    """The lease at `path` written now and every RENEW_SECONDS (by a thread) until exit; then
    removed, so the helper ends even if its removal fails."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_SECONDS):
            with contextlib.suppress(OSError):  # tried again at the next renewal
                path.touch()

    path.touch()
    thread = threading.Thread(target=renew, name="helper-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)
