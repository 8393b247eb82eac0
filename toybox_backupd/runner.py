"""One run of one job, the same path for the scheduler and the CLI.

lock (one job at a time, across processes) → history row → log context → disk-space check →
tier, under a time limit → retention after success → close the row → notification.
Nothing escapes as an exception: the run row says what happened.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from . import logs, redact
from .history import History
from .settings import Settings

log = logs.get("toybox_backupd.runner")

TIERS = {"pgdump": "logical", "full": "full", "diff": "diff"}
TIME_LIMIT_VARS = {"pgdump": "PGDUMP_TIME_LIMIT_MIN", "full": "VOLUME_FULL_TIME_LIMIT_MIN",
                   "diff": "VOLUME_DIFF_TIME_LIMIT_MIN"}


class Cancelled(Exception):
    """The run was ended from outside: its time limit, or an abort signal."""

    def __init__(self, reason: str, status: str):
        super().__init__(reason)
        self.status = status


class JobError(Exception):
    """A failure already put in words an operator can act on."""


@dataclass
class TierResult:
    bytes: int = 0
    artifacts: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    settings: Settings
    history: History
    run_id: int
    job: str
    trigger: str
    volumes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    _cancel: Cancelled | None = None
    _callbacks: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def log(self) -> Any:
        return structlog.get_logger("toybox_backupd." + self.job)

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
        with self._lock:
            if self._cancel is not None:
                return
            self._cancel = Cancelled(reason, status)
            callbacks = list(self._callbacks)
        log.warning("ending the run", reason=reason, run_id=self.run_id, job=self.job)
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


# the inter-process lock ---------------------------------------------------------------------
@contextlib.contextmanager
def job_lock(state_dir: Path, job: str, wait_log: Callable[[str], None] | None = None,
             cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
    """One job at a time across the daemon and CLI processes (flock in STATE_DIR)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "run.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another run"
            if wait_log:
                wait_log(holder)
            while True:
                if cancelled and cancelled():
                    raise Cancelled("stopped while waiting for another run", "interrupted") from None
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{job} (pid {os.getpid()})")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


# disk space --------------------------------------------------------------------------------
def expected_size(history: History, job: str, targets: list[str]) -> int:
    tier = TIERS[job]
    total = 0
    for target in targets or [None]:  # type: ignore[list-item]
        artifacts = history.artifacts(tier=tier, target=target)
        if artifacts:
            total += artifacts[-1].size
    return total


def check_disk_space(settings: Settings, history: History, job: str, targets: list[str]) -> None:
    settings.backup_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.backup_dir).free
    last = expected_size(history, job, targets)
    need = int(last * (100 + settings.disk_margin_percent) / 100)
    if need and free < need:
        raise JobError(
            f"not enough free space in BACKUP_DIR {settings.backup_dir}: {human(free)} free, "
            f"the last {job} took {human(last)} (+{settings.disk_margin_percent}% margin = "
            f"{human(need)}); free some space or lower the retention")


def human(size: float | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


# one run ---------------------------------------------------------------------------------
Tier = Callable[[RunContext], TierResult]


def tier_function(job: str) -> Tier:
    if job == "pgdump":
        from . import logical

        return logical.backup
    if job in ("full", "diff"):
        from . import volumes

        return volumes.backup_full if job == "full" else volumes.backup_diff
    raise ValueError(f"unknown job {job!r}")


def targets_of(settings: Settings, job: str, volumes: list[str] | None) -> list[str]:
    if job == "pgdump":
        return [settings.postgres_db]
    return list(volumes or settings.backup_volumes)


def run_job(settings: Settings, job: str, *, trigger: str = "manual",
            volumes: list[str] | None = None,
            register: Callable[[RunContext | None], None] | None = None,
            stop_requested: Callable[[], bool] | None = None) -> int:
    """Run `job` once and return its run id. Waits for any other run to finish first.

    `register` is told the live RunContext (and None at the end) so a daemon can cancel it.
    """
    targets = targets_of(settings, job, volumes)
    bound = structlog.contextvars.bound_contextvars
    with job_lock(settings.state_dir, job,
                  wait_log=lambda holder: log.info("waiting for the current run", holder=holder,
                                                   job=job),
                  cancelled=stop_requested), History(settings.state_dir) as history:
        run_id = history.open_run(job, ",".join(targets), trigger)
        ctx = RunContext(settings, history, run_id, job, trigger, volumes=targets)
        if register:
            register(ctx)
        limit = settings.time_limit_seconds(job)
        timer = threading.Timer(limit, ctx.cancel,
                                args=(f"time limit of {limit // 60} min reached "
                                      f"({TIME_LIMIT_VARS[job]})", "failed"))
        timer.daemon = True
        started = time.monotonic()
        with bound(job=job, run_id=run_id):
            log.info("run started", trigger=trigger, targets=",".join(targets))
            status, error, result = "failed", None, TierResult()
            try:
                timer.start()
                check_disk_space(settings, history, job, targets)
                result = tier_function(job)(ctx)
                ctx.check()
                status = "ok"
            except Cancelled as exc:
                status, error = exc.status, str(exc)
            except JobError as exc:
                if ctx.cancellation is not None:  # e.g. "tar exited 2" after cancel() closed it
                    status, error = ctx.cancellation.status, str(ctx.cancellation)
                else:
                    error = str(exc)
            except Exception as exc:
                if ctx.cancellation is not None:  # a stream closed by cancel() broke first
                    status, error = ctx.cancellation.status, str(ctx.cancellation)
                else:
                    error = describe_unexpected(exc)
                    log.error("unexpected error", error=error,
                              traceback=redact.redact(traceback.format_exc()))
            finally:
                timer.cancel()
            details = {**ctx.details, **result.details}
            if status == "ok":
                try:
                    from . import retention

                    deleted = retention.apply(settings, history, job, targets)
                    details["retention_deleted"] = deleted
                except Exception as exc:  # retention trouble never turns a backup into a failure
                    details["retention_error"] = redact.redact(str(exc))
                    log.error("retention failed", error=str(exc))
            history.close_run(run_id, status, bytes_=result.bytes,
                              artifact=", ".join(result.artifacts) or None, error=error,
                              details=details)
            elapsed = time.monotonic() - started
            if status == "ok":
                log.info("run finished", status=status, seconds=round(elapsed, 1),
                         bytes=result.bytes, size=human(result.bytes),
                         artifacts=", ".join(result.artifacts))
            else:
                log.error("run finished", status=status, seconds=round(elapsed, 1), error=error)
            if register:
                register(None)
    # outside the lock: a slow mail server never holds up the next backup
    with History(settings.state_dir) as history:
        notify_run(settings, history, run_id)
    return run_id


def notify_run(settings: Settings, history: History, run_id: int) -> None:
    """Queue and try to send the run's email. Never raises: mail never fails a backup."""
    try:
        from . import notify

        notify.after_run(settings, history, run_id)
    except Exception as exc:
        log.error("notification failed", error=redact.redact(str(exc)), run_id=run_id)


def describe_unexpected(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    return redact.redact(f"{exc.__class__.__name__}: {text}")
