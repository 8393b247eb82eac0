"""Restore to a moment: a base backup plus the WAL, recovered in a throwaway server.

`restore db --at T` takes the newest base backup finished at or before T, and when the WAL
archive reaches T it recovers them in a throwaway PostgreSQL container from the database's own
image (no network, a scratch volume, `recovery_target_time = T`, promoted at the target), dumps
the database from it with pg_dump, and restores that dump into the live database exactly as a
dump restore does (logical.restore_dump: beside it, then swapped; single tables; --into).
When T is outside what the WAL reaches, the newest dump at or before T is named with its distance
from T, and used only with --nearest (or a yes when asked), never by --yes alone. The tools run
with the server's version directory first on PATH (pgtools.server_tools), and the moment reached
(the last commit replayed) is said.

What is not here comes from off-site (OFFSITE_URL): the base backup (restore_points.local_copy,
as any restore point) and the WAL segments the archive here lacks (wal_offsite.fetch, into the
restore's scratch). The scratch (volume, dump, fetched WAL) is the restore's own
(pitr_scratch): removed when it ends, or by start-up recovery when its process was killed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ...adapters import docker_api
from ...adapters.pgtools import OS_USER, server_tools, tool_error
from ...catalog.restore_points import local_copy, restorable, restore_point
from ...core.atomic import AtomicFile
from ...core.basics import (
    CatalogError,
    Confirm,
    JobError,
    Say,
    duration_text,
    iso,
    local_time,
    silent,
    utcnow,
)
from ...core.settings import Settings
from ...store import Artifact, Store
from ..logical import dump as logical
from ..logical.dump import Hold
from . import wal, wal_offsite
from .scratch import Scratch, scratch
from .timelines import Timelines, lsn_value

BASE_TIER = "base"
DATA = "/pgdata/data"
ARCHIVE = "/pgdata/wal"
SETUP_CAPS = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER"]
MARK = "# toybox-backupd: recovery settings (removed when a cluster is restored)"
SETUP = r"""
set -eu
MARK="# toybox-backupd: recovery settings (removed when a cluster is restored)"
conf="$1"; base="$2"; shift 2
mkdir -p /pgdata/data /pgdata/wal
tar -xzf "$base/base.tar.gz" -C /pgdata/data
tar -xzf "$base/pg_wal.tar.gz" -C /pgdata/data/pg_wal
for f in "$@"; do name=$(basename "$f"); cp "$f" "/pgdata/wal/${name%.partial}"; done
rm -f /pgdata/data/standby.signal /pgdata/data/postmaster.pid
cp -p /pgdata/data/pg_hba.conf /pgdata/data/pg_hba.conf.toybox-backupd
printf 'local all all trust\n' > /pgdata/data/pg_hba.conf
printf '%s\n%s\n' "$MARK" "$conf" >> /pgdata/data/postgresql.auto.conf
touch /pgdata/data/recovery.signal
chown -R postgres:postgres /pgdata
chmod 700 /pgdata/data
"""


def base_for(store: Store, dbname: str, at: datetime,
             fits: Callable[[Artifact], bool] = lambda item: True) -> Artifact | None:
    """The newest base backup finished at or before `at` that is intact here or off-site and
    `fits` (None: there is none)."""
    kept = [item for item in restorable(store, BASE_TIER, dbname)
            if item.created_at <= at and fits(item)]
    return max(kept, key=lambda item: (item.created_at, item.id), default=None)


def on_timeline(lines: Timelines, timeline: int) -> Callable[[Artifact], bool]:
    """Whether a base backup is on `timeline`'s path (taken on it, or on an ancestor before
    the fork): a recovery to that timeline can start from it."""
    return lambda item: lines.contains(timeline, int(item.extra.get("timeline") or 1),
                                       lsn_value(str(item.extra.get("end_lsn") or "0/0")))


def of_cluster(system: str | None) -> Callable[[Artifact], bool]:
    """Whether a base backup is of the cluster `system` (or recorded none: taken before the
    record, or `system` unknown)."""
    return lambda item: system is None or system_of(item) in (None, system)


def serving(settings: Settings, dbname: str, at: datetime | None) -> tuple[Artifact | None,
                                                                          str | None]:
    """The cluster a recovery to `at` recovers, and a base backup of it finished by then:
    without `at`, the current one (the archive's current chain, else the newest base
    backup's); with `at`, the one of the newest base backup finished at or before it."""
    current = wal.current_system(settings, dbname) if at is None else None
    with Store(settings.state_dir) as store:
        anyone = base_for(store, dbname, at or utcnow(), of_cluster(current))
    return anyone, current or (system_of(anyone) if anyone is not None else None)


def choose(settings: Settings, dbname: str, at: datetime | None,
           say: Say = silent) -> tuple[Artifact | None, int]:
    """The base backup a recovery to `at` (None: the newest moment) starts from, and the
    timeline it follows: of the cluster serving then (`serving`), the timeline it was on at
    `at` (wal.timeline_at; the timeline history files off-site that are not here are fetched
    first), read from that cluster's own WAL and history files only."""
    anyone, system = serving(settings, dbname, at)
    if anyone is None:
        return None, 1
    wal_offsite.fetch_histories(settings, dbname, say)
    lines = wal.timelines(settings, dbname, system)
    found = wal.of_system(wal.segments(settings, dbname), system)
    timeline = (wal.newest_timeline(found, lines) if at is None else
                wal.timeline_at(at, wal.ends(settings, recovery_image(settings, anyone), dbname,
                                             system, version_of(anyone))))
    fits = on_timeline(lines, timeline)
    with Store(settings.state_dir) as store:
        return base_for(store, dbname, at or utcnow(),
                        lambda item: of_cluster(system)(item) and fits(item)), timeline


@dataclass
class Plan:
    """What a recovery from `base` works with."""

    base: Artifact
    image: str  # the database image the throwaway server runs
    version: str | None  # the server version the base backup was taken of
    timeline: int  # the timeline it follows
    files: list[wal.Segment]  # the WAL on that timeline's path (here, or fetched into the scratch)
    histories: list[Path]  # every timeline history file


def gather(settings: Settings, base: Artifact, timeline: int, work: Scratch,
           say: Say = silent) -> Plan:
    """The WAL a recovery from `base` along `timeline` needs: the segments on its path from the
    base's start on, here, and those the archive here lacks fetched from off-site into the
    scratch. The database commits once more first, when it is up, so that every moment up to
    now is recoverable."""
    wal.make_recent_recoverable(settings)
    start = int(base.extra.get("start_segment", 0))
    system = system_of(base)  # only the WAL of the cluster the base backup was taken of
    local = wal.of_system((s for s in wal.segments(settings, base.target) if s.number >= start),
                          system)
    fetched = wal_offsite.fetch(settings, base.target, start, local, work.wal, say)
    found = local + wal.of_system((s for s in (wal.parse_segment(p, aside=p.parent != work.wal)
                                               for p in fetched) if s is not None), system)
    lines = wal.timelines(settings, base.target, system)
    histories = [path for path in (wal.history_file(settings, base.target, system, t)
                                   for t in lines.histories) if path is not None]
    return Plan(base, recovery_image(settings, base, say), version_of(base), timeline,
                wal.on_path(found, lines, timeline, start), histories)


def system_of(base: Artifact) -> str | None:
    """The system identifier of the cluster a base backup was taken of (None: not recorded, a
    base backup older than that record)."""
    system = base.extra.get("system_identifier")
    return str(system) if system else None


def version_of(base: Artifact) -> str | None:
    """The server version a base backup was taken of (`SHOW server_version`)."""
    version = base.extra.get("server_version")
    return str(version) if version else None


def recovery_image(settings: Settings, base: Artifact, say: Say = silent) -> str:
    """The image the base backup was taken with, or (a new host that lacks it) the database
    container's, which must run the same PostgreSQL major version."""
    recorded = str(base.extra["image"])
    if docker_api.image_present(recorded):
        return recorded
    try:
        image = docker_api.image_of(docker_api.find_container(settings.pg_container or ""))
    except docker_api.DockerError as exc:
        raise JobError(f"the image the base backup was taken with ({recorded[:19]}…) is not on "
                       f"this Docker engine, and PG_CONTAINER's cannot stand in: {exc}") from None
    say(f"the base backup's image ({recorded[:19]}…) is not on this engine: recovering with "
        f"the database container's ({image[:19]}…)")
    return image


def _fetched(settings: Settings, base: Artifact, say: Say) -> None:
    """The base backup's files here and checked (fetched from off-site when they are not)."""
    with Store(settings.state_dir) as store:
        local_copy(settings, store, base, say)


def restore_db_at(settings: Settings, at: datetime, *, tables: Iterable[str] = (),
                  into: str | None = None, confirm: Confirm = None, say: Say = silent,
                  hold: Hold = contextlib.nullcontext, nearest: bool = False) -> None:
    """Restore the database as it was at `at` (see the module's doc); outside what the WAL
    reaches, the newest dump at or before it, only with `nearest` or when `confirm` says yes."""
    dbname = settings.postgres_db
    base, timeline = choose(settings, dbname, at, say)
    with scratch(settings) as work:
        plan = gather(settings, base, timeline, work, say) if base is not None else None
        end = wal.last_commit(settings, plan.image, files=plan.files, version=plan.version) if (
            plan and plan.files) else None
        if plan is not None and end is not None and at <= end:
            _fetched(settings, plan.base, say)
            say(f"recovering base backup {plan.base.path} "
                f"({local_time(plan.base.created_at, settings.zone)}) plus WAL to "
                f"{local_time(at, settings.zone)}" + on_which(timeline))
            with recovered(settings, plan, at, work) as done, \
                    dumped(settings, done.server, dbname, at, work.dump) as item:
                say(f"recovered; {reached(settings, done)}; dumped {dbname} as it was then")
                logical.restore_dump(settings, item, settings.backup_dir / item.path,
                                     tables=tables, into=into, confirm=confirm, say=say, hold=hold)
            return
    why = ("no base backup finished at or before it" if base is None else
           f"the WAL archive reaches only {local_time(end, settings.zone)}" if end else
           "the WAL archive holds no commit after the base backup")
    _nearest_dump(settings, at, why, nearest=nearest, confirm=confirm, say=say)
    logical.restore_db(settings, at=at, tables=tables, into=into, confirm=confirm, say=say,
                       hold=hold)


def _nearest_dump(settings: Settings, at: datetime, why: str, *, nearest: bool,
                  confirm: Confirm, say: Say) -> None:
    """A moment the WAL does not reach: say which restore point would be used and how far it
    is from `at`; go on only with `nearest` (--nearest) or a yes asked of the operator, never
    by --yes alone (JobError, nothing changed). CatalogError when there is no such dump."""
    with Store(settings.state_dir) as store:
        dump = restore_point(store, (logical.TIER,), settings.postgres_db, at)
    gap = duration_text((at - dump.created_at).total_seconds())
    said = (f"point in time: {local_time(at, settings.zone)} is outside what the WAL reaches "
            f"({why}); the newest dump at or before it ({local_time(dump.created_at, settings.zone)}"
            f") is {gap} before it")
    if nearest:
        say(f"{said}; using the newest dump (--nearest)")
        return
    if confirm is None:
        raise JobError(f"{said}. Nothing was changed: pass --nearest to restore that dump "
                       "instead, or ask for a moment `list` shows in the point-in-time window")
    if not confirm(f"{said}. Restore that dump instead?"):
        raise JobError("cancelled; nothing was changed")
    say(f"{said}; using the newest dump")


def reached(settings: Settings, done: Recovery) -> str:
    """The moment a recovery reached, in words: its last commit replayed."""
    if done.reached is None:
        return "no commit replayed after the base backup"
    return f"reached {local_time(done.reached, settings.zone)} (the last commit replayed)"


@dataclass
class Recovery:
    server: Any   # the throwaway server's container
    scratch: str  # its data volume (the cluster in data/)
    reached: datetime | None = None  # the last commit it replayed (None: none after the base)


def on_which(timeline: int) -> str:
    """` on timeline N` after a cluster restore forked one, else nothing."""
    return f" on timeline {timeline}" if timeline > 1 else ""


@contextlib.contextmanager
def recovered(settings: Settings, plan: Plan, at: datetime | None,
              work: Scratch) -> Iterator[Recovery]:
    """A throwaway server recovered from the plan's base backup plus the WAL of its timeline's
    path to `at` (None: to the end of it), promoted, in the scratch's volume; removed with it afterwards."""
    work.create_volume()
    try:
        _prepare(settings, plan, at, work)
        with docker_api.beside(plan.image, None, {work.volume: ("/pgdata", "rw")}, "recover",
                               user=OS_USER, owner=work.owner, command=["postgres", "-D", DATA],
                               environment=server_tools(plan.image, plan.version)) as server:
            _wait_promoted(settings, server)
            yield Recovery(server, work.volume, _last_replayed(settings, server))
    finally:
        docker_api.remove_scratch_volume(work.volume, work.owner)


def _prepare(settings: Settings, plan: Plan, at: datetime | None, work: Scratch) -> None:
    """Unpack the base backup into the scratch volume, copy beside it the WAL on the path of
    the plan's timeline and every timeline history file (the new timeline a promotion makes is
    numbered after the highest), and set the recovery target (a root helper from the
    database's image, no network)."""
    where = wal.shared(settings, settings.backup_dir, mode="ro")
    conf = [f"restore_command = 'cp {ARCHIVE}/%f %p'",
            f"recovery_target_timeline = '{plan.timeline}'",
            "archive_mode = 'off'", "listen_addresses = ''", "hot_standby = 'on'",
            "unix_socket_directories = '/pgdata'"]
    if at is not None:
        conf += [f"recovery_target_time = '{iso(at)}'", "recovery_target_action = 'promote'",
                 "recovery_target_inclusive = 'on'"]
    folder = where.path((settings.backup_dir / plan.base.path).parent)
    with docker_api.beside(plan.image, None, {**where.mounts(), work.volume: ("/pgdata", "rw")},
                           "recover-setup", user="0:0", caps=SETUP_CAPS,
                           owner=work.owner) as helper:
        result, _ = docker_api.run(helper, ["sh", "-c", SETUP, "sh", "\n".join(conf), folder,
                                            *(where.path(s.path) for s in plan.files),
                                            *(where.path(p) for p in plan.histories)])
    if result.exit_code != 0:
        raise JobError(tool_error("the recovery set-up (tar, cp)", result,
                                  "a helper from the database's image"))


def _wait_promoted(settings: Settings, server: Any, timeout: float = 3600) -> None:
    """Until the throwaway server has replayed to its target and left recovery."""
    deadline = time.monotonic() + timeout
    query = ["psql", "-X", "-A", "-t", "-h", "/pgdata", "-U", settings.postgres_user, "-d", "postgres", "-c",
             "SELECT pg_is_in_recovery()"]
    while time.monotonic() < deadline:
        if docker_api.container_state(server.id) not in ("running", "created"):
            break
        with contextlib.suppress(docker_api.DockerError):
            result, out = docker_api.run(server, query, user=OS_USER)
            if result.exit_code == 0 and out.strip() == b"f":
                return
        time.sleep(0.5)
    tail = docker_api.logs_tail(server, 12)
    raise JobError("the recovery of the base backup plus WAL did not finish: "
                   + ("; ".join(line for line in tail.splitlines() if line.strip())[-1500:]
                      or "no message"))


def _last_replayed(settings: Settings, server: Any) -> datetime | None:
    """The commit time of the last transaction the recovered server replayed."""
    result, out = docker_api.run(server, [
        "psql", "-X", "-A", "-t", "-h", "/pgdata", "-U", settings.postgres_user, "-d", "postgres",
        "-c", "SELECT extract(epoch FROM pg_last_xact_replay_timestamp())"], user=OS_USER)
    if result.exit_code != 0:
        raise JobError(tool_error("psql", result, "the recovered server"))
    text = out.decode("utf-8", "replace").strip()
    return datetime.fromtimestamp(float(text), UTC) if text else None


@contextlib.contextmanager
def dumped(settings: Settings, server: Any, dbname: str, at: datetime,
           path: Path) -> Iterator[Artifact]:
    """pg_dump -Fc of `dbname` from the recovered server into the scratch file `path` in
    BACKUP_DIR (removed afterwards), as a dump restore point."""
    proc = docker_api.Exec(server, ["pg_dump", "-h", "/pgdata", "-U", settings.postgres_user,
                                    "-Fc", "-d", dbname], user=OS_USER)
    try:
        with AtomicFile(path) as out:
            for chunk in proc.stdout():
                out.write(chunk)
            result = proc.wait()
            if result.exit_code != 0:
                raise JobError(tool_error("pg_dump", result, "the recovered server"))
            out.commit()
            size, digest = out.size, out.sha256
        yield Artifact(id=0, run_id=None, tier="logical", target=dbname, path=path.name,
                       created_at=at, size=size, sha256=digest, status="ok", base_id=None,
                       extra={"format": "custom", "database": dbname}, verified_at=None)
    finally:
        proc.close()
        Path(path).unlink(missing_ok=True)


def window(settings: Settings, dbname: str | None = None) -> wal.Window | None:
    """What `restore db --at` can reach: from the oldest kept base backup to the newest commit
    in the WAL archive, with the gaps between (None: no base backup yet); of the current
    database cluster only (`serving`). JobError when pg_waldump cannot read the WAL."""
    dbname = dbname or settings.postgres_db
    newest, system = serving(settings, dbname, None)  # the cluster now, not one replaced before
    if newest is None:
        return None
    with Store(settings.state_dir) as store:
        oldest = min(filter(of_cluster(system), restorable(store, BASE_TIER, dbname)),
                     key=lambda item: item.created_at)
    image, version = str(newest.extra["image"]), version_of(newest)
    found = wal.of_system(wal.segments(settings, dbname), system)
    lines = wal.timelines(settings, dbname, system)
    first = wal.segment_of_lsn(str(oldest.extra["end_lsn"]))
    path = wal.on_path(found, lines, wal.newest_timeline(found, lines))
    end = wal.last_commit(settings, image, dbname, path, version)
    spans = wal.ends(settings, image, dbname, system, version)
    return wal.Window(start=oldest.created_at, end=max(end or newest.created_at,
                                                       newest.created_at),
                      gaps=wal.gaps([s for s in path if s.number >= first], first),
                      timelines=spans if len(spans) > 1 else [])


RECOVERY_TOOLS = ("pg_waldump", "postgres", "pg_dump", "psql")


def check_recovery_image(settings: Settings) -> str:
    """`check`: the image a restore to a moment would recover the newest base backup with
    (recovery_image), when it is not the database container's (whose tools the route's check
    ran): pg_waldump, postgres, pg_dump and psql run there with the PATH a restore gives them.
    In words ("": nothing more to check); JobError saying what is missing."""
    newest, _system = serving(settings, settings.postgres_db, None)
    if newest is None:
        return ""
    image = recovery_image(settings, newest)
    if image == docker_api.image_of(wal.db_container(settings)):
        return ""
    with docker_api.beside(image, None, {}, "check", user=wal.owner_user(), lifetime=120,
                           environment=server_tools(image, version_of(newest))) as helper:
        result, _ = docker_api.run(helper, ["sh", "-c", wal.TOOLS_SCRIPT, "sh",
                                            *RECOVERY_TOOLS])
    if result.exit_code != 0:
        detail = "; ".join(line for line in result.stderr.splitlines()[-3:] if line.strip())
        raise JobError(f"a restore to a moment recovers base backup {newest.path} with the "
                       f"image it was taken with ({image[:19]}…), and there "
                       f"{detail or f'the tools exited with status {result.exit_code}'}: keep "
                       "an image with that PostgreSQL version's programs as that image")
    return f"; the newest base backup's image ({image[:19]}…) has {', '.join(RECOVERY_TOOLS)}"


# restore cluster ---------------------------------------------------------------------------------
FILL = r"""
set -eu
cp -a /recovered/data/. "$1/"
cd "$1"
mv pg_hba.conf.toybox-backupd pg_hba.conf
awk -v mark="$2" '$0 == mark { exit } { print }' postgresql.auto.conf > /tmp/auto.conf
cat /tmp/auto.conf > postgresql.auto.conf
rm -f postmaster.pid /tmp/auto.conf
"""


def restore_cluster_at(settings: Settings, at: datetime | None, *, volume: str | None = None,
                       confirm: Confirm = None, stop_containers: bool = False,
                       say: Say = silent, hold: Hold = contextlib.nullcontext) -> None:
    """Rebuild the database's data volume as the cluster was at `at` (None: the newest moment
    the WAL reaches): recovered in a throwaway server, shut down cleanly, then swapped into the
    volume with the safety of `restore volume` (beside, complete, then swapped)."""
    from ..volumes.restore import restore_filled
    from ..volumes.swap import new_dir, run_step

    target = volume or _data_volume(settings)
    base, timeline = choose(settings, settings.postgres_db, at, say)
    if base is None:
        raise CatalogError("no base backup finished at or before that moment (see `list`)" if at else
                           "no base backup of the current database cluster (the one "
                           f"{wal.wal_dir(settings)}/{wal.SYSTEM_FILE} names) yet: take one "
                           "with `backup base`, or name a moment with --at (see `list`)")
    with hold(), scratch(settings) as work:
        plan = gather(settings, base, timeline, work, say)
        moment = _reachable(settings, plan, at)
        _fetched(settings, base, say)
        say(f"recovering base backup {base.path} plus WAL to {moment}{on_which(timeline)}")
        with recovered(settings, plan, at, work) as done:
            docker_api.stop_container(done.server, timeout=600)  # a clean shut-down checkpoint
            say(f"recovered; {reached(settings, done)}")
            if at is None:
                moment = local_time(done.reached or base.created_at, settings.zone)

            def fill(helper: Any, staging: str) -> None:
                run_step(helper, ["sh", "-c", FILL, "sh", new_dir(staging), MARK],
                         "copying the recovered cluster")

            restore_filled(settings, target, what=f"the cluster recovered from {base.path}",
                           when=moment, fill=fill, mounts={done.scratch: ("/recovered", "ro")},
                           confirm=confirm, stop_containers=stop_containers, say=say)


def _reachable(settings: Settings, plan: Plan, at: datetime | None) -> str:
    """The moment a cluster recovery goes to, in words. JobError (nothing is changed yet) when
    `at` is past the newest commit of the WAL it has (e.g. off-site WAL that is not replayed)."""
    end = wal.last_commit(settings, plan.image, files=plan.files,
                           version=plan.version) if plan.files else None
    if at is None:
        reached = f" ({local_time(end, settings.zone)})" if end else ""
        return f"the newest moment the WAL reaches{reached}"
    if end is None or at > end:
        reach = (f"reaches only {local_time(end, settings.zone)}" if end else
                 "holds no commit after the base backup")
        raise JobError(f"the WAL here and off-site {reach}, not {local_time(at, settings.zone)}: "
                       "what was written later is not in the WAL this restore may replay; "
                       "nothing was changed (restore to an earlier moment)")
    return local_time(at, settings.zone)


def _data_volume(settings: Settings) -> str:
    """The volume at PG_CONTAINER's PGDATA; JobError naming --volume when it cannot be found."""
    try:
        container = docker_api.find_container(settings.pg_container or "")
    except docker_api.DockerError:
        container = None
    name = docker_api.data_volume(container) if container is not None else None
    if name is None:
        raise JobError("cannot tell the database's data volume (PG_CONTAINER is gone or mounts "
                       "no volume at its PGDATA): name it with --volume")
    return name
