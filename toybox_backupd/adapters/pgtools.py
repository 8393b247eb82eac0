"""Running PostgreSQL's client tools where their version matches the server.

With PG_CONTAINER the tools run inside the database container (`docker exec`), as the
`postgres` user (not root: a restored dump is SQL, and psql runs the shell commands in it), so
pg_dump is always the server's own version. Without it they run locally over the network, and
pg_dump is refused if it is older than the server.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from ..core.basics import JobError
from ..core.settings import Settings
from . import database, docker_api
from .docker_api import ExecResult, tool_error

STDERR_KEEP = 64 * 1024
OS_USER = "postgres"  # the tools run as this user in the database container, never as root
# where Debian's packages (and so the official image) put a major version's programs; pg_wrapper's
# links in /usr/bin cover only some of them (not pg_waldump, pg_amcheck, pg_ctl nor postgres)
SERVER_BIN = "/usr/lib/postgresql/{major}/bin"
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def server_tools(image: str, version: str | None) -> dict[str, str]:
    """The environment a helper from the database's `image` runs PostgreSQL's programs with,
    for a server of `version` (`SHOW server_version`; None: unknown): PATH begins with that
    major version's directory, as pg_wrapper finds them, then the image's own PATH. An image
    that puts them elsewhere on its PATH (the official image) is served as before. Raises
    DockerError."""
    path = docker_api.image_path(image) or STANDARD_PATH
    if not version:
        return {"PATH": path}
    return {"PATH": f"{SERVER_BIN.format(major=database.server_major(version))}:{path}"}


class Proc(Protocol):
    def stdout(self) -> Iterator[bytes]: ...
    def feed(self, chunks: Iterable[bytes], partial_ok: bool = False) -> None: ...
    def wait(self, timeout: float = 60) -> ExecResult: ...
    def kill(self) -> bool: ...
    def close(self) -> None: ...


PASSED_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR",
                  "PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSERVICEFILE")


def minimal_environment() -> dict[str, str]:
    """What a local pg tool needs of our environment, and nothing else (no other secrets)."""
    return {key: os.environ[key] for key in PASSED_THROUGH if key in os.environ}


class LocalProc:
    """A local process with the same surface as docker_api.Exec."""

    def __init__(self, cmd: list[str], env: dict[str, str], stdin: bool = False):
        self.cmd = cmd
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={**minimal_environment(), **env})
        self._stderr = bytearray()
        self._err_thread = threading.Thread(target=self._read_stderr, daemon=True)
        self._err_thread.start()
        self._writer: threading.Thread | None = None
        self._lost_input: BaseException | None = None

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr += line
            if len(self._stderr) > 2 * STDERR_KEEP:
                del self._stderr[:-STDERR_KEEP]

    def stdout(self) -> Iterator[bytes]:
        assert self._proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            while chunk := self._proc.stdout.read1(1024 * 1024):  # type: ignore[attr-defined]
                yield chunk

    def feed(self, chunks: Iterable[bytes], partial_ok: bool = False) -> None:
        """Write `chunks` to stdin from a thread; as docker_api.Exec.feed."""
        def write() -> None:
            assert self._proc.stdin is not None
            try:
                for chunk in chunks:
                    self._proc.stdin.write(chunk)
            except (BrokenPipeError, OSError, ValueError) as exc:
                if not partial_ok:
                    self._lost_input = exc
            finally:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()

        self._writer = threading.Thread(target=write, daemon=True)
        self._writer.start()

    def wait(self, timeout: float = 60) -> ExecResult:
        """Drain stdout, then the exit status; JobError if stdin could not all be written."""
        for _ in self.stdout():
            pass
        if self._writer:
            self._writer.join(timeout)
        code = self._proc.wait(timeout)
        self._err_thread.join(timeout)
        result = ExecResult(code, self._stderr.decode("utf-8", "replace").strip())
        if self._lost_input is not None:
            raise JobError(f"{os.path.basename(self.cmd[0])} on this host did not take all of "
                           f"its input ({self._lost_input}); it exited with status {code}: "
                           + (result.stderr.splitlines() or ["no message"])[-1])
        return result

    def kill(self) -> bool:
        """End the process (SIGTERM)."""
        with contextlib.suppress(OSError):
            self._proc.terminate()
            return True
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._proc.kill()


class PgTools:
    """Builds and starts pg_dump / pg_restore / psql / pg_dumpall for the configured server."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.container: Any = None
        if settings.pg_container:
            self.container = docker_api.find_container(settings.pg_container)
            if not docker_api.is_running(self.container):
                raise JobError(
                    f"the database container {self.container.name} (PG_CONTAINER="
                    f"{settings.pg_container}) is not running ({self.container.status})")

    @property
    def where(self) -> str:
        if self.container is not None:
            return f"container {self.container.name}"
        return "this host"

    def start(self, tool: str, args: list[str], stdin: bool = False) -> Proc:
        s = self.settings
        env = {"PGPASSWORD": s.postgres_password_value or "", "PGCONNECT_TIMEOUT": "10",
               "PGAPPNAME": database.APPLICATION_NAME}
        if self.container is not None:
            cmd = [tool, "-U", s.postgres_user, *args]
            return docker_api.Exec(self.container, cmd, environment=env, stdin=stdin,
                                   user=OS_USER)
        binary = shutil.which(tool)
        if binary is None:
            raise JobError(f"{tool} is not installed here and PG_CONTAINER is not set; set "
                           "PG_CONTAINER to the database container so the server's own tools run")
        cmd = [binary, "-h", s.postgres_host, "-p", str(s.postgres_port), "-U", s.postgres_user,
               *args]
        return LocalProc(cmd, env, stdin=stdin)

    @contextlib.contextmanager
    def temp_file(self, data: bytes) -> Iterator[str]:
        """A small non-secret file where the tools run (e.g. a pg_restore -L list); its path."""
        name = f"/tmp/toybox-backupd-{secrets.token_hex(6)}"
        if self.container is None:
            with tempfile.NamedTemporaryFile(prefix="toybox-backupd-") as handle:
                handle.write(data)
                handle.flush()
                yield handle.name
            return
        docker_api.put_file(self.container, name, data, mode=0o644)
        try:
            yield name
        finally:
            with contextlib.suppress(Exception):
                docker_api.run(self.container, ["rm", "-f", name])

    def output(self, tool: str, args: list[str], stdin: Iterable[bytes]) -> str:
        """Run a tool on `stdin` and return its (text) output; JobError if it fails.

        The tool may stop reading early (`pg_restore -l` reads only the table of contents).
        Bytes that are not UTF-8 (names in a SQL_ASCII database) come back as surrogates:
        `.encode("utf-8", "surrogateescape")` gives the very same bytes again.
        """
        proc = self.start(tool, args, stdin=True)
        proc.feed(stdin, partial_ok=True)
        out = bytearray()
        for chunk in proc.stdout():
            out += chunk
        result = proc.wait()
        if result.exit_code != 0:
            raise JobError(tool_error(tool, result, self.where))
        return out.decode("utf-8", "surrogateescape")

    def check_same_server(self, dbname: str) -> str:
        """Prove that the tools reach the server psycopg reaches; return its identity.

        With PG_CONTAINER the tools talk to the server in that container, psycopg to
        POSTGRES_HOST:POSTGRES_PORT: both are asked for the system identifier and start time.
        Raises JobError naming both when they differ (another stack's database, say).
        """
        here = database.server_identity(self.settings, dbname)
        if self.container is None:
            return here  # the local tools connect to POSTGRES_HOST:POSTGRES_PORT themselves
        s = self.settings
        where = f"POSTGRES_HOST:POSTGRES_PORT {s.postgres_host}:{s.postgres_port}"
        project = (self.container.labels or {}).get("com.docker.compose.project")
        named = (f"PG_CONTAINER={s.pg_container} (container {self.container.name}"
                 + (f" of compose project {project})" if project else ")"))
        try:
            there = self.output("psql", ["-X", "-A", "-t", "-q", "-d", dbname, "-c",
                                         database.SERVER_IDENTITY], []).strip()
        except JobError as exc:
            raise JobError(f"cannot tell whether {named} is the server at {where}: {exc}") from None
        if there != here:
            raise JobError(
                f"{named} runs another PostgreSQL server than the one at {where} ("
                f"{self.container.name}: {there}; {s.postgres_host}:{s.postgres_port}: {here}): "
                "pg_dump and pg_restore would "
                "work on another database than the one checked. Set PG_CONTAINER to the "
                f"container of the server at {s.postgres_host}:{s.postgres_port} (its name from "
                f"`docker ps`), or POSTGRES_HOST to {self.container.name}'s address")
        return here

    def check_version(self, server_version: str) -> None:
        """Refuse a local pg_dump older than the server (in-container tools always match)."""
        if self.container is not None:
            return
        binary = shutil.which("pg_dump")
        if binary is None:
            raise JobError("pg_dump is not installed here and PG_CONTAINER is not set")
        out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"(\d+)(?:\.\d+)?", out)
        local = int(match.group(1)) if match else 0
        server = database.server_major(server_version)
        if local < server:
            raise JobError(
                f"the local pg_dump is version {local} but the server is {server_version}; an "
                "older pg_dump cannot dump a newer server. Set PG_CONTAINER to the database "
                f"container, or install PostgreSQL {server} client tools")
