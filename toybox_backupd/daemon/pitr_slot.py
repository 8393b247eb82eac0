"""The replication slot this installation streams through, and its end when PITR is off.

The streamer records the slot (STATE_PITR_SLOT) before it first makes or uses it. A daemon
started with PITR=off drops that slot at start-up (said in the log): nobody streams from it any
more, and a slot nobody reads holds the database's WAL (pg_wal) for ever. Only a slot this
installation recorded, or whose WAL archive (BACKUP_DIR/wal/<db>/) it keeps, is dropped:
another's is never touched.
"""

from __future__ import annotations

from ..adapters import database
from ..core import logs
from ..core.settings import Settings
from ..store import Store
from ..tiers.pitr import wal
from .keys import STATE_PITR_SLOT

log = logs.get("toybox_backupd.daemon")


def claim(store: Store) -> None:
    """Record that this installation streams through wal.SLOT."""
    store.set_state(STATE_PITR_SLOT, wal.SLOT)


def streamed_here(settings: Settings, store: Store) -> bool:
    """Whether this installation has streamed the WAL (PITR was on here once)."""
    return store.get_state(STATE_PITR_SLOT) == wal.SLOT or wal.wal_dir(settings).is_dir()


def drop_unused(settings: Settings, store: Store) -> str | None:
    """With PITR=off: drop our slot if the server still has it; its name if it was dropped.
    A database that cannot be reached keeps it (said): the next start tries again."""
    if not streamed_here(settings, store):
        return None  # whatever slot there is, it is not ours
    try:
        held = database.slot_retained(settings, wal.SLOT)
        if held is not None:
            database.drop_slot(settings, wal.SLOT)
    except database.DatabaseError as exc:
        log.warning("PITR is off, but the replication slot it streamed through could not be "
                    "dropped; it is tried again at the next start (or drop it by hand: SELECT "
                    "pg_drop_replication_slot(...))", slot=wal.SLOT, error=str(exc))
        return None
    store.set_state(STATE_PITR_SLOT, "")
    if held is None:
        return None
    log.warning("PITR is off: the replication slot it streamed through was dropped, so the "
                "database no longer keeps its WAL for a streamer that does not run",
                slot=wal.SLOT, held_bytes=held)
    return wal.SLOT
