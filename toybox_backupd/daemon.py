"""The daemon: schedules, one run at a time, start-up recovery, catch-up, shutdown, health.

- Jobs come from PGDUMP_SCHEDULE, VOLUME_FULL_SCHEDULE and VOLUME_DIFF_SCHEDULE (crontab(5), in
  TZ) and run on a single worker thread: a job that comes due while another runs waits for it,
  and a job never overlaps itself. Jobs due at the same moment run as pgdump, full, diff.
- At start, holding the run lock, runs left `running` by a crash become `interrupted`,
  partial files are removed, containers a crashed run left stopped are started again and
  leftover helper containers are removed.
- A job whose latest scheduled time passed while the daemon was down (or whose run at that
  time was interrupted) runs once at start (CATCH_UP=false turns this off).
- SIGTERM/SIGINT: no new runs; the current run finishes, then exit 0. A second signal aborts
  the current run cleanly (it is recorded as interrupted).
- A heartbeat in the history database every 30 s; `healthcheck` reads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from types import FrameType
from typing import Any

from cronsim import CronSim

from . import __version__, archive, logs, redact, runner, schedule
from .history import History, iso, parse_iso, utcnow
from .settings import JOBS, Settings

log = logs.get("toybox_backupd.daemon")

HEARTBEAT_SECONDS = 30.0
OUTBOX_SECONDS = 60.0
HEARTBEAT_STALE = timedelta(minutes=3)
HUNG_GRACE_SECONDS = 300.0  # a cancelled run that has not ended by then: restart the process
MIN_MARGIN = timedelta(hours=1)
ABORT_REASON = "aborted by a second signal"
_ORDER = {job: number for number, job in enumerate(JOBS, start=1)}
_SETTING = {"pgdump": "PGDUMP_SCHEDULE", "full": "VOLUME_FULL_SCHEDULE",
            "diff": "VOLUME_DIFF_SCHEDULE"}

# keys in the history database's `state` table
STATE_FIRST_STARTED = "daemon_first_started"
STATE_STARTED = "daemon_started"
STATE_STOPPED = "daemon_stopped"
STATE_HEARTBEAT = "heartbeat"
STATE_PID = "daemon_pid"


def _local(moment: datetime, zone: tzinfo) -> str:
    return moment.astimezone(zone).strftime("%a %Y-%m-%d %H:%M %Z")


def _ago(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 2 * 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# start-up recovery ---------------------------------------------------------------------------
def recover(settings: Settings, stop_requested: Callable[[], bool] | None = None,
            last_alive: datetime | None = None) -> dict[str, Any]:
    """Clean up after a crash; safe to call whenever, as it holds the run lock while it works.

    With the lock held no run is in progress (every run holds it), so every `running` row is
    left over from a process that died. `last_alive` (default: the heartbeat in the history)
    estimates when that happened. Returns what was done:
    {"interrupted": [run ids], "partials_removed": [paths], "containers_started": [names],
     "containers_failed": [{"name", "error"}], "helpers_removed": n}.
    """
    result: dict[str, Any] = {"interrupted": [], "partials_removed": [], "containers_started": [],
                              "containers_failed": [], "helpers_removed": 0}
    with runner.job_lock(
        settings.state_dir, "start-up recovery",
        wait_log=lambda holder: log.info("recovery waits for the current run", holder=holder),
        cancelled=stop_requested,
    ), History(settings.state_dir) as history:
        beat = last_alive or parse_iso(history.get_state(STATE_HEARTBEAT))
        for run in history.running_runs():
            where = f"pid {run.pid} on {run.host}" if run.pid else "its process"
            error = (f"interrupted: the process running it ({where}) stopped or crashed before "
                     "the run ended; found at start-up, its partial file was removed")
            cancel_reason = run.details.get("cancel_reason")
            if cancel_reason:
                error += f" (it had been ended because: {cancel_reason}, but did not stop)"
            history.close_run(run.id, "interrupted", error=error,
                              details={"recovered_at": iso(), "recovered_by": "start-up recovery"})
            if beat is not None and beat > run.started_at:
                # the crash happened around the last heartbeat, not now
                with history.tx() as db:
                    db.execute("UPDATE runs SET ended_at=? WHERE id=?", (iso(beat), run.id))
            result["interrupted"].append(run.id)
            log.warning("run left running by a crash marked interrupted", run_id=run.id,
                        job=run.job, started=_local(run.started_at, settings.zone))
        for path in archive.remove_partials(settings.backup_dir):
            relative = str(path.relative_to(settings.backup_dir))
            result["partials_removed"].append(relative)
            log.warning("partial file removed", file=relative)
        stopped = history.stopped_containers()
        if stopped or settings.backup_volumes:
            _restart_containers(history, stopped, result)
            try:
                from . import docker_api

                result["helpers_removed"] = docker_api.remove_stale_helpers(
                    history.instance_id())
                if result["helpers_removed"]:
                    log.warning("leftover helper containers removed",
                                count=result["helpers_removed"])
            except Exception as exc:
                log.warning("could not look for leftover helper containers", error=str(exc))
    # outside the lock: a slow mail server never holds up the first backup
    if result["interrupted"]:
        with History(settings.state_dir) as history:
            for run_id in result["interrupted"]:
                runner.notify_run(settings, history, run_id)
    if any(result[key] for key in result):
        log.info("start-up recovery done", interrupted=len(result["interrupted"]),
                 partials_removed=len(result["partials_removed"]),
                 containers_started=", ".join(result["containers_started"]) or "-",
                 containers_failed=len(result["containers_failed"]),
                 helpers_removed=result["helpers_removed"])
    else:
        log.info("start-up recovery: nothing to recover")
    return result


def _restart_containers(history: History, stopped: list[Any], result: dict[str, Any]) -> None:
    """Start the containers a crashed run left stopped (recorded before they were stopped)."""
    if not stopped:
        return
    try:
        from . import docker_api
    except Exception as exc:  # pragma: no cover - the package is always there
        log.error("cannot restart stopped containers", error=str(exc))
        return
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
            history.forget_stopped(container_id)
        except Exception as exc:
            log.error("could not start a container left stopped by a crashed run; start it by "
                      "hand (docker start)", container=name, error=str(exc))
            result["containers_failed"].append({"name": name, "error": str(exc)})


# catch-up --------------------------------------------------------------------------------------
def missed_jobs(settings: Settings, history: History, now: datetime,
                since: datetime | None) -> dict[str, datetime]:
    """Enabled jobs whose latest scheduled time (at or before `now`) was not served by a run.

    A slot is served by any run of the job started at or after it, except an interrupted one
    (a crash ended it, so that backup did not happen) — unless that run was itself a catch-up
    (so a crash at start never loops). Slots before `since` (the daemon's first start) do not
    count: a new installation catches nothing up. Returns {job: slot}, at most one per job.
    """
    if since is None:
        return {}
    missed: dict[str, datetime] = {}
    for job in JOBS:
        if not settings.job_enabled(job):
            continue
        slot = schedule.previous_time(settings.schedule_for(job), settings.zone, now)
        if slot is None or slot.astimezone(UTC) < since.astimezone(UTC):
            continue
        runs = [run for run in history.runs_since(slot.astimezone(UTC)) if run.job == job]
        if any(run.status != "interrupted" or run.trigger == "catchup" for run in runs):
            continue
        missed[job] = slot
    return missed


# the daemon ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _daemon_lock(state_dir: Path) -> Iterator[bool]:
    """One daemon per STATE_DIR (True if we got it)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "daemon.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._signals = 0
        self._state_lock = threading.Lock()
        self._active: str | None = None  # the job the worker is running
        self._ctx: runner.RunContext | None = None
        self._catchup: set[str] = set()
        self._aborted = False
        self._cancelled_seen: float | None = None
        self._last_signal = "signal"
        self.scheduler: Any = None

    # signals -------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # keep it tiny: the main loop does the work
        self._signals += 1
        self._last_signal = signal.Signals(signum).name
        self._wake.set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def stop_requested(self) -> bool:
        return self.stopping.is_set()

    # the worker ----------------------------------------------------------------------------
    def _register(self, ctx: runner.RunContext | None) -> None:
        self._ctx = ctx
        if ctx is None:
            self._cancelled_seen = None

    def execute(self, job: str) -> int | None:
        """Run `job` now on the calling thread (the scheduler's single worker). Never raises."""
        with self._state_lock:
            if self.stopping.is_set():
                log.info("not starting the run: the daemon is stopping", job=job)
                return None
            self._active = job
        trigger = "schedule"
        if job in self._catchup:
            self._catchup.discard(job)
            trigger = "catchup"
        try:
            run_id = runner.run_job(self.settings, job, trigger=trigger, register=self._register,
                                    stop_requested=self.stop_requested)
            self._log_next(job)
            return run_id
        except runner.Cancelled as exc:
            log.info("run not started", job=job, reason=str(exc))
        except Exception as exc:
            log.error("the run could not be carried out", job=job,
                      error=runner.describe_unexpected(exc))
        finally:
            with self._state_lock:
                self._active = None
                self._ctx = None
            self._wake.set()
        return None

    def _log_next(self, job: str) -> None:
        if self.stopping.is_set() or self.scheduler is None:
            return
        entry = self.scheduler.get_job(f"{_ORDER[job]}-{job}")
        if entry is not None and entry.next_run_time is not None:
            log.info("next run", job=job, at=_local(entry.next_run_time, self.settings.zone))

    def flush_outbox(self) -> None:
        try:
            from . import notify

            with History(self.settings.state_dir) as history:
                notify.flush_outbox(self.settings, history)
        except Exception as exc:
            log.error("sending queued emails failed", error=redact.redact(str(exc)))

    # scheduler -------------------------------------------------------------------------------
    def build_scheduler(self, now: datetime, missed: dict[str, datetime]) -> Any:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.jobstores.memory import MemoryJobStore
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        logging.getLogger("apscheduler.scheduler").setLevel(logging.WARNING)
        settings = self.settings
        scheduler = BackgroundScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(max_workers=1),
                       "mail": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=settings.zone,
        )
        for job in JOBS:
            if not settings.job_enabled(job):
                continue
            options: dict[str, Any] = {}
            if job in missed:
                # the catch-up is this job's own next run, so it can never run twice at once;
                # a microsecond apart keeps the order pgdump, full, diff
                options["next_run_time"] = now + timedelta(microseconds=_ORDER[job])
                self._catchup.add(job)
            # ids sort in run order: jobs due at the same moment run pgdump, full, diff
            scheduler.add_job(self.execute, schedule.CrontabTrigger(settings.schedule_for(job),
                                                                    settings.zone),
                              args=[job], id=f"{_ORDER[job]}-{job}", name=job, **options)
        scheduler.add_job(self.flush_outbox, IntervalTrigger(seconds=OUTBOX_SECONDS),
                          id="outbox", name="email outbox", executor="mail")
        return scheduler

    def log_summary(self, now: datetime, missed: dict[str, datetime]) -> None:
        settings = self.settings
        for job in JOBS:
            expr = settings.schedule_for(job)
            if not expr:
                log.info(f"{job}: disabled ({_SETTING[job]} is empty)")
                continue
            if not settings.job_enabled(job):
                log.info(f"{job}: disabled (BACKUP_VOLUMES is empty)")
                continue
            upcoming = schedule.next_times(expr, settings.zone, now, 1)[0]
            targets = ", ".join(runner.targets_of(settings, job, None))
            if job in missed:
                when = (f"catching up now (missed the run due {_local(missed[job], settings.zone)}),"
                        f" then {_local(upcoming, settings.zone)}")
            else:
                when = f"next run {_local(upcoming, settings.zone)}"
            log.info(f"{job}: '{expr}' in {settings.tz}, {when}", job=job, targets=targets)

    # main loop ---------------------------------------------------------------------------------
    def heartbeat(self, history: History) -> None:
        try:
            history.set_state(STATE_HEARTBEAT, iso())
        except Exception as exc:
            log.error("could not write the heartbeat", error=str(exc))

    def _begin_stop(self) -> None:
        with self._state_lock:
            self.stopping.set()
            active = self._active
        with contextlib.suppress(Exception):
            self.scheduler.pause()
        if active:
            log.warning(f"{self._last_signal} received: no new runs; waiting for the current "
                        f"{active} run to finish (a second signal aborts it)", job=active)
        else:
            log.info(f"{self._last_signal} received: stopping")

    def _abort(self) -> None:
        ctx = self._ctx
        self._aborted = True
        if ctx is not None:
            log.warning("second signal: aborting the current run", job=ctx.job, run_id=ctx.run_id)
            ctx.cancel(ABORT_REASON, "interrupted")
        elif self._active:
            log.warning("second signal: the run waiting to start is abandoned", job=self._active)

    def _watch_cancelled(self, history: History) -> None:
        """A run that was cancelled (time limit, abort) but does not end: restart the process."""
        ctx = self._ctx
        if ctx is None or not ctx.cancelled:
            self._cancelled_seen = None
            return
        now = time.monotonic()
        if self._cancelled_seen is None:
            self._cancelled_seen = now
            return
        if now - self._cancelled_seen < HUNG_GRACE_SECONDS:
            return
        reason = str(ctx.cancellation) if ctx.cancellation else "cancelled"
        log.critical("the run did not stop after it was ended; exiting so that the container "
                     "restarts and start-up recovery cleans up", job=ctx.job, run_id=ctx.run_id,
                     reason=reason, waited_s=int(now - self._cancelled_seen))
        with contextlib.suppress(Exception):
            history.update_run_details(ctx.run_id, cancel_reason=reason)
        logging.shutdown()
        os._exit(3)

    def loop(self, history: History) -> None:
        next_beat = 0.0
        while True:
            if self._signals >= 1 and not self.stopping.is_set():
                self._begin_stop()
            if self._signals >= 2 and not self._aborted:
                self._abort()
            with self._state_lock:
                idle = self._active is None
            if self.stopping.is_set() and idle:
                return
            now = time.monotonic()
            if now >= next_beat:
                self.heartbeat(history)
                next_beat = now + HEARTBEAT_SECONDS
            self._watch_cancelled(history)
            self._wake.wait(timeout=max(0.05, min(1.0, next_beat - now)))
            self._wake.clear()

    def run(self) -> int:
        settings = self.settings
        settings.backup_dir.mkdir(parents=True, exist_ok=True)
        with _daemon_lock(settings.state_dir) as locked:
            if not locked:
                holder = (settings.state_dir / "daemon.lock").read_text().strip()
                log.error("another toybox-backupd daemon already runs with this STATE_DIR",
                          state_dir=str(settings.state_dir), holder=holder or "?")
                return 1
            self.install_signals()
            log.info("toybox-backupd starting", version=__version__, pid=os.getpid(),
                     tz=settings.tz, backup_dir=str(settings.backup_dir),
                     state_dir=str(settings.state_dir), catch_up=settings.catch_up)
            with History(settings.state_dir) as history:
                started = utcnow()
                first = parse_iso(history.get_state(STATE_FIRST_STARTED))
                last_alive = parse_iso(history.get_state(STATE_HEARTBEAT))
                if first is None:
                    history.set_state(STATE_FIRST_STARTED, iso(started))
                history.set_state(STATE_STARTED, iso(started))
                history.set_state(STATE_PID, str(os.getpid()))
                self.heartbeat(history)
                try:
                    recover(settings, stop_requested=lambda: self._signals > 0,
                            last_alive=last_alive)
                except runner.Cancelled:
                    log.info("stopped during start-up recovery")
                    return 0
                now = utcnow()
                missed: dict[str, datetime] = {}
                if settings.catch_up:
                    missed = missed_jobs(settings, history, now, first)
                self.scheduler = self.build_scheduler(now, missed)
                self.log_summary(now, missed)
                if not any(settings.job_enabled(job) for job in JOBS):
                    log.warning("no job is enabled: set PGDUMP_SCHEDULE (and the volume "
                                "schedules with BACKUP_VOLUMES)")
                self.scheduler.start()
                try:
                    self.loop(history)
                finally:
                    with contextlib.suppress(Exception):
                        self.scheduler.shutdown(wait=True)
                    history.set_state(STATE_STOPPED, iso())
                log.info("toybox-backupd stopped", aborted=self._aborted)
        return 0


def run(settings: Settings) -> int:
    """`toybox-backupd run`: the daemon, until SIGTERM/SIGINT. Returns the exit code."""
    return Daemon(settings).run()


# health ------------------------------------------------------------------------------------------
@dataclass
class Due:
    slot: datetime  # the latest scheduled time whose run should have succeeded by now
    interval: timedelta  # the gap between it and the scheduled time before it
    margin: timedelta


def required_slot(expr: str, zone: tzinfo, now: datetime, limit: int = 5000) -> Due | None:
    """The latest scheduled time `slot` with slot + margin <= now, where the margin is
    max(1 h, 25 % of the gap between `slot` and the scheduled time before it)."""
    times = iter(CronSim(expr, now.astimezone(zone), reverse=True))
    try:
        later = next(times)
        for _ in range(limit):
            earlier = next(times)
            interval = later.astimezone(UTC) - earlier.astimezone(UTC)
            margin = max(MIN_MARGIN, interval / 4)
            if later.astimezone(UTC) + margin <= now.astimezone(UTC):
                return Due(later, interval, margin)
            later = earlier
    except StopIteration:
        return None
    return None


def healthcheck(settings: Settings, now: datetime | None = None) -> tuple[bool, list[str]]:
    """Healthy if the heartbeat is fresh and every enabled job succeeded when it should have.

    Returns (healthy, lines): one line per problem, or one summary line when healthy.
    """
    now = now or utcnow()
    problems: list[str] = []
    good: list[str] = []
    with History(settings.state_dir) as history:
        beat = parse_iso(history.get_state(STATE_HEARTBEAT))
        first = parse_iso(history.get_state(STATE_FIRST_STARTED))
        stopped = parse_iso(history.get_state(STATE_STOPPED))
        if beat is None:
            problems.append(f"daemon: no heartbeat in {history.path}; the daemon has not run "
                            "with this STATE_DIR")
        elif now - beat > HEARTBEAT_STALE:
            why = ("it stopped at " + _local(stopped, settings.zone)
                   if stopped and stopped >= beat else "it is not running or is stuck")
            problems.append(f"daemon: last heartbeat {_ago(now - beat)} ago "
                            f"({_local(beat, settings.zone)}); {why}")
        else:
            good.append(f"heartbeat {_ago(now - beat)} ago")
        for job in JOBS:
            if not settings.job_enabled(job):
                continue
            due = required_slot(settings.schedule_for(job), settings.zone, now)
            last_ok = history.last_run(job, "ok")
            if due is None or first is None or due.slot.astimezone(UTC) < first:
                good.append(f"{job} not due yet")
                continue
            if last_ok is not None and last_ok.started_at >= due.slot.astimezone(UTC) - timedelta(
                    seconds=5):
                good.append(f"{job} ok {_ago(now - last_ok.started_at)} ago")
                continue
            last = history.last_run(job)
            success = (f"last success {_local(last_ok.started_at, settings.zone)}"
                       if last_ok else "never succeeded")
            latest = ""
            if last is not None and last.status != "ok":
                latest = f"; last run #{last.id} {last.status}"
                if last.error:
                    latest += f": {last.error[:200]}"
            problems.append(
                f"{job}: no successful run since the one due {_local(due.slot, settings.zone)} "
                f"(allowed {_ago(due.margin)} to finish); {success}{latest}")
    if problems:
        return False, problems
    return True, ["healthy: " + "; ".join(good)]
