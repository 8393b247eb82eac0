"""The scan of a volume being archived: a temporary table of every path and what is chosen.

A volume's listing goes into `scan` (temporary, per connection), is compared with the base
full's file index in SQL, and streams back out as the new archive's index, so memory does not
grow with the number of files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .base import StoreBase
from .paths import from_db, row_from_db, row_to_db, to_db

INDEX_COLUMNS = "path, type, size, mtime_ns, ctime_ns, inode, mode, uid, gid, link, hash"
COMPARED = ("type", "size", "mtime_ns", "ctime_ns", "inode", "mode", "uid", "gid", "link")


class ScanMixin(StoreBase):
    def scan_reset(self) -> None:
        """An empty `scan` table for the next volume."""
        self.db.execute(f"CREATE TEMP TABLE IF NOT EXISTS scan ({INDEX_COLUMNS}, selected INTEGER,"
                        " seen INTEGER, PRIMARY KEY (path)) WITHOUT ROWID")
        self.db.execute("DELETE FROM scan")

    def scan_add(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """rows: (path, type, size, mtime_ns, ctime_ns, inode, mode, uid, gid, link)."""
        with self.tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO scan(path, type, size, mtime_ns, ctime_ns, inode, mode,"
                " uid, gid, link, hash, selected, seen)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 0, 0)", map(row_to_db, rows))

    def scan_select_all(self) -> None:
        self.db.execute("UPDATE scan SET selected=1")

    def scan_select_changed(self, base_id: int) -> list[str]:
        """Select what differs from artifact `base_id`'s index (and the parents of it).

        Returns the paths of the base's index that are gone from the volume.
        """
        differs = " OR ".join(f"f.{c} IS NOT s.{c}" for c in COMPARED)
        with self.tx() as db:
            db.execute(
                "UPDATE scan SET selected=1 WHERE path IN (SELECT s.path FROM scan s LEFT JOIN"
                f" files f ON f.artifact_id=? AND f.path=s.path WHERE f.path IS NULL OR {differs})",
                (base_id,))
            # Parents of changed paths come along: extracting into a directory changes its
            # mtime, and tar only sets it back for directories that are in the archive.
            db.executemany("UPDATE scan SET selected=1 WHERE path=?",
                           ((to_db(p),) for p in _parents(self.scan_selected_names())))
        return [from_db(row[0]) for row in self.db.execute(
            "SELECT f.path FROM files f WHERE f.artifact_id=? AND NOT EXISTS"
            " (SELECT 1 FROM scan s WHERE s.path=f.path) ORDER BY f.path", (base_id,))]

    def scan_selected_names(self) -> list[str]:
        return [from_db(row[0]) for row in self.db.execute(
            "SELECT path FROM scan WHERE selected=1 ORDER BY path")]

    def scan_mark_seen(self, hashes: list[tuple[str | None, str]]) -> None:
        """Record members that arrived in the archive: [(content hash or None, path)]."""
        with self.tx() as db:
            db.executemany("UPDATE scan SET seen=1, hash=? WHERE path=?",
                           ((digest, to_db(path)) for digest, path in hashes))

    def scan_take_vanished(self) -> list[str]:
        """Selected paths that never arrived (gone while read): removed from the scan."""
        with self.tx() as db:
            vanished = [from_db(row[0]) for row in db.execute(
                "SELECT path FROM scan WHERE selected=1 AND seen=0 ORDER BY path")]
            db.execute("DELETE FROM scan WHERE selected=1 AND seen=0")
        return vanished

    def scan_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM scan WHERE selected=1").fetchone()[0])

    def scan_index_rows(self) -> Iterator[tuple[Any, ...]]:
        """The new archive's file index, streamed from the table (not held in a list)."""
        return (row_from_db(row) for row in self.db.execute(
            f"SELECT {INDEX_COLUMNS} FROM scan WHERE selected=1 ORDER BY path"))


def _parents(paths: Iterable[str]) -> set[str]:
    parents: set[str] = set()
    for path in paths:
        while "/" in path:
            path = path.rsplit("/", 1)[0]
            if path in parents:
                break
            parents.add(path)
        parents.add(".")
    return parents
