"""Restore to a moment: a base backup plus the WAL, recovered in a throwaway server.

`restore db --at T` takes the newest base backup finished at or before T, and when the WAL
archive reaches T it recovers them in a throwaway PostgreSQL container from the database's own
image (no network, a scratch volume, `recovery_target_time = T`, promoted at the target), dumps
the database from it with pg_dump, and restores that dump into the live database exactly as a
dump restore does (logical.restore_dump: beside it, then swapped; single tables; --into).
When T is outside what the WAL reaches, the newest dump at or before T is used, as before.

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
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import docker_api
from ..atomic import AtomicFile
from ..basics import CatalogError, Confirm, JobError, Say, iso, local_time, silent, utcnow
from ..pgtools import OS_USER, tool_error
from ..restore_points import local_copy, restorable
from ..settings import Settings
from ..store import Artifact, Store
from . import logical, wal, wal_offsite
from .logical import Hold
from .pitr_scratch import Scratch, scratch
from .timelines import Timelines, history_name, lsn_value

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


def choose(settings: Settings, dbname: str, at: datetime | None,
           say: Say = silent) -> tuple[Artifact | None, int]:
    """The base backup a recovery to `at` (None: the newest moment) starts from, and the
    timeline it follows: the one the server was on at `at` (wal.timeline_at; the timeline
    history files off-site that are not here are fetched first)."""
    with Store(settings.state_dir) as store:
        anyone = base_for(store, dbname, at or utcnow())
    if anyone is None:
        return None, 1
    wal_offsite.fetch_histories(settings, dbname, say)
    lines = wal.timelines(settings, dbname)
    timeline = (wal.newest_timeline(wal.segments(settings, dbname), lines) if at is None else
                wal.timeline_at(at, wal.ends(settings, recovery_image(settings, anyone),
                                             dbname)))
    with Store(settings.state_dir) as store:
        return base_for(store, dbname, at or utcnow(), on_timeline(lines, timeline)), timeline


@dataclass
class Plan:
    """What a recovery from `base` works with."""

    base: Artifact
    image: str  # the database image the throwaway server runs
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
    lines = wal.timelines(settings, base.target)
    histories = [wal.wal_dir(settings, base.target) / history_name(t) for t in lines.histories]
    return Plan(base, recovery_image(settings, base, say), timeline,
                wal.on_path(found, lines, timeline, start), histories)


def system_of(base: Artifact) -> str | None:
    """The system identifier of the cluster a base backup was taken of (None: not recorded, a
    base backup older than that record)."""
    system = base.extra.get("system_identifier")
    return str(system) if system else None


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
                  hold: Hold = contextlib.nullcontext) -> None:
    """Restore the database as it was at `at` (see the module's doc)."""
    dbname = settings.postgres_db
    base, timeline = choose(settings, dbname, at, say)
    with scratch(settings) as work:
        plan = gather(settings, base, timeline, work, say) if base is not None else None
        end = wal.last_commit(settings, plan.image, files=plan.files) if (
            plan and plan.files) else None
        if plan is not None and end is not None and at <= end:
            _fetched(settings, plan.base, say)
            say(f"recovering base backup {plan.base.path} "
                f"({local_time(plan.base.created_at, settings.zone)}) plus WAL to "
                f"{local_time(at, settings.zone)}" + on_which(timeline))
            with recovered(settings, plan, at, work) as done, \
                    dumped(settings, done.server, dbname, at, work.dump) as item:
                say(f"recovered; dumped {dbname} as it was at {local_time(at, settings.zone)}")
                logical.restore_dump(settings, item, settings.backup_dir / item.path,
                                     tables=tables, into=into, confirm=confirm, say=say, hold=hold)
            return
    why = ("no base backup finished at or before it" if base is None else
           f"the WAL archive reaches only {local_time(end, settings.zone)}" if end else
           "the WAL archive holds no commit")
    say(f"point in time: {why}; using the newest dump at or before "
        f"{local_time(at, settings.zone)}")
    logical.restore_db(settings, at=at, tables=tables, into=into, confirm=confirm, say=say,
                       hold=hold)


@dataclass
class Recovery:
    server: Any   # the throwaway server's container
    scratch: str  # its data volume (the cluster in data/)


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
                               user=OS_USER, owner=work.owner,
                               command=["postgres", "-D", DATA]) as server:
            _wait_promoted(settings, server)
            yield Recovery(server, work.volume)
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
    in the WAL archive, with the gaps between (None: no base backup yet); of the database
    cluster of the newest base backup only."""
    dbname = dbname or settings.postgres_db
    with Store(settings.state_dir) as store:
        kept = restorable(store, BASE_TIER, dbname)
    if not kept:
        return None
    newest = max(kept, key=lambda item: item.created_at)
    system = system_of(newest)  # the cluster now: another one replaced before is not counted
    oldest = min((item for item in kept if system_of(item) in (None, system)),
                 key=lambda item: item.created_at)
    image = str(newest.extra["image"])
    found = wal.of_system(wal.segments(settings, dbname), system)
    lines = wal.timelines(settings, dbname)
    first = wal.segment_of_lsn(str(oldest.extra["end_lsn"]))
    path = wal.on_path(found, lines, wal.newest_timeline(found, lines))
    end = wal.last_commit(settings, image, dbname, path)
    spans = wal.ends(settings, image, dbname)
    return wal.Window(start=oldest.created_at, end=max(end or newest.created_at,
                                                       newest.created_at),
                      gaps=wal.gaps([s for s in path if s.number >= first], first),
                      timelines=spans if len(spans) > 1 else [])


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
    from .volume_restore import restore_filled
    from .volume_swap import new_dir, run_step

    target = volume or _data_volume(settings)
    base, timeline = choose(settings, settings.postgres_db, at, say)
    if base is None:
        raise CatalogError("no base backup finished at or before that moment (see `list`)")
    with hold(), scratch(settings) as work:
        plan = gather(settings, base, timeline, work, say)
        moment = _reachable(settings, plan, at)
        _fetched(settings, base, say)
        say(f"recovering base backup {base.path} plus WAL to {moment}{on_which(timeline)}")
        with recovered(settings, plan, at, work) as done:
            docker_api.stop_container(done.server, timeout=600)  # a clean shut-down checkpoint

            def fill(helper: Any, staging: str) -> None:
                run_step(helper, ["sh", "-c", FILL, "sh", new_dir(staging), MARK],
                         "copying the recovered cluster")

            restore_filled(settings, target, what=f"the cluster recovered to {moment}",
                           when=moment, fill=fill, mounts={done.scratch: ("/recovered", "ro")},
                           confirm=confirm, stop_containers=stop_containers, say=say)


def _reachable(settings: Settings, plan: Plan, at: datetime | None) -> str:
    """The moment a cluster recovery goes to, in words. JobError (nothing is changed yet) when
    `at` is past the newest commit of the WAL it has (e.g. off-site WAL that is not replayed)."""
    end = wal.last_commit(settings, plan.image, files=plan.files) if plan.files else None
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
