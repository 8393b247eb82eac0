"""Keys of the daemon's entries in the store's `state` table, and its clock constants."""

from __future__ import annotations

from datetime import timedelta

STATE_FIRST_STARTED = "daemon_first_started"
STATE_STARTED = "daemon_started"
STATE_STOPPED = "daemon_stopped"
STATE_HEARTBEAT = "heartbeat"
STATE_PID = "daemon_pid"
STATE_UNUSABLE = "settings_unusable"  # the problems `run` waits for (empty: none)

HEARTBEAT_SECONDS = 30.0
HEARTBEAT_STALE = timedelta(minutes=3)
