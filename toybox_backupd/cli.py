"""The `toybox-backupd` command: a thin layer over the package."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from . import __version__
from .actions import manual
from .actions.manual import EXIT_CONFIG, EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, progress_text
from .core import logs, progress, redact
from .core.atomic import use_file_mode
from .core.basics import TimeLimitReached, ago, human, local_time
from .core.settings import Settings, SettingsError, load, where
from .store import Store
from .tiers import registry as jobs

# Each command imports what it needs when it runs: `healthcheck` and `--help` stay fast
# (the Docker SDK, psycopg and APScheduler cost ~0.5 s to import).

__all__ = ["build_parser", "main", "progress_text"]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command."""
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

    _add_backup(sub.add_parser("backup", help="run one backup now, through the scheduler's path"))

    _add_reports(sub)

    _add_restore(sub.add_parser("restore", help="restore a database, a volume or some files"))

    p = sub.add_parser("verify", help="re-check checksums and readability of every kept artifact")
    p.add_argument("--json", action="store_true")
    p.add_argument("--offsite", action="store_true",
                   help="check the off-site copies instead (by checksum where the store keeps "
                        "one, else by reading them)")

    p = sub.add_parser("schedule", help="each job's schedule and next 5 run times")
    p.add_argument("--json", action="store_true")

    sub.add_parser("check", help="validate settings; reach Docker, PostgreSQL, backup dir, SMTP")
    sub.add_parser("healthcheck", help="exit 0 only if the daemon is alive and backups are fresh")
    p = sub.add_parser("reindex", help="rebuild the catalog from the manifests in BACKUP_DIR")
    p.add_argument("--offsite", action="store_true",
                   help="from the manifests off-site (OFFSITE_URL): a new host with only .env")
    _add_trust_unsigned(p)
    p = sub.add_parser("keys", help="the off-site signing key")
    ksub = p.add_subparsers(dest="keys_command", metavar="WHAT", required=True)
    k = ksub.add_parser("new", help="make a new signing key file (OFFSITE_SIGNING_KEY_FILE); "
                                    "print its verify key")
    k.add_argument("--out", required=True, metavar="FILE", help="the key file to create "
                   "(never overwritten; keep it outside STATE_DIR, like the age identity)")

    p = sub.add_parser("notify", help="email tools")
    nsub = p.add_subparsers(dest="notify_command", metavar="WHAT", required=True)
    nsub.add_parser("test", help="send a test email and a test chat message (NOTIFY_URLS); "
                                 "report how each was answered")
    return parser


def _add_trust_unsigned(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-unsigned", action="store_true",
                   help="accept off-site manifests and WAL checksums that carry no signature "
                        "(copies made before OFFSITE_SIGNING_KEY_FILE was set)")


def _add_backup(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB",
                   help=f"{' | '.join(jobs.names())} (pgdump is another name for logical)")
    p.add_argument("--volume", action="append", metavar="NAME",
                   help="only this volume (full/diff; repeatable)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print where the time went (helper, scan, tar, fsync, ...)")
    p.add_argument("--no-daemon", action="store_true",
                   help="run it in this process even when the daemon could (also: "
                        "TOYBOX_NO_DAEMON=1)")


def _add_reports(sub: Any) -> None:
    """The read-only reports: list, history, status."""
    p = sub.add_parser("list", help="restore points of every tier")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tier", choices=jobs.names())
    p = sub.add_parser("history", help="recent runs and their outcome")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=20)
    p = sub.add_parser("status", help="one screen: last and next runs, restore points, off-site "
                                      "lag, free space, what needs attention")
    p.add_argument("--json", action="store_true")


def _add_restore(p: argparse.ArgumentParser) -> None:
    rsub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    r = rsub.add_parser("db", help="restore the database from a pg_dump")
    r.add_argument("--at", metavar="WHEN", help="newest dump at or before WHEN (ISO, in TZ); "
                   "with PITR=on the database as it was at that second")
    r.add_argument("--table", action="append", metavar="NAME", help="only this table (repeatable)")
    r.add_argument("--into", metavar="DBNAME", help="restore into this (new) database instead")
    r.add_argument("--yes", action="store_true", help="do not ask before replacing")
    r.add_argument("--nearest", action="store_true", help="with PITR: when the WAL does not "
                   "reach WHEN, restore the newest dump at or before it (--yes alone refuses)")
    r = rsub.add_parser("volume", help="rebuild a volume as it was at a restore point")
    r.add_argument("name")
    r.add_argument("--at", metavar="WHEN")
    r.add_argument("--to", metavar="OTHER", help="restore into this volume instead")
    r.add_argument("--yes", action="store_true", help="do not ask before replacing")
    r.add_argument("--stop-containers", action="store_true",
                   help="stop running containers that use the volume, start them after")
    r = rsub.add_parser("cluster", help="with PITR: rebuild the database's data volume as the "
                        "cluster was at a moment (base backup + WAL)")
    r.add_argument("--at", metavar="WHEN", help="that moment (ISO, in TZ); default: the newest "
                   "moment the WAL reaches")
    r.add_argument("--volume", metavar="NAME", help="the data volume (default: the one at "
                   "PG_CONTAINER's PGDATA)")
    r.add_argument("--yes", action="store_true", help="do not ask before replacing")
    r.add_argument("--stop-containers", action="store_true",
                   help="stop running containers that use the volume, start them after")
    r = rsub.add_parser("files", help="extract matching paths of a volume into a directory")
    r.add_argument("name")
    r.add_argument("patterns", nargs="+", metavar="PATTERN", help="glob, e.g. 'uploads/2026-01-2*'")
    r.add_argument("--at", metavar="WHEN")
    r.add_argument("--dest", required=True, metavar="DIR")
    for r in rsub.choices.values():
        _add_trust_unsigned(r)


def main(argv: Sequence[str] | None = None) -> int:
    """The `toybox-backupd` command; returns the exit status (0 ok, 1 failed, 2 bad settings)."""
    args = build_parser().parse_args(argv)
    strict = args.command in ("run", "check")
    try:
        settings = load(args.env_file, strict=strict)
    except SettingsError as exc:
        if args.command == "run":  # stay up and say so: a restart loop would tell nobody
            from .daemon import unusable

            fallback = exc.fallback
            logs.setup(fallback.log_format if fallback else "console", "INFO")
            return unusable.wait(exc.problems, fallback, where(args.env_file))
        logs.setup("console", "INFO")
        print(f"toybox-backupd: the settings are not usable ({where(args.env_file)}):",
              file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    if getattr(args, "trust_unsigned", False):
        settings = settings.model_copy(update={"offsite_trust_unsigned": True})
    _setup_logs(settings, args, argv)
    use_file_mode(settings.backup_file_mode)
    try:
        return _echo_exit(args, int(COMMANDS[args.command](settings, args) or 0))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        logs.echo("manual command interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `toybox-backupd list | head`
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:  # a clear line, never a traceback with secrets in it
        message = manual.failure(exc)
        print(f"toybox-backupd: {message}", file=sys.stderr)
        logs.echo("manual command failed", error=message)
        return EXIT_FAIL


# commands that change things: their lines also go to the daemon's log (docker compose logs)
ECHOED = ("backup", "restore", "verify", "reindex")


def _setup_logs(settings: Settings, args: argparse.Namespace,
                argv: Sequence[str] | None) -> None:
    """The daemon logs in LOG_FORMAT; a command at a terminal in console format, and the
    commands in ECHOED copy their lines to TOYBOX_LOG_MIRROR (the image: PID 1's output)."""
    daemon = args.command == "run"
    mirror = (logs.open_mirror(os.environ.get("TOYBOX_LOG_MIRROR"))
              if args.command in ECHOED else None)
    logs.setup(settings.log_format if daemon else logs.terminal_format(settings.log_format),
               settings.log_level, mirror=mirror, mirror_format=settings.log_format)
    if mirror is not None:
        logs.bind(command=args.command, pid=os.getpid())
        words = " ".join(argv if argv is not None else sys.argv[1:])
        logs.echo(f"manual command: toybox-backupd {redact.redact(words)}")


def _echo_exit(args: argparse.Namespace, code: int) -> int:
    if args.command in ECHOED:
        logs.echo("manual command finished", exit_code=code)
    return code


def say(line: str) -> None:
    """Show one line to the operator (the `say` callback of restores), and log it to the
    daemon's log when the command copies its lines there."""
    print(line)
    logs.echo(line)


class StdTerminal:
    """This process's own stdout and stderr, as a manual.Terminal."""

    progress = True

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def write(self, stream: str, text: str) -> None:
        print(text, end="", file=sys.stdout if stream == "out" else sys.stderr, flush=True)


def progress_printer() -> manual.ProgressPrinter:
    """Progress of restores, verify and manual backups on this process's stderr."""
    return manual.ProgressPrinter(StdTerminal())


def confirm(question: str) -> bool:
    """Ask on the terminal; without one, refuse (the caller says to pass --yes)."""
    if not sys.stdin.isatty():
        print(f"{question}\nrefusing without --yes (no terminal to ask on)", file=sys.stderr)
        return False
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")


# commands ------------------------------------------------------------------------------------
def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """`run`: the daemon, until SIGTERM/SIGINT."""
    from .daemon import loop

    return loop.run(settings, where(args.env_file))


def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    """`backup JOB`: one run now, in this process; exit 1 unless it succeeded."""
    from .actions import runner

    return manual.backup(settings, args.job, args.volume, args.verbose, StdTerminal(),
                         run=lambda job: runner.run_job(settings, job, volumes=args.volume))


def cmd_restore(settings: Settings, args: argparse.Namespace) -> int:
    """`restore db|volume|files`: asks first, then holds the run lock, within its time limit."""
    from .catalog.restore_points import parse_when

    at = parse_when(args.at, settings.zone) if args.at else None
    ask = None if getattr(args, "yes", False) else confirm
    what = f"restore {args.what}"
    with progress.listening(progress_printer()):
        _restore(settings, args, at, ask, what)
    return EXIT_OK


def _restore(settings: Settings, args: argparse.Namespace, at: datetime | None,
             ask: Any, what: str) -> None:
    from .tiers.logical import dump as logical
    from .tiers.volumes import archive as volumes

    if args.what == "db":
        # asks before it takes the lock: an unanswered prompt never holds up a backup
        restore: Any = logical.restore_db
        if at is not None and settings.pitr:  # to the moment: base backup + WAL, else a dump
            from .tiers.pitr.restore import restore_db_at

            restore = functools.partial(restore_db_at, nearest=args.nearest)
        restore(settings, at=at, tables=args.table or [], into=args.into,
                confirm=ask, say=say, hold=lambda: _restore_lock(settings, what))
    elif args.what == "cluster":
        from .tiers.pitr.restore import restore_cluster_at

        restore_cluster_at(settings, at, volume=args.volume, confirm=ask,
                           stop_containers=args.stop_containers, say=say,
                           hold=lambda: _restore_lock(settings, what))
    elif args.what == "volume":
        volumes.restore_volume(settings, args.name, at=at, to=args.to, confirm=ask,
                               stop_containers=args.stop_containers, say=say,
                               hold=lambda: _restore_lock(settings, what))
    else:
        with _restore_lock(settings, what):
            volumes.restore_files(settings, args.name, args.patterns, at=at, dest=args.dest,
                                  say=say)


@contextlib.contextmanager
def _restore_lock(settings: Settings, what: str, limit: bool = True) -> Iterator[None]:
    """The run lock (no backup beside a restore), and RESTORE_TIME_LIMIT_MIN on what it holds."""
    from .core import locks

    with locks.run_lock(settings.state_dir, what,
                        wait_log=lambda holder: print(f"waiting for {holder} to finish…",
                                                      file=sys.stderr)):
        if not limit:
            yield
            return
        minutes = settings.restore_time_limit_min

        def expire(_signum: int, _frame: object) -> None:
            raise TimeLimitReached(f"{what} reached its time limit of {minutes} min "
                                   "(RESTORE_TIME_LIMIT_MIN) and was stopped")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(minutes * 60)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    """`verify`: every kept artifact re-read; exit 1 if any is bad."""
    from .actions import verify

    with _restore_lock(settings, "verify", limit=False), progress.listening(progress_printer()):
        if args.offsite:
            results, unknown = verify.verify_offsite(settings), []
        else:
            results = verify.verify_all(settings)
            unknown = verify.unknown_files(settings)
    corrupt = [r for r in results if not r.ok and r.checked]
    unchecked = [r for r in results if not r.checked]
    if args.json:
        print(json.dumps([result.as_dict() for result in results], indent=2))
        return 1 if corrupt or unchecked else 0
    for result in results:
        state = "ok       " if result.ok else ("CORRUPT  " if result.checked else "UNCHECKED")
        print(f"{state} {result.tier:<8} {result.path}"
              + (f"\n          {result.problem}" if result.problem else ""))
    print(f"{len(results) - len(corrupt) - len(unchecked)} of {len(results)} artifacts verified"
          + (f", {len(corrupt)} bad" if corrupt else "")
          + (f", {len(unchecked)} could not be checked now (try again)" if unchecked else ""))
    if unknown:
        print(f"{len(unknown)} file(s) in BACKUP_DIR that the catalog does not know (`reindex` adds "
              "the tool's own; anything else is not a backup):")
        for path in unknown[:50]:
            print(f"          {path}")
    return 1 if corrupt or unchecked else 0


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    """`check`: every part tried; exit 1 if any fails."""
    from .actions import checks

    outcomes = checks.run_checks(settings)
    for outcome in outcomes:
        state = "FAIL" if not outcome.ok else ("WARN" if outcome.warning else "ok  ")
        print(f"{state}  {outcome.name:<12} {outcome.text}")
    return EXIT_OK if all(outcome.ok for outcome in outcomes) else EXIT_FAIL


def cmd_healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    """`healthcheck`: exit 0 only if the daemon is alive and backups are fresh."""
    from .daemon.health import healthcheck

    healthy, reasons = healthcheck(settings)
    for reason in reasons:
        print(reason)
    return EXIT_OK if healthy else EXIT_FAIL


def cmd_reindex(settings: Settings, args: argparse.Namespace) -> int:
    """`reindex [--offsite]`: the catalog rebuilt from the manifests (local, or off-site)."""
    from .catalog import reindex

    if args.offsite:
        from .catalog.reindex_offsite import reindex_offsite
        done = reindex_offsite(settings)
    else:
        done = reindex.reindex(settings.backup_dir, settings.state_dir)
    for path, why in done.skipped:
        print(f"skipped {path}: {why}")
    print(f"reindex: {len(done.added)} artifact(s) added to the catalog"
          + (f", {len(done.skipped)} skipped" if done.skipped else ""))
    return EXIT_OK


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    """`keys new --out FILE`: a new off-site signing key."""
    from pathlib import Path

    from .places.offsite import signing

    path = Path(args.out).expanduser()
    verify_key = signing.new_key_file(path)
    print(f"signing key written to {path} (mode 0600)")
    print(f"verify key: {verify_key}")
    print("Set OFFSITE_SIGNING_KEY_FILE to this file (outside STATE_DIR), keep a copy beside the "
          "age identity, and give a restore on a new host OFFSITE_VERIFY_KEYS=<verify key>. "
          "Rotating: keep the old verify key in OFFSITE_VERIFY_KEYS for the copies it signed.")
    return EXIT_OK


def cmd_notify(settings: Settings, args: argparse.Namespace) -> int:
    """`notify test`: a test email and a test chat message to each NOTIFY_URLS entry, and how
    each was answered."""
    from .notify import outbox as notify

    said = notify.send_test_chat(settings)
    if settings.notify_email_to or not said:
        said.insert(0, notify.send_test(settings))
    for ok, message in said:
        print(message, file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if all(ok for ok, _ in said) else EXIT_FAIL


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    """`list`: restore points, oldest first."""
    from .catalog.restore_points import listing, where

    with Store(settings.state_dir) as store:
        items = listing(store, args.tier)
    if args.json:
        print(json.dumps([{**item.as_dict(), "location": where(item, copy),
                           "offsite": copy.as_dict() if copy else None}
                          for item, copy in items], indent=2))
        return EXIT_OK
    if not items:
        print("no restore points yet")
        return EXIT_OK
    rows = [("ID", "TIER", "TARGET", f"TIME ({settings.tz})", "SIZE", "SHA256", "STATUS", "BASE",
             "WHERE")]
    for item, copy in items:
        status = item.status if item.status in ("ok", "corrupt") else (copy.status if copy else "")
        rows.append((str(item.id), item.tier, item.target,
                     local_time(item.created_at, settings.zone, "table"), human(item.size),
                     item.sha256[:12], status, str(item.base_id) if item.base_id else "-",
                     where(item, copy)))
    _table(rows)
    if settings.pitr and args.tier in (None, "base"):
        from .tiers.pitr.restore import window

        reach = window(settings)
        print(f"point in time ({settings.postgres_db}): "
              + (reach.text(settings.zone) if reach else "no base backup yet"))
    return EXIT_OK


def cmd_history(settings: Settings, args: argparse.Namespace) -> int:
    """`history`: recent runs, newest first, with their email's state."""
    with Store(settings.state_dir) as store:
        runs = store.runs(limit=args.limit)
        mail = {run.id: store.mail_status(run.id) for run in runs}
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
                     local_time(run.started_at, settings.zone, "table"), duration,
                     human(run.bytes), mail[run.id] or "-", (result or "")[:120]))
    _table(rows)
    return EXIT_OK


def cmd_schedule(settings: Settings, args: argparse.Namespace) -> int:
    """`schedule`: each job's schedule and next five times."""
    from .core.schedule import next_times

    now = datetime.now(settings.zone)
    listed = []
    for job in jobs.all_jobs():
        enabled = job.enabled(settings)
        times = next_times(job.schedule(settings), settings.zone, now, 5) if enabled else []
        listed.append({
            "job": job.name, "schedule": job.schedule(settings), "timezone": settings.tz,
            "enabled": enabled, "targets": job.targets(settings),
            "next": [moment.isoformat() for moment in times], "problem": job.problem(settings),
        })
    if args.json:
        print(json.dumps({"timezone": settings.tz, "jobs": listed}, indent=2))
        return EXIT_OK
    for entry in listed:
        state = "" if entry["enabled"] else "  (disabled)"
        print(f"{entry['job']:<7} {entry['schedule'] or '-':<16} {settings.tz}{state}")
        if entry["problem"]:
            print(f"          {entry['problem']}")
        for moment in entry["next"]:
            print(f"          {local_time(datetime.fromisoformat(moment), settings.zone, 'weekday')}")
    return EXIT_OK


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """`status`: one screen of what an operator checks first."""
    from .daemon import status as state

    now = datetime.now(settings.zone)
    found = state.gather(settings, now)
    if args.json:
        print(json.dumps(found.as_dict(), indent=2))
        return EXIT_OK
    zone = settings.zone
    beat = found.daemon["heartbeat_age_s"]
    print(f"toybox-backupd status at {local_time(now, zone, 'weekday')}: daemon "
          + (f"heartbeat {ago(timedelta(seconds=beat))} ago" if beat is not None
             else "has not run with this STATE_DIR"))
    print()
    _status_jobs(found, settings)
    print()
    _status_points(found, settings)
    print()
    _status_footer(found)
    print()
    if not found.attention:
        print("nothing needs attention")
    else:
        print("NEEDS ATTENTION:")
        for line in found.attention:
            print(f"  - {line}")
    return EXIT_OK


def _status_footer(found: Any) -> None:
    if found.offsite is not None:
        off = found.offsite
        lag = (f"newest copy {ago(timedelta(seconds=off['lag_s']))} old" if off["lag_s"] is not None
               else "no copy yet")
        print(f"off-site   {off['url']}: {lag} (limit {off['max_lag_hours']} h), "
              f"{off['copies']} cop{'y' if off['copies'] == 1 else 'ies'}, {off['pending']} pending")
    else:
        print("off-site   off (OFFSITE_URL is empty)")
    disk = found.disk
    print("disk       " + (f"{disk['path']}: {disk['error']}" if "error" in disk else
                           f"{human(disk['free'])} free of {human(disk['total'])} "
                           f"({100 * disk['free'] / max(disk['total'], 1):.0f}%) in {disk['path']}"))
    waiting = [row for row in found.outbox if row["status"] != "given_up"]
    print(f"outbox     {len(waiting)} report(s) waiting to be sent")


def _status_jobs(found: Any, settings: Settings) -> None:
    zone = settings.zone
    rows = [("JOB", "SCHEDULE", "LAST RUN", "RESULT", "TIME", "SIZE", "NEXT RUN")]
    for entry in found.jobs:
        last = entry.last_run
        when, result, took, size = "-", "never run", "-", "-"
        if last:
            started = datetime.fromisoformat(last["started_at"])
            when = (f"#{last['id']} {local_time(started, zone, 'table')} "
                    f"({ago(timedelta(seconds=last['age_s']))} ago)")
            result, size = last["status"], human(last["bytes"])
            took = f"{last['duration_s']:.1f}s" if last["duration_s"] is not None else "-"
        upcoming = (local_time(datetime.fromisoformat(entry.next_run), zone, "weekday")
                    if entry.next_run else "(disabled)")
        rows.append((entry.job, entry.schedule or "-", when, result, took, size, upcoming))
    _table(rows)


def _status_points(found: Any, settings: Settings) -> None:
    if not found.restore_points:
        print("no restore points yet")
        return
    zone = settings.zone
    rows = [("TIER", "TARGET", "POINTS", f"OLDEST ({settings.tz})", "NEWEST", "SIZE", "OFF-SITE")]
    for p in found.restore_points:
        rows.append((p.tier, p.target, str(p.count),
                     local_time(datetime.fromisoformat(p.oldest), zone, "table"),
                     local_time(datetime.fromisoformat(p.newest), zone, "table"), human(p.bytes),
                     str(p.offsite)))
    _table(rows)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


COMMANDS = {
    "run": cmd_run, "backup": cmd_backup, "list": cmd_list, "history": cmd_history,
    "restore": cmd_restore, "verify": cmd_verify, "schedule": cmd_schedule, "check": cmd_check,
    "healthcheck": cmd_healthcheck, "reindex": cmd_reindex, "notify": cmd_notify, "keys": cmd_keys,
    "status": cmd_status,
}


if __name__ == "__main__":
    sys.exit(main())
