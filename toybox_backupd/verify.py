"""`toybox-backupd verify`: re-check every kept artifact; results go into the history."""

from __future__ import annotations

import json

from . import logs
from .history import Artifact, History
from .settings import Settings

log = logs.get("toybox_backupd.verify")


def check_artifact(settings: Settings, item: Artifact) -> str | None:
    """None if the artifact is sound, else what is wrong."""
    if item.tier == "logical":
        from . import logical

        return logical.verify(settings, item)
    from . import volumes

    return volumes.verify(settings, item)


def run(settings: Settings, as_json: bool = False) -> int:
    results = []
    with History(settings.state_dir) as history:
        items = history.artifacts(statuses=("ok", "corrupt"))
        run_id = history.open_run("verify", f"{len(items)} artifacts")
        for item in items:
            problem = check_artifact(settings, item)
            history.mark_verified(item.id, problem is None)
            if problem is None and item.status == "corrupt":
                history.set_artifact_status(item.id, "ok")
            results.append({"id": item.id, "tier": item.tier, "target": item.target,
                            "path": item.path, "ok": problem is None, "problem": problem})
            if problem:
                log.error("artifact failed verification", path=item.path, problem=problem)
        bad = [r for r in results if not r["ok"]]
        history.close_run(
            run_id, "failed" if bad else "ok", bytes_=sum(i.size for i in items),
            error="; ".join(f"{r['path']}: {r['problem']}" for r in bad) or None,
            details={"checked": len(results), "bad": len(bad)})
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            state = "ok     " if result["ok"] else "CORRUPT"
            print(f"{state} {result['tier']:<8} {result['path']}"
                  + (f"\n        {result['problem']}" if result["problem"] else ""))
        print(f"{len(results) - len(bad)} of {len(results)} artifacts verified"
              + (f", {len(bad)} bad" if bad else ""))
    return 1 if bad else 0
