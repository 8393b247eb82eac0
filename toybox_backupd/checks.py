"""`toybox-backupd check`: is every part the daemon needs reachable and usable?"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from . import database, docker_api, notify, redact
from .basics import human
from .pgtools import PgTools
from .settings import Settings


@dataclass
class Outcome:
    name: str
    ok: bool
    text: str


def _dir(path: os.PathLike[str] | str) -> str:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".toybox-check-"):
        pass
    return f"{path} writable, {human(shutil.disk_usage(path).free)} free"


def _docker() -> str:
    return f"engine {docker_api.ping()}"


def _database(settings: Settings) -> str:
    version = database.check_reachable(settings, attempts=1, timeout=5)
    return f"{settings.postgres_db} on {settings.postgres_host}:{settings.postgres_port} " \
           f"(PostgreSQL {version.split()[0]})"


def _pg_container(settings: Settings) -> str:
    tools = PgTools(settings)  # refuses a container that is not running
    identity = tools.check_same_server(settings.postgres_db)
    return (f"{tools.where} is running the server at {settings.postgres_host}:"
            f"{settings.postgres_port} ({identity})")


def _volumes(settings: Settings) -> str:
    missing = [v for v in settings.backup_volumes if not docker_api.volume_exists(v)]
    if missing:
        raise RuntimeError(f"no such Docker volume: {', '.join(missing)} (check BACKUP_VOLUMES)")
    return ", ".join(settings.backup_volumes)


def run_checks(settings: Settings) -> list[Outcome]:
    """Try each part in turn (settings, dirs, Docker, database, what a restore does to
    databases, the database container, volumes, SMTP); never raises."""
    checks: list[tuple[str, Callable[[], str]]] = [
        ("settings", lambda: "ok"),
        ("backup dir", lambda: _dir(settings.backup_dir)),
        ("state dir", lambda: _dir(settings.state_dir)),
        ("docker", _docker),
        ("database", lambda: _database(settings)),
        ("restore", lambda: database.try_restore(settings)),
    ]
    if settings.pg_container:
        checks.append(("db container", lambda: _pg_container(settings)))
    if settings.backup_volumes:
        checks.append(("volumes", lambda: _volumes(settings)))
    if settings.notify_email_to:
        checks.append(("smtp", lambda: notify.check_smtp(settings)))
    outcomes = []
    for name, check in checks:
        try:
            outcomes.append(Outcome(name, True, check()))
        except Exception as exc:
            outcomes.append(Outcome(name, False, redact.redact(str(exc))))
    return outcomes
