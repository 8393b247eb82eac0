"""SQLite history and catalog: runs, artifacts, file index, outbox, stopped containers.

One file in STATE_DIR, WAL mode, a busy timeout so the daemon and a CLI process can use it at
once. The schema carries a version (PRAGMA user_version) and moves forward by migrations.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import redact

DB_NAME = "history.sqlite3"

MIGRATIONS: list[str] = [
    # 1: runs and artifacts
    """
    CREATE TABLE runs (
        id          INTEGER PRIMARY KEY,
        job         TEXT NOT NULL,
        target      TEXT,
        trigger     TEXT NOT NULL DEFAULT 'manual',
        status      TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        ended_at    TEXT,
        bytes       INTEGER,
        artifact    TEXT,
        error       TEXT,
        details     TEXT NOT NULL DEFAULT '{}',
        host        TEXT,
        pid         INTEGER
    );
    CREATE INDEX runs_job_started ON runs(job, started_at);
    CREATE TABLE artifacts (
        id          INTEGER PRIMARY KEY,
        run_id      INTEGER REFERENCES runs(id),
        tier        TEXT NOT NULL,
        target      TEXT NOT NULL,
        path        TEXT NOT NULL UNIQUE,
        created_at  TEXT NOT NULL,
        size        INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        status      TEXT NOT NULL DEFAULT 'ok',
        base_id     INTEGER REFERENCES artifacts(id),
        extra       TEXT NOT NULL DEFAULT '{}',
        verified_at TEXT,
        deleted_at  TEXT
    );
    CREATE INDEX artifacts_tier_target ON artifacts(tier, target, created_at);
    """,
    # 2: file index of volume archives, paths deleted since the base full
    """
    CREATE TABLE files (
        artifact_id INTEGER NOT NULL REFERENCES artifacts(id) ON DELETE CASCADE,
        path        TEXT NOT NULL,
        type        TEXT NOT NULL,
        size        INTEGER NOT NULL,
        mtime_ns    INTEGER NOT NULL,
        ctime_ns    INTEGER NOT NULL,
        inode       INTEGER NOT NULL,
        mode        INTEGER NOT NULL,
        uid         INTEGER NOT NULL,
        gid         INTEGER NOT NULL,
        link        TEXT,
        hash        TEXT,
        PRIMARY KEY (artifact_id, path)
    ) WITHOUT ROWID;
    CREATE TABLE deleted_paths (
        artifact_id INTEGER NOT NULL REFERENCES artifacts(id) ON DELETE CASCADE,
        path        TEXT NOT NULL,
        PRIMARY KEY (artifact_id, path)
    ) WITHOUT ROWID;
    """,
    # 3: containers stopped for a consistent archive; email outbox; key/value state
    """
    CREATE TABLE stopped_containers (
        container_id TEXT PRIMARY KEY,
        name         TEXT NOT NULL,
        run_id       INTEGER,
        stopped_at   TEXT NOT NULL
    );
    CREATE TABLE outbox (
        id            INTEGER PRIMARY KEY,
        run_id        INTEGER REFERENCES runs(id),
        created_at    TEXT NOT NULL,
        message_id    TEXT NOT NULL UNIQUE,
        subject       TEXT NOT NULL,
        message       BLOB NOT NULL,
        recipients    TEXT NOT NULL,
        status        TEXT NOT NULL DEFAULT 'pending',
        attempts      INTEGER NOT NULL DEFAULT 0,
        next_try_at   TEXT NOT NULL,
        last_error    TEXT,
        sent_at       TEXT
    );
    CREATE TABLE state (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None = None) -> str:
    return (moment or utcnow()).astimezone(UTC).isoformat(timespec="microseconds")


def parse_iso(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


@dataclass
class Run:
    id: int
    job: str
    target: str | None
    trigger: str
    status: str
    started_at: datetime
    ended_at: datetime | None
    bytes: int | None
    artifact: str | None
    error: str | None
    details: dict[str, Any]
    host: str | None
    pid: int | None

    @property
    def duration(self) -> float | None:
        if self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Run:
        return cls(
            id=row["id"], job=row["job"], target=row["target"], trigger=row["trigger"],
            status=row["status"], started_at=datetime.fromisoformat(row["started_at"]),
            ended_at=parse_iso(row["ended_at"]), bytes=row["bytes"], artifact=row["artifact"],
            error=row["error"], details=json.loads(row["details"] or "{}"), host=row["host"],
            pid=row["pid"],
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "job": self.job, "target": self.target, "trigger": self.trigger,
            "status": self.status, "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "duration_s": round(self.duration, 3) if self.duration is not None else None,
            "bytes": self.bytes, "artifact": self.artifact, "error": self.error,
            "details": self.details,
        }


@dataclass
class Artifact:
    id: int
    run_id: int | None
    tier: str
    target: str
    path: str
    created_at: datetime
    size: int
    sha256: str
    status: str
    base_id: int | None
    extra: dict[str, Any]
    verified_at: datetime | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Artifact:
        return cls(
            id=row["id"], run_id=row["run_id"], tier=row["tier"], target=row["target"],
            path=row["path"], created_at=datetime.fromisoformat(row["created_at"]),
            size=row["size"], sha256=row["sha256"], status=row["status"], base_id=row["base_id"],
            extra=json.loads(row["extra"] or "{}"), verified_at=parse_iso(row["verified_at"]),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "run_id": self.run_id, "tier": self.tier, "target": self.target,
            "path": self.path, "created_at": self.created_at.isoformat(), "size": self.size,
            "sha256": self.sha256, "status": self.status, "base_id": self.base_id,
            "verified_at": self.verified_at.isoformat() if self.verified_at else None,
            "extra": self.extra,
        }


class History:
    """A connection to the history database. Cheap to open; use one per thread."""

    def __init__(self, state_dir: Path):
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / DB_NAME
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                  check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=30000")
        self.migrate()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (no upgrade deadlocks)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def migrate(self) -> None:
        with self.tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {version}, newer than this toybox-backupd "
                    f"understands ({SCHEMA_VERSION}); upgrade toybox-backupd"
                )
            for number in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[number]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={number + 1}")

    @property
    def version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    # runs ----------------------------------------------------------------------------
    def open_run(self, job: str, target: str | None = None, trigger: str = "manual",
                 started_at: datetime | None = None, pid: int | None = None) -> int:
        import os

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
                  details: dict[str, Any] | None = None) -> None:
        with self.tx() as db:
            current = db.execute("SELECT details FROM runs WHERE id=?", (run_id,)).fetchone()
            merged = json.loads(current["details"]) if current else {}
            merged.update(details or {})
            db.execute(
                "UPDATE runs SET status=?, ended_at=?, bytes=?, artifact=?, error=?, details=?"
                " WHERE id=?",
                (status, iso(), bytes_, artifact, redact.redact(error) if error else None,
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

    # artifacts -----------------------------------------------------------------------
    def add_artifact(self, *, run_id: int | None, tier: str, target: str, path: str,
                     created_at: datetime, size: int, sha256: str, base_id: int | None = None,
                     extra: dict[str, Any] | None = None) -> int:
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO artifacts(run_id, tier, target, path, created_at, size, sha256,"
                " base_id, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, tier, target, path, iso(created_at), size, sha256, base_id,
                 json.dumps(extra or {}, default=str)),
            )
            return int(cur.lastrowid or 0)

    def artifact(self, artifact_id: int) -> Artifact | None:
        row = self.db.execute("SELECT * FROM artifacts WHERE id=?", (artifact_id,)).fetchone()
        return Artifact.from_row(row) if row else None

    def artifact_by_path(self, path: str) -> Artifact | None:
        row = self.db.execute("SELECT * FROM artifacts WHERE path=?", (path,)).fetchone()
        return Artifact.from_row(row) if row else None

    def artifacts(self, tier: str | None = None, target: str | None = None,
                  statuses: Iterable[str] = ("ok",)) -> list[Artifact]:
        """Artifacts, oldest first."""
        statuses = list(statuses)
        query = f"SELECT * FROM artifacts WHERE status IN ({','.join('?' * len(statuses))})"
        args: list[Any] = list(statuses)
        if tier:
            query += " AND tier=?"
            args.append(tier)
        if target:
            query += " AND target=?"
            args.append(target)
        rows = self.db.execute(query + " ORDER BY created_at, id", args)
        return [Artifact.from_row(row) for row in rows]

    def set_artifact_status(self, artifact_id: int, status: str) -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE artifacts SET status=?, deleted_at=CASE WHEN ?='deleted' THEN ?"
                " ELSE deleted_at END WHERE id=?",
                (status, status, iso(), artifact_id))

    def mark_verified(self, artifact_id: int, ok: bool) -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE artifacts SET verified_at=?, status=CASE WHEN ? THEN status"
                " ELSE 'corrupt' END WHERE id=?", (iso(), ok, artifact_id))

    # file index ------------------------------------------------------------------------
    def add_files(self, artifact_id: int, rows: Iterable[tuple[Any, ...]]) -> None:
        """rows: (path, type, size, mtime_ns, ctime_ns, inode, mode, uid, gid, link, hash)."""
        with self.tx() as db:
            db.executemany(
                "INSERT INTO files(artifact_id, path, type, size, mtime_ns, ctime_ns, inode,"
                " mode, uid, gid, link, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((artifact_id, *row) for row in rows),
            )

    def add_deleted_paths(self, artifact_id: int, paths: Iterable[str]) -> None:
        with self.tx() as db:
            db.executemany("INSERT INTO deleted_paths(artifact_id, path) VALUES (?, ?)",
                           ((artifact_id, path) for path in paths))

    def files(self, artifact_id: int) -> Iterator[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM files WHERE artifact_id=? ORDER BY path", (artifact_id,))

    def deleted_paths(self, artifact_id: int) -> list[str]:
        rows = self.db.execute(
            "SELECT path FROM deleted_paths WHERE artifact_id=? ORDER BY path", (artifact_id,))
        return [row["path"] for row in rows]

    # containers stopped for a consistent archive ---------------------------------------
    def record_stopped(self, container_id: str, name: str, run_id: int | None) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO stopped_containers(container_id, name, run_id, stopped_at)"
                " VALUES (?, ?, ?, ?)", (container_id, name, run_id, iso()))

    def forget_stopped(self, container_id: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM stopped_containers WHERE container_id=?", (container_id,))

    def stopped_containers(self) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM stopped_containers ORDER BY stopped_at"))

    # key/value state ---------------------------------------------------------------------
    def set_state(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", (key, value))

    def instance_id(self) -> str:
        """A random id of this history (labels helper containers as ours)."""
        current = self.get_state("instance_id")
        if current is None:
            import uuid

            with self.tx() as db:
                db.execute("INSERT OR IGNORE INTO state(key, value) VALUES ('instance_id', ?)",
                           (uuid.uuid4().hex,))
            current = self.get_state("instance_id")
        assert current is not None
        return current

    def get_state(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return row["value"] if row else None


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]


def open_history(state_dir: Path) -> History:
    return History(state_dir)
