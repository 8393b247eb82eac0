"""Keys of the daemon's entries in the store's `state` table, and its clock constants."""

from __future__ import annotations

from datetime import timedelta

STATE_FIRST_STARTED = "daemon_first_started"
STATE_STARTED = "daemon_started"
STATE_STOPPED = "daemon_stopped"
STATE_HEARTBEAT = "heartbeat"
STATE_PID = "daemon_pid"
# with PITR=on: the WAL streamer (daemon/streamer.py)
STATE_PITR_DOWN = "pitr.down_since"     # since when it has not streamed ("" while it does)
STATE_PITR_ERROR = "pitr.error"         # why it stopped last
STATE_PITR_ALERTED = "pitr.alerted"     # "yes" once the down alert went out
STATE_PITR_STREAMING = "pitr.streaming_since"
STATE_PITR_GAP = "pitr.gap"             # the last gap (or dropped slot), in words
STATE_PITR_SLOT = "pitr.slot"           # the replication slot this installation streams through
STATE_UNUSABLE = "settings_unusable"  # the problems `run` waits for (empty: none)

HEARTBEAT_SECONDS = 30.0
HEARTBEAT_STALE = timedelta(minutes=3)
