"""Point in time off-site: the WAL archive's copy in the target, fetched back and pruned.

The target holds the archive under the same paths as BACKUP_DIR (`wal/<db>/<segment>`, the
chains before a gap under `wal/<db>/before-<stamp>/`), each `<segment>.age` when encrypted:
every completed segment once, checked whole (16 MiB) first and followed by
`<segment>.sha256` (sha256sum's format, of the plain segment: `sha256sum -c` checks one fetched
by hand) and its signature `<segment>.sha256.sig` (offsite.trust), and the segment being
written again every PARTIAL_EVERY seconds when it has changed since its last copy (an idle
database costs nothing), compressed by zstd (`….partial.zst`: a segment is mostly the zeros it
was padded with; `zstd -d` reads it), with the checksum of its plain bytes signed the same way.

A restore on a host that lacks segments (a lost server, or WAL pruned here but kept off-site)
fetches those it needs, decrypted, each checked against its signed `.sha256` and its size: a
completed segment without one is never replayed (recovery stops before it, and says so), a
`.partial` or timeline history file without one is not used. Retention,
after a successful base backup run, deletes there the segments no base backup kept here or
off-site needs, and each `.partial` whose completed segment is there.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core import compression, progress
from ...core.atomic import AtomicFile
from ...core.basics import CatalogError, JobError, Say, human, silent
from ...core.settings import Settings
from ...places.offsite import trust
from ...places.offsite.copy import AGE_SUFFIX, ZSTD_SUFFIX, put_file
from ...places.offsite.fetch import download
from ...places.offsite.target import OffsiteError, Target, open_target
from . import wal

STATE_OFFSITE = "pitr.offsite_upto"  # the newest completed segment copied off-site
PARTIAL_EVERY = 60.0  # seconds between copies of the segment being written
SUM_SUFFIX = ".sha256"
STATE_SYSTEM = "pitr.offsite_system"  # the cluster whose chain is copied to wal/<db>/ itself
STATE_HISTORIES = "pitr.offsite_histories"  # the timeline history files copied off-site
STATE_PARTIAL = "pitr.offsite_partial"  # the segment being written as last copied
HISTORY = re.compile(r"^[0-9A-F]{8}\.history$")


# copying -------------------------------------------------------------------------------------
def verify_segment(segment: wal.Segment) -> str | None:
    """None if a completed segment is whole (16 MiB), else what is wrong."""
    size = segment.path.stat().st_size
    if not segment.partial and size != wal.SEGMENT_SIZE:
        return f"{segment.path.name} is {size} bytes, not a whole segment ({wal.SEGMENT_SIZE})"
    return None


def copy_offsite(settings: Settings, store: Any, last_partial: float, now: float) -> float:
    """Copy the completed segments not yet off-site (each checked, then verified there, then
    its `.sha256`), and the one being written when `PARTIAL_EVERY` has passed since
    `last_partial`; returns the time of the last partial copy. Raises ToyboxError
    (OffsiteError) when the target fails: the next watch tries again from where this one
    stopped."""
    target = open_target(settings)
    if target is None:
        return last_partial
    folder, marker = _chain_place(settings, store)
    root = wal.wal_dir(settings)
    marks = {key: store.get_state(key) or "" for key in {marker, STATE_OFFSITE}}
    for segment in wal.segments(settings):
        if segment.partial:
            if segment.path.parent == root and now - last_partial >= PARTIAL_EVERY:
                _copy_partial(settings, store, target, segment, folder)
                last_partial = now
            continue
        # a chain set aside keeps the place (and marker) it had: the first cluster's
        current = segment.path.parent == root
        _copy_completed(settings, (store, marks), target, segment,
                        (folder, marker) if current else ("", STATE_OFFSITE))
    _copy_histories(settings, store, target)
    return last_partial


def _copy_partial(settings: Settings, store: Any, target: Target, segment: wal.Segment,
                  folder: str) -> None:
    """The segment being written, compressed, unless it is as it was at its last copy (its
    name, size and time of change, in STATE_PARTIAL)."""
    facts = segment.path.stat()
    seen = f"{segment.name} {facts.st_size} {facts.st_mtime_ns}"
    if store.get_state(STATE_PARTIAL) == seen:
        return
    remote = _remote_key(settings, segment, folder)
    stored = put_file(settings, target, str(segment.path.relative_to(settings.backup_dir)),
                      remote, compress=True)
    trust.put_checksum(settings, target, remote, stored["plain_sha256"], segment.system())
    store.set_state(STATE_PARTIAL, seen)


def _copy_completed(settings: Settings, progress_: tuple[Any, dict[str, str]], target: Target,
                    segment: wal.Segment, place: tuple[str, str]) -> None:
    """One completed segment not yet off-site (after its chain's marker, in `progress_`: the
    store and the markers read): checked whole, copied, then its `.sha256`; the marker moved
    on."""
    store, marks = progress_
    folder, marker = place
    if segment.name <= marks[marker]:
        return
    problem = verify_segment(segment)
    if problem:
        raise JobError(f"not copied off-site: {problem}")
    remote = _remote_key(settings, segment, folder)
    stored = put_file(settings, target, str(segment.path.relative_to(settings.backup_dir)),
                      remote)
    trust.put_checksum(settings, target, remote, stored["source_sha256"], segment.system())
    store.set_state(marker, segment.name)
    marks[marker] = segment.name


def _chain_place(settings: Settings, store: Any) -> tuple[str, str]:
    """Where the archive's current chain goes off-site, and its progress marker. The first
    cluster copied goes to `wal/<db>/` itself; a cluster that replaced it (its segments would
    carry the same names) to `wal/<db>/cluster-<system identifier>/`, with a marker of its own,
    so no cluster's copy ever overwrites another's."""
    system = wal.archive_system(settings)
    first = store.get_state(STATE_SYSTEM)
    if not first and system:
        store.set_state(STATE_SYSTEM, system)
        first = system
    if system is None or system == first:
        return "", STATE_OFFSITE
    return f"cluster-{system}/", f"{STATE_OFFSITE}.{system}"


def _remote_key(settings: Settings, segment: wal.Segment, folder: str) -> str:
    """The object key of a segment of the current chain (`folder`: see _chain_place)."""
    relative = segment.path.relative_to(settings.backup_dir)
    return str(relative.parent / folder / relative.name) if folder else str(relative)


def _copy_histories(settings: Settings, store: Any, target: Target) -> None:
    """Each timeline history file (`00000002.history`, written once when a cluster restore
    forks a timeline) copied once: a restore from off-site alone needs it to follow a timeline."""
    copied = set((store.get_state(STATE_HISTORIES) or "").split())
    for path in sorted(wal.wal_dir(settings).glob("*.history")):
        if path.name in copied or not HISTORY.match(path.name):
            continue
        relative = str(path.relative_to(settings.backup_dir))
        stored = put_file(settings, target, relative)
        trust.put_checksum(settings, target, relative, stored["source_sha256"])
        copied.add(path.name)
        store.set_state(STATE_HISTORIES, " ".join(sorted(copied)))


def fetch_histories(settings: Settings, dbname: str, say: Say = silent) -> list[str]:
    """The timeline history files off-site that the archive here lacks, fetched into it (so a
    restore on a new host follows the timelines the old one had); their names. Nothing when
    off-site copies are off or the target cannot be listed (said)."""
    target = open_target(settings)
    if target is None:
        return []
    prefix, folder = f"wal/{dbname}/", wal.wal_dir(settings, dbname)
    try:
        present = set(target.keys(prefix))
    except OffsiteError as exc:
        say(f"the WAL off-site cannot be listed ({exc}); only the WAL here is used")
        return []
    fetched = []
    for key in sorted(k for k in present if HISTORY.match(k[len(prefix):].removesuffix(AGE_SUFFIX))):
        path = folder / key[len(prefix):].removesuffix(AGE_SUFFIX)
        if path.exists():
            continue
        try:
            _fetch_checked(settings, target, key, present, path)
        except trust.Untrusted as exc:
            say(f"the timeline history file {path.name} off-site is not used: {exc}")
            continue
        fetched.append(path.name)
    if fetched:
        say(f"fetched the timeline history file(s) {', '.join(fetched)} from off-site")
    return fetched


def _fetch_checked(settings: Settings, target: Target, key: str, present: set[str],
                   path: Path) -> None:
    """One small object (a timeline history file) into `path`, after its checksum and
    signature are believed and only if it matches them. Raises trust.Untrusted. (History files
    copied before checksums were written have none: taken only when unsigned copies are.)"""
    plain = key.removesuffix(AGE_SUFFIX)
    encrypted = key.endswith(AGE_SUFFIX)
    trust.require_encrypted(settings, key, encrypted)
    old = settings.offsite_trust_unsigned and plain + SUM_SUFFIX not in present
    want = None if old else trust.checked_sum(settings, target, plain, present)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with AtomicFile(path) as out:
        download(settings, target, {"key": key, "encrypted": encrypted}, out)
        if want is not None and out.sha256 != want:
            raise trust.Untrusted(f"{key} off-site does not match its {SUM_SUFFIX}")
        out.commit()


# what is there -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Remote:
    """One segment's object: `segment.path` is its plain path (`wal/<db>/…`), `key` the
    object's (`….age` when encrypted)."""

    segment: wal.Segment
    key: str


def _in_layout(rest: str) -> bool:
    """`<segment>`, `before-<stamp>/<segment>`, `other-<stamp>/<segment>` (a replaced
    cluster's chain) or `cluster-<system>/<segment>` (the chain of the cluster that replaced
    the first one copied) below `wal/<db>/`."""
    parts = rest.split("/")
    return len(parts) == 1 or (len(parts) == 2 and parts[0].startswith(
        ("before-", "other-", "cluster-")))


def _sum_segment(key: str) -> wal.Segment | None:
    """The segment whose `.sha256` (or `.sha256.sig`) `key` is; None for any other key."""
    plain = key.removesuffix(trust.SIG_SUFFIX)
    if not plain.endswith(SUM_SUFFIX):
        return None
    return wal.parse_segment(Path(plain[: -len(SUM_SUFFIX)]))


def _plain(key: str) -> str:
    """The key of an object's plain contents: without `.age`, then `.zst`."""
    return key.removesuffix(AGE_SUFFIX).removesuffix(ZSTD_SUFFIX)


def listing(target: Target, dbname: str) -> tuple[list[Remote], set[str]]:
    """The segments under `wal/<db>/` in the target (WAL order) and the keys of the `.sha256`
    objects (and their `.sha256.sig`) there. Anything else there is not ours and is never touched."""
    prefix = f"wal/{dbname}/"
    found: list[Remote] = []
    sums: set[str] = set()
    for key in target.keys(prefix):
        if not _in_layout(key[len(prefix):]):
            continue
        if _sum_segment(key) is not None:  # a checksum, or its signature
            sums.add(key)
            continue
        segment = wal.parse_segment(Path(_plain(key)))
        if segment is not None:
            found.append(Remote(segment, key))
    found.sort(key=lambda r: (r.segment.number, r.segment.timeline, r.segment.partial,
                              _packed(r.key)))
    return found, sums


def _packed(key: str) -> bool:
    return key.removesuffix(AGE_SUFFIX).endswith(ZSTD_SUFFIX)


def _one_each(remote: list[Remote]) -> list[Remote]:
    """One object per file: of a plain `.partial` (copied before they were compressed) and a
    compressed one of the same name, the compressed (the later)."""
    return list({str(r.segment.path): r for r in remote}.values())


# fetching ------------------------------------------------------------------------------------
def wanted(remote: list[Remote], local: list[wal.Segment], start: int) -> list[Remote]:
    """The segments from `start` on that `local` lacks: a completed one unless it is here, the
    one being written only when its completed segment is nowhere and it is not here."""
    here = {s.name for s in local if not s.partial}
    anywhere = {s.name for s in local} | {r.segment.name for r in remote if not r.segment.partial}
    return [r for r in remote if r.segment.number >= start
            and r.segment.name not in (anywhere if r.segment.partial else here)]


def fetch(settings: Settings, dbname: str, start: int, local: list[wal.Segment], into: Path,
          say: Say = silent) -> list[Path]:
    """Fetch from off-site the segments from `start` on that `local` lacks, into `into` (as
    they lie below `wal/<db>/`); their paths. [] when off-site copies are off or the target
    cannot be listed (said); CatalogError without the identity for encrypted copies, OffsiteError
    for a copy that is not what was written."""
    target = open_target(settings)
    if target is None:
        return []
    try:
        remote, sums = listing(target, dbname)
    except OffsiteError as exc:
        say(f"the WAL off-site cannot be listed ({exc}); only the WAL here is used")
        return []
    needed = _one_each(wanted(remote, local, start))
    if any(r.key.endswith(AGE_SUFFIX) for r in needed) and settings.age_identity_file is None:
        raise CatalogError(f"the WAL off-site ({target.url}) is encrypted: set AGE_IDENTITY_FILE "
                           "to the identity (private key) to restore from it")
    if not needed:
        return []
    say(f"fetching {len(needed)} WAL segment(s) ({human(len(needed) * wal.SEGMENT_SIZE)}) "
        f"from off-site ({target.url})")
    paths = []
    with progress.task("fetching WAL from off-site", len(needed) * wal.SEGMENT_SIZE):
        for item in needed:
            try:
                want = _believed(settings, target, item, sums)
            except trust.Untrusted as exc:
                if item.segment.partial:
                    say(f"{item.key} off-site is not used: {exc}")
                    continue
                say(f"the WAL off-site is not replayed from {item.segment.name} on: {exc}. "
                    "Recovery stops before it; what was written after it is lost unless the "
                    "WAL here holds it")
                break
            path = _fetch_one(settings, target, item, want, into / _below(item, dbname), say)
            if path is not None:
                paths.append(path)
    return paths


def _believed(settings: Settings, target: Target, item: Remote, sums: set[str]) -> str:
    """The sha256 a segment must have: its `.sha256`, signed. Raises trust.Untrusted (also for
    a segment that is not encrypted when OFFSITE_AGE_RECIPIENTS is set)."""
    trust.require_encrypted(settings, item.key, item.key.endswith(AGE_SUFFIX))
    return trust.checked_sum(settings, target, str(item.segment.path), sums)


def _below(item: Remote, dbname: str) -> str:
    return str(item.segment.path.relative_to(f"wal/{dbname}"))


def _fetch_one(settings: Settings, target: Target, item: Remote, want: str, path: Path,
               say: Say) -> Path | None:
    """One segment, decrypted and checked against `want` (its believed sha256); None for a
    `.partial` that is not a whole file or does not match (it was copied again meanwhile)."""
    with AtomicFile(path) as out:
        with compression.zstd_unpacking(out) if _packed(item.key) else contextlib.nullcontext(
                out) as into:
            download(settings, target, {"key": item.key,
                                        "encrypted": item.key.endswith(AGE_SUFFIX)}, into)
        if out.size != wal.SEGMENT_SIZE:
            if item.segment.partial:
                say(f"{item.key} off-site is {out.size} bytes, not a whole segment: skipped")
                return None
            raise OffsiteError(f"the off-site copy {item.key} is {out.size} bytes, not a whole "
                               f"WAL segment ({wal.SEGMENT_SIZE})")
        if out.sha256 != want:
            if item.segment.partial:
                say(f"{item.key} off-site does not match its {SUM_SUFFIX}: skipped")
                return None
            raise OffsiteError(f"the off-site copy {item.key} does not match its {SUM_SUFFIX} "
                               f"({out.sha256[:16]}… ≠ {want[:16]}…)")
        out.commit()
    return path


# pruning -------------------------------------------------------------------------------------
def prune(settings: Settings, keep_from: int, dbname: str,
          warn: Callable[[str], None] = lambda text: None) -> list[str]:
    """Delete off-site the segments before `keep_from` (no kept base backup needs them) with
    their `.sha256`, and every `.partial` whose completed segment is there; the deleted keys.
    A delete the target refuses (an Object Lock) ends it, told to `warn`."""
    target = open_target(settings)
    if target is None:
        return []
    remote, sums = listing(target, dbname)
    complete = {r.segment.name for r in remote if not r.segment.partial}
    doomed = [r.key for r in remote if r.segment.number < keep_from
              or (r.segment.partial and r.segment.name in complete)]
    doomed += sorted(key for key in sums if (s := _sum_segment(key)) and (
        s.number < keep_from or (s.partial and s.name in complete)))
    deleted: list[str] = []
    for key in doomed:
        try:
            target.delete(key)
        except OffsiteError as exc:
            warn(f"off-site WAL retention stopped at {key}: {exc}")
            break
        deleted.append(key)
    return deleted
