"""`toybox-backupd check`: is every part the daemon needs reachable and usable?"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..adapters import database, docker_api, hints, pgtools
from ..adapters.pgtools import PgTools
from ..core import redact
from ..core.atomic import TOOL_DIRS, looser_than
from ..core.settings import Settings
from ..notify import outbox as notify
from ..tiers import registry as jobs


@dataclass
class Outcome:
    name: str
    ok: bool
    text: str
    warning: bool = False  # ok, but the operator should act


class Caveat(Exception):
    """Raised by a check that passes with a caveat."""


def _settings(settings: Settings) -> str:
    problems = [problem for job in jobs.all_jobs() if (problem := job.problem(settings))]
    if problems:
        raise RuntimeError("\n".join(problems))
    return "ok"


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
    missing = hints.missing_volumes(settings.backup_volumes)
    if missing:
        raise RuntimeError(missing)
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
    from ..places.offsite.target import open_target
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
    from ..places.offsite import crypto
    assert settings.age_identity_file is not None
    identities = crypto.load_identities(settings.age_identity_file)
    mine = set(crypto.public_keys(identities))
    wanted = set(settings.offsite_age_recipients)
    if wanted and not mine & wanted:
        raise RuntimeError(f"AGE_IDENTITY_FILE {settings.age_identity_file} holds no identity "
                           "for any of OFFSITE_AGE_RECIPIENTS: it cannot decrypt new copies")
    raise Caveat(f"AGE_IDENTITY_FILE {settings.age_identity_file} decrypts the copies; keep "
                 "it OFF this host as well (a lost host must not take the only key with it)")


def _signing(settings: Settings) -> str:
    """The signing key: its verify key printed (OFFSITE_VERIFY_KEYS on a new host), or why
    copies are unsigned."""
    from ..places.offsite import trust
    path = settings.offsite_signing_key_file
    if path is None:
        raise Caveat("OFFSITE_SIGNING_KEY_FILE is not set: new off-site copies are NOT signed, so "
                     "a restore refuses them without --trust-unsigned; make a key with "
                     "`toybox-backupd keys new --out /path/outside/STATE_DIR/signing-key.pem`")
    own = trust.signer(settings)
    assert own is not None
    mode = path.stat().st_mode & 0o777
    text = (f"{path} signs the off-site manifests and WAL checksums; verify key: "
            f"{own.verify_key} (keep it beside the age identity: a new host needs "
            "OFFSITE_VERIFY_KEYS=<it>)")
    if mode & 0o077:
        raise Caveat(f"{text}; the key file is mode {mode:o}: make it 0600 (chmod 600 {path})")
    return text


def _pitr(settings: Settings) -> str:
    from ..tiers.pitr import restore as pitr_restore
    from ..tiers.pitr import wal

    return wal.check_route(settings) + pitr_restore.check_recovery_image(settings)


def _optional_checks(settings: Settings) -> list[tuple[str, Callable[[], str]]]:
    """The checks of what is configured only sometimes: volumes, email, chat, off-site."""
    wanted = [
        ("pitr route", settings.pitr, lambda: _pitr(settings)),
        ("volumes", settings.backup_volumes, lambda: _volumes(settings)),
        ("smtp", settings.notify_email_to, lambda: notify.check_smtp(settings)),
        ("chat", settings.notify_url_list, lambda: notify.check_chat(settings)),
        ("off-site", settings.offsite_url, lambda: _offsite(settings)),
        ("signing key", settings.offsite_url or settings.offsite_signing_key_file,
         lambda: _signing(settings)),
        ("age identity", settings.age_identity_file, lambda: _identity(settings)),
    ]
    return [(name, check) for name, configured, check in wanted if configured]


def run_checks(settings: Settings) -> list[Outcome]:
    """Try each part in turn (settings, dirs, Docker, database, what a restore does to
    databases, the database container, volumes, SMTP, chat, off-site); never raises."""
    checks: list[tuple[str, Callable[[], str]]] = [
        ("settings", lambda: _settings(settings)),
        ("backup dir", lambda: hints.require_writable(settings.backup_dir, settings.backup_dir)),
        ("state dir", lambda: hints.require_writable(settings.state_dir, settings.backup_dir)),
        ("permissions", lambda: _permissions(settings)),
        ("secrets", lambda: _secrets(settings)),
        ("docker", _docker),
    ]
    if settings.postgres_db:  # volume backups only: no database to reach
        checks += [("database", lambda: _database(settings)),
                   ("restore", lambda: database.try_restore(settings))]
    if settings.pg_container and settings.postgres_db:
        checks.append(("db container", lambda: _pg_container(settings)))
    checks += _optional_checks(settings)
    outcomes = []
    for name, check in checks:
        try:
            outcomes.append(Outcome(name, True, check()))
        except Caveat as exc:
            outcomes.append(Outcome(name, True, redact.redact(str(exc)), warning=True))
        except Exception as exc:
            outcomes.append(Outcome(name, False, redact.redact(str(exc))))
    return outcomes
