"""One run of one job, the same path for the scheduler and the CLI.

lock (one job at a time, across processes) → run row → log context → disk-space check →
the job's tier, under a time limit → after success: the off-site copy (a failed copy stays
pending, never fails the run), retention local and off-site → close the row → notification.
Nothing escapes as an exception: the run row says what happened.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..adapters import hints
from ..core import locks, logs, redact
from ..core.basics import Cancelled, JobError, TierResult, ToyboxError, describe_unexpected, human
from ..core.settings import Settings
from ..notify import outbox as notify
from ..places.offsite import copy as offsite_copy
from ..store import Store
from ..tiers import registry as jobs
from ..tiers.registry import Job
from . import offsite_retention, retention

log = logs.get("toybox_backupd.runner")


@dataclass
class Run:
    """A run in progress: what its tier sees (basics.RunContext) and how it is ended."""

    settings: Settings
    store: Store
    run_id: int
    job: Job
    trigger: str
    targets: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    _cancel: Cancelled | None = None
    _callbacks: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def log(self) -> Any:
        return structlog.get_logger("toybox_backupd." + self.job.name)

    def check(self) -> None:
        """Raise Cancelled if the run has been ended from outside."""
        if self._cancel is not None:
            raise self._cancel

    @property
    def cancelled(self) -> bool:
        return self._cancel is not None

    @property
    def cancellation(self) -> Cancelled | None:
        return self._cancel

    def cancel(self, reason: str, status: str = "failed") -> None:
        """End the run from another thread: later `check()`s raise, callbacks run now."""
        with self._lock:
            if self._cancel is not None:
                return
            self._cancel = Cancelled(reason, status)
            callbacks = list(self._callbacks)
        log.warning("ending the run", reason=reason, run_id=self.run_id, job=self.job.name)
        for callback in callbacks:
            with contextlib.suppress(Exception):
                callback()

    @contextlib.contextmanager
    def on_cancel(self, callback: Callable[[], None]) -> Iterator[None]:
        """While inside, `cancel()` also calls `callback` (e.g. close a stream)."""
        with self._lock:
            self._callbacks.append(callback)
            already = self._cancel is not None
        if already:
            callback()
        try:
            yield
        finally:
            with self._lock:
                self._callbacks.remove(callback)

    def note(self, **details: Any) -> None:
        self.details.update(details)


# disk space --------------------------------------------------------------------------------
def check_disk_space(settings: Settings, store: Store, job: Job, targets: list[str]) -> None:
    """Refuse early unless BACKUP_DIR has room for the job's last artifacts plus the margin."""
    hints.require_writable(settings.backup_dir, settings.backup_dir)  # says what to chown
    free = shutil.disk_usage(settings.backup_dir).free
    last = 0
    for target in targets or [None]:  # type: ignore[list-item]
        artifacts = store.artifacts(tier=job.name, target=target)
        if artifacts:
            last += artifacts[-1].size
    need = int(last * (100 + settings.disk_margin_percent) / 100)
    if need and free < need:
        raise JobError(
            f"not enough free space in BACKUP_DIR {settings.backup_dir}: {human(free)} free, "
            f"the last {job.name} took {human(last)} (+{settings.disk_margin_percent}% margin = "
            f"{human(need)}); free some space or lower the retention")


# one run ---------------------------------------------------------------------------------
def run_job(settings: Settings, job_name: str, *, trigger: str = "manual",
            volumes: list[str] | None = None,
            register: Callable[[Run | None], None] | None = None,
            stop_requested: Callable[[], bool] | None = None) -> int:
    """Run job `job_name` once and return its run id. Waits for any other run to finish first.

    `volumes` narrows the targets; `register` is told the live Run (and None at the end) so a
    daemon can cancel it. Raises Cancelled only if stopped while waiting for the lock.
    """
    job = jobs.get(job_name)
    targets = job.targets(settings, volumes)
    with locks.run_lock(settings.state_dir, job.name,
                        wait_log=lambda holder: log.info("waiting for the current run",
                                                         holder=holder, job=job.name),
                        cancelled=stop_requested), Store(settings.state_dir) as store:
        run_id = store.open_run(job.name, ",".join(targets), trigger)
        run = Run(settings, store, run_id, job, trigger, targets=targets)
        notify.run_started(settings, store, run_id)  # the `/start` ping, on its own thread
        if register:
            register(run)
        with structlog.contextvars.bound_contextvars(job=job.name, run_id=run_id):
            _carry_out(run)
        if register:
            register(None)
    # outside the lock: a slow mail server never holds up the next backup
    with Store(settings.state_dir) as store:
        notify.after_run(settings, store, run_id)
    return run_id


def _carry_out(run: Run) -> None:
    """The tier under its time limit, retention after success, the run row closed."""
    settings, job = run.settings, run.job
    limit = job.time_limit_seconds(settings)
    timer = threading.Timer(limit, run.cancel, args=(
        f"time limit of {limit // 60} min reached ({job.time_limit_var})", "failed"))
    timer.daemon = True
    started = time.monotonic()
    log.info("run started", trigger=run.trigger, targets=",".join(run.targets))
    status, error, result = "failed", None, TierResult()
    try:
        timer.start()
        check_disk_space(settings, run.store, job, run.targets)
        result = job.tier.backup(run)
        run.check()
        status = "ok"
    except BaseException as exc:
        if not isinstance(exc, Exception):
            raise
        status, error = _outcome(run, exc)
    finally:
        timer.cancel()
    details = {**run.details, **result.details}
    if status == "ok":
        details.update(_copy_offsite(run))
        details.update(_retain(run, offsite_ok="offsite_pending" not in details))
    run.store.close_run(run.run_id, status, bytes_=result.bytes,
                        artifact=", ".join(result.artifacts) or None, error=error, details=details)
    elapsed = round(time.monotonic() - started, 1)
    if status == "ok":
        log.info("run finished", status=status, seconds=elapsed, bytes=result.bytes,
                 size=human(result.bytes), artifacts=", ".join(result.artifacts))
    else:
        log.error("run finished", status=status, seconds=elapsed, error=error)


def _outcome(run: Run, exc: Exception) -> tuple[str, str]:
    """(status, error) for a run that raised `exc`."""
    if isinstance(exc, Cancelled):
        return exc.status, str(exc)
    if run.cancellation is not None:  # e.g. "tar exited 2" after cancel() closed its stream
        return run.cancellation.status, str(run.cancellation)
    if isinstance(exc, ToyboxError):
        return "failed", str(exc)
    error = redact.redact(describe_unexpected(exc))
    log.error("unexpected error", error=error, traceback=redact.redact(traceback.format_exc()))
    return "failed", error


def offsite_keep_days(settings: Settings) -> offsite_copy.KeepDays:
    """tier -> days its off-site copies are kept."""
    return lambda tier: settings.offsite_keep(jobs.get(tier).keep_days(settings))


def _copy_offsite(run: Run) -> dict[str, Any]:
    """Copy the run's artifacts off-site; trouble leaves them pending, the run ok."""
    try:
        return offsite_copy.copy_run(run.settings, run.store, run.run_id,
                                     offsite_keep_days(run.settings))
    except Exception as exc:  # the last net: a backup never fails for its copy
        error = redact.redact(describe_unexpected(exc))
        log.error("off-site copy step failed", error=error,
                  traceback=redact.redact(traceback.format_exc()))
        return {"offsite_pending": error}


def _retain(run: Run, offsite_ok: bool) -> dict[str, Any]:
    """Prune after a success (off-site too, once this run's copies are there); retention
    trouble never turns a backup into a failure."""
    try:
        result: dict[str, Any] = {"retention_deleted": retention.apply(
            run.settings, run.store, run.job.name, run.targets)}
        if offsite_ok:
            gone = offsite_retention.apply(run.settings, run.store, run.job.name, run.targets)
            if gone:
                result["offsite_retention_deleted"] = gone
        return result
    except retention.Refused as exc:
        log.warning("retention refused", reason=str(exc))
        return {"retention_deleted": [], "retention_refused": str(exc)}
    except Exception as exc:
        log.error("retention failed", error=str(exc))
        return {"retention_error": redact.redact(str(exc))}
