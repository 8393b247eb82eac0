"""`toybox-backupd verify`: re-check every kept artifact; results go into the history."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from . import jobs, logs
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_artifact(settings: Settings, item: Artifact) -> str | None:
    """None if the artifact is sound, else what is wrong (its tier module reads it)."""
    try:
        tier = jobs.get(item.tier).tier
    except ValueError:
        return f"no tier {item.tier!r} is known to this version, so it cannot be read"
    problem: str | None = tier.verify(settings, item)
    return problem


def verify_all(settings: Settings) -> list[Checked]:
    """Check every kept artifact (ok or corrupt), record the verdicts and a `verify` run.

    A corrupt artifact that reads well again is marked ok. Returns the verdicts, oldest first.
    """
    results: list[Checked] = []
    with Store(settings.state_dir) as store:
        items = store.artifacts(statuses=("ok", "corrupt"))
        run_id = store.open_run("verify", f"{len(items)} artifacts")
        for item in items:
            problem = check_artifact(settings, item)
            store.mark_verified(item.id, problem is None)
            if problem is None and item.status == "corrupt":
                store.set_artifact_status(item.id, "ok")
            results.append(Checked(item.id, item.tier, item.target, item.path, problem is None,
                                   problem))
            if problem:
                log.error("artifact failed verification", path=item.path, problem=problem)
        bad = [r for r in results if not r.ok]
        store.close_run(
            run_id, "failed" if bad else "ok", bytes_=sum(i.size for i in items),
            error="; ".join(f"{r.path}: {r.problem}" for r in bad) or None,
            details={"checked": len(results), "bad": len(bad)})
    return results
