"""Queries on the catalog: artifacts, their file index and the paths deleted since a full."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from ..core.basics import iso
from .base import StoreBase
from .paths import from_db, row_to_db, to_db
from .records import Artifact


class CatalogMixin(StoreBase):
    def add_artifact(self, *, run_id: int | None, tier: str, target: str, path: str,
                     created_at: datetime, size: int, sha256: str, base_id: int | None = None,
                     extra: dict[str, Any] | None = None,
                     files: Iterable[tuple[Any, ...]] = (), deleted: Iterable[str] = (),
                     status: str = "ok") -> int:
        """Catalog one artifact (path relative to BACKUP_DIR) with its file index and deleted
        paths, in one transaction; return its id. `status` is `ok`, or `remote` for one that
        is only off-site."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO artifacts(run_id, tier, target, path, created_at, size, sha256,"
                " base_id, extra, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, tier, target, path, iso(created_at), size, sha256, base_id,
                 json.dumps(extra or {}, default=str), status),
            )
            artifact_id = int(cur.lastrowid or 0)
            _insert_index(db, artifact_id, files, deleted)
            return artifact_id

    def revive_artifact(self, artifact_id: int, *, created_at: datetime, size: int, sha256: str,
                        base_id: int | None, extra: dict[str, Any],
                        files: Iterable[tuple[Any, ...]] = (),
                        deleted: Iterable[str] = ()) -> bool:
        """A `deleted` (or off-site only, `remote`) artifact whose files are back: `ok` again,
        as its manifest describes it, with its file index and deleted paths. False (nothing
        changed) unless it was deleted or remote."""
        with self.tx() as db:
            cur = db.execute(
                "UPDATE artifacts SET status='ok', deleted_at=NULL, verified_at=NULL,"
                " created_at=?, size=?, sha256=?, base_id=?, extra=? WHERE id=? AND"
                " status IN ('deleted', 'remote')", (iso(created_at), size, sha256, base_id,
                                      json.dumps(extra, default=str), artifact_id))
            if cur.rowcount != 1:
                return False
            db.execute("DELETE FROM files WHERE artifact_id=?", (artifact_id,))
            db.execute("DELETE FROM deleted_paths WHERE artifact_id=?", (artifact_id,))
            _insert_index(db, artifact_id, files, deleted)
        return True

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

    def run_artifacts(self, run_id: int) -> list[Artifact]:
        """The artifacts one run made, in the order it made them."""
        rows = self.db.execute("SELECT * FROM artifacts WHERE run_id=? ORDER BY id", (run_id,))
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
            _insert_index(db, artifact_id, rows, ())

    def add_deleted_paths(self, artifact_id: int, paths: Iterable[str]) -> None:
        with self.tx() as db:
            _insert_index(db, artifact_id, (), paths)

    def files(self, artifact_id: int) -> Iterator[dict[str, Any]]:
        """An artifact's file index, a dict per path (paths as text, byte for byte)."""
        for row in self.db.execute(
                "SELECT * FROM files WHERE artifact_id=? ORDER BY path", (artifact_id,)):
            entry = dict(row)
            entry["path"], entry["link"] = from_db(entry["path"]), from_db(entry["link"])
            yield entry

    def has_index(self, artifact_id: int) -> bool:
        """Whether the artifact's file index is in the catalog."""
        return self.db.execute("SELECT 1 FROM files WHERE artifact_id=? LIMIT 1",
                               (artifact_id,)).fetchone() is not None

    def deleted_paths(self, artifact_id: int) -> list[str]:
        rows = self.db.execute(
            "SELECT path FROM deleted_paths WHERE artifact_id=? ORDER BY path", (artifact_id,))
        return [from_db(row["path"]) for row in rows]

    def forget_index(self, artifact_id: int) -> None:
        """Drop a deleted artifact's file index (it only takes space in the database)."""
        with self.tx() as db:
            db.execute("DELETE FROM files WHERE artifact_id=?", (artifact_id,))
            db.execute("DELETE FROM deleted_paths WHERE artifact_id=?", (artifact_id,))


def _insert_index(db: sqlite3.Connection, artifact_id: int, files: Iterable[tuple[Any, ...]],
                  deleted: Iterable[str]) -> None:
    """An artifact's file index rows and its deleted paths, inside the caller's transaction."""
    db.executemany(
        "INSERT INTO files(artifact_id, path, type, size, mtime_ns, ctime_ns, inode,"
        " mode, uid, gid, link, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ((artifact_id, *row_to_db(row)) for row in files),
    )
    db.executemany("INSERT INTO deleted_paths(artifact_id, path) VALUES (?, ?)",
                   ((artifact_id, to_db(path)) for path in deleted))
