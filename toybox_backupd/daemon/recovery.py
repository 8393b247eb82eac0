"""Start-up recovery: what a crashed process left behind is put right before any run."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..adapters import docker_api
from ..core import locks, logs, redact
from ..core.atomic import remove_partials
from ..core.basics import iso, local_time, parse_iso
from ..core.settings import Settings
from ..notify import outbox as notify
from ..places.offsite.target import open_target
from ..places.offsite.uploads import Ledger
from ..store import Store
from ..tiers.pitr import scratch as pitr_scratch
from ..tiers.pitr import wal
from ..tiers.volumes import swap as volume_swap
from ..tiers.volumes import transfer
from . import pitr_slot
from .keys import STATE_HEARTBEAT

log = logs.get("toybox_backupd.daemon")


def recover(settings: Settings, stop_requested: Callable[[], bool] | None = None,
            last_alive: datetime | None = None) -> dict[str, Any]:
    """Clean up after a crash; safe to call whenever, as it holds the run lock while it works.

    With the lock held no run is in progress (every run holds it), so every `running` row is
    left over from a process that died. `last_alive` (default: the heartbeat in the store)
    estimates when that happened. Returns what was done:
    {"interrupted": [run ids], "partials_removed": [paths], "restores": [{"volume", "outcome"}],
     "containers_started": [names], "containers_failed": [{"name", "error"}],
     "helpers_removed": n, "spool_removed": [FIFO directories],
     "scratch_removed": [volumes and files of killed restores to a moment],
     "uploads_aborted": [keys of S3 multipart uploads a killed copy left],
     "streamers_removed": n, "slot_dropped": the replication slot dropped (PITR=off) or None}.
    """
    result: dict[str, Any] = {"interrupted": [], "partials_removed": [], "restores": [],
                              "containers_started": [], "containers_failed": [],
                              "helpers_removed": 0, "scratch_removed": [], "uploads_aborted": [],
                              "streamers_removed": 0, "slot_dropped": None}
    with locks.run_lock(
        settings.state_dir, "start-up recovery",
        wait_log=lambda holder: log.info("recovery waits for the current run", holder=holder),
        cancelled=stop_requested,
    ), Store(settings.state_dir) as store:
        _close_interrupted(settings, store, last_alive, result)
        for path in remove_partials(settings.backup_dir):
            relative = str(path.relative_to(settings.backup_dir))
            result["partials_removed"].append(relative)
            log.warning("partial file removed", file=relative)
        result["spool_removed"] = transfer.remove_leftovers(settings.state_dir)
        result["uploads_aborted"] = _abort_uploads(settings)
        _end_streaming(settings, store, result)
        if settings.pitr:
            _remove_scratch(settings, result)
        held = _settle_restores(settings, store, result)
        stopped = [row for row in store.stopped_containers() if row["container_id"] not in held]
        if stopped or settings.backup_volumes:
            _restart_containers(store, stopped, result)
            _remove_helpers(store, result)
    # outside the lock: a slow mail server never holds up the first backup
    if result["interrupted"]:
        with Store(settings.state_dir) as store:
            for run_id in result["interrupted"]:
                notify.after_run(settings, store, run_id)
    _log_summary(result)
    return result


def _close_interrupted(settings: Settings, store: Store, last_alive: datetime | None,
                       result: dict[str, Any]) -> None:
    """Mark runs left `running` as interrupted, ended around the last heartbeat."""
    beat = last_alive or parse_iso(store.get_state(STATE_HEARTBEAT))
    for run in store.running_runs():
        where = f"pid {run.pid} on {run.host}" if run.pid else "its process"
        error = (f"interrupted: the process running it ({where}) stopped or crashed before "
                 "the run ended; found at start-up, its partial file was removed")
        cancel_reason = run.details.get("cancel_reason")
        if cancel_reason:
            error += f" (it had been ended because: {cancel_reason}, but did not stop)"
        # the crash happened around the last heartbeat, not now
        ended = beat if beat is not None and beat > run.started_at else None
        store.close_run(run.id, "interrupted", error=error, ended_at=ended,
                        details={"recovered_at": iso(), "recovered_by": "start-up recovery"})
        result["interrupted"].append(run.id)
        log.warning("run left running by a crash marked interrupted", run_id=run.id,
                    job=run.job, started=local_time(run.started_at, settings.zone, "weekday"))


def _settle_restores(settings: Settings, store: Store, result: dict[str, Any]) -> set[str]:
    """Settle the volume restores a killed process left in progress, starting the containers
    they stopped; return the ids of those containers (the rest of recovery leaves them be)."""
    held = {c["id"] for item in store.pending_restores() for c in item["containers"]}
    try:
        settled = volume_swap.settle_pending(settings, store)
    except Exception as exc:
        log.error("could not settle the volume restores left in progress", error=str(exc))
        return held
    for item in settled:
        result["restores"].append({"volume": item.volume,
                                   "outcome": item.outcome or f"failed: {item.error}"})
        result["containers_started"] += item.started
        result["containers_failed"] += item.failed
    return held


def _abort_uploads(settings: Settings) -> list[str]:
    """Abort the S3 multipart uploads a killed copy left unfinished (their parts would stay in
    the bucket); a store that cannot be reached now is cleaned by the next copy instead."""
    if not settings.offsite_url.startswith("s3://") or not Ledger(settings.state_dir).recorded():
        return []
    try:
        target = open_target(settings)
        return target.clean_up() if target is not None else []
    except Exception as exc:
        log.warning("could not abort the unfinished off-site uploads a crash left; the next "
                    "off-site copy tries again", error=redact.redact(str(exc)))
        return []


def _end_streaming(settings: Settings, store: Store, result: dict[str, Any]) -> None:
    """The WAL streamer containers a killed daemon of this installation left (whatever PITR
    says now: its pg_receivewal streams on); with PITR=off, our replication slot too."""
    if not settings.pitr and not pitr_slot.streamed_here(settings, store):
        return
    try:
        result["streamers_removed"] = docker_api.remove_beside(store.instance_id(), "wal")
    except Exception as exc:
        log.warning("could not look for leftover WAL streamer containers", error=str(exc))
    if result["streamers_removed"]:
        log.warning("WAL streamer container left by a killed daemon removed",
                    count=result["streamers_removed"])
    if settings.pitr:
        return
    try:
        result["slot_dropped"] = pitr_slot.drop_unused(settings, store)
    except Exception as exc:
        log.warning("could not look for the replication slot PITR streamed through",
                    slot=wal.SLOT, error=redact.redact(str(exc)))


def _remove_scratch(settings: Settings, result: dict[str, Any]) -> None:
    """The scratch volumes and files of restores to a moment whose process was killed; those
    of a restore still running (started by hand meanwhile: it does not hold the run lock while
    it recovers) stay."""
    try:
        removed, running = pitr_scratch.remove_leftovers(settings)
    except Exception as exc:
        log.error("could not remove what killed restores to a moment left", error=str(exc))
        return
    result["scratch_removed"] = removed
    if removed:
        log.warning("scratch of a restore cut short removed", items=", ".join(removed))
    if running:
        log.info("scratch of a restore still running left alone", items=", ".join(running))


def _restart_containers(store: Store, stopped: list[Any], result: dict[str, Any]) -> None:
    """Start the containers a crashed run left stopped (recorded before they were stopped)."""
    for row in stopped:
        container_id, name = row["container_id"], row["name"]
        try:
            state = docker_api.container_state(container_id)
            if state is None:
                log.warning("a container stopped by a crashed run no longer exists",
                            container=name)
            elif state != "running":
                docker_api.start_container(container_id)
                log.warning("container left stopped by a crashed run started again",
                            container=name, run_id=row["run_id"])
                result["containers_started"].append(name)
            store.forget_stopped(container_id)
        except Exception as exc:
            log.error("could not start a container left stopped by a crashed run; start it by "
                      "hand (docker start)", container=name, error=str(exc))
            result["containers_failed"].append({"name": name, "error": str(exc)})


def _remove_helpers(store: Store, result: dict[str, Any]) -> None:
    try:
        result["helpers_removed"] = docker_api.remove_stale_helpers(store.instance_id())
        if result["helpers_removed"]:
            log.warning("leftover helper containers removed", count=result["helpers_removed"])
    except Exception as exc:
        log.warning("could not look for leftover helper containers", error=str(exc))


def _log_summary(result: dict[str, Any]) -> None:
    if any(result[key] for key in result):
        log.info("start-up recovery done", interrupted=len(result["interrupted"]),
                 partials_removed=len(result["partials_removed"]),
                 restores_settled=len(result["restores"]),
                 containers_started=", ".join(result["containers_started"]) or "-",
                 containers_failed=len(result["containers_failed"]),
                 helpers_removed=result["helpers_removed"],
                 scratch_removed=len(result["scratch_removed"]),
                 uploads_aborted=len(result["uploads_aborted"]),
                 streamers_removed=result["streamers_removed"],
                 slot_dropped=result["slot_dropped"] or "-")
    else:
        log.info("start-up recovery: nothing to recover")
