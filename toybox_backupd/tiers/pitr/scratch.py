"""What a restore to a moment makes for itself, and removes: its scratch.

A restore to a moment (`restore db --at`, `restore cluster`) works under one random token:
- the Docker volume `toybox-backupd-recover-<token>`, labelled SCRATCH_LABEL and with this
  instance's id (OWNER_LABEL), where the throwaway server recovers the cluster;
- `BACKUP_DIR/.pitr-<token>.dump` (`….partial` while it is written): the database dumped
  from that server;
- `BACKUP_DIR/.pitr-<token>-wal/`: WAL segments fetched from off-site for it.
All go when the restore ends, however it ends. While it runs it holds a lock on
`STATE_DIR/scratch/<token>.lock`; a killed restore's process lets go of it, so start-up
recovery removes the scratch of exactly the restores no longer running, never that of one
still running (a `restore` started by hand while the daemon starts).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...adapters import docker_api
from ...core import locks
from ...core.settings import Settings
from ...store import Store

VOLUME_PREFIX = "toybox-backupd-recover-"
LOCK_DIR = "scratch"
_FILE = re.compile(r"^\.pitr-([0-9a-f]{10})(?:\.dump(?:\.partial)?|-wal)$")


@dataclass(frozen=True)
class Scratch:
    token: str
    owner: str  # the instance id (labels the volume and the containers that mount it)
    backup_dir: Path

    @property
    def volume(self) -> str:
        return VOLUME_PREFIX + self.token

    @property
    def dump(self) -> Path:
        return self.backup_dir / f".pitr-{self.token}.dump"

    @property
    def wal(self) -> Path:
        return self.backup_dir / f".pitr-{self.token}-wal"

    def create_volume(self) -> None:
        docker_api.create_volume(self.volume, {docker_api.SCRATCH_LABEL: "pitr-recover",
                                               docker_api.OWNER_LABEL: self.owner})

    def remove(self) -> None:
        """Everything of it: the files, the volume and the containers of ours that mount it."""
        shutil.rmtree(self.wal, ignore_errors=True)
        for path in (self.dump, self.dump.with_name(self.dump.name + ".partial")):
            path.unlink(missing_ok=True)
        docker_api.remove_scratch_volume(self.volume, self.owner)


def _lock(settings: Settings, token: str) -> Path:
    return settings.state_dir / LOCK_DIR / f"{token}.lock"


def _owner(settings: Settings) -> str:
    with Store(settings.state_dir) as store:
        return store.instance_id()


@contextlib.contextmanager
def scratch(settings: Settings) -> Iterator[Scratch]:
    """A new scratch, locked while the block runs and removed at its end."""
    made = Scratch(secrets.token_hex(5), _owner(settings), settings.backup_dir)
    with locks.held(_lock(settings, made.token), "a restore to a moment"):
        try:
            yield made
        finally:
            made.remove()


def leftovers(settings: Settings, owner: str) -> dict[str, list[str]]:
    """token -> the scratch volumes of this instance and the scratch files in BACKUP_DIR
    (only the tool's own names) under that token, running or not."""
    found: dict[str, list[str]] = {}
    for name in docker_api.scratch_volumes(owner):
        if name.startswith(VOLUME_PREFIX):
            found.setdefault(name[len(VOLUME_PREFIX):], []).append(name)
    for path in sorted(settings.backup_dir.glob(".pitr-*")):
        match = _FILE.match(path.name)
        if match and not path.is_symlink():
            found.setdefault(match.group(1), []).append(path.name)
    return found


def remove_leftovers(settings: Settings) -> tuple[list[str], list[str]]:
    """Remove the scratch of the restores to a moment that are no longer running (their
    process was killed); returns (what was removed, what was left to a running restore)."""
    owner = _owner(settings)
    removed: list[str] = []
    running: list[str] = []
    for token, things in leftovers(settings, owner).items():
        if locks.in_use(_lock(settings, token)):
            running += things
            continue
        Scratch(token, owner, settings.backup_dir).remove()
        _lock(settings, token).unlink(missing_ok=True)
        removed += things
    for lock in (settings.state_dir / LOCK_DIR).glob("*.lock"):
        if not locks.in_use(lock):  # one killed before it made anything
            lock.unlink(missing_ok=True)
    return removed, running
