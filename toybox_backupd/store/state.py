"""Key/value state (heartbeat, instance id, restores in progress) and stopped containers."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from typing import Any

from ..core.basics import iso
from .base import StoreBase

RESTORE_KEY = "restore:"


class StateMixin(StoreBase):
    def set_state(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", (key, value))

    def get_state(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return row["value"] if row else None

    def instance_id(self) -> str:
        """A random id of this history: labels our helper containers, names our Message-IDs."""
        current = self.get_state("instance_id")
        if current is None:
            with self.tx() as db:
                db.execute("INSERT OR IGNORE INTO state(key, value) VALUES ('instance_id', ?)",
                           (uuid.uuid4().hex,))
            current = self.get_state("instance_id")
        assert current is not None
        return current

    # containers stopped for a consistent archive ---------------------------------------
    def record_stopped(self, container_id: str, name: str, run_id: int | None) -> None:
        """Written before the container is stopped, so a crash leaves a note to restart it."""
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO stopped_containers(container_id, name, run_id, stopped_at)"
                " VALUES (?, ?, ?, ?)", (container_id, name, run_id, iso()))

    def forget_stopped(self, container_id: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM stopped_containers WHERE container_id=?", (container_id,))

    def stopped_containers(self) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM stopped_containers ORDER BY stopped_at"))

    # volume restores in progress -------------------------------------------------------
    def begin_restore(self, volume: str, staging: str, containers: list[tuple[str, str]]) -> None:
        """Note a restore of `volume` before anything in it changes or any container stops.

        `staging` is its staging directory in the volume, `containers` the (id, name) of the
        containers it stops; start-up recovery settles a restore that never ended.
        """
        self.set_state(RESTORE_KEY + volume, json.dumps({
            "volume": volume, "staging": staging, "started_at": iso(), "pid": os.getpid(),
            "containers": [{"id": cid, "name": name} for cid, name in containers]}))

    def end_restore(self, volume: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM state WHERE key=?", (RESTORE_KEY + volume,))

    def pending_restores(self) -> list[dict[str, Any]]:
        """Restores begun and not ended (their process died or is still at work), by volume."""
        rows = self.db.execute("SELECT value FROM state WHERE substr(key, 1, ?)=? ORDER BY key",
                               (len(RESTORE_KEY), RESTORE_KEY))
        return [json.loads(row["value"]) for row in rows]
