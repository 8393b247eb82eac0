"""Point in time: the route to the database's replication rule, the WAL archive, its window.

The route needs nothing from the stack's files. A helper container is made from the database
container's own image (so pg_receivewal, pg_basebackup and pg_waldump are the server's own
version) and joins the database container's network namespace (`--network container:<db>`):
it reaches the server at 127.0.0.1, where the official image's pg_hba.conf (initdb's default)
trusts `host replication all 127.0.0.1/32`. It runs as the sidecar's own uid/gid (the files it
writes belong to the sidecar, 0600), with every capability dropped, a read-only root and no new
privileges, and mounts only the backup directory (found as transfer.py finds the spool: the
sidecar's own volume or bind mount, or the host path on the host).

The WAL archive is BACKUP_DIR/wal/<db>/: completed segments (`000000010000000000000042`) and
the one being written (`….partial`, fsynced at every commit by `--synchronous`), and the history
file of each timeline after the first (`00000002.history`). A gap the streamer could not close
moves what came before it into `wal/<db>/before-<stamp>/`, so pg_receivewal starts a new chain;
a cluster restore's new timeline moves the old timeline's branch past the fork into
`wal/<db>/branch-<stamp>/` (follow_timeline), so pg_receivewal streams the new timeline from
where it forked. A database cluster replaced under the same container (its system identifier,
recorded in `wal/<db>/system_identifier`, differs) moves the whole chain into
`wal/<db>/other-<stamp>/` (follow_system). Recovery looks in all of them, reads only the
segments of the base backup's cluster (each segment's own header names it: segment_system),
and one timeline's path (timelines.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ...adapters import database, docker_api
from ...adapters.pgtools import server_tools
from ...core.atomic import AtomicFile
from ...core.basics import JobError, local_time, utcnow
from ...core.settings import Settings
from . import helper_lease
from .timelines import (
    SEGMENT_SIZE,
    Timelines,
    history_name,
    lsn_value,
    segment_name,
    segment_of,
)

SLOT = "toybox_backupd"
APPLICATION = "toybox-backupd-wal"
MOUNT = "/backup"  # where a route helper mounts the backup directory's volume or host path
SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?$")
# chains set aside: before a gap, a timeline's old branch, another database cluster's
SIDE = ("before-*", "branch-*", "other-*")
SYSTEM_FILE = "system_identifier"  # the cluster a chain's folder holds the WAL of
# the first page of every segment: XLogLongPageHeaderData (PostgreSQL's xlog_internal.h):
# xlp_magic, xlp_info, xlp_tli, xlp_pageaddr, xlp_rem_len (padded to 24), xlp_sysid,
# xlp_seg_size, xlp_xlog_blcksz; native byte order (little-endian here)
LONG_HEADER = struct.Struct("<HHIQI4xQII")
XLP_LONG_HEADER = 0x0002
COMMIT = re.compile(r"desc: (?:COMMIT|ABORT) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


def wal_dir(settings: Settings, dbname: str | None = None) -> Path:
    """BACKUP_DIR/wal/<db>/."""
    return settings.backup_dir / "wal" / (dbname or settings.postgres_db)


def owner_user() -> str:
    """uid:gid of this process: what route helpers run as, so their files are ours."""
    return f"{os.getuid()}:{os.getgid()}"


@dataclass
class Shared:
    """A directory here (`local`) that a route helper mounting `mounts()` sees at `inside`."""

    local: Path
    inside: str
    source: str
    mode: str = "rw"

    def mounts(self) -> dict[str, tuple[str, str]]:
        return {self.source: (MOUNT, self.mode)}

    def path(self, local: Path) -> str:
        """Where the helper sees `local`, a path below `self.local`."""
        relative = local.relative_to(self.local)
        return self.inside if str(relative) == "." else f"{self.inside}/{relative}"


def shared(settings: Settings, local: Path, mode: str = "rw") -> Shared:
    """`local` (created 0700 if missing) as a route helper can mount it; JobError if it cannot."""
    local.mkdir(mode=0o700, parents=True, exist_ok=True)
    where = docker_api.mountable(local.resolve())
    if where is None:
        raise JobError(
            f"point-in-time recovery needs {local} on a Docker volume or bind mount the engine "
            "can mount into a helper (BACKUP_DIR is on a tmpfs, or the engine is remote)")
    source, sub = where
    inside = "/".join(part for part in (MOUNT, sub) if part)
    return Shared(local.resolve(), inside, source, mode)


def db_container(settings: Settings) -> Any:
    """The running database container (PG_CONTAINER); JobError when there is none."""
    if not settings.pg_container:
        raise JobError("PITR needs PG_CONTAINER (the database container): its image runs the "
                       "WAL streamer and base backups beside it")
    container = docker_api.find_container(settings.pg_container)
    if not docker_api.is_running(container):
        raise JobError(f"the database container {container.name} (PG_CONTAINER="
                       f"{settings.pg_container}) is not running ({container.status})")
    return container


@contextlib.contextmanager
def route(settings: Settings, local: Path, purpose: str, lifetime: int | None, owner: str = "",
          ) -> Iterator[tuple[Any, Shared, str]]:
    """A helper beside the database that sees `local`, with the server's version directory on
    its PATH (pgtools.server_tools); yields (helper, shared dir, image). It ends by itself
    after `lifetime` seconds, or (None) once this process renews its lease in `local` no more
    (helper_lease)."""
    container = db_container(settings)
    image = docker_api.image_of(container)
    where = shared(settings, local)
    tools = server_tools(image, database.server_version(settings))
    lease = local / helper_lease.LEASE_FILE
    with contextlib.ExitStack() as stack:
        if lifetime is None:
            stack.enter_context(helper_lease.renewed(lease))
        helper = stack.enter_context(docker_api.beside(
            image, container.id, where.mounts(), purpose, user=owner_user(), owner=owner,
            lifetime=lifetime or 0, auto_remove=lifetime is None, environment=tools,
            command=helper_lease.command(where.path(lease)) if lifetime is None else None))
        yield helper, where, image


def connection(settings: Settings, port: int) -> str:
    """The libpq connection string of the route (the password is passed in PGPASSWORD)."""
    return (f"host=127.0.0.1 port={port} user={settings.postgres_user} "
            f"application_name={APPLICATION} connect_timeout=10")


def environment(settings: Settings) -> dict[str, str]:
    """The environment of a tool on the route: the password for a stack that asks for one."""
    env = {"PGCONNECT_TIMEOUT": "10", "TZ": "UTC"}
    if settings.postgres_password_value:
        env["PGPASSWORD"] = settings.postgres_password_value
    return env


def receivewal_command(settings: Settings, port: int, directory: str) -> list[str]:
    """pg_receivewal into `directory`, through the slot, fsyncing every commit; no retry
    loop of its own (the daemon supervises it)."""
    return ["pg_receivewal", "-d", connection(settings, port), "-D", directory, "-S", SLOT,
            "--synchronous", "--no-loop", "--no-password", "--verbose"]


# the archive ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    timeline: int
    number: int  # the segment's number in the WAL (log * 256 + seg for 16 MiB segments)
    path: Path
    partial: bool
    aside: bool = False  # in a folder set aside (before a gap, an old timeline's branch)

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".partial")

    def system(self) -> str | None:
        """The system identifier of the cluster that wrote it (its own header)."""
        return segment_system(self.path)

    def rank(self) -> tuple[bool, bool]:
        """Of two copies of one segment, the higher ranked holds more: a complete one, else
        one set aside (what its timeline streamed while it was the server's) over one streamed
        again up to a switch point."""
        return (not self.partial, self.aside)


def parse_segment(path: Path, aside: bool = False) -> Segment | None:
    """The segment a WAL file name names (None for any other name)."""
    match = SEGMENT.match(path.name)
    if match is None:
        return None
    tli, log, seg, partial = match.groups()
    per_log = 0x100000000 // SEGMENT_SIZE
    return Segment(int(tli, 16), int(log, 16) * per_log + int(seg, 16), path, bool(partial),
                   aside)


def segment_system(path: Path) -> str | None:
    """The system identifier a WAL segment's first page carries (xlp_sysid): the database
    cluster that wrote it, whatever folder it lies in. None when the file holds no WAL yet (a
    `.partial` pg_receivewal has only padded with zeros) or is unreadable."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(LONG_HEADER.size)
    except OSError:
        return None
    if len(head) < LONG_HEADER.size:
        return None
    magic, info, _tli, _addr, _rem, sysid, _size, _block = LONG_HEADER.unpack(head)
    if magic == 0 or not info & XLP_LONG_HEADER or sysid == 0:
        return None
    return str(sysid)


def of_system(found: Iterable[Segment], system: str | None) -> list[Segment]:
    """The segments the cluster `system` wrote (by each one's own header), in their order; all
    of them when `system` is None (a base backup taken before its system was recorded)."""
    return [s for s in found if system is None or s.system() == system]


def segments(settings: Settings, dbname: str | None = None) -> list[Segment]:
    """Every WAL segment kept (the chains before gaps too), in WAL order."""
    root = wal_dir(settings, dbname)
    found = []
    for path in [*root.glob("*"), *(p for side in SIDE for p in root.glob(f"{side}/*"))]:
        segment = parse_segment(path, aside=path.parent != root)
        if segment is not None and path.is_file():
            found.append(segment)
    return sorted(found, key=lambda s: (s.number, s.timeline, s.partial))


def segment_of_lsn(lsn: str) -> int:
    """The segment number that holds `lsn` ("0/3000028")."""
    return segment_of(lsn_value(lsn))


def recorded_system(folder: Path) -> str | None:
    """The cluster a chain's folder says it holds (its system_identifier file); None: none."""
    recorded = folder / SYSTEM_FILE
    if not recorded.is_file():
        return None
    return recorded.read_text(encoding="ascii", errors="replace").strip() or None


def history_folder(settings: Settings, dbname: str | None = None, system: str | None = None,
                   ) -> Path | None:
    """Where the timeline history files of the cluster `system` (None: the current chain's)
    are: wal/<db>/ while it is the current chain's, the other-<stamp>/ its chain was set aside
    into once the cluster was replaced (follow_system); None when the archive has neither."""
    root = wal_dir(settings, dbname)
    if system is None or recorded_system(root) in (None, system):
        return root
    return next((folder for folder in sorted(root.glob("other-*"))
                 if recorded_system(folder) == system), None)


def timelines(settings: Settings, dbname: str | None = None, system: str | None = None,
              ) -> Timelines:
    """The timeline histories the archive holds of the cluster `system` (history_folder)."""
    folder = history_folder(settings, dbname, system)
    return Timelines.load(folder) if folder is not None else Timelines()


def history_file(settings: Settings, dbname: str | None, system: str | None,
                 timeline: int) -> Path | None:
    """The history file of `timeline` of the cluster `system` (None: not there)."""
    folder = history_folder(settings, dbname, system)
    path = folder / history_name(timeline) if folder is not None else None
    return path if path is not None and path.is_file() else None


def current_system(settings: Settings, dbname: str | None = None) -> str | None:
    """The cluster the archive's current chain holds (recorded by the streamer when it last
    started); None when none is recorded."""
    return recorded_system(wal_dir(settings, dbname))


def best_copies(found: Iterable[Segment]) -> list[Segment]:
    """One file per segment number (the best ranked copy), in WAL order."""
    chosen: dict[int, Segment] = {}
    for segment in found:
        held = chosen.get(segment.number)
        if held is None or segment.rank() > held.rank():
            chosen[segment.number] = segment
    return [chosen[number] for number in sorted(chosen)]


def on_path(found: list[Segment], lines: Timelines, timeline: int, first: int = 0,
            ) -> list[Segment]:
    """What a recovery to `timeline` reads from segment `first` on: each segment's file on
    that timeline's path (timelines.py), never another branch's."""
    return best_copies(s for s in found if s.number >= first
                       and lines.owner(timeline, s.number) == s.timeline)


def newest_timeline(found: list[Segment], lines: Timelines) -> int:
    """The newest timeline the archive knows (by its segments or its history files)."""
    return lines.known(s.timeline for s in found)[-1]


@dataclass
class Window:
    """What the WAL archive can recover: from `start` to `end`, with its gaps."""

    start: datetime | None = None
    end: datetime | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)  # missing segment numbers
    # after a cluster restore: each timeline, with its newest commit (see `ends`)
    timelines: list[tuple[int, datetime | None]] = field(default_factory=list)

    def text(self, zone: Any) -> str:
        gaps = ", ".join(f"segments {a:X}..{b:X}" for a, b in self.gaps) or "none"
        text = (f"from {local_time(self.start, zone)} to {local_time(self.end, zone)}, "
                f"gaps: {gaps}")
        if self.timelines:
            text += ", timelines: " + ", ".join(
                f"{timeline} until {local_time(end, zone)}" if end else str(timeline)
                for timeline, end in self.timelines[:-1]) + f", then {self.timelines[-1][0]}"
        return text


def gaps(found: list[Segment], first: int | None = None) -> list[tuple[int, int]]:
    """Missing segment ranges from `first` (default: the oldest kept) to the newest."""
    numbers = sorted({s.number for s in found})
    if not numbers:
        return []
    missing, expected = [], numbers[0] if first is None else first
    for number in numbers:
        if number < expected:
            continue
        if number > expected:
            missing.append((expected, number - 1))
        expected = number + 1
    return missing


# pg_waldump reads a segment to where its WAL stops (the end of what was written, a record that
# goes on in the next file): it says so and exits 1 after printing the records. Any other failure
# (no pg_waldump, an unreadable file) is an error, never "no commit".
WALDUMP_SCRIPT = r"""
command -v pg_waldump >/dev/null || {
  echo "pg_waldump is not in this image (PATH=$PATH)" >&2; exit 127; }
for f in "$@"; do
  name=$(basename "$f"); name=${name%.partial}
  cp "$f" "/tmp/$name" || exit 4
  all=$(pg_waldump -r Transaction "/tmp/$name" 2>/tmp/waldump.err); code=$?
  rm -f "/tmp/$name"
  if [ "$code" -ne 0 ] && ! grep -qE 'error in WAL record at|could not find a valid record' \
      /tmp/waldump.err; then
    echo "$f: $(tail -n 3 /tmp/waldump.err)" >&2; exit 5
  fi
  out=$(printf '%s\n' "$all" | grep -E 'desc: (COMMIT|ABORT) ' | tail -n 1)
  if [ -n "$out" ]; then echo "$out"; exit 0; fi
done
exit 0
"""


def last_commit(settings: Settings, image: str, dbname: str | None = None,
                files: list[Segment] | None = None, version: str | None = None,
                ) -> datetime | None:
    """The time of the newest commit in `files` (segments anywhere in BACKUP_DIR; default: the
    newest timeline's path in the archive), read with pg_waldump from the database's own image
    (of the server `version`, whose version directory is put on PATH), no network, in the
    newest four that hold WAL: the newest moment a recovery can reach. None when there is none;
    JobError when pg_waldump fails."""
    if files is None:
        found = segments(settings, dbname)
        lines = timelines(settings, dbname)
        files = on_path(found, lines, newest_timeline(found, lines))
    written = [s for s in files if s.system() is not None]  # a padded `.partial`: no WAL yet
    if not written:
        return None
    newest = sorted(written, key=lambda s: (s.number, s.timeline, s.partial), reverse=True)[:4]
    where = shared(settings, settings.backup_dir, mode="ro")
    with docker_api.beside(image, None, where.mounts(), "waldump", user=owner_user(),
                           lifetime=600, environment=server_tools(image, version)) as helper:
        result, out = docker_api.run(helper, ["sh", "-c", WALDUMP_SCRIPT, "sh",
                                              *(where.path(s.path) for s in newest)],
                                     environment={"TZ": "UTC"})
    if result.exit_code != 0:
        raise JobError(f"pg_waldump could not read the WAL archive {wal_dir(settings, dbname)} "
                       f"(exit status {result.exit_code}): {result.stderr[-300:]}")
    match = COMMIT.search(out.decode("utf-8", "replace"))
    if match is None:
        return None
    return datetime.fromisoformat(match.group(1)).replace(tzinfo=UTC)


def ends(settings: Settings, image: str, dbname: str | None = None, system: str | None = None,
         version: str | None = None) -> list[tuple[int, datetime | None]]:
    """Each timeline the archive knows of the cluster `system` (None: any), oldest first, with
    the newest commit in its own WAL (when it stopped being the server's: a cluster restore
    forked a newer one); the newest timeline, still the server's, with None. One timeline: no
    look at the WAL."""
    found = of_system(segments(settings, dbname), system)
    known = timelines(settings, dbname, system).known(s.timeline for s in found)
    return [*((timeline, last_commit(settings, image, dbname, best_copies(
        s for s in found if s.timeline == timeline), version)) for timeline in known[:-1]),
        (known[-1], None)]


def timeline_at(at: datetime, spans: list[tuple[int, datetime | None]]) -> int:
    """The timeline that was the server's at `at` (`spans` from `ends`): the oldest one whose
    own WAL has a commit at or after `at`, else the newest. A moment on an old timeline's
    branch after a cluster restore forked it is recovered on that branch."""
    for timeline, end in spans[:-1]:
        if end is not None and at <= end:
            return timeline
    return spans[-1][0]


def make_recent_recoverable(settings: Settings) -> bool:
    """With the database up: commit now and wait until the streamer has it, so any moment up to
    now is recoverable (recovery stops at the first commit after its target). Never raises."""
    try:
        return database.mark_and_flush(settings, APPLICATION)
    except database.DatabaseError:
        return False


# the streamer ---------------------------------------------------------------------------------
GAP_MARKS = (
    "has already been removed",  # the server no longer has the WAL we ask for
    "is not in this server's history",  # the archive's branch is not the server's
    "ahead of the WAL flush position",  # the archive went further than the server's WAL
)


def is_gap(why: str) -> bool:
    """Whether pg_receivewal ended because the archive cannot be continued from the server."""
    return any(mark in why for mark in GAP_MARKS)


class Receiver:
    """One pg_receivewal on the route, until it ends (`run`) or is ended (`end`)."""

    def __init__(self, settings: Settings, owner: str = ""):
        self.settings = settings
        self.owner = owner
        self.proc: docker_api.Exec | None = None
        self.ended = False
        self.followed: str | None = None  # a new timeline it follows (follow_timeline), in words
        self.replaced: str | None = None  # the cluster was replaced (follow_system), in words

    def run(self, on_started: Any = None) -> str:
        """Stream until pg_receivewal ends; return why it ended (its last words)."""
        s = self.settings
        remove_unpadded(s)
        stamp = local_time(utcnow(), s.zone, "stamp")
        self.replaced = follow_system(s, stamp)
        self.followed = follow_timeline(s, stamp)
        created = database.ensure_slot(s, SLOT)
        port = database.server_port(s)
        local = wal_dir(s)
        docker_api.remove_beside(self.owner, "wal")  # one a killed daemon left streaming
        with route(s, local, "wal", lifetime=None, owner=self.owner) as (
                helper, where, _image):
            self.proc = docker_api.Exec(helper, receivewal_command(s, port, where.path(local)),
                                        environment=environment(s))
            if self.ended:
                self.proc.kill()
            if on_started is not None:
                on_started(created)
            for _ in self.proc.stdout():
                pass
            result = self.proc.wait()
        tail = "; ".join(line for line in result.stderr.splitlines()[-4:] if line.strip())
        return f"pg_receivewal ended with exit status {result.exit_code}: {tail or 'no message'}"

    def end(self) -> None:
        self.ended = True
        if self.proc is not None:
            self.proc.kill()
            self.proc.close()


def remove_unpadded(settings: Settings) -> list[str]:
    """pg_receivewal opens a new segment by writing 16 MiB of zeros, then the WAL into it: one
    killed while padding leaves a shorter file of zeros, which it then refuses ("should be 0 or
    16777216" bytes). Such a file holds no WAL: remove it, so the segment is streamed again.
    A short file that is not all zeros is left for the operator (and the error says so)."""
    removed = []
    for segment in segments(settings):
        path = segment.path
        if not segment.partial or path.parent != wal_dir(settings):
            continue
        size = path.stat().st_size
        if size in (0, SEGMENT_SIZE) or not _all_zeros(path):
            continue
        path.unlink()
        removed.append(path.name)
    return removed


def _all_zeros(path: Path) -> bool:
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            if chunk.count(0) != len(chunk):
                return False
    return True


def close_chain(settings: Settings, stamp: str) -> Path | None:
    """Move the archive's files into before-<stamp>/ (a gap follows them), so pg_receivewal
    starts a new chain at the server's current position. Returns the directory, if any."""
    root = wal_dir(settings)
    return set_aside([path for path in root.glob("*") if parse_segment(path) is not None],
                     root / f"before-{stamp}")


def archive_system(settings: Settings) -> str | None:
    """The cluster the archive's current chain holds: the header of its newest segment that
    has one, else the chain's recorded system identifier; None when it holds neither."""
    root = wal_dir(settings)
    mine = [s for s in segments(settings) if s.path.parent == root]
    for segment in sorted(mine, key=resume_key, reverse=True):
        system = segment.system()
        if system is not None:
            return system
    return recorded_system(root)


def follow_system(settings: Settings, stamp: str) -> str | None:
    """Before pg_receivewal starts: when the server is another database cluster than the one
    the archive's chain holds (replaced under the same container: a major-version upgrade by
    dump and restore, a volume initialised again), the whole chain (segments, timeline
    histories, its system_identifier) is moved to other-<stamp>/, so pg_receivewal starts a new
    chain at the new server's position. The server's system identifier is then recorded in
    wal/<db>/system_identifier. In words, what was done (None: nothing). Raises
    DatabaseError."""
    server = database.system_identifier(settings)
    root = wal_dir(settings)
    held = archive_system(settings)
    said = None
    if held is not None and held != server:
        files = [path for path in root.glob("*") if path.is_file() and (
            parse_segment(path) is not None or path.suffix == ".history"
            or path.name == SYSTEM_FILE)]
        moved = set_aside(files, root / f"other-{stamp}")
        said = (f"the database server is another database cluster (system identifier "
                f"{server}) than the one the WAL archive holds ({held}): it was replaced "
                f"(a major-version upgrade, a volume initialised again). The old cluster's "
                f"WAL was moved to {moved} (kept while a base backup of it is kept); "
                "streaming starts a new chain")
    recorded = root / SYSTEM_FILE
    if not recorded.is_file() or recorded.read_text(encoding="ascii").strip() != server:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with AtomicFile(recorded) as out:
            out.write(f"{server}\n".encode())
            out.commit()
    return said


def set_aside(files: list[Path], target: Path) -> Path | None:
    """Move `files` into the folder `target` (made 0700); None when there are none."""
    if not files:
        return None
    target.mkdir(mode=0o700, exist_ok=True)
    for path in files:
        path.rename(target / path.name)
    return target


def resume_key(segment: Segment) -> tuple[int, int, bool]:
    """pg_receivewal resumes after the highest segment, on the highest timeline, complete
    over partial."""
    return (segment.number, segment.timeline, not segment.partial)


def follow_timeline(settings: Settings, stamp: str) -> str | None:
    """Before pg_receivewal starts: the server's timeline history files into the archive, and
    when the server writes on another timeline than the archive's newest segment (a cluster
    restore promoted it), the segments that are not on the server's path (the old timeline's
    branch after the fork) moved to branch-<stamp>/, and pg_receivewal made to start where the
    server's timeline began. In words, what was done (None: nothing). Raises DatabaseError."""
    server = database.server_timeline(settings)
    fetch_histories(settings, server)
    root = wal_dir(settings)
    mine = [s for s in segments(settings) if s.path.parent == root]
    lines = timelines(settings)
    if not mine or max(mine, key=resume_key).timeline == server or (
            server > 1 and server not in lines.histories):
        return None  # the same timeline; or one we cannot place: pg_receivewal says so
    off = [s for s in mine if lines.owner(server, s.number) != s.timeline]
    moved = set_aside([s.path for s in off], root / f"branch-{stamp}")
    start = _start_at_fork(root, lines, server, [s for s in mine if s not in off])
    return (f"the database server now writes timeline {server} (a cluster restore, or a "
            f"promotion, forked it): streaming follows it"
            + (f" from segment {start}" if start else "")
            + (f"; the {len(off)} segment(s) of the old timeline's branch after the fork "
               f"were moved to {moved}" if moved else ""))


def _start_at_fork(root: Path, lines: Timelines, server: int, rest: list[Segment],
                   ) -> str | None:
    """When pg_receivewal would resume at the segment where the server's timeline begins but
    on the old timeline (or has nothing to resume from), an empty `.partial` of that segment
    on the server's timeline makes it start there, on it (it pads an empty one and streams it
    from its start: the old timeline's WAL up to the fork, then the new one's). Returns the
    file's name, or None (it resumes earlier, and follows the switch by itself)."""
    begin = lines.begins(server)
    if begin is None:
        return None
    if rest:
        last = max(rest, key=resume_key)
        if (last.number if last.partial else last.number + 1) != begin:
            return None
    name = segment_name(server, begin) + ".partial"
    (root / name).touch(mode=0o600)
    return name


def fetch_histories(settings: Settings, server: int) -> list[str]:
    """Copy the history files of timelines 2 to `server` the archive lacks from the server's
    pg_wal (every one of them must be beside the WAL: a recovery numbers its new timeline
    after the highest it finds). Returns the names copied."""
    copied = []
    for timeline in range(2, server + 1):
        path = wal_dir(settings) / history_name(timeline)
        if path.exists():
            continue
        data = database.timeline_history(settings, path.name)
        if data is None:
            continue
        with AtomicFile(path) as out:
            out.write(data)
            out.commit()
        copied.append(path.name)
    return copied


def prune(settings: Settings, keep: dict[str | None, int], dbname: str | None = None,
          ) -> list[str]:
    """Delete the archived WAL segments no kept base backup needs (`keep`, from
    retention.wal_keep: for each database cluster a base backup is kept of, the segment the
    oldest one starts in); never the one being written. Returns the deleted paths, relative to
    BACKUP_DIR."""
    deleted = []
    root = wal_dir(settings, dbname)
    found = segments(settings, dbname)
    current = [s for s in found if s.path.parent == root]
    writing = max(current, key=resume_key) if current else None
    for segment in found:
        if segment == writing or segment.number >= needed_from(segment, keep, root):
            continue
        segment.path.unlink(missing_ok=True)
        deleted.append(str(segment.path.relative_to(settings.backup_dir)))
    for folder in (path for side in SIDE for path in root.glob(side)):
        with contextlib.suppress(OSError):
            if [p.name for p in folder.iterdir()] == [SYSTEM_FILE]:
                (folder / SYSTEM_FILE).unlink()
            folder.rmdir()  # only once empty
    return deleted


def needed_from(segment: Segment, keep: dict[str | None, int], root: Path) -> float:
    """The first segment number of `segment`'s cluster that a kept base backup needs: the start
    of the oldest base backup kept of that cluster (or of one that recorded no cluster). Whose
    segment it is unknown (no header yet): the oldest start of all. A cluster no base backup is
    kept of: the current chain stays whole (its first base backup is to come), a chain set
    aside goes whole (a cluster replaced, whose base backups are all gone)."""
    system = segment.system()
    if system is None:
        return min(keep.values(), default=0)
    limits = [keep[key] for key in (system, None) if key in keep]
    if limits:
        return min(limits)
    return 0 if segment.path.parent == root else float("inf")


# what a restore to a moment runs from the database's image: the streamer, base backups, the
# window (pg_waldump), the throwaway server and the dump taken from it
RESTORE_TOOLS = ("pg_receivewal", "pg_basebackup", "pg_waldump", "postgres", "pg_dump", "psql")
TOOLS_SCRIPT = r"""
for tool in "$@"; do
  command -v "$tool" >/dev/null || {
    echo "$tool is not in the image (not on PATH=$PATH)" >&2; exit 127; }
  "$tool" --version >/dev/null || { echo "$tool --version failed" >&2; exit 4; }
done
"""
CHECK_SCRIPT = r"""
test -w "$1" || { echo "$1 is not writable by $(id -u):$(id -g) there" >&2; exit 3; }
conn=$2; shift 2
""" + TOOLS_SCRIPT + r"""
pg_receivewal --version
psql -X -A -t -d "$conn replication=true" -c IDENTIFY_SYSTEM
"""


def check_route(settings: Settings) -> str:
    """`check`: a helper beside the database finds and runs every tool a restore to a moment
    needs (RESTORE_TOOLS, with the PATH the restore gives them), opens a replication connection
    over 127.0.0.1 (IDENTIFY_SYSTEM) and sees the backup directory. One line, or JobError
    saying what fails."""
    port = database.server_port(settings)
    local = wal_dir(settings)
    with route(settings, local, "check", lifetime=120) as (helper, where, _image):
        result, out = docker_api.run(
            helper, ["sh", "-c", CHECK_SCRIPT, "sh", where.path(local), connection(settings, port),
                     *RESTORE_TOOLS], environment=environment(settings))
    if result.exit_code != 0:
        tail = "; ".join(line for line in result.stderr.splitlines()[-3:] if line.strip())
        raise JobError("the route beside the database does not work (a replication connection "
                       f"to 127.0.0.1:{port} from the database's network, {local} writable "
                       f"there, and {', '.join(RESTORE_TOOLS)} in the database's image): "
                       f"{tail or f'exit status {result.exit_code}'}")
    version = out.decode("utf-8", "replace").splitlines()[0].strip()
    return (f"{version} beside the database; replication over 127.0.0.1:{port} allowed; "
            f"{', '.join(RESTORE_TOOLS[1:])} found")
