"""The daemon: schedules, one run at a time, signals, heartbeat.

- Jobs come from the registry (each job's schedule setting, crontab(5) in TZ) and run on a
  single worker thread: a job that comes due while another runs waits for it, and a job never
  overlaps itself. Jobs due at the same moment run in registry order (logical, full, diff).
- At start: start-up recovery (recovery.py), then catch-up of missed runs (catchup.py).
- SIGTERM/SIGINT: no new runs; the current run finishes, then exit 0. A second signal aborts
  the current run cleanly (it is recorded as interrupted).
- A heartbeat in the store every 30 s; `healthcheck` (health.py) reads it.
- `toybox-backupd backup` by hand is handed to the daemon over STATE_DIR/daemon.sock when it is
  safe (handoff_server.py): it runs like a command's own run, under the same run lock, and a
  stop waits for it as for a scheduled run. The helper container of a volume run is kept for
  the next one for HELPER_KEEP_SECONDS (tiers/kept_helper.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

from .. import __version__
from ..actions import runner
from ..core import locks, logs, redact, schedule
from ..core.basics import Cancelled, describe_unexpected, iso, local_time, parse_iso, utcnow
from ..core.settings import Settings
from ..notify import outbox as notify
from ..notify import report
from ..store import Store
from ..tiers import registry as jobs
from ..tiers.volumes import kept_helper
from . import handoff_server, memory
from .catchup import missed_jobs
from .keys import (
    HEARTBEAT_SECONDS,
    STATE_FIRST_STARTED,
    STATE_HEARTBEAT,
    STATE_PID,
    STATE_STARTED,
    STATE_STOPPED,
    STATE_UNUSABLE,
)
from .recovery import recover

log = logs.get("toybox_backupd.daemon")

OUTBOX_SECONDS = 60.0
OFFSITE_SECONDS = 60.0  # how often due off-site copies are looked for (each has its backoff)
HUNG_GRACE_SECONDS = 300.0  # a cancelled run that has not ended by then: restart the process
ABORT_REASON = "aborted by a second signal"


def _local(moment: datetime, settings: Settings) -> str:
    return local_time(moment, settings.zone, "weekday")


def _job_id(name: str) -> str:
    """Scheduler ids sort in run order: jobs due at the same moment run in registry order."""
    return f"{jobs.order(name)}-{name}"


class Daemon:
    def __init__(self, settings: Settings, source: str = ".env"):
        self.settings = settings
        self.source = source  # where the settings came from, for the operator
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._signals = 0
        self._state_lock = threading.Lock()
        self._active: str | None = None  # the job the worker is running
        self._manual = 0  # runs handed over by commands, started or waiting for the lock
        self._ctx: runner.Run | None = None
        self._catchup: set[str] = set()
        self._aborted = False
        self._cancelled_seen: float | None = None
        self._last_signal = "signal"
        self.scheduler: Any = None
        self.streamer: Any = None
        self.handoff: handoff_server.Server | None = None

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
    def _register(self, ctx: runner.Run | None) -> None:
        self._ctx = ctx
        if ctx is None:
            self._cancelled_seen = None

    @contextlib.contextmanager
    def _registration(self) -> Iterator[Callable[[runner.Run | None], None]]:
        """runner.run_job's `register` for one run; on the way out the daemon forgets that run
        if it still holds it (and never another run that has the lock by then)."""
        mine: list[runner.Run] = []

        def register(ctx: runner.Run | None) -> None:
            if ctx is not None:
                mine.append(ctx)
            self._register(ctx)

        try:
            yield register
        finally:
            with self._state_lock:
                if any(self._ctx is ctx for ctx in mine):
                    self._register(None)
            memory.release()  # what the run freed goes back: the daemon stays flat

    def accepting(self) -> bool:
        """Whether a command may hand its run over (handoff_server)."""
        return not self.stopping.is_set()

    @contextlib.contextmanager
    def handing_over(self) -> Iterator[None]:
        """While a command's run is carried out, to the last word sent to the command: a stop
        waits for it to end. Raises Cancelled when the daemon is stopping already."""
        with self._state_lock:
            if self.stopping.is_set():
                raise Cancelled("the daemon is stopping", "interrupted")
            self._manual += 1
        try:
            yield
        finally:
            with self._state_lock:
                self._manual -= 1
            self._wake.set()

    def run_manual(self, job: str, volumes: list[str] | None,
                   handle: handoff_server.Handle) -> int:
        """Run `job` for a command that handed it over (within `handing_over`), on the calling
        thread, as the command would (trigger manual, the run lock); its run id. Raises
        Cancelled if the daemon stops or the command cancels before the run starts, and what
        runner.run_job raises."""
        with self._registration() as register:
            def both(ctx: runner.Run | None) -> None:
                register(ctx)
                handle.register(ctx)

            return runner.run_job(self.settings, job, volumes=volumes, register=both,
                                  stop_requested=lambda: self.stopping.is_set()
                                  or handle.wanted)

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
            with self._registration() as register:
                run_id = runner.run_job(self.settings, job, trigger=trigger, register=register,
                                        stop_requested=self.stop_requested)
            self._log_next(job)
            return run_id
        except Cancelled as exc:
            log.info("run not started", job=job, reason=str(exc))
        except Exception as exc:
            log.error("the run could not be carried out", job=job,
                      error=redact.redact(describe_unexpected(exc)))
        finally:
            with self._state_lock:
                self._active = None
            self._wake.set()
        return None

    def _log_next(self, job: str) -> None:
        if self.stopping.is_set() or self.scheduler is None:
            return
        entry = self.scheduler.get_job(_job_id(job))
        if entry is not None and entry.next_run_time is not None:
            log.info("next run", job=job, at=_local(entry.next_run_time, self.settings))

    def flush_outbox(self) -> None:
        """Send the queued emails that are due (the scheduler's mail thread; never raises)."""
        try:
            with Store(self.settings.state_dir) as store:
                notify.flush_outbox(self.settings, store)
        except Exception as exc:
            log.error("sending queued emails failed", error=redact.redact(str(exc)))

    def retry_offsite(self) -> None:
        """Retry the off-site copies that are due (own thread; never raises)."""
        from ..places.offsite import copy as offsite_copy
        try:
            done = offsite_copy.retry_due(self.settings, runner.offsite_keep_days(self.settings),
                                          stop=self.stop_requested)
            if done:
                log.info("pending off-site copies done", count=len(done))
        except Cancelled:
            pass
        except Exception as exc:
            log.error("retrying off-site copies failed",
                      error=redact.redact(describe_unexpected(exc)))

    # scheduler -------------------------------------------------------------------------------
    def build_scheduler(self, now: datetime, missed: dict[str, datetime]) -> Any:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.jobstores.memory import MemoryJobStore
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        settings = self.settings
        scheduler = BackgroundScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(max_workers=1),
                       "mail": ThreadPoolExecutor(max_workers=1),
                       "offsite": ThreadPoolExecutor(max_workers=1),
                       "pitr": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=settings.zone,
        )
        for job in jobs.all_jobs():
            if not job.enabled(settings):
                continue
            options: dict[str, Any] = {}
            if job.name in missed:
                # the catch-up is this job's own next run, so it can never run twice at once;
                # a microsecond apart keeps the registry's order
                options["next_run_time"] = now + timedelta(microseconds=jobs.order(job.name))
                self._catchup.add(job.name)
            scheduler.add_job(self.execute, schedule.CrontabTrigger(job.schedule(settings),
                                                                    settings.zone),
                              args=[job.name], id=_job_id(job.name), name=job.name, **options)
        # first at once: what start-up queued (recovery, a broken schedule) goes out now
        scheduler.add_job(self.flush_outbox, IntervalTrigger(seconds=OUTBOX_SECONDS),
                          id="outbox", name="email outbox", executor="mail", next_run_time=now)
        if settings.pitr:
            self._add_streamer(scheduler)
        if settings.offsite_url:
            scheduler.add_job(self.retry_offsite, IntervalTrigger(seconds=OFFSITE_SECONDS),
                              id="offsite", name="off-site copy queue", executor="offsite")
        return scheduler

    def _add_streamer(self, scheduler: Any) -> None:
        """PITR=on: the supervised WAL streamer (started with the scheduler) and its watch."""
        from apscheduler.triggers.interval import IntervalTrigger

        from .streamer import WATCH_SECONDS, Streamer

        self.streamer = Streamer(self.settings, self.request_base)
        scheduler.add_job(self.streamer.watch, IntervalTrigger(seconds=WATCH_SECONDS),
                          id="pitr", name="WAL streamer watch", executor="pitr")

    def request_base(self, why: str) -> None:
        """Run a base backup as soon as the worker is free (a gap in the WAL archive)."""
        if self.scheduler is None or self.stopping.is_set():
            return
        log.warning("base backup requested", reason=why)
        self.scheduler.add_job(self.execute, args=["base"], id=f"base-now-{time.monotonic_ns()}",
                               name="base")

    def log_summary(self, now: datetime, missed: dict[str, datetime]) -> None:
        settings = self.settings
        for job in jobs.all_jobs():
            why = job.disabled_reason(settings)
            if why:
                if not job.problem(settings):  # a broken schedule: report_problems says it
                    log.info(f"{job.name}: disabled ({why})")
                continue
            expr = job.schedule(settings)
            upcoming = schedule.next_times(expr, settings.zone, now, 1)[0]
            if job.name in missed:
                when = (f"catching up now (missed the run due {_local(missed[job.name], settings)}),"
                        f" then {_local(upcoming, settings)}")
            else:
                when = f"next run {_local(upcoming, settings)}"
            log.info(f"{job.name}: '{expr}' in {settings.tz}, {when}", job=job.name,
                     targets=", ".join(job.targets(settings)))
        if settings.offsite_url:
            how = ("encrypted for " + ", ".join(settings.offsite_age_recipients)
                   if settings.offsite_age_recipients else "NOT encrypted")
            log.info(f"off-site: every restore point is copied to {settings.offsite_url}, {how}")
        else:
            log.info("off-site: off (OFFSITE_URL is empty): the backups live on this host only")

    def report_problems(self, store: Store) -> None:
        """A job whose schedule is broken does not run; the others do. Say so in the log and
        by email (`healthcheck` fails for it too): a typo never silently stops backups."""
        settings = self.settings
        problems = [problem for job in jobs.all_jobs() if (problem := job.problem(settings))]
        for problem in problems:
            log.error(f"NOT SCHEDULED: {problem} (in {self.source}); check an edit with "
                      f"`{report.CHECK_AN_EDIT}`, apply it with `docker compose up -d`")
        if problems:
            notify.enqueue_problem(settings, store, problems, source=self.source, what=(
                "Until it is fixed, that job does not run; the other jobs run as scheduled, "
                "and `toybox-backupd healthcheck` fails (the container shows as unhealthy)."))
        if not any(job.enabled(settings) for job in jobs.all_jobs()):
            log.warning("no job is enabled: set " + ", ".join(
                job.schedule_var for job in jobs.all_jobs()) + " (and their targets)")
    def serve_metrics(self) -> Any:
        """Prometheus metrics on METRICS_PORT, if set (a thread of its own); the server."""
        if not self.settings.metrics_port:
            return None
        from . import metrics
        return metrics.serve(self.settings, self.settings.metrics_port)

    # main loop ---------------------------------------------------------------------------------
    def heartbeat(self, store: Store) -> None:
        try:
            store.set_state(STATE_HEARTBEAT, iso())
        except Exception as exc:
            log.error("could not write the heartbeat", error=str(exc))

    def _begin_stop(self) -> None:
        with self._state_lock:
            self.stopping.set()
            active = self._active or ("manual" if self._manual else None)
        if self.handoff is not None:  # commands run their backups themselves from now on
            self.handoff.stop()
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

    def _watch_cancelled(self, store: Store) -> None:
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
            store.update_run_details(ctx.run_id, cancel_reason=reason)
        logging.shutdown()
        os._exit(3)

    def loop(self, store: Store) -> None:
        next_beat = 0.0
        while True:
            if self._signals >= 1 and not self.stopping.is_set():
                self._begin_stop()
            if self._signals >= 2 and not self._aborted:
                self._abort()
            with self._state_lock:
                idle = self._active is None and not self._manual
            if self.stopping.is_set() and idle:
                return
            now = time.monotonic()
            if now >= next_beat:
                self.heartbeat(store)
                next_beat = now + HEARTBEAT_SECONDS
            self._watch_cancelled(store)
            self._wake.wait(timeout=max(0.05, min(1.0, next_beat - now)))
            self._wake.clear()

    def run(self) -> int:
        settings = self.settings
        settings.backup_dir.mkdir(parents=True, exist_ok=True)
        with locks.daemon_lock(settings.state_dir) as locked:
            if not locked:
                holder = locks.holder(settings.state_dir, locks.DAEMON_LOCK)
                log.error("another toybox-backupd daemon already runs with this STATE_DIR",
                          state_dir=str(settings.state_dir), holder=holder or "?")
                return 1
            self.install_signals()
            memory.limit_arenas()  # before the daemon's threads: see memory.py
            handoff_server.remove_stale(settings.state_dir)  # a killed daemon's socket
            log.info("toybox-backupd starting", version=__version__, pid=os.getpid(),
                     tz=settings.tz, backup_dir=str(settings.backup_dir),
                     state_dir=str(settings.state_dir), catch_up=settings.catch_up)
            for line in settings.weak_secrets():
                log.warning(line)
            with Store(settings.state_dir) as store:
                started = utcnow()
                first = parse_iso(store.get_state(STATE_FIRST_STARTED))
                last_alive = parse_iso(store.get_state(STATE_HEARTBEAT))
                if first is None:
                    store.set_state(STATE_FIRST_STARTED, iso(started))
                store.set_state(STATE_STARTED, iso(started))
                store.set_state(STATE_UNUSABLE, "")  # the settings are usable now
                store.set_state(STATE_PID, str(os.getpid()))
                self.heartbeat(store)
                try:
                    recover(settings, stop_requested=lambda: self._signals > 0,
                            last_alive=last_alive)
                except Cancelled:
                    log.info("stopped during start-up recovery")
                    return 0
                now = utcnow()
                missed: dict[str, datetime] = {}
                if settings.catch_up:
                    missed = missed_jobs(settings, store, now, first)
                self.scheduler = self.build_scheduler(now, missed)
                self.log_summary(now, missed)
                self.report_problems(store)
                self.serve_metrics()
                self._serve(store)
                log.info("toybox-backupd stopped", aborted=self._aborted)
        return 0

    def _serve(self, store: Store) -> None:
        """The scheduler, the WAL streamer and the socket for manual backups until the loop
        ends, then all stopped, and the kept helper container removed."""
        self.scheduler.start()
        kept_helper.enable(self.settings.helper_keep_seconds)
        if self.streamer is not None:
            self.streamer.start()
        self.handoff = self._listen()
        try:
            self.loop(store)
        finally:
            if self.handoff is not None:
                self.handoff.stop()
            if self.streamer is not None:
                self.streamer.shutdown()
            with contextlib.suppress(Exception):
                self.scheduler.shutdown(wait=True)
            kept_helper.shutdown()
            store.set_state(STATE_STOPPED, iso())

    def _listen(self) -> handoff_server.Server | None:
        """The socket for manual backups; None (and the commands run them themselves) if it
        cannot be made."""
        server = handoff_server.Server(self)
        try:
            server.start()
        except OSError as exc:
            log.warning("manual backups cannot be handed to the daemon: no socket in STATE_DIR; "
                        "`toybox-backupd backup` runs them itself", error=str(exc))
            return None
        return server



def run(settings: Settings, source: str = ".env") -> int:
    """`toybox-backupd run`: the daemon, until SIGTERM/SIGINT. Returns the exit code."""
    return Daemon(settings, source).run()
