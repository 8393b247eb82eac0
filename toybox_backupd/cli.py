"""The `toybox-backupd` command: a thin layer over the package."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from . import __version__, logs, redact
from .settings import JOBS, Settings, SettingsError, load

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toybox-backupd",
        description="Logical (pg_dump), full and differential volume backups of a docker "
                    "compose stack, with a SQLite catalog, restores and email reports.",
    )
    parser.add_argument("--version", action="version", version=f"toybox-backupd {__version__}")
    parser.add_argument("--env-file", default=os.environ.get("TOYBOX_ENV_FILE", ".env"),
                        help="settings file (default: .env; the environment overrides it)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("run", help="run the daemon: schedules, retention, emails (the sidecar's job)")

    p = sub.add_parser("backup", help="run one backup now, through the scheduler's path")
    p.add_argument("job", choices=JOBS, help="pgdump | full | diff")
    p.add_argument("--volume", action="append", metavar="NAME",
                   help="only this volume (full/diff; repeatable)")

    p = sub.add_parser("list", help="restore points of every tier")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tier", choices=("logical", "full", "diff"))

    p = sub.add_parser("history", help="recent runs and their outcome")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=20)

    p = sub.add_parser("restore", help="restore a database, a volume or some files")
    rsub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    r = rsub.add_parser("db", help="restore the database from a pg_dump")
    r.add_argument("--at", metavar="WHEN", help="newest dump at or before WHEN (ISO, in TZ)")
    r.add_argument("--table", action="append", metavar="NAME", help="only this table (repeatable)")
    r.add_argument("--into", metavar="DBNAME", help="restore into this (new) database instead")
    r.add_argument("--yes", action="store_true", help="do not ask before replacing")
    r = rsub.add_parser("volume", help="rebuild a volume as it was at a restore point")
    r.add_argument("name")
    r.add_argument("--at", metavar="WHEN")
    r.add_argument("--to", metavar="OTHER", help="restore into this volume instead")
    r.add_argument("--yes", action="store_true", help="do not ask before replacing")
    r.add_argument("--stop-containers", action="store_true",
                   help="stop running containers that use the volume, start them after")
    r = rsub.add_parser("files", help="extract matching paths of a volume into a directory")
    r.add_argument("name")
    r.add_argument("patterns", nargs="+", metavar="PATTERN", help="glob, e.g. 'uploads/2026-01-2*'")
    r.add_argument("--at", metavar="WHEN")
    r.add_argument("--dest", required=True, metavar="DIR")

    p = sub.add_parser("verify", help="re-check checksums and readability of every kept artifact")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("schedule", help="each job's schedule and next 5 run times")
    p.add_argument("--json", action="store_true")

    sub.add_parser("check", help="validate settings; reach Docker, PostgreSQL, backup dir, SMTP")
    sub.add_parser("healthcheck", help="exit 0 only if the daemon is alive and backups are fresh")
    sub.add_parser("reindex", help="rebuild the catalog from the manifests in BACKUP_DIR")

    p = sub.add_parser("notify", help="email tools")
    nsub = p.add_subparsers(dest="notify_command", metavar="WHAT", required=True)
    nsub.add_parser("test", help="send a test email and report how the SMTP server answered")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    strict = args.command in ("run", "check")
    try:
        settings = load(args.env_file, strict=strict)
    except SettingsError as exc:
        logs.setup("console", "INFO")
        print(f"toybox-backupd: the settings are not usable ({args.env_file} and the environment):",
              file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(settings.log_format, settings.log_level)
    try:
        return int(dispatch(args, settings) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `toybox-backupd list | head`
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:  # a clear line, never a traceback with secrets in it
        from .runner import describe_unexpected

        message = str(exc) if _is_plain(exc) else describe_unexpected(exc)
        print(f"toybox-backupd: {redact.redact(message)}", file=sys.stderr)
        return EXIT_FAIL


def _is_plain(exc: BaseException) -> bool:
    from .catalog import CatalogError
    from .database import DatabaseError
    from .docker_api import DockerError
    from .runner import JobError

    return isinstance(exc, DockerError | DatabaseError | JobError | UserError | CatalogError)


class UserError(Exception):
    """A request that cannot be carried out; nothing was changed."""


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    command = args.command
    if command == "run":
        from . import daemon

        return daemon.run(settings)
    if command == "backup":
        from .history import History
        from .runner import run_job

        run_id = run_job(settings, args.job, volumes=args.volume)
        with History(settings.state_dir) as history:
            run = history.run(run_id)
        assert run is not None
        if run.status == "ok":
            print(f"run {run_id}: ok, {run.artifact}")
            return EXIT_OK
        print(f"run {run_id}: {run.status}: {run.error}", file=sys.stderr)
        return EXIT_FAIL
    if command == "list":
        return cmd_list(settings, args)
    if command == "history":
        return cmd_history(settings, args)
    if command == "schedule":
        return cmd_schedule(settings, args)
    if command == "check":
        from . import checks

        return checks.run_checks(settings)
    if command == "restore":
        return cmd_restore(settings, args)
    if command == "verify":
        from . import verify

        return verify.run(settings, as_json=args.json)
    if command == "healthcheck":
        from . import daemon

        healthy, reasons = daemon.healthcheck(settings)
        for reason in reasons:
            print(reason)
        return EXIT_OK if healthy else EXIT_FAIL
    if command == "reindex":
        from . import catalog

        added = catalog.reindex(settings)
        print(f"reindex: {added} artifact(s) added to the catalog")
        return EXIT_OK
    if command == "notify":
        from . import notify

        ok, message = notify.send_test(settings)
        print(message, file=sys.stdout if ok else sys.stderr)
        return EXIT_OK if ok else EXIT_FAIL
    raise UserError(f"unknown command {command}")


def confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        print(f"{question}\nrefusing without --yes (no terminal to ask on)", file=sys.stderr)
        return False
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")


def cmd_restore(settings: Settings, args: argparse.Namespace) -> int:
    from . import catalog
    from .runner import job_lock

    at = catalog.parse_when(args.at, settings.zone) if args.at else None
    # a restore waits for a running backup, and no backup (nor start-up recovery) runs beside it
    with job_lock(settings.state_dir, f"restore {args.what}",
                  wait_log=lambda holder: print(f"waiting for {holder} to finish…",
                                                file=sys.stderr)):
        _restore(settings, args, at)
    return EXIT_OK


def _restore(settings: Settings, args: argparse.Namespace, at: datetime | None) -> None:
    if args.what == "db":
        from . import logical

        logical.restore_db(settings, at=at, tables=args.table or [], into=args.into,
                           confirm=None if args.yes else confirm)
    elif args.what == "volume":
        from . import volumes

        volumes.restore_volume(settings, args.name, at=at, to=args.to,
                               confirm=None if args.yes else confirm,
                               stop_containers=args.stop_containers)
    else:
        from . import volumes

        volumes.restore_files(settings, args.name, args.patterns, at=at, dest=args.dest)


def _local(moment: datetime, settings: Settings) -> str:
    return moment.astimezone(settings.zone).strftime("%Y-%m-%d %H:%M:%S")


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    from .history import History
    from .runner import human

    with History(settings.state_dir) as history:
        items = history.artifacts(tier=args.tier, statuses=("ok", "corrupt"))
    if args.json:
        print(json.dumps([item.as_dict() for item in items], indent=2))
        return EXIT_OK
    if not items:
        print("no restore points yet")
        return EXIT_OK
    rows = [("ID", "TIER", "TARGET", f"TIME ({settings.tz})", "SIZE", "SHA256", "STATUS", "BASE")]
    for item in items:
        rows.append((str(item.id), item.tier, item.target, _local(item.created_at, settings),
                     human(item.size), item.sha256[:12], item.status,
                     str(item.base_id) if item.base_id else "-"))
    _table(rows)
    return EXIT_OK


def cmd_history(settings: Settings, args: argparse.Namespace) -> int:
    from .history import History
    from .runner import human

    with History(settings.state_dir) as history:
        runs = history.runs(limit=args.limit)
        mail = {run.id: _mail_status(history, run.id) for run in runs}
    if args.json:
        print(json.dumps([{**run.as_dict(), "email": mail[run.id]} for run in runs], indent=2))
        return EXIT_OK
    if not runs:
        print("no runs yet")
        return EXIT_OK
    rows = [("RUN", "JOB", "TARGET", "TRIGGER", "STATUS", f"STARTED ({settings.tz})", "TIME",
             "SIZE", "EMAIL", "RESULT")]
    for run in runs:
        duration = f"{run.duration:.1f}s" if run.duration is not None else "-"
        result = run.error if run.status != "ok" else (run.artifact or "")
        rows.append((str(run.id), run.job, run.target or "", run.trigger, run.status,
                     _local(run.started_at, settings), duration, human(run.bytes),
                     mail[run.id] or "-", (result or "")[:120]))
    _table(rows)
    return EXIT_OK


def _mail_status(history: Any, run_id: int) -> str | None:
    row = history.db.execute(
        "SELECT status, attempts FROM outbox WHERE run_id=? ORDER BY id DESC LIMIT 1", (run_id,)
    ).fetchone()
    if row is None:
        return None
    return str(row["status"]) if row["status"] != "retrying" else f"retrying ({row['attempts']})"


def cmd_schedule(settings: Settings, args: argparse.Namespace) -> int:
    from .schedule import next_times

    now = datetime.now(settings.zone)
    jobs = []
    for job in JOBS:
        expr = settings.schedule_for(job)
        enabled = settings.job_enabled(job)
        times = next_times(expr, settings.zone, now, 5) if enabled else []
        jobs.append({
            "job": job, "schedule": expr, "timezone": settings.tz, "enabled": enabled,
            "targets": [settings.postgres_db] if job == "pgdump" else settings.backup_volumes,
            "next": [moment.isoformat() for moment in times],
        })
    if args.json:
        print(json.dumps({"timezone": settings.tz, "jobs": jobs}, indent=2))
        return EXIT_OK
    for job in jobs:
        state = "" if job["enabled"] else "  (disabled)"
        print(f"{job['job']:<7} {job['schedule'] or '-':<16} {settings.tz}{state}")
        for moment in job["next"]:
            local = datetime.fromisoformat(moment).astimezone(settings.zone)
            print(f"          {local.strftime('%a %Y-%m-%d %H:%M %Z')}")
    return EXIT_OK


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
