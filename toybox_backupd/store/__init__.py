"""The SQLite history and catalog: the only module that speaks SQL.

One file in STATE_DIR, WAL mode, a busy timeout so the daemon and a CLI process can use it at
once; the schema carries a version and moves forward by migrations (schema.py).
"""

from __future__ import annotations

from typing import Self

from .base import DB_NAME
from .catalog import CatalogMixin
from .offsite import OffsiteMixin
from .outbox import OutboxMixin
from .records import Artifact, Copy, Run
from .runs import RunsMixin
from .scan import ScanMixin
from .schema import SCHEMA_VERSION
from .state import StateMixin

__all__ = ["DB_NAME", "SCHEMA_VERSION", "Artifact", "Copy", "Run", "Store"]


class Store(RunsMixin, CatalogMixin, ScanMixin, OutboxMixin, OffsiteMixin, StateMixin):
    """Runs, artifacts and their file index and off-site copies, the email outbox, state,
    stopped containers.

    Use as a context manager: `with Store(settings.state_dir) as store: ...`.
    """

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
