"""With PITR=on: the supervised WAL streamer, its slot watch and its alerts.

A thread runs pg_receivewal on the route (tiers.wal.Receiver) and starts it again when it ends:
after 2 s if it had streamed for a minute or more, else after basics.backoff (1, 2, 5, 10, 30,
60 min). A watch every WATCH_SECONDS: the streamer down for PITR_ALERT_MINUTES: one alert
email (and `healthcheck` fails), and one more when it streams again.
A second thread measures the slot every SLOT_WATCH_SECONDS over one kept connection: past
PITR_MAX_SLOT_WAL of the database's WAL the slot is dropped so the database's disk never fills
(an alert email), then a base backup is taken at once: the WAL the slot no longer held may be
lost, and a new base backup closes that gap. The slot holds at most the limit plus what the
server writes in a second.
A gap pg_receivewal reports ("requested WAL segment … has already been removed") is closed
the same way: the archive so far is moved aside (wal/<db>/before-<stamp>/), the stream starts a
new chain at the server's position, and a base backup is requested.
While it is down, a restart of the database container (a restore with --stop-containers) ends
the wait at once. Before each start, wal.follow_system sets the whole archive aside
(wal/<db>/other-<stamp>/) when the server is another database cluster (replaced under the same
container: its system identifier differs), and wal.follow_timeline puts the archive on the
server's timeline (after a cluster restore: the old branch set aside, streaming from the fork);
either is said, emailed, and a base backup taken of the new cluster or timeline.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime

from ..adapters import database, docker_api
from ..core import logs, redact
from ..core.basics import ToyboxError, backoff, describe_unexpected, human, iso, local_time, parse_iso, utcnow
from ..core.settings import Settings
from ..notify import outbox as notify
from ..notify import report
from ..store import Store
from ..tiers.pitr import wal, wal_offsite
from . import pitr_slot
from .keys import STATE_PITR_ALERTED as STATE_ALERTED
from .keys import STATE_PITR_DOWN as STATE_DOWN
from .keys import STATE_PITR_ERROR as STATE_ERROR
from .keys import STATE_PITR_GAP as STATE_GAP
from .keys import STATE_PITR_STREAMING as STATE_STREAMING

log = logs.get("toybox_backupd.streamer")

WATCH_SECONDS = 5.0
SLOT_WATCH_SECONDS = 1.0
QUICK_RESTART = 2.0  # seconds before restarting a streamer that had run for a while
HEALTHY_RUN = 60.0
STEADY = 10.0  # seconds pg_receivewal must have run before it counts as streaming
STOP_GRACE = 5.0  # seconds a stopping daemon waits for pg_receivewal to end on its signal


class Streamer:
    """The supervised pg_receivewal; `request_base` asks the scheduler for a base backup now."""

    def __init__(self, settings: Settings, request_base: Callable[[str], None]):
        self.settings = settings
        self.request_base = request_base
        self.stopping = threading.Event()
        self.receiver: wal.Receiver | None = None
        self.partial_copied = float("-inf")  # when the segment being written was last copied
        # the database container's start (docker_api.started_at) when pg_receivewal last ran,
        # and the one a wait was last cut short for
        self.streamed_on: str | None = None
        self.woken_for: str | None = None
        self.thread = threading.Thread(target=self._loop, name="wal-streamer", daemon=True)
        self.slot_thread = threading.Thread(target=self._slot_loop, name="wal-slot-watch",
                                            daemon=True)
        with Store(settings.state_dir) as store:
            self.owner = store.instance_id()

    def start(self) -> None:
        with Store(self.settings.state_dir) as store:
            store.set_state(STATE_DOWN, iso())  # until pg_receivewal runs
            pitr_slot.claim(store)
        self.thread.start()
        self.slot_thread.start()

    def shutdown(self) -> None:
        """Prompt: pg_receivewal is signalled; one that has not ended within STOP_GRACE
        seconds (not started far enough to be signalled) goes with its container."""
        self.stopping.set()
        if self.receiver is not None:
            self.receiver.end()
        self.thread.join(STOP_GRACE)
        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                docker_api.remove_beside(self.owner, "wal")
            self.thread.join(STOP_GRACE)
        self.slot_thread.join(10)
        self._release_slot()

    def _release_slot(self) -> None:
        """A stopped sidecar cannot watch the slot, so it does not leave one behind to hold the
        database's WAL for as long as it stays stopped. The next start streams on from its last
        segment when the server still has it; else the gap is reported and closed by a base
        backup. (A daemon killed outright leaves the slot; the next start watches it again.)"""
        try:
            database.drop_slot(self.settings, wal.SLOT)
        except database.DatabaseError as exc:  # the database is down too: nothing grows
            log.warning("replication slot kept at shut-down", slot=wal.SLOT, error=str(exc))
            return
        log.info("replication slot dropped at shut-down: the stopped sidecar holds none of "
                 "the database's WAL", slot=wal.SLOT)

    def _set(self, key: str, value: str) -> None:
        with Store(self.settings.state_dir) as store:
            store.set_state(key, value)

    def _loop(self) -> None:
        attempts = 0
        while not self.stopping.is_set():
            began = time.monotonic()
            self.receiver = wal.Receiver(self.settings, self.owner)
            try:
                why = self.receiver.run(on_started=self._started)
            except ToyboxError as exc:
                why = str(exc)
            except Exception as exc:  # never let the thread die: say it and try again
                why = describe_unexpected(exc)
            why = redact.redact(why)
            if self.stopping.is_set():
                return
            self._down(why)
            if wal.is_gap(why):
                self._gap(why)
            attempts = 1 if time.monotonic() - began >= HEALTHY_RUN else attempts + 1
            delay = QUICK_RESTART if attempts == 1 else backoff(attempts - 1).total_seconds()
            log.warning("WAL streamer down; starting it again", in_s=delay, error=why)
            if self._pause(delay):
                attempts = 0

    def _pause(self, delay: float) -> bool:
        """Wait `delay` s before the next start, or less: until the database container has been
        started again since pg_receivewal last ran (a restore with --stop-containers, `docker
        compose restart`; once per start of it) and its server answers. True if it was."""
        deadline = time.monotonic() + delay
        while not self.stopping.wait(max(0.0, min(WATCH_SECONDS, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return False
            now = self._db_started()
            if now is not None and now not in (self.streamed_on, self.woken_for):
                self.woken_for = now
                with contextlib.suppress(database.DatabaseError):
                    database.check_reachable(self.settings)
                log.info("the database container was started again: streaming starts again")
                return True
        return False

    def _db_started(self) -> str | None:
        """When the database container (PG_CONTAINER) last started; None if unknown."""
        name = self.settings.pg_container
        return docker_api.started_at(name) if name else None

    def _started(self, slot_created: bool) -> None:
        """pg_receivewal runs; the watch counts it as streaming once it has lasted STEADY
        seconds (one that fails at once, over and over, stays down for the alert). On a new
        timeline (a cluster restore): said, emailed, and a base backup taken on it."""
        self._set(STATE_STREAMING, iso())
        self.streamed_on = self._db_started()
        log.info("WAL streamer running", directory=str(wal.wal_dir(self.settings)),
                 slot=wal.SLOT, slot_created=slot_created)
        receiver = self.receiver
        if receiver is not None and receiver.replaced:
            alert(self.settings, "the database cluster was replaced",
                  f"{receiver.replaced}. A base backup of the new cluster is taken now; "
                  "moments before the replacement are recovered from the old cluster's base "
                  "backups and WAL.")
            self.request_base("database cluster replaced")
        elif receiver is not None and receiver.followed:
            alert(self.settings, "WAL streamer follows a new timeline",
                  f"{receiver.followed}. A base backup is taken now, on the new timeline.")
            self.request_base("new timeline")

    def _down(self, why: str) -> None:
        with Store(self.settings.state_dir) as store:
            store.set_state(STATE_STREAMING, "")
            if not store.get_state(STATE_DOWN):
                store.set_state(STATE_DOWN, iso())
            store.set_state(STATE_ERROR, why)

    def _gap(self, why: str) -> None:
        stamp = local_time(utcnow(), self.settings.zone, "stamp")
        moved = wal.close_chain(self.settings, stamp)
        try:  # a new slot reserves WAL from the server's position now
            database.drop_slot(self.settings, wal.SLOT)
        except database.DatabaseError as exc:
            log.warning("could not drop the replication slot after a gap", error=str(exc))
        text = (f"the WAL archive has a gap: {why}. The archive so far was moved to {moved}; "
                "streaming starts again at the server's position and a base backup is taken "
                "now, so later moments are recoverable again.")
        self._set(STATE_GAP, text)
        alert(self.settings, "WAL gap: base backup started", text)
        self.request_base("gap in the WAL archive")

    # the watch (the scheduler's pitr thread) -----------------------------------------------
    def watch(self) -> None:
        """Alerts for a streamer down too long; the slot dropped past PITR_MAX_SLOT_WAL; the
        WAL copied off-site (OFFSITE_URL)."""
        try:
            self._watch_down()
        except Exception as exc:
            log.error("PITR watch failed", error=redact.redact(describe_unexpected(exc)))
        if not self.settings.offsite_url:
            return
        try:
            with Store(self.settings.state_dir) as store:
                self.partial_copied = wal_offsite.copy_offsite(
                    self.settings, store, self.partial_copied, time.monotonic())
        except Exception as exc:  # tried again at the next watch
            log.warning("WAL off-site copy pending", error=redact.redact(
                str(exc) if isinstance(exc, ToyboxError) else describe_unexpected(exc)))

    def _watch_down(self) -> None:
        s = self.settings
        with Store(s.state_dir) as store:
            down = parse_iso(store.get_state(STATE_DOWN))
            streaming = parse_iso(store.get_state(STATE_STREAMING))
            if down is not None and streaming is not None and (
                    utcnow() - streaming).total_seconds() >= STEADY:
                store.set_state(STATE_DOWN, "")
                down = None
            alerted = store.get_state(STATE_ALERTED) == "yes"
            error = store.get_state(STATE_ERROR) or "-"
            if down is None and alerted:
                store.set_state(STATE_ALERTED, "")
                alert(s, "WAL streamer running again", "pg_receivewal streams the WAL again.")
            elif down is not None and not alerted and (
                    utcnow() - down).total_seconds() >= s.pitr_alert_minutes * 60:
                store.set_state(STATE_ALERTED, "yes")
                alert(s, "WAL streamer down", down_text(s, down, error))

    def _slot_loop(self) -> None:
        """watch_slot every SLOT_WATCH_SECONDS until shut down; a failure is logged once (not
        every second) until the watch works again."""
        gauge = database.SlotGauge(self.settings, wal.SLOT)
        said = ""
        try:
            while not self.stopping.wait(SLOT_WATCH_SECONDS):
                try:
                    self.watch_slot(gauge)
                    said = ""
                except Exception as exc:
                    error = redact.redact(describe_unexpected(exc))
                    if error != said:
                        log.error("replication slot watch failed", error=error)
                    said = error
        finally:
            gauge.close()

    def watch_slot(self, gauge: database.SlotGauge) -> None:
        """Drop the slot once it holds more than PITR_MAX_SLOT_WAL (see the module's doc)."""
        s = self.settings
        try:
            held = gauge.held()
        except database.DatabaseError:
            return  # the database is down: nothing grows
        if held is None or held <= s.pitr_max_slot_wal:
            return
        database.drop_slot(s, wal.SLOT)
        text = (f"the replication slot {wal.SLOT} held {human(held)} of WAL on the database "
                f"server, more than PITR_MAX_SLOT_WAL ({human(s.pitr_max_slot_wal)}): it was "
                "dropped so that the database's disk does not fill. WAL the streamer had not "
                "received may be lost: a base backup is taken now.")
        log.error("replication slot dropped", held=held, limit=s.pitr_max_slot_wal)
        self._set(STATE_GAP, text)
        alert(s, "replication slot dropped", text)
        if self.receiver is not None:
            self.receiver.end()
        self.request_base("replication slot dropped")


def down_text(settings: Settings, since: datetime, error: str) -> str:
    """The alert's words for a streamer down since `since`."""
    return (f"The WAL streamer (pg_receivewal) has been down since "
            f"{local_time(since, settings.zone)}: {error}. Moments after that are not "
            "recoverable until it runs again; it is retried with backoff.")


def alert(settings: Settings, what: str, text: str) -> None:
    """Log and email (when NOTIFY_EMAIL_TO is set) a point-in-time alert."""
    log.warning(what, detail=text)
    if not settings.notify_email_to:
        return
    host = socket.gethostname()
    now = utcnow()
    message = report.build_message(
        settings, subject=f"{report.SUBJECT_PREFIX} PITR: {what} on {host}",
        text=f"{what}\n\n{text}\n", html_body=None, now=now,
        message_id=f"<toybox-backupd.pitr.{uuid.uuid4().hex}@{report.host_token()}>")
    with Store(settings.state_dir) as store:
        notify.enqueue(store, message, run_id=None, recipients=settings.notify_email_to, now=now)
