"""What to do about the set-up mistakes a new user makes, in words: a backup directory the
sidecar's user cannot write, a volume name with a typo.

Both `check` and a failed run say the same thing, from here.
"""

from __future__ import annotations

import difflib
import os
import stat
import tempfile
from pathlib import Path

from ..core.basics import JobError, human
from . import docker_api


class Unwritable(JobError):
    """A directory the sidecar must write to refuses its user; the message says what to run."""


def require_writable(path: Path, backup_dir: Path) -> str:
    """Create `path` if needed and write a probe file in it; "PATH writable, N free", or
    Unwritable naming the host directory, its owner, this process's uid and the `chown`."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".toybox-check-"):
            pass
    except PermissionError as exc:
        raise Unwritable(unwritable(path, backup_dir, exc)) from None
    free = human(os.statvfs(path).f_bavail * os.statvfs(path).f_frsize)
    return f"{path} writable, {free} free"


def unwritable(directory: Path, backup_dir: Path, exc: OSError | None = None) -> str:
    """Why the sidecar's user cannot write in `directory`, and the command that fixes it."""
    failed = Path(exc.filename) if exc is not None and exc.filename else directory
    existing = next((p for p in (failed, *failed.parents) if _seen(p)), Path("/"))
    me = f"{os.getuid()}:{os.getgid()}"
    try:
        info = existing.stat()
        owner = (f"it belongs to uid {info.st_uid}" + (" (root)" if info.st_uid == 0 else "")
                 + f", gid {info.st_gid}, mode {stat.S_IMODE(info.st_mode):04o}")
    except OSError:
        info, owner = None, "its owner cannot be read"
    text = (f"cannot write in {existing} (the sidecar runs as uid {os.getuid()}, gid "
            f"{os.getgid()}): {owner}")
    if info is not None and info.st_uid == 0:
        text += ("; Docker creates a bind-mounted host directory as root when it does not "
                 "exist yet")
    return text + ". " + _fix(existing, backup_dir, me)


def _seen(path: Path) -> bool:
    """Whether `path` exists as far as this user can tell (not inside a directory it may not
    enter: that raises PermissionError from `Path.exists`)."""
    try:
        return path.exists()
    except OSError:
        return False


def _fix(local: Path, backup_dir: Path, me: str) -> str:
    """The command that gives `local` to this process's uid, where it is seen from."""
    source, volume = host_side(local, backup_dir)
    if volume:
        return (f"Give it to uid {me}: docker compose run --rm -u 0 --entrypoint chown backupd "
                f"-R {me} {local}")
    label = ""
    if _below(local, backup_dir):
        label = " (BACKUP_HOST_DIR" + (", beside docker-compose.yml)" if source.startswith(".")
                                       else ")")
    return f"On the host: sudo chown -R {me} {source}{label}"


def host_side(local: Path, backup_dir: Path) -> tuple[str, bool]:
    """Where `local` lives as the host sees it: (host path, or volume name; is a volume)."""
    if not Path("/.dockerenv").exists():  # not in a container: paths are the host's
        return str(local), False
    try:
        source = docker_api.mountable(local)
    except Exception:  # no engine to ask: the compose file's mount of BACKUP_DIR
        source = None
    if source is not None:
        name, inner = source
        return (str(Path(name) / inner) if inner else name), not name.startswith("/")
    if _below(local, backup_dir):
        host = os.environ.get("BACKUP_HOST_DIR") or "./backups"  # compose's default
        inner = str(local.relative_to(backup_dir))
        return (host if inner == "." else f"{host.rstrip('/')}/{inner}"), False
    return str(local), False


def _below(local: Path, top: Path) -> bool:
    return local == top or top in local.parents


def missing_volumes(names: list[str]) -> str | None:
    """"no such Docker volume: X (did you mean Y?)" for the names the engine does not know."""
    known = docker_api.volume_names()
    missing = [name for name in names if name not in known]
    if not missing:
        return None
    parts = []
    for name in missing:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        parts.append(name + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return (f"no such Docker volume: {', '.join(parts)}; check BACKUP_VOLUMES (`docker volume "
            "ls` lists the real names: compose prefixes them with the project name)")
