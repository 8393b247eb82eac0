"""`restore volume`: rebuild a volume as it was at a restore point, never leaving it worse.

The chain (full, the paths deleted since it, the differential) is extracted beside the old tree
and swapped in only when complete (volume_swap). The restore is recorded in the store before
anything changes, and so is each container it stops, before it is stopped: after a crash,
start-up recovery settles the volume and starts them again. A failure that is caught puts the old
tree back and leaves the stopped containers stopped, for the operator to check and start.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ...adapters import docker_api
from ...catalog.restore_points import chain_for, corrupt, local_copy
from ...core import progress
from ...core.atomic import sha256_of
from ...core.basics import Confirm, JobError, Say, ToyboxError, describe_unexpected, local_time, silent
from ...core.compression import HashingReader, decompressed_from, kind_of
from ...core.settings import Settings
from ...store import Artifact, Store
from . import swap as volume_swap
from . import transfer
from .swap import FORWARD, MOUNT, NoRoom, new_dir, run_step, run_step_fifo

TAR_EXTRACT = [
    "tar", "--extract", "--numeric-owner", "--same-owner", "--same-permissions",
    "--xattrs", "--xattrs-include=*",
]


@dataclass
class Plan:
    """One restore: what goes where, and the containers it stops."""

    name: str
    target: str
    when: str
    chain: list[Artifact]
    files: list[Path]
    deleted: list[str]
    running: list[Any]
    staging: str = field(default_factory=volume_swap.staging_name)
    stopped: list[Any] = field(default_factory=list)
    # instead of the chain: fill(helper, staging) writes the new tree into new_dir(staging),
    # from what `mounts` adds to the helper (a point-in-time restore's recovered cluster)
    fill: Callable[[Any, str], None] | None = None
    mounts: dict[str, tuple[str, str]] = field(default_factory=dict)


def restore_volume(settings: Settings, name: str, *, at: datetime | None = None,
                   to: str | None = None, confirm: Confirm = None,
                   stop_containers: bool = False, say: Say = silent,
                   hold: Callable[[], AbstractContextManager[object]] = nullcontext) -> None:
    """Rebuild volume `to` (default `name`) as `name` was at `at`: its full, then its differential.

    Asks (`confirm`) first, then does the work inside `hold()` (the run lock). Raises
    CatalogError (no restore point, or a corrupt file: nothing changed) or JobError (the volume
    holds its old contents; stopped containers stay stopped, named in the message).
    """
    target = to or name
    with Store(settings.state_dir) as store:
        chain = chain_for(store, name, at)
        deleted = store.deleted_paths(chain[-1].id) if len(chain) > 1 else []
        files = [local_copy(settings, store, item, say, streamed=True) for item in chain]
    when = local_time(chain[-1].created_at, settings.zone)
    # asked before the lock is taken: an unanswered prompt never holds up a backup
    running = _check_target(target, name, when, confirm, stop_containers)
    plan = Plan(name, target, when, chain, files, deleted, running)
    with hold():
        say(f"restoring {target} from {' + '.join(item.path for item in chain)} ({when})")
        carry_out(settings, plan, say)


def restore_filled(settings: Settings, target: str, *, what: str, when: str,
                   fill: Callable[[Any, str], None], mounts: dict[str, tuple[str, str]],
                   confirm: Confirm = None, stop_containers: bool = False,
                   say: Say = silent) -> None:
    """Replace volume `target` with the tree `fill(helper, staging)` writes, with the safety
    of a volume restore (beside, swapped in when complete, the old tree back on failure).
    The caller holds the run lock."""
    running = _check_target(target, what, when, confirm, stop_containers)
    plan = Plan(what, target, when, [], [], [], running, fill=fill, mounts=mounts)
    say(f"restoring {target} from {what} ({when})")
    carry_out(settings, plan, say)


def carry_out(settings: Settings, plan: Plan, say: Say) -> None:
    """Settle earlier restores, stop, restore, swap; the old tree back on any failure."""
    _settle_earlier(settings, plan.target, say)
    with Store(settings.state_dir) as store:  # the daemon's kept helper lets go of the volume
        docker_api.remove_kept_helpers(store.instance_id(), plan.target)
    try:
        _stop_and_restore(settings, plan)
    except BaseException as exc:  # Ctrl-C too: the old tree comes back before we exit
        raise _failed(settings, plan, exc) from None
    _succeeded(settings, plan, say)


def _settle_earlier(settings: Settings, target: str, say: Say) -> None:
    """Settle restores a killed process left in progress (as start-up recovery does)."""
    with Store(settings.state_dir) as store:
        settled = volume_swap.settle_pending(settings, store)
    for item in settled:
        if item.outcome is None and item.volume == target:
            raise JobError(
                f"an earlier restore of volume {target} was cut short and cannot be settled "
                f"({item.error}); its old contents may be in {item.staging}/old inside the "
                "volume. Nothing was changed; fix the cause and try again")
        started = f"; started again: {', '.join(item.started)}" if item.started else ""
        say(f"an earlier restore of {item.volume} had been cut short: "
            f"{item.outcome or 'could not be settled: ' + item.error}{started}")


def _check_target(target: str, name: str, when: str, confirm: Confirm,
                  stop_containers: bool) -> list[Any]:
    """The running containers to stop; asks first, creates a missing volume. Changes nothing
    on a refusal."""
    exists = docker_api.volume_exists(target)
    running = [c for c in (docker_api.containers_using_volume(target) if exists else [])
               if c.status == "running"]
    if running and not stop_containers:
        names = ", ".join(c.name for c in running)
        raise JobError(f"volume {target} is in use by running container(s) {names}; stop them "
                       "first or pass --stop-containers")
    if exists and confirm is not None and not confirm(
            f"This replaces everything in volume {target!r} with {name} as it was at {when}. "
            "Continue?"):
        raise JobError("cancelled; nothing was changed")
    if not exists:
        docker_api.create_volume(target)
    return running


def _stop_and_restore(settings: Settings, plan: Plan) -> None:
    with Store(settings.state_dir) as store:
        store.begin_restore(plan.target, plan.staging, [(c.id, c.name) for c in plan.running])
        for container in plan.running:
            store.record_stopped(container.id, container.name, None)
            docker_api.stop_container(container)
            plan.stopped.append(container)
        owner = store.instance_id()
    image = docker_api.helper_image(settings.helper_image)
    lifetime = settings.restore_time_limit_min * 60 + 60
    with transfer.fifo(settings.state_dir, helper_writes=False) as channel, docker_api.helper(
            image, {plan.target: (MOUNT, "rw"), **transfer.mounts(channel), **plan.mounts},
            "restore", owner, lifetime=lifetime) as helper:
        channel = transfer.seen_by(channel, helper)
        volume_swap.prepare(helper, plan.staging)
        if plan.fill is not None:
            plan.fill(helper, plan.staging)
            volume_swap.swap(helper, plan.staging)
            return
        _extract(helper, channel, plan.files[0], plan.chain[0], plan.staging)
        if len(plan.chain) > 1:
            _delete_paths(helper, plan.deleted, plan.staging)
            _extract(helper, channel, plan.files[1], plan.chain[1], plan.staging)
        volume_swap.swap(helper, plan.staging)


def _extract(helper: Any, channel: transfer.Fifo | None, path: Path, item: Artifact,
             staging: str) -> None:
    """Extract one archive into the staging tree, decompressed here as tar extracts it there,
    its sha256 checked as it is read: a mismatch fails the restore before anything is swapped
    in (restore_volume asks local_copy not to read the archive once more before)."""
    kind = item.extra.get("compression") or kind_of(path)
    source = channel.inside if channel is not None else "-"
    cmd = [*TAR_EXTRACT, "--file=" + source, "--directory=" + new_dir(staging)]
    what = f"extracting {path.name}"
    with progress.task(f"restoring {item.path}", item.size), HashingReader(path) as raw:
        try:
            if channel is not None:
                run_step_fifo(helper, channel, cmd, what, decompressed_from(raw, kind))
            else:
                run_step(helper, cmd, what, decompressed_from(raw, kind))
        except Exception:
            if sha256_of(path) != item.sha256:  # a read of its own: `raw` may be half read
                raise corrupt(path, sha256_of(path), item.sha256) from None
            raise
        actual = raw.sha256()
    if actual != item.sha256:
        raise corrupt(path, actual, item.sha256)


def _delete_paths(helper: Any, paths: list[str], staging: str) -> None:
    safe = [p for p in paths if _safe_relative(p)]
    if not safe:
        return
    data = b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in safe)
    run_step(helper, ["sh", "-c", f"cd {new_dir(staging)} && xargs -0 -r rm -rf --"],
             "removing paths deleted since the full", iter([data]))


def _safe_relative(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and ".." not in parts and path != "."


# the outcome ---------------------------------------------------------------------------------
def _succeeded(settings: Settings, plan: Plan, say: Say) -> None:
    """Start the stopped containers again; one that fails stays recorded for start-up."""
    problems = []
    with Store(settings.state_dir) as store:
        for container in plan.stopped:
            try:
                docker_api.start_container(container.id)
                store.forget_stopped(container.id)
            except Exception as exc:
                problems.append(f"{container.name} ({exc})")
        store.end_restore(plan.target)
    say(f"restored volume {plan.target}: {plan.name} as of {plan.when}")
    if problems:
        raise JobError(f"volume {plan.target} was restored, but container(s) could not be "
                       f"started again: {'; '.join(problems)}; start them with docker start "
                       "(the daemon's start-up recovery also tries)")


def _failed(settings: Settings, plan: Plan, exc: BaseException) -> JobError:
    """Put the old tree back; the error to raise (the stopped containers stay stopped)."""
    reason = _reason(plan, exc)
    names = [c.name for c in plan.stopped]
    try:
        with Store(settings.state_dir) as store:
            owner = store.instance_id()
        outcome = volume_swap.settle(settings, plan.target, plan.staging, owner)
    except Exception as again:  # recorded still: start-up recovery settles it and starts them
        return JobError(
            f"restoring volume {plan.target} failed: {reason}; putting its old contents back "
            f"failed too: {describe_unexpected(again)}. Whatever of them is not in place is "
            f"in {plan.staging}/old inside the volume. The daemon's start-up recovery (restart "
            "the sidecar) or the next `restore volume` puts them back"
            + (f" and then starts {', '.join(names)} again" if names else ""))
    with Store(settings.state_dir) as store:
        for container in plan.running:  # stopped ones stay stopped; the others never stopped
            store.forget_stopped(container.id)
        store.end_restore(plan.target)
    held = ("The restore had finished: the volume holds the restored contents." if outcome ==
            FORWARD else "The volume's old contents are in place again.")
    text = f"restoring volume {plan.target} failed: {reason}. {held}"
    if names:
        text += (f" Container(s) {', '.join(names)} stay(s) stopped, as after any failed "
                 f"restore: check them, then start them with `docker start {' '.join(names)}`.")
    return JobError(text)


def _reason(plan: Plan, exc: BaseException) -> str:
    if isinstance(exc, NoRoom):
        return (f"volume {plan.target} lacks room to restore beside its current contents: a "
                "restore writes the restored files next to the old ones and swaps them in only "
                "when complete, so the volume's disk needs free space for both (make room there, "
                "or restore with --to OTHER into a volume on a bigger disk and copy from it)")
    if isinstance(exc, ToyboxError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return describe_unexpected(exc)
