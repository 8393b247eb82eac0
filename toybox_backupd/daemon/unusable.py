"""`run` with settings it cannot use: no backups, but no silent restart loop either.

Exiting would only make Docker restart the container with the same environment (compose reads
`.env` when it creates the container, not when it restarts it), over and over, and nobody would
be told. So the daemon stays up without schedules: it logs every problem (again every hour),
emails them once if the email settings themselves are usable, sends queued emails, and waits
for SIGTERM; `healthcheck` fails meanwhile, so the container shows as unhealthy.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from ..core import logs
from ..core.settings import Settings
from ..notify import outbox as notify
from ..notify import report
from ..store import Store
from .keys import STATE_UNUSABLE

log = logs.get("toybox_backupd.daemon")

RELOG_SECONDS = 3600.0
FLUSH_SECONDS = 60.0
WHAT = ("No backup runs until this is fixed: the daemon waits without schedules, and "
        "`toybox-backupd healthcheck` fails (the container shows as unhealthy).")


def wait(problems: list[str], fallback: Settings | None, source: str,
         stop: threading.Event | None = None) -> int:
    """Say what is wrong, then wait until SIGTERM/SIGINT (or `stop`); returns exit code 2."""
    stop = stop or threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    _log(problems, source)
    _record(problems, fallback, source)
    logged = time.monotonic()
    while not stop.wait(FLUSH_SECONDS):
        if fallback is not None and fallback.notify_email_to:
            _flush(fallback)
        if time.monotonic() - logged >= RELOG_SECONDS:
            _log(problems, source)
            logged = time.monotonic()
    log.info("toybox-backupd stopped (the settings were not usable)")
    return 2


def _log(problems: list[str], source: str) -> None:
    log.critical(f"the settings are not usable ({source}); no backup runs until they are "
                 f"fixed. Check an edit with `{report.CHECK_AN_EDIT}`, apply it with "
                 "`docker compose up -d`", problems=len(problems))
    for line in problems:
        log.error(f"settings: {line}")


def _record(problems: list[str], fallback: Settings | None, source: str) -> None:
    """Note the problems for `healthcheck`, and email them (once per state database)."""
    if fallback is None:
        log.error("these problems cannot be emailed: STATE_DIR or the email settings are "
                  "among them")
        return
    try:
        with Store(fallback.state_dir) as store:
            store.set_state(STATE_UNUSABLE, "\n".join(problems))
            if not fallback.notify_email_to:
                log.error("these problems cannot be emailed: NOTIFY_EMAIL_TO is unset or "
                          "among them")
                return
            notify.enqueue_problem(fallback, store, problems, what=WHAT, source=source)
            notify.flush_outbox(fallback, store)
    except Exception as exc:
        log.error("could not record or email the settings problems", error=str(exc))


def _flush(settings: Settings) -> None:
    try:
        with Store(settings.state_dir) as store:
            notify.flush_outbox(settings, store)
    except Exception as exc:
        log.error("sending queued emails failed", error=str(exc))
