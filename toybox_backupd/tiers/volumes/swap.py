"""Restoring a volume without ever leaving it half restored: stage beside, swap, settle.

The new tree is extracted beside the old one, into a staging directory inside the same volume
(the same file system, so moving an entry is a rename). Only when it is complete are the two
swapped, entry by entry, and the old tree removed. Each step leaves a mark in the staging
directory, so a restore cut short at any point (an error, Ctrl-C, SIGKILL, a reboot) is settled
later by one rule (`settle`):

- `swapped` there: the new tree is complete and in place: remove the old one (roll forward);
- `old` there: move the old entries back, after removing the new ones moved in if `aside` is
  there (every old entry had been moved aside), and the root's owner, mode and mtime with them;
- otherwise the live tree was never touched: remove the staging directory.

The staging directory `.toybox-restore-<random>` (0700, root) holds `new/` (the tree being
restored), `old.mtime` (the root's mtime before), `new.mtime` (the restored root's), `old/` (the
old entries; its owner and mode are the root's), and the marks `aside` and `swapped`. The
scripts run as root in a helper container that mounts the volume at /vol, with POSIX sh, find,
stat -c and touch -r (GNU or BusyBox).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ...adapters import docker_api
from ...core.basics import JobError
from ...core.logs import get
from ...core.settings import Settings
from ...store import Store
from . import transfer

log = get("toybox_backupd.volumes")
MOUNT = "/vol"
PREFIX = ".toybox-restore-"
FORWARD = "finished swapping in the restored contents"
BACK = "put the old contents back"
REMOVED = "removed the unfinished restore"
NOTHING = "nothing was left in the volume"
_OUTCOMES = {"forward": FORWARD, "back": BACK, "removed": REMOVED, "nothing": NOTHING}
NO_ROOM = "No space left on device"

# like_root FROM TO: owner and mode of FROM onto TO; move_all FROM TO: every entry of FROM
# (dotfiles too, the staging directory left out) into TO; flush: to disk before going on
_FUNCTIONS = """
like_root() { chown "$(stat -c %u:%g "$1")" "$2" && chmod "$(stat -c %a "$1")" "$2"; }
move_all() { find "$1" -mindepth 1 -maxdepth 1 ! -name "$N" -exec sh -c 'mv -- "$@" "$0"' "$2" {} +; }
flush() { sync -f "$S" 2>/dev/null || sync; }
"""
_PREPARE = """
touch -r "$V" /tmp/root.mtime
mkdir -m 0700 "$S"
mkdir "$S/new"
like_root "$V" "$S/new"
touch -r /tmp/root.mtime "$S/old.mtime"
"""
_FORWARD = """
touch -r "$S/new.mtime" /tmp/root.mtime
rm -rf "$S/old"
rm -rf "$S"
touch -r /tmp/root.mtime "$V"
"""
_REMOVE = """
if [ -e "$S/old.mtime" ]; then touch -r "$S/old.mtime" /tmp/root.mtime
else touch -r "$V" /tmp/root.mtime; fi
rm -rf "$S"
touch -r /tmp/root.mtime "$V"
"""
_SWAP = """
flush
touch -r "$S/new" "$S/new.mtime"
mkdir "$S/old.tmp"
like_root "$V" "$S/old.tmp"
mv "$S/old.tmp" "$S/old"
move_all "$V" "$S/old"
touch "$S/aside"
move_all "$S/new" "$V"
like_root "$S/new" "$V"
flush
touch "$S/swapped"
flush
""" + _FORWARD
_BACK = """
if [ -e "$S/aside" ]; then
  find "$V" -mindepth 1 -maxdepth 1 ! -name "$N" -exec rm -rf -- {} +
fi
move_all "$S/old" "$V"
like_root "$S/old" "$V"
flush
""" + _REMOVE
_SETTLE = f"""
if [ ! -e "$S" ]; then echo nothing
elif [ -e "$S/swapped" ]; then {_FORWARD}
  echo forward
elif [ -d "$S/old" ]; then {_BACK}
  echo back
else {_REMOVE}
  echo removed
fi
"""


class NoRoom(JobError):
    """The volume's file system filled up while the new tree was written beside the old."""


def staging_name() -> str:
    """A new staging directory's name (at the volume's root)."""
    return PREFIX + secrets.token_hex(6)


def new_dir(staging: str) -> str:
    """Where the new tree is extracted, as the helper sees it."""
    return f"{MOUNT}/{staging}/new"


def _script(helper: Any, staging: str, body: str, what: str) -> str:
    if not re.fullmatch(re.escape(PREFIX) + "[0-9a-z]+", staging):
        raise JobError(f"not a staging directory of a restore: {staging!r}")
    head = f'set -eu\nV={MOUNT}\nN={staging}\nS="$V/$N"\n'
    return run_step(helper, ["sh", "-c", head + _FUNCTIONS + body], what)


def run_step(helper: Any, cmd: list[str], what: str, stdin: Iterator[bytes] | None = None) -> str:
    """Run one command of a restore in the helper; its stdout, or JobError (NoRoom if full)."""
    proc = docker_api.Exec(helper, cmd, stdin=stdin is not None)
    if stdin is not None:
        proc.feed(stdin)
    out = b"".join(proc.stdout())
    _step_failed(cmd, what, proc.wait(timeout=3600))
    return out.decode("utf-8", "replace")


def run_step_fifo(helper: Any, channel: transfer.Fifo, cmd: list[str], what: str,
                  data: Iterator[bytes]) -> None:
    """Run one command of a restore that reads `data` from the FIFO `channel` (named in
    `cmd`); JobError (NoRoom if full) unless it took all of it and succeeded."""
    waiter = transfer.Waiter(docker_api.Exec(helper, cmd))
    try:
        taken = transfer.send(channel, data, waiter.done)
    except BaseException:
        waiter.proc.kill()  # it read a part of the data: it must not go on as if that were all
        raise
    result = waiter.result()
    _step_failed(cmd, what, result)
    if not taken:
        raise JobError(f"{what}: {cmd[0]} in the helper container did not take all of its "
                       f"input; it exited with status {result.exit_code}")


def _step_failed(cmd: list[str], what: str, result: docker_api.ExecResult) -> None:
    if result.exit_code != 0:
        error = NoRoom if NO_ROOM in result.stderr else JobError
        raise error(f"{what}: " + docker_api.tool_error(cmd[0], result, "the helper container"))


def prepare(helper: Any, staging: str) -> None:
    """Make the staging directory, its `new/` with the root's owner and mode."""
    _script(helper, staging, _PREPARE, "making the staging directory")


def swap(helper: Any, staging: str) -> None:
    """Swap the complete new tree in for the old one, then remove the old one."""
    _script(helper, staging, _SWAP, "swapping the restored contents in")


def settle(settings: Settings, volume: str, staging: str, owner: str) -> str:
    """Settle a restore of `volume` cut short (see the module's rule); return what was done.

    Runs in a new helper: call it only when no other helper works on the volume.
    """
    if not docker_api.volume_exists(volume):
        return NOTHING
    image = docker_api.helper_image(settings.helper_image)
    with docker_api.helper(image, {volume: (MOUNT, "rw")}, "restore", owner) as helper:
        out = _script(helper, staging, _SETTLE, f"settling the restore of {volume}")
    words = out.split()
    return _OUTCOMES.get(words[-1] if words else "", NOTHING)


# restores whose process died -----------------------------------------------------------------
@dataclass
class Settled:
    """A restore left in progress: what settling it did (`outcome` None: it failed)."""

    volume: str
    staging: str
    outcome: str | None = None
    error: str = ""
    started: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


def settle_pending(settings: Settings, store: Store) -> list[Settled]:
    """Settle every restore recorded in progress, then start the containers it stopped.

    Call it holding the run lock (so no restore of this installation is at work): its helper
    containers still running are removed first. A restore that cannot be settled stays recorded,
    its containers stopped, for the next attempt.
    """
    pending = store.pending_restores()
    if not pending:
        return []
    owner = store.instance_id()
    docker_api.remove_stale_helpers(owner)
    done = []
    for item in pending:
        settled = Settled(item["volume"], item["staging"])
        try:
            settled.outcome = settle(settings, settled.volume, settled.staging, owner)
        except Exception as exc:
            settled.error = str(exc)
            log.error("a restore cut short could not be settled; its containers stay stopped",
                      volume=settled.volume, staging=settled.staging, error=settled.error)
            done.append(settled)
            continue
        log.warning("a restore cut short was settled", volume=settled.volume,
                    outcome=settled.outcome)
        for container in item["containers"]:
            _start_again(store, container["id"], container["name"], settled)
        store.end_restore(settled.volume)
        done.append(settled)
    return done


def _start_again(store: Store, container_id: str, name: str, settled: Settled) -> None:
    """Start a container the restore stopped; one that fails stays recorded as stopped."""
    try:
        state = docker_api.container_state(container_id)
        if state is not None and state != "running":
            docker_api.start_container(container_id)
            settled.started.append(name)
            log.warning("container stopped by a restore cut short started again", container=name)
        store.forget_stopped(container_id)
    except Exception as exc:
        log.error("could not start a container stopped by a restore cut short; start it by hand "
                  "(docker start)", container=name, error=str(exc))
        settled.failed.append({"name": name, "error": str(exc)})
