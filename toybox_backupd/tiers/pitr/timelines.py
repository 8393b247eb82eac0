"""Timelines: which WAL belongs to which history, once a cluster restore has forked it.

A recovery that ends at a moment is promoted: the server's WAL goes on on a new timeline (2,
then 3, ...), and the timeline's history file (`00000002.history`, one line per ancestor:
`1<TAB>0/5000A28<TAB>why`) says where it forked from its parent. After `restore cluster` the
archive holds two branches past that point: the new timeline's segments (`00000002…`) and what
the old timeline wrote until the restore stopped it (`00000001…`, from the fork's segment on).
A recovery must read one branch only. On timeline k's path, segment n is the file of the
timeline that k's history says was current at n; the segment holding a switch point belongs to
the newer timeline (it holds the older one's WAL up to the switch, as PostgreSQL reads it).

Nothing here reads files or talks to a server: wal.py and pitr_restore.py give it the history
files and segment numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SEGMENT_SIZE = 16 * 1024 * 1024
HISTORY = re.compile(r"^([0-9A-F]{8})\.history$")


def lsn_value(text: str) -> int:
    """The byte position `text` ("0/5000A28") names."""
    high, low = (int(part, 16) for part in text.split("/"))
    return (high << 32) + low


def segment_of(lsn: int) -> int:
    """The number of the 16 MiB segment holding byte position `lsn`."""
    return lsn // SEGMENT_SIZE


def history_name(timeline: int) -> str:
    """The name of `timeline`'s history file (00000002.history)."""
    return f"{timeline:08X}.history"


def segment_name(timeline: int, number: int) -> str:
    """The WAL file name of segment `number` on `timeline` (16 MiB segments)."""
    per_log = 0x100000000 // SEGMENT_SIZE
    return f"{timeline:08X}{number // per_log:08X}{number % per_log:08X}"


@dataclass(frozen=True)
class Switch:
    """Timeline `parent` ended at byte position `lsn`; the next one on the path began there."""

    parent: int
    lsn: int


def parse_history(text: str) -> list[Switch]:
    """The switches of a timeline history file, oldest first (comments and blank lines
    skipped, as PostgreSQL does). ValueError when a line does not parse."""
    switches = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parent, lsn = line.split()[:2]
        switches.append(Switch(int(parent), lsn_value(lsn)))
    return switches


@dataclass
class Timelines:
    """The history of every timeline the archive knows ({timeline: its switches})."""

    histories: dict[int, list[Switch]] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> Timelines:
        """The history files in `folder`; one that does not parse counts as unknown."""
        histories = {}
        for path in folder.glob("*.history"):
            match = HISTORY.match(path.name)
            if match is None or not path.is_file():
                continue
            try:
                histories[int(match.group(1), 16)] = parse_history(
                    path.read_text(encoding="utf-8", errors="replace"))
            except ValueError:
                continue
        return cls(histories)

    def known(self, seen: Iterable[int] = ()) -> list[int]:
        """Every timeline known (1, those with a history, and `seen`), oldest first."""
        return sorted({1, *self.histories, *seen})

    def owner(self, timeline: int, number: int) -> int:
        """The timeline whose file holds segment `number` on `timeline`'s path."""
        for switch in self.histories.get(timeline, []):
            if number < segment_of(switch.lsn):
                return switch.parent
        return timeline

    def begins(self, timeline: int) -> int | None:
        """The segment `timeline` begins in (None for timeline 1, or an unknown history)."""
        switches = self.histories.get(timeline)
        return segment_of(switches[-1].lsn) if switches else None

    def contains(self, timeline: int, other: int, lsn: int) -> bool:
        """Whether position `lsn` of timeline `other` is on `timeline`'s path."""
        if other == timeline:
            return True
        return any(switch.parent == other and lsn <= switch.lsn
                   for switch in self.histories.get(timeline, []))
