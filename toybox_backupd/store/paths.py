"""File names in the catalog, byte for byte.

In Python a path is text decoded as UTF-8 with `surrogateescape`, so any byte string a volume
holds round-trips. SQLite text must be valid UTF-8: a name that is (nearly all) is stored as
TEXT, as it always was; any other (`caf\\xe9.jpg` from an older system or a zip file) is stored
as its exact bytes (a BLOB). Both columns compare equal only to the same kind, and one name is
always stored the same way, so comparisons between scans and indexes stay exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PATH_COLUMNS = ("path", "link")


def to_db(path: str | None) -> str | bytes | None:
    """The value stored for `path`."""
    if path is None:
        return None
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape")
    return path


def from_db(value: Any) -> Any:
    """The path (text) for a stored value."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def row_to_db(row: Iterable[Any], positions: tuple[int, ...] = (0, 9)) -> tuple[Any, ...]:
    """An index row (path, type, size, ..., link, ...) with its path columns as stored."""
    return _map(row, positions, to_db)


def row_from_db(row: Iterable[Any], positions: tuple[int, ...] = (0, 9)) -> tuple[Any, ...]:
    """The inverse of `row_to_db`."""
    return _map(row, positions, from_db)


def _map(row: Iterable[Any], positions: tuple[int, ...], convert: Any) -> tuple[Any, ...]:
    values = list(row)
    for position in positions:
        if position < len(values):
            values[position] = convert(values[position])
    return tuple(values)
