"""Every Docker SDK call of toybox-backupd lives here.

Streams come from `docker exec` over the hijacked API socket, so the exit status of the command
is read back (`exec_inspect`) instead of lost, stdin can be fed, and a stuck stream can be ended
from another thread by closing its socket.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import select
import socket
import struct
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.utils.socket import STDERR, STDOUT, frames_iter

from ..core.basics import ToyboxError

STOP_LABEL = "toybox-backupd.stop-during-backup"
HELPER_LABEL = "toybox-backupd.helper"
OWNER_LABEL = "toybox-backupd.owner"
KEPT_LABEL = "toybox-backupd.kept"  # a helper the daemon keeps between runs
SCRATCH_LABEL = "toybox-backupd.scratch"  # a volume made for one restore, removed after it
COMPOSE_SERVICE = "com.docker.compose.service"
STDERR_KEEP = 64 * 1024
READ_SIZE = 1024 * 1024
WRITER_GRACE = 5.0  # seconds the stdin writer gets to finish once the command has ended
_FRAME = struct.Struct(">BxxxL")
# every exec'd command first tells its pid (on stderr, removed before anyone reads it), so
# that it can be signalled later: `sh -c 'echo ...$$ >&2; exec "$@"' sh CMD...`
PID_MARK = b"toybox-backupd-pid "
PID_PREFIX = ["sh", "-c", f'echo "{PID_MARK.decode()}$$" >&2; exec "$@"', "sh"]


class DockerError(ToyboxError):
    """A Docker problem, in words an operator can act on."""


@lru_cache(maxsize=1)
def client() -> docker.DockerClient:
    """The Docker client (cached); DockerError when the engine cannot be reached."""
    try:
        # API calls time out; exec streams do not (see Exec): a run's time limit ends those
        return docker.from_env(timeout=int(os.environ.get("DOCKER_CLIENT_TIMEOUT", "120")))
    except DockerException as exc:
        raise DockerError(_unreachable(exc)) from None


def ping() -> str:
    """The engine's version, or DockerError."""
    try:
        return str(client().version().get("Version", "?"))
    except (DockerException, OSError) as exc:
        raise DockerError(_unreachable(exc)) from None


def _unreachable(exc: BaseException, socket_path: str = "/var/run/docker.sock") -> str:
    """Why the engine cannot be reached, and what to do; a refused socket names DOCKER_GID."""
    text = f"cannot reach the Docker engine ({_short(exc)})"
    if "Permission denied" not in str(exc) or os.environ.get("DOCKER_HOST"):
        return text + f"; is {socket_path} mounted and readable (DOCKER_HOST)?"
    try:
        wanted = f"{os.stat(socket_path).st_gid}"
    except OSError:
        wanted = "?"
    groups = ", ".join(str(gid) for gid in sorted({os.getgid(), *os.getgroups()}))
    return (f"{text}: uid {os.getuid()} (groups {groups}) may not use {socket_path}, whose "
            f"group is {wanted}. Set DOCKER_GID in .env to the socket's group id, as the "
            f"host's `stat -c %g {socket_path}` prints it ({wanted} here), then recreate the "
            "sidecar: docker compose up -d")


@lru_cache(maxsize=1)
def engine_name() -> str | None:
    """The Docker host's name (the engine's `docker info` Name); None if it cannot be read."""
    try:
        return str(client().info().get("Name") or "") or None
    except (DockerException, DockerError, OSError):
        return None


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "…"


# containers -------------------------------------------------------------------------------
def find_container(name: str) -> Container:
    """A container by name or id, else the (running) container of a compose service."""
    api = client()
    try:
        return api.containers.get(name)
    except NotFound:
        pass
    except APIError as exc:
        raise DockerError(f"cannot look up container {name!r}: {_short(exc)}") from None
    matches = api.containers.list(all=True, filters={"label": f"{COMPOSE_SERVICE}={name}"})
    if not matches:
        raise DockerError(f"no container or compose service named {name!r}")
    running = [c for c in matches if c.status == "running"]
    project = own_compose_project()
    if project:
        same = [c for c in (running or matches)
                if c.labels.get("com.docker.compose.project") == project]
        if same:
            return same[0]
    return (running or matches)[0]


def is_running(container: Container) -> bool:
    """Whether `container` runs now (its state is reloaded first)."""
    container.reload()
    return container.status == "running"


def containers_using_volume(volume: str) -> list[Container]:
    """Containers (any state) that mount `volume`, our helpers left out."""
    result = []
    for container in client().containers.list(all=True, filters={"volume": volume}):
        if container.labels.get(HELPER_LABEL):
            continue
        result.append(container)
    return result


def mounted_volumes(container: Container) -> list[str]:
    """The names of the Docker volumes `container` mounts."""
    return [str(m["Name"]) for m in container.attrs.get("Mounts") or []
            if m.get("Type") == "volume" and m.get("Name")]


def data_volume(container: Container) -> str | None:
    """The named volume mounted at the container's PGDATA (the official image's default
    /var/lib/postgresql/data), if any."""
    env = dict(item.split("=", 1) for item in container.attrs.get("Config", {}).get("Env") or []
               if "=" in item)
    pgdata = env.get("PGDATA", "/var/lib/postgresql/data").rstrip("/")
    for mount in container.attrs.get("Mounts") or []:
        if mount.get("Type") == "volume" and str(mount.get("Destination", "")).rstrip("/") == pgdata:
            return str(mount["Name"])
    return None


def wants_stop(container: Container, names: Iterable[str]) -> bool:
    """Whether `container` is stopped while its volume is read: labelled, or named in `names`."""
    names = set(names)
    labels = container.labels or {}
    return (
        labels.get(STOP_LABEL, "").lower() in {"true", "1", "yes"}
        or container.name in names
        or labels.get(COMPOSE_SERVICE) in names
    )


def stop_container(container: Container, timeout: int = 120) -> None:
    """Stop `container`, giving it `timeout` seconds before SIGKILL."""
    container.stop(timeout=timeout)


def start_container(container_id: str) -> None:
    """Start the container with this id."""
    client().containers.get(container_id).start()


def container_state(container_id: str) -> str | None:
    """The container's status (running, exited, ...), or None if it is gone."""
    try:
        return str(client().containers.get(container_id).status)
    except NotFound:
        return None


def started_at(name: str) -> str | None:
    """The id and last start time of container `name` (as find_container finds it), None when
    there is none: it changes whenever the container is started again or replaced."""
    try:
        container = find_container(name)
    except (DockerError, DockerException):
        return None
    return f"{container.id} {container.attrs.get('State', {}).get('StartedAt', '')}"


@lru_cache(maxsize=1)
def own_container() -> Container | None:
    """The container this process runs in, if any."""
    candidates = [socket.gethostname()]
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            candidates += re.findall(r"/containers/([0-9a-f]{64})/", handle.read())
    except OSError:
        pass
    for candidate in candidates:
        try:
            return client().containers.get(candidate)
        except (NotFound, APIError, DockerError):
            continue
    return None


def mountable(local: Path) -> tuple[str, str] | None:
    """How a container of this engine can mount the local directory `local`, if it can.

    (source, subpath): a helper mounts `source` (a volume name or a host path) and finds
    `local` at `subpath` below it. Inside a container: through the mount of ours that holds
    `local` (a named volume, or a bind mount's host path); on a host talking to a local engine
    (unix socket): the path itself. None otherwise (a tmpfs, a remote engine). The engine may
    still see another file system (Docker Desktop's VM): callers check that a helper sees it.
    """
    me = own_container()
    if me is None:
        local_engine = str(client().api.base_url).startswith("http+docker://local")
        return (str(local), "") if local_engine else None
    best: dict[str, Any] | None = None
    for mount in me.attrs.get("Mounts") or []:
        where = Path(mount.get("Destination") or "/nowhere")
        if local.is_relative_to(where) and (
                best is None or len(where.parts) > len(Path(best["Destination"]).parts)):
            best = mount
    if best is None or best.get("Type") not in ("volume", "bind"):
        return None
    inner = str(local.relative_to(best["Destination"]))
    inner = "" if inner == "." else inner
    if best["Type"] == "bind":
        return str(Path(best["Source"]) / inner), ""
    return str(best["Name"]), inner


def own_compose_project() -> str | None:
    """The compose project of the container this process runs in, if any."""
    try:
        me = own_container()
    except DockerException:
        return None
    return me.labels.get("com.docker.compose.project") if me else None


def helper_image(configured: str | None) -> str:
    """HELPER_IMAGE, else the image this process runs in, else toybox-backupd:latest."""
    if configured:
        return configured
    me = own_container()
    if me is not None and me.image is not None:
        return str(me.image.id)
    return "toybox-backupd:latest"


def _require_image(image: str) -> None:
    """DockerError saying what to do when `image` is not on this engine (no pull is tried)."""
    try:
        client().images.get(image)
    except ImageNotFound:
        raise DockerError(
            f"the helper image {image!r} is not on this Docker engine, and toybox-backupd never "
            "pulls one: build the sidecar's image (`docker build -t toybox-backupd .` in its "
            "source) or set HELPER_IMAGE to a local image that has GNU tar") from None
    except APIError as exc:
        raise DockerError(f"cannot look up the helper image {image!r}: {_short(exc)}") from None


# volumes ----------------------------------------------------------------------------------
def volume_exists(name: str) -> bool:
    """Whether a Docker volume of this name exists."""
    try:
        client().volumes.get(name)
        return True
    except NotFound:
        return False


def volume_names() -> list[str]:
    """The names of every volume of the engine."""
    return [str(volume.name) for volume in client().volumes.list()]


def create_volume(name: str, labels: dict[str, str] | None = None) -> None:
    """Create an empty named volume (with `labels`)."""
    client().volumes.create(name, labels=labels or {})


def scratch_volumes(owner: str) -> list[str]:
    """The names of the scratch volumes this instance (`owner`) created (SCRATCH_LABEL)."""
    return [str(volume.name) for volume in client().volumes.list(
        filters={"label": [SCRATCH_LABEL, f"{OWNER_LABEL}={owner}"]})]


def remove_scratch_volume(name: str, owner: str) -> None:
    """Remove a scratch volume with the containers of this instance (`owner`) that mount it (a
    killed restore's throwaway server). DockerError if something else still uses it."""
    for container in client().containers.list(
            all=True, filters={"volume": name, "label": f"{OWNER_LABEL}={owner}"}):
        with contextlib.suppress(NotFound):
            container.remove(force=True, v=True)
    try:
        client().volumes.get(name).remove(force=True)
    except NotFound:
        pass
    except APIError as exc:
        raise DockerError(f"cannot remove volume {name}: {_short(exc)}") from None


def image_path(image: str) -> str | None:
    """The PATH `image` sets (its config's environment); None when it sets none. Raises
    DockerError."""
    try:
        env = client().images.get(image).attrs.get("Config", {}).get("Env") or []
    except DockerException as exc:
        raise DockerError(f"cannot look up the image {image!r}: {_short(exc)}") from None
    return next((item[5:] for item in env if item.startswith("PATH=")), None)


def image_present(image: str) -> bool:
    """Whether `image` (a name or id) is on this engine (nothing is pulled)."""
    try:
        client().images.get(image)
        return True
    except ImageNotFound:
        return False


# helper containers ------------------------------------------------------------------------
DEFAULT_HELPER_LIFETIME = 4 * 3600
# What a helper may do as root, and nothing more (all other capabilities are dropped):
# reading a volume needs to pass any file's permissions (PGDATA is 0700 postgres); writing one
# back also sets owners, modes, times and special files as they were.
READ_CAPS = ["DAC_READ_SEARCH"]
WRITE_CAPS = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "MKNOD"]


@contextlib.contextmanager
def helper(image: str, volumes: dict[str, tuple[str, str]], purpose: str,
           owner: str = "", lifetime: int = DEFAULT_HELPER_LIFETIME) -> Iterator[Container]:
    """A short-lived container that mounts `volumes` ({volume: (path, 'ro'|'rw')}), removed on
    exit whatever happens (see `start_helper`)."""
    container = start_helper(image, volumes, purpose, owner, lifetime)
    try:
        yield container
    finally:
        remove_helper(container)


def start_helper(image: str, volumes: dict[str, tuple[str, str]], purpose: str,
                 owner: str = "", lifetime: int = DEFAULT_HELPER_LIFETIME,
                 kept: bool = False) -> Container:
    """Start a helper container that mounts `volumes` ({volume: (path, 'ro'|'rw')}); the caller
    removes it (`remove_helper`).

    It sleeps for `lifetime` seconds (the run's time limit) so commands can be exec'd into it,
    then ends and removes itself: a helper outlives a killed run by that much at most. It has
    no network, no logs, a read-only root and only READ_CAPS (WRITE_CAPS when a volume is
    mounted rw). `owner` (the history's instance id) lets start-up recovery remove only its own
    leftovers; `kept` marks one the daemon keeps between runs (remove_kept_helpers). Raises
    DockerError (in plain words when the image is missing: it is never pulled from a registry).
    """
    writes = any(mode == "rw" for _, mode in volumes.values())
    labels = {HELPER_LABEL: purpose, OWNER_LABEL: owner} | ({KEPT_LABEL: "true"} if kept else {})
    return _create(image, ["sleep", str(max(1, int(lifetime)))], volumes, "none", labels,
                   caps=WRITE_CAPS if writes else READ_CAPS, user="0:0",
                   name=f"toybox-backupd-helper-{uuid.uuid4().hex[:10]}", what="a helper",
                   tmpfs_mb=16, auto_remove=True, log_config={"type": "none"})


def remove_helper(container: Container) -> None:
    """Remove a helper container (and its anonymous volumes); gone already is fine."""
    with contextlib.suppress(DockerException):
        container.remove(force=True, v=True)


def helper_running(container: Container) -> bool:
    """Whether a helper container is still there and running."""
    try:
        container.reload()
    except DockerException:
        return False
    return container.status == "running"


def remove_kept_helpers(owner: str, volume: str | None = None) -> int:
    """Remove the helpers the daemon of this instance (`owner`) keeps between runs (those that
    mount `volume`, if given): a restore of that volume wants nobody else looking at it. Call
    it holding the run lock: then none of them is in use."""
    labels = [KEPT_LABEL, f"{OWNER_LABEL}={owner}"]
    filters: dict[str, Any] = {"label": labels} | ({"volume": volume} if volume else {})
    found = client().containers.list(all=True, filters=filters)
    for container in found:
        remove_helper(container)
    return len(found)


@contextlib.contextmanager
def _hardened(image: str, command: list[str], volumes: dict[str, tuple[str, str]],
              network: str, labels: dict[str, str], **options: Any) -> Iterator[Container]:
    """A container made by `_create`, removed on exit with its anonymous volumes."""
    container = _create(image, command, volumes, network, labels, **options)
    try:
        yield container
    finally:
        with contextlib.suppress(DockerException):
            container.remove(force=True, v=True)


def _create(image: str, command: list[str], volumes: dict[str, tuple[str, str]],
            network: str, labels: dict[str, str], *, caps: Iterable[str], user: str,
            name: str, what: str, tmpfs_mb: int, read_only: bool = True,
            auto_remove: bool = False, log_config: dict[str, str] | None = None,
            environment: dict[str, str] | None = None) -> Container:
    """A container running `command` with every capability dropped but `caps`, no new
    privileges, a private /tmp, no entrypoint; remove it with its anonymous volumes (the
    sidecar's own image declares two; the named volumes it mounted are never removed by
    that). Raises DockerError (in plain words when the image is missing: it is never pulled)."""
    _require_image(image)
    binds = {volume: {"bind": path, "mode": mode} for volume, (path, mode) in volumes.items()}
    try:
        return client().containers.run(
            image, command, detach=True, auto_remove=auto_remove, network_mode=network,
            volumes=binds, labels=labels, cap_drop=["ALL"], cap_add=list(caps),
            read_only=read_only, tmpfs={"/tmp": f"rw,noexec,nosuid,size={tmpfs_mb}m"},
            security_opt=["no-new-privileges"], entrypoint=[], user=user, name=name,
            log_config=log_config, environment=environment)
    except APIError as exc:
        raise DockerError(f"cannot start {what} container from {image!r}: {_short(exc)}") from None

STREAMER_LABEL = "toybox-backupd.beside"  # helpers that share the database's network


def image_of(container: Container) -> str:
    """The id of the image `container` runs (its tools match its server's version)."""
    return str(container.attrs.get("Image") or container.image.id)


@contextlib.contextmanager
def beside(image: str, db_id: str | None, volumes: dict[str, tuple[str, str]], purpose: str, *,
           user: str, owner: str = "", caps: Iterable[str] = (),
           command: list[str] | None = None, lifetime: int = DEFAULT_HELPER_LIFETIME,
           writable_root: bool = False, environment: dict[str, str] | None = None,
           auto_remove: bool = False) -> Iterator[Container]:
    """A container from the database's own `image`, in the network namespace of the database
    container `db_id` (it reaches the server at 127.0.0.1 and its local pg_hba rules), or with
    no network when `db_id` is None (a throwaway server for a recovery).

    It runs `command` (default: sleep `lifetime` seconds, for exec'd commands) as `user`, with
    every capability dropped but `caps`, no new privileges, `environment` (its exec'd commands
    have it too), and is removed on exit (and when its command ends, with `auto_remove`).
    Raises DockerError.
    """
    with _hardened(image, command or ["sleep", str(max(1, int(lifetime)))], volumes,
                   f"container:{db_id}" if db_id else "none",
                   {STREAMER_LABEL: purpose, OWNER_LABEL: owner}, caps=caps, user=user,
                   name=f"toybox-backupd-{purpose}-{uuid.uuid4().hex[:10]}",
                   what=f"a {purpose}", tmpfs_mb=64, read_only=not writable_root,
                   environment=environment, auto_remove=auto_remove) as container:
        yield container

def remove_beside(owner: str, purpose: str) -> int:
    """Remove the `purpose` containers beside the database that this instance (`owner`) left
    running (a WAL streamer outlives a killed daemon: its exec'd pg_receivewal goes on)."""
    count = 0
    for container in client().containers.list(
            all=True, filters={"label": [f"{STREAMER_LABEL}={purpose}", f"{OWNER_LABEL}={owner}"]}):
        with contextlib.suppress(DockerException):
            container.remove(force=True, v=True)
            count += 1
    return count


def logs_tail(container: Container, lines: int = 20) -> str:
    """The last `lines` of a container's output (empty if it cannot be had)."""
    try:
        return bytes(container.logs(tail=lines)).decode("utf-8", "replace").strip()
    except DockerException:
        return ""


def remove_volume(name: str) -> None:
    """Remove a named volume this tool created (a recovery's scratch volume)."""
    with contextlib.suppress(NotFound):
        client().volumes.get(name).remove(force=True)


def remove_stale_helpers(owner: str) -> int:
    """Remove helper containers that a crashed run of this instance (`owner`) left behind.

    Call it only while holding the run lock, so no live run of this instance owns one.
    """
    count = 0
    for container in client().containers.list(
            all=True, filters={"label": [HELPER_LABEL, f"{OWNER_LABEL}={owner}"]}):
        with contextlib.suppress(DockerException):
            container.remove(force=True, v=True)
            count += 1
    return count


def put_file(container: Container, path: str, data: bytes, mode: int = 0o600) -> None:
    """Write one small file into a container (directory must exist)."""
    directory, _, name = path.rpartition("/")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = mode
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))
    container.put_archive(directory or "/", buffer.getvalue())


# exec streams ------------------------------------------------------------------------------
class _Demux:
    """Docker's multiplexed stream (8-byte header + payload frames), across arbitrary reads."""

    def __init__(self, on_stderr: Callable[[memoryview], None]):
        self.on_stderr = on_stderr
        self.header = b""
        self.stream = 0
        self.left = 0  # payload bytes of the current frame still to come

    def split(self, data: memoryview) -> list[memoryview]:
        """The stdout payload pieces in `data`; stderr pieces go to `on_stderr`."""
        parts = []
        position, size = 0, len(data)
        while position < size:
            if not self.left:
                take = min(8 - len(self.header), size - position)
                self.header += data[position:position + take]
                position += take
                if len(self.header) == 8:
                    self.stream, self.left = _FRAME.unpack(self.header)
                    self.header = b""
                continue
            take = min(self.left, size - position)
            if self.stream == STDOUT:
                parts.append(data[position:position + take])
            elif self.stream == STDERR:
                self.on_stderr(data[position:position + take])
            position += take
            self.left -= take
        return parts


class _LostInput(Exception):
    """The command stopped reading its stdin before it had all of it."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))


@dataclass
class ExecResult:
    exit_code: int
    stderr: str


def tool_error(tool: str, result: ExecResult, where: str) -> str:
    """A failed tool's exit status and the tail of its stderr, in one line."""
    tail = result.stderr.strip().splitlines()[-6:]
    detail = "; ".join(line.strip() for line in tail if line.strip()) or "no message"
    if result.exit_code == -1:
        return f"{tool} in {where}: its exit status could not be read ({detail})"
    if result.exit_code >= 128:
        return (f"{tool} in {where} was killed (signal {result.exit_code - 128}, exit status "
                f"{result.exit_code}): {detail}")
    return f"{tool} in {where} failed with exit status {result.exit_code}: {detail}"


@dataclass
class Exec:
    """A command running in a container; iterate `stdout()`, then `wait()`.

    `feed(chunks)` writes stdin from a thread; `close()` (from any thread) ends the stream.
    """

    container: Container
    cmd: list[str]
    environment: dict[str, str] | None = None
    user: str | None = None
    stdin: bool = False
    _exec_id: str = ""
    _sock: Any = None
    _stderr: bytearray = field(default_factory=bytearray)
    _first_line: bytearray | None = field(default_factory=bytearray)
    _pid: int | None = None
    _writer: threading.Thread | None = None
    _writer_error: BaseException | None = None
    _partial_ok: bool = False
    _closed: bool = False

    def __post_init__(self) -> None:
        api = client().api
        try:
            self._exec_id = api.exec_create(
                self.container.id, [*PID_PREFIX, *self.cmd], stdout=True, stderr=True,
                stdin=self.stdin, environment=self.environment, user=self.user or "",
            )["Id"]
            self._sock = api.exec_start(self._exec_id, socket=True)
            # A stream may rightly be silent (pg_dump waiting for a lock) or not read (tar busy
            # with a big file while its list of names waits) for longer than the API timeout.
            self._raw().settimeout(None)
        except APIError as exc:
            raise DockerError(
                f"cannot run {self.cmd[0]} in container {self.container.name}: {_short(exc)}"
            ) from None

    def _raw(self) -> socket.socket:
        return getattr(self._sock, "_sock", self._sock)

    @property
    def pid(self) -> int | None:
        """The command's process id inside its container, once it has said so."""
        return self._pid

    def _stderr_text(self) -> str:
        pending = bytes(self._first_line or b"")  # a first line that never ended
        return (pending + bytes(self._stderr)).decode("utf-8", "replace").strip()

    def kill(self, signal_name: str = "TERM") -> bool:
        """Signal the command itself (closing our stream does not end it: Docker runs exec'd
        processes detached from the request). True if a signal was sent."""
        pid = self.pid
        if pid is None:
            return False
        try:
            api = client().api
            # the shell's own kill: an image without procps (the official postgres image) has
            # no /bin/kill, and an exec of a missing program fails without a word
            kill = api.exec_create(self.container.id, ["sh", "-c", f"kill -{signal_name} {pid}"],
                                   user=self.user or "")["Id"]
            api.exec_start(kill, detach=True)
        except (DockerException, OSError):
            return False
        return True

    def stdout(self) -> Iterator[bytes]:
        """Chunks of the command's stdout; stderr is kept (its tail) for `wait()`."""
        try:
            if isinstance(self._sock, socket.SocketIO):  # the local socket (unix or tcp)
                yield from self._frames()
                return
            for stream, data in frames_iter(self._sock, tty=False):  # ssh, npipe, tls
                if stream == STDOUT:
                    yield data
                elif stream == STDERR:
                    self._keep_stderr(data)
        except (OSError, ValueError):
            if not self._closed:
                raise

    def _keep_stderr(self, data: bytes | memoryview) -> None:
        if self._first_line is not None:  # the pid line first (PID_PREFIX), kept apart
            self._first_line += data
            if b"\n" not in self._first_line and len(self._first_line) < 64:
                return
            first, _, rest = bytes(self._first_line).partition(b"\n")
            self._first_line = None
            if first.startswith(PID_MARK) and first[len(PID_MARK):].isdigit():
                self._pid = int(first[len(PID_MARK):])
                data = rest
            else:
                data = first + b"\n" + rest
        self._stderr += data
        if len(self._stderr) > 2 * STDERR_KEEP:
            del self._stderr[:-STDERR_KEEP]

    def _frames(self) -> Iterator[bytes]:
        """Demultiplex the stream (8-byte header + payload frames) from large reads.

        docker's frames_iter reads each frame's header and payload separately (a poll and a
        recv each, for frames of at most 32 KiB); this reads whatever has arrived, up to
        READ_SIZE, into one reusable buffer and yields the stdout payloads of each read as one
        chunk. Like frames_iter it waits for data without a time limit and ends at EOF.
        """
        raw = self._raw()
        if raw is None:  # closed before anything was read: like reading a closed SocketIO
            raise ValueError("I/O operation on closed socket")
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        waiter = select.poll()
        waiter.register(raw, select.POLLIN | select.POLLPRI)
        demux = _Demux(self._keep_stderr)
        while True:
            waiter.poll()
            size = self._sock.readinto(view)
            if size is None:
                continue
            if not size:
                return
            parts = demux.split(view[:size])
            if parts:
                yield b"".join(parts)

    def feed(self, chunks: Iterable[bytes], partial_ok: bool = False) -> None:
        """Write `chunks` to the command's stdin from a thread, then close stdin.

        If the command stops reading before it has them all, `wait()` raises DockerError
        whatever its exit status: its output cannot be trusted. `partial_ok` is for commands
        that rightly read only the start of their input (`pg_restore --list`).
        """
        self._partial_ok = partial_ok

        def write() -> None:
            try:
                self._send(chunks)
            except BaseException as exc:  # the input itself failed: end the command
                self._writer_error = exc
                self.close()

        self._writer = threading.Thread(target=write, name="exec-stdin", daemon=True)
        self._writer.start()

    def _send(self, chunks: Iterable[bytes]) -> None:
        raw = self._raw()
        for chunk in chunks:
            if self._closed:
                return
            try:
                raw.sendall(chunk)
            except OSError as exc:  # the command stopped reading (its output still comes)
                if not self._closed:  # a close() from our side is no lost input
                    self._writer_error = _LostInput(exc)
                with contextlib.suppress(OSError):
                    raw.shutdown(socket.SHUT_WR)
                return
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_WR)

    def wait(self, timeout: float = 60) -> ExecResult:
        """Drain what is left, then the command's exit status (-1 if it cannot be had).

        Raises what failed the stdin writer (see `feed`).
        """
        for _ in self.stdout():
            pass
        code = self._exit_code(timeout)
        if self._writer is not None:
            # the command has ended: its input is sent by now, or it never will be (dockerd
            # may keep the stdin side open after the process exits, so no error need come)
            self._writer.join(WRITER_GRACE if code is not None else timeout)
            if self._writer.is_alive() and self._writer_error is None:
                self._writer_error = _LostInput(OSError(
                    errno.EPIPE, "it ended while some of its input was still to be sent"))
        self.close()
        result = ExecResult(exit_code=-1 if code is None else code,
                            stderr=self._stderr_text())
        error = self._writer_error
        if isinstance(error, _LostInput):
            if not self._partial_ok:
                raise DockerError(self._input_lost(error, result))
        elif error is not None:
            raise error
        return result

    def _exit_code(self, timeout: float) -> int | None:
        api = client().api
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = api.exec_inspect(self._exec_id)
            if not info.get("Running"):
                code = info.get("ExitCode")
                return None if code is None else int(code)
            time.sleep(0.05)
        return None

    def _input_lost(self, error: _LostInput, result: ExecResult) -> str:
        tail = "; ".join(line.strip() for line in result.stderr.splitlines()[-6:] if line.strip())
        return (f"{self.cmd[0]} in container {self.container.name} did not take all of its "
                f"input ({error}); it exited with status {result.exit_code}"
                + (f": {tail}" if tail else ""))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._raw().shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()


def run(container: Container, cmd: list[str], environment: dict[str, str] | None = None,
        user: str | None = None) -> tuple[ExecResult, bytes]:
    """Run a short command; return its result and (bounded) stdout."""
    proc = Exec(container, cmd, environment=environment, user=user)
    out = bytearray()
    for chunk in proc.stdout():
        if len(out) < 4 * 1024 * 1024:
            out += chunk
    return proc.wait(), bytes(out)
