"""Key/value state (heartbeat, instance id) and containers stopped for a consistent archive."""

from __future__ import annotations

import sqlite3
import uuid

from ..basics import iso
from .base import StoreBase


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
