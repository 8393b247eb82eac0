"""`toybox-backupd check`: is every part the daemon needs reachable and usable?"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from . import database, docker_api, notify, pgtools, redact
from .atomic import TOOL_DIRS, looser_than
from .basics import human
from .pgtools import PgTools
from .settings import Settings


@dataclass
class Outcome:
    name: str
    ok: bool
    text: str
    warning: bool = False  # ok, but the operator should act


class Caveat(Exception):
    """Raised by a check that passes with a caveat."""


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
    container = tools.container
    result, out = docker_api.run(container, ["pg_dump", "--version"], user=pgtools.OS_USER)
    if result.exit_code != 0:
        raise RuntimeError(f"pg_dump does not run as user {pgtools.OS_USER!r} in container "
                           f"{container.name}: {result.stderr or out.decode(errors='replace')}")
    return (f"{tools.where} is running the server at {settings.postgres_host}:"
            f"{settings.postgres_port} ({identity}); {out.decode().strip()} as {pgtools.OS_USER}")


def _volumes(settings: Settings) -> str:
    missing = [v for v in settings.backup_volumes if not docker_api.volume_exists(v)]
    if missing:
        raise RuntimeError(f"no such Docker volume: {', '.join(missing)} (check BACKUP_VOLUMES)")
    return ", ".join(settings.backup_volumes)


def _permissions(settings: Settings) -> str:
    roots = [settings.backup_dir / top for top in TOOL_DIRS] + [settings.state_dir]
    count, examples = looser_than(roots, settings.backup_file_mode)
    if count:
        group = "g-w,o-rwx" if settings.backup_file_mode == "0640" else "go-rwx"
        raise Caveat(f"{count} backup file(s) or directories are more open than "
                       f"BACKUP_FILE_MODE={settings.backup_file_mode} allows, e.g. "
                       f"{'; '.join(examples)}: run `chmod -R {group}` on them (written before "
                       "0.2, or by hand)")
    return f"files {settings.backup_file_mode}, directories private"


def _secrets(settings: Settings) -> str:
    weak = settings.weak_secrets()
    if weak:
        raise Caveat("; ".join(weak))
    return "no weak password"


def _offsite(settings: Settings) -> str:
    from .offsite.target import open_target
    target = open_target(settings)
    assert target is not None
    target.probe()
    if settings.offsite_age_recipients:
        return (f"{target.url}: listed, wrote and deleted a probe object; encrypted for "
                f"{len(settings.offsite_age_recipients)} age recipient(s)")
    raise Caveat(f"{target.url}: listed, wrote and deleted a probe object; copies are NOT "
                 "encrypted (set OFFSITE_AGE_RECIPIENTS: whoever reads the bucket reads the "
                 "database and the uploads)")


def _identity(settings: Settings) -> str:
    from .offsite import crypto
    assert settings.age_identity_file is not None
    identities = crypto.load_identities(settings.age_identity_file)
    mine = set(crypto.public_keys(identities))
    wanted = set(settings.offsite_age_recipients)
    if wanted and not mine & wanted:
        raise RuntimeError(f"AGE_IDENTITY_FILE {settings.age_identity_file} holds no identity "
                           "for any of OFFSITE_AGE_RECIPIENTS: it cannot decrypt new copies")
    raise Caveat(f"AGE_IDENTITY_FILE {settings.age_identity_file} decrypts the copies; keep "
                 "it OFF this host as well (a lost host must not take the only key with it)")


def _pitr(settings: Settings) -> str:
    from .tiers import wal

    return wal.check_route(settings)


def run_checks(settings: Settings) -> list[Outcome]:
    """Try each part in turn (settings, dirs, Docker, database, what a restore does to
    databases, the database container, volumes, SMTP); never raises."""
    checks: list[tuple[str, Callable[[], str]]] = [
        ("settings", lambda: "ok"),
        ("backup dir", lambda: _dir(settings.backup_dir)),
        ("state dir", lambda: _dir(settings.state_dir)),
        ("permissions", lambda: _permissions(settings)),
        ("secrets", lambda: _secrets(settings)),
        ("docker", _docker),
        ("database", lambda: _database(settings)),
        ("restore", lambda: database.try_restore(settings)),
    ]
    if settings.pg_container:
        checks.append(("db container", lambda: _pg_container(settings)))
    if settings.pitr:
        checks.append(("pitr route", lambda: _pitr(settings)))
    if settings.backup_volumes:
        checks.append(("volumes", lambda: _volumes(settings)))
    if settings.notify_email_to:
        checks.append(("smtp", lambda: notify.check_smtp(settings)))
    if settings.offsite_url:
        checks.append(("off-site", lambda: _offsite(settings)))
    if settings.age_identity_file:
        checks.append(("age identity", lambda: _identity(settings)))
    outcomes = []
    for name, check in checks:
        try:
            outcomes.append(Outcome(name, True, check()))
        except Caveat as exc:
            outcomes.append(Outcome(name, True, redact.redact(str(exc)), warning=True))
        except Exception as exc:
            outcomes.append(Outcome(name, False, redact.redact(str(exc))))
    return outcomes
