"""Queries on the `runs` table: one row per run of a job (and per verify)."""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime
from typing import Any

from ..core import redact
from ..core.basics import iso, parse_iso
from .base import StoreBase
from .records import Run


class RunsMixin(StoreBase):
    def open_run(self, job: str, target: str | None = None, trigger: str = "manual",
                 started_at: datetime | None = None, pid: int | None = None) -> int:
        """Insert a `running` row; return its id."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO runs(job, target, trigger, status, started_at, host, pid)"
                " VALUES (?, ?, ?, 'running', ?, ?, ?)",
                (job, target, trigger, iso(started_at), socket.gethostname(),
                 pid if pid is not None else os.getpid()),
            )
            return int(cur.lastrowid or 0)

    def close_run(self, run_id: int, status: str, *, bytes_: int | None = None,
                  artifact: str | None = None, error: str | None = None,
                  details: dict[str, Any] | None = None, ended_at: datetime | None = None) -> None:
        """Close a run: status, sizes, error (redacted) and details merged into the row's."""
        with self.tx() as db:
            current = db.execute("SELECT details FROM runs WHERE id=?", (run_id,)).fetchone()
            merged = json.loads(current["details"]) if current else {}
            merged.update(details or {})
            db.execute(
                "UPDATE runs SET status=?, ended_at=?, bytes=?, artifact=?, error=?, details=?"
                " WHERE id=?",
                (status, iso(ended_at), bytes_, artifact, redact.redact(error) if error else None,
                 redact.redact(json.dumps(merged, default=str)), run_id),
            )

    def update_run_details(self, run_id: int, **details: Any) -> None:
        with self.tx() as db:
            row = db.execute("SELECT details FROM runs WHERE id=?", (run_id,)).fetchone()
            merged = json.loads(row["details"]) if row else {}
            merged.update(details)
            db.execute("UPDATE runs SET details=? WHERE id=?",
                       (redact.redact(json.dumps(merged, default=str)), run_id))

    def run(self, run_id: int) -> Run | None:
        row = self.db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return Run.from_row(row) if row else None

    def runs(self, limit: int = 20, job: str | None = None) -> list[Run]:
        """The newest runs first."""
        if job:
            rows = self.db.execute(
                "SELECT * FROM runs WHERE job=? ORDER BY id DESC LIMIT ?", (job, limit))
        else:
            rows = self.db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,))
        return [Run.from_row(row) for row in rows]

    def runs_since(self, since: datetime) -> list[Run]:
        rows = self.db.execute(
            "SELECT * FROM runs WHERE started_at >= ? ORDER BY started_at", (iso(since),))
        return [Run.from_row(row) for row in rows]

    def running_runs(self) -> list[Run]:
        rows = self.db.execute("SELECT * FROM runs WHERE status='running' ORDER BY id")
        return [Run.from_row(row) for row in rows]

    def last_run(self, job: str, status: str | None = None) -> Run | None:
        query = "SELECT * FROM runs WHERE job=?"
        args: list[Any] = [job]
        if status:
            query += " AND status=?"
            args.append(status)
        row = self.db.execute(query + " ORDER BY started_at DESC, id DESC LIMIT 1", args).fetchone()
        return Run.from_row(row) if row else None

    def first_run_started(self) -> datetime | None:
        """When the first run in the history started (None: no run yet)."""
        row = self.db.execute("SELECT MIN(started_at) AS first FROM runs").fetchone()
        return parse_iso(row["first"])

    def set_run_ended(self, run_id: int, ended_at: datetime) -> None:
        """Back-date a run's end (start-up recovery: the crash happened at the last heartbeat)."""
        with self.tx() as db:
            db.execute("UPDATE runs SET ended_at=? WHERE id=?", (iso(ended_at), run_id))
