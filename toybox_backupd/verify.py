"""`toybox-backupd verify`: re-check every kept artifact; results go into the history."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from . import jobs, logs, reindex
from .basics import Unverifiable
from .settings import Settings
from .store import Artifact, Store

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
        results = [_check(settings, store, item) for item in items]
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
