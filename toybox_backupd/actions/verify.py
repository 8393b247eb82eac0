"""`toybox-backupd verify`: re-check every kept artifact; results go into the history."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..catalog import reindex
from ..core import logs, progress
from ..core.basics import CatalogError, Unverifiable, utcnow
from ..core.settings import Settings
from ..places.offsite import trust
from ..places.offsite.target import OffsiteError, Stored, Target, open_target
from ..store import Artifact, Copy, Store
from ..tiers import registry as jobs

log = logs.get("toybox_backupd.verify")


@dataclass
class Checked:
    """One artifact's verdict."""

    id: int
    tier: str
    target: str
    path: str
    ok: bool
    problem: str | None
    checked: bool = True  # False: it could not be checked now (no verdict; status unchanged)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_artifact(settings: Settings, item: Artifact) -> str | None:
    """None if the artifact is sound, else what is wrong (its tier module reads it).

    Raises Unverifiable when it cannot be read now.
    """
    try:
        tier = jobs.get(item.tier).tier
    except ValueError:
        return f"no tier {item.tier!r} is known to this version, so it cannot be read"
    problem: str | None = tier.verify(settings, item)
    return problem


def verify_all(settings: Settings) -> list[Checked]:
    """Check every kept artifact (ok or corrupt), record the verdicts and a `verify` run.

    Take the run lock first (no backup may stop the database container meanwhile). An
    artifact that cannot be checked now keeps its status; a corrupt one that reads well again
    is marked ok. Returns the verdicts, oldest first.
    """
    with Store(settings.state_dir) as store:
        items = store.artifacts(statuses=("ok", "corrupt"))
        run_id = store.open_run("verify", f"{len(items)} artifacts")
        results = []
        for number, item in enumerate(items, 1):
            # the checksum, then the tier reads it through: each byte is read twice
            with progress.task(f"[{number}/{len(items)}] verifying {item.path}", 2 * item.size):
                results.append(_check(settings, store, item))
        bad = [r for r in results if not r.ok]
        unchecked = [r for r in bad if not r.checked]
        error = "; ".join(f"{r.path}: {r.problem}" for r in bad)
        if unchecked:
            error = (f"{len(unchecked)} artifact(s) could not be checked now (not a verdict on "
                     f"them): {error}")
        store.close_run(run_id, "failed" if bad else "ok", bytes_=sum(i.size for i in items),
                        error=error or None,
                        details={"checked": len(results) - len(unchecked),
                                 "bad": len(bad) - len(unchecked), "unchecked": len(unchecked)})
    return results


def unknown_files(settings: Settings) -> list[str]:
    """Files in the tool's layout that the catalog does not know (relative to BACKUP_DIR)."""
    with Store(settings.state_dir) as store:
        return reindex.unknown_files(settings.backup_dir, store)


def _check(settings: Settings, store: Store, item: Artifact) -> Checked:
    try:
        problem = check_artifact(settings, item)
    except Unverifiable as exc:
        log.warning("artifact could not be checked now", path=item.path, reason=str(exc))
        return Checked(item.id, item.tier, item.target, item.path, False, str(exc), False)
    store.mark_verified(item.id, problem is None)
    if problem is None and item.status == "corrupt":
        store.set_artifact_status(item.id, "ok")
    if problem:
        log.error("artifact failed verification", path=item.path, problem=problem)
    return Checked(item.id, item.tier, item.target, item.path, problem is None, problem)


# off-site ------------------------------------------------------------------------------------
def verify_offsite(settings: Settings) -> list[Checked]:
    """Check every off-site copy (ok or corrupt) where it lies: by the size and ETag the
    store keeps where it keeps them, else by streaming the object's sha256. Records the
    verdicts and a `verify` run; a target that cannot be reached gives no verdict."""
    target = open_target(settings)
    if target is None:
        raise CatalogError("OFFSITE_URL is empty: there are no off-site copies to verify")
    with Store(settings.state_dir) as store:
        copies = store.offsite_copies(("ok", "corrupt"))
        run_id = store.open_run("verify", f"{len(copies)} off-site copies")
        results = [_check_copy(settings, store, target, copy) for copy in copies]
        bad = [r for r in results if not r.ok]
        store.close_run(run_id, "failed" if bad else "ok", bytes_=None,
                        error="; ".join(f"{r.path}: {r.problem}" for r in bad) or None,
                        details={"offsite": target.url, "checked": len(results),
                                 "bad": len(bad)})
    return results


def _problem_of(settings: Settings, target: Target, copy: Copy) -> str | None:
    for obj in copy.objects:
        stored = Stored(key=obj["key"], size=obj["size"], sha256=obj.get("sha256") or "",
                        verified_by=obj.get("verified_by") or "", etag=obj.get("etag"))
        if obj.get("manifest"):  # what this host wrote, or signed by a trusted key
            try:
                trust.remote_manifest(settings, target, obj["key"], stored.sha256 or None)
            except trust.Untrusted as exc:
                return str(exc)
        if not stored.sha256 and not stored.etag:
            continue  # a manifest read by `reindex --offsite`: its signature is checked above
        problem = target.check(stored)
        if problem:
            return f"{obj['key']}: {problem}"
    return None


def _check_copy(settings: Settings, store: Store, target: Target, copy: Copy) -> Checked:
    item = store.artifact(copy.artifact_id)
    assert item is not None
    try:
        problem = _problem_of(settings, target, copy)
    except OffsiteError as exc:
        return Checked(item.id, item.tier, item.target, item.path, False, str(exc), False)
    store.set_copy_status(copy.artifact_id, "ok" if problem is None else "corrupt", utcnow(),
                          problem)
    if problem:
        log.error("off-site copy failed verification", path=item.path, problem=problem)
    return Checked(item.id, item.tier, item.target, item.path, problem is None, problem)
