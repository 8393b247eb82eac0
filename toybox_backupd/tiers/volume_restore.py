"""Restores of the physical tiers: a whole volume (some of its files: file_restore)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import docker_api
from ..basics import Confirm, JobError, Say, local_time, silent
from ..compression import decompressed, kind_of
from ..pgtools import tool_error
from ..restore_points import chain_for, check_file
from ..settings import Settings
from ..store import Artifact, Store

MOUNT = "/vol"
TAR_EXTRACT = [
    "tar", "--extract", "--file=-", "--numeric-owner", "--same-owner", "--same-permissions",
    "--xattrs", "--xattrs-include=*", "--directory=" + MOUNT,
]


def restore_volume(settings: Settings, name: str, *, at: datetime | None = None,
                   to: str | None = None, confirm: Confirm = None,
                   stop_containers: bool = False, say: Say = silent) -> None:
    """Rebuild volume `to` (default `name`) as `name` was at `at`: its full, then its differential.

    Raises CatalogError (no restore point, or a corrupt file: nothing changed) or JobError.
    """
    target = to or name
    with Store(settings.state_dir) as store:
        chain = chain_for(store, name, at)
        deleted = store.deleted_paths(chain[-1].id) if len(chain) > 1 else []
        owner = store.instance_id()
    files = [check_file(settings.backup_dir, item) for item in chain]
    when = local_time(chain[-1].created_at, settings.zone)
    exists = docker_api.volume_exists(target)
    running = [c for c in (docker_api.containers_using_volume(target) if exists else [])
               if c.status == "running"]
    if running and not stop_containers:
        names = ", ".join(c.name for c in running)
        raise JobError(f"volume {target} is in use by running container(s) {names}; stop them "
                       "first or pass --stop-containers")
    if exists and confirm is not None and not confirm(
            f"This replaces everything in volume {target!r} with {name} as it was at {when}. "
            "Continue?"):
        raise JobError("cancelled; nothing was changed")
    if not exists:
        docker_api.create_volume(target)
    say(f"restoring {target} from {' + '.join(item.path for item in chain)} ({when})")
    stopped: list[Any] = []
    try:
        for container in running:
            docker_api.stop_container(container)
            stopped.append(container)
        image = docker_api.helper_image(settings.helper_image)
        with docker_api.helper(image, {target: (MOUNT, "rw")}, "restore", owner) as helper:
            _run(helper, ["find", MOUNT, "-mindepth", "1", "-delete"], "emptying the volume")
            _extract(helper, files[0], chain[0])
            if len(chain) > 1:
                _delete_paths(helper, deleted)
                _extract(helper, files[1], chain[1])
    finally:
        for container in stopped:
            docker_api.start_container(container.id)
    say(f"restored volume {target}: {name} as of {when}")


def _run(helper: Any, cmd: list[str], what: str, stdin: Iterator[bytes] | None = None) -> None:
    proc = docker_api.Exec(helper, cmd, stdin=stdin is not None)
    if stdin is not None:
        proc.feed(stdin)
    result = proc.wait(timeout=3600)
    if result.exit_code != 0:
        raise JobError(f"{what}: " + tool_error(cmd[0], result, "the helper container"))


def _extract(helper: Any, path: Path, item: Artifact) -> None:
    kind = item.extra.get("compression") or kind_of(path)
    _run(helper, TAR_EXTRACT, f"extracting {path.name}", decompressed(path, kind))


def _delete_paths(helper: Any, paths: list[str]) -> None:
    safe = [p for p in paths if _safe_relative(p)]
    if not safe:
        return
    data = b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in safe)
    _run(helper, ["sh", "-c", f"cd {MOUNT} && xargs -0 -r rm -rf --"],
         "removing paths deleted since the full", iter([data]))


def _safe_relative(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and ".." not in parts and path != "."
