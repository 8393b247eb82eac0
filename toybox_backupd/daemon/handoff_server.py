"""Manual backups handed over by the `toybox-backupd backup` command (launcher.py): the daemon
runs them exactly as the command would (manual.backup → runner.run_job, under the same run
lock: the same history and catalog rows, emails and log lines) and sends the command the lines
it would have shown and its exit status. Protocol: toybox_backupd/daemon/handoff.py.

Only when that is safe; otherwise the command is told to run the backup itself:
- the socket is 0600 and the peer must run as this process's uid, or as root;
- the command is this same toybox-backupd (version and installation directory);
- its settings, built here from the environment variables and env-file text it sent just as
  its own process would build them, equal the daemon's (a relative path compared from each
  side's working directory), and so do the variables that steer a run besides the settings
  (Docker's, the transport's, what a local pg_dump gets);
- the daemon is not stopping.
Why a command was left to itself is logged at debug level, naming variables, never values;
what the command sent is never logged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
from typing import Any, Protocol

import structlog

from .. import __version__
from ..actions import manual
from ..adapters.pgtools import PASSED_THROUGH
from ..core import logs, redact
from ..core.basics import Cancelled
from ..core.settings import Settings, SettingsError, differences, load_given, variable_names
from ..tiers.volumes.transfer import FORCE
from .handoff import PROTOCOL, Channel, address, socket_path
from .handoff_output import NOT_SHOWN, Outgoing

log = logs.get("toybox_backupd.daemon")
HANDSHAKE_SECONDS = 10.0
FLUSH_SECONDS = 10.0  # a stop waits this long for a command to read the end of its run
# what steers a run besides the settings: the Docker engine and client, the data path, the
# environment of a local pg_dump, the host path named in hints
PROCESS_VARS = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_CLIENT_TIMEOUT",
                FORCE, "BACKUP_HOST_DIR", *PASSED_THROUGH)
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTRL_C = "interrupted by Ctrl-C in the command that started it"
GONE = "interrupted: the command that started it went away"


class Host(Protocol):
    """What the daemon offers (loop.Daemon)."""

    settings: Settings

    def accepting(self) -> bool: ...

    def handing_over(self) -> contextlib.AbstractContextManager[None]: ...

    def run_manual(self, job: str, volumes: list[str] | None, handle: Handle) -> int: ...


class Handle:
    """Ends a handed-over run from the command's side (Ctrl-C there, or the command gone):
    the run is cancelled like any other (runner.Run.cancel), or not started if still waiting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ctx: Any = None
        self.started = False
        self.reason: str | None = None

    @property
    def wanted(self) -> bool:
        return self.reason is not None

    def register(self, ctx: Any) -> None:
        """runner.run_job's `register`: the live run (None once it has ended)."""
        with self._lock:
            self._ctx = ctx
            self.started = self.started or ctx is not None
            reason = self.reason
        if ctx is not None and reason is not None:
            ctx.cancel(reason, "interrupted")

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            ctx = self._ctx
        if ctx is not None:
            ctx.cancel(reason, "interrupted")


class Terminal:
    """The command's stdout and stderr, over the connection (a manual.Terminal), queued: a
    write never waits for the command to read (handoff_output.py). Once the command has
    cancelled, nothing more is sent but the last word, as with Ctrl-C in the command itself."""

    def __init__(self, outgoing: Outgoing, handle: Handle):
        self.outgoing = outgoing
        self.tty = outgoing.tty
        self.handle = handle

    @property
    def progress(self) -> bool:
        return self.handle.started  # not while it waits for another run: that one's bytes

    def write(self, stream: str, text: str, last: bool = False) -> None:
        if self.handle.wanted and not last:
            return
        self.outgoing.put(keep=last, **{stream: text})


class _LogStream:
    """The command's stderr as a stream for its log lines (logs.copied_to)."""

    def __init__(self, terminal: Terminal):
        self.terminal = terminal

    def write(self, text: str) -> None:
        self.terminal.write("err", text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.terminal.tty


class Server:
    """The daemon's socket: one thread accepting, one per connection."""

    def __init__(self, host: Host):
        self.host = host
        self.path = os.path.abspath(socket_path(host.settings.state_dir))
        self._listener: socket.socket | None = None
        self._inode = 0

    def start(self) -> None:
        self._listener, self._inode = _listen(self.path)
        threading.Thread(target=self._accept, args=(self._listener,), name="handoff",
                         daemon=True).start()

    def stop(self) -> None:
        """No more connections (those open go on); the socket file removed. Idempotent."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # stopped
            threading.Thread(target=self._serve, args=(conn,), name="handoff-run",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(HANDSHAKE_SECONDS)
                if not _peer_allowed(conn):
                    return
                channel = Channel(conn)
                request = self._handshake(channel)
                if request is None:
                    return
                conn.settimeout(None)
                _Handover(self.host, channel, request).carry_out()
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.debug("a command's connection ended early", error=type(exc).__name__)

    def _handshake(self, channel: Channel) -> dict[str, Any] | None:
        """The command's request if the daemon takes its run over (the command said go)."""
        channel.send(hello=PROTOCOL, names=[*variable_names(), *PROCESS_VARS])
        message = channel.receive()
        request = message.get("request") if message else None
        if not isinstance(request, dict):
            return None
        why = self._refusal(request)
        if why is not None:
            log.debug("manual backup left to the command", reason=why)
            channel.send(fallback=why)
            return None
        channel.send(ready=True)
        answer = channel.receive()
        return request if answer and answer.get("go") is True else None

    def _refusal(self, request: dict[str, Any]) -> str | None:
        """Why the daemon must not run this command's backup (None: it may)."""
        if request.get("protocol") != PROTOCOL:
            return "another protocol"
        if request.get("version") != __version__ or request.get("package") != PACKAGE:
            return "another toybox-backupd (version or installation)"
        if not self.host.accepting():
            return "the daemon is stopping"
        environ = {str(k): str(v) for k, v in dict(request.get("environ") or {}).items()}
        changed = [name for name in PROCESS_VARS if environ.get(name) != os.environ.get(name)]
        if changed:
            return "the environment differs: " + ", ".join(changed)
        text = request.get("env_file", {}).get("text")
        try:
            theirs = load_given(environ, None if text is None else str(text))
        except SettingsError:
            return "its settings are not usable"
        changed = differences(self.host.settings, os.getcwd(), theirs, str(request.get("cwd")))
        return "the settings differ: " + ", ".join(changed) if changed else None


class _Handover:
    """One run carried out for a command."""

    def __init__(self, host: Host, channel: Channel, request: dict[str, Any]):
        self.host = host
        self.channel = channel
        self.job = str(request["job"])
        self.volumes = [str(v) for v in request["volumes"]] if request.get("volumes") else None
        self.verbose = bool(request.get("verbose"))
        self.words = " ".join(str(word) for word in request.get("argv") or ())
        self.pid = int(request.get("pid") or 0)
        self.handle = Handle()
        self.outgoing = Outgoing(channel, bool(request.get("tty")),
                                 lambda: self.handle.cancel(GONE))
        self.terminal = Terminal(self.outgoing, self.handle)

    def carry_out(self) -> None:
        """The run, and the command told its end, before the daemon may stop (a command that
        does not read gets FLUSH_SECONDS for it; it gets it all the same when it reads again)."""
        threading.Thread(target=self._watch, name="handoff-watch", daemon=True).start()
        try:
            if self._run() is None:
                self._last_word(fallback="the daemon is stopping")  # before the run began
        finally:
            self.outgoing.close()

    def _run(self) -> int | None:
        """The run's exit status, the command told it; None: not started (the daemon stops)."""
        try:
            with self.host.handing_over(), structlog.contextvars.bound_contextvars(
                    command="backup", pid=self.pid):
                log.info(f"manual command: toybox-backupd {redact.redact(self.words)}",
                         handed_over=True)
                code = self._backup()
                if code is not None:
                    log.info("manual command finished", exit_code=code)
                    self._last_word(exit=code)
                return code
        except Cancelled:  # stopping already
            return None

    def _last_word(self, **message: Any) -> None:
        if self.outgoing.dropped:
            log.warning(f"{self.outgoing.dropped} {NOT_SHOWN}", job=self.job)
        self.outgoing.put(keep=True, **message)
        if not self.outgoing.flush(FLUSH_SECONDS):
            log.info("the command does not read: it gets its last lines when it reads again",
                     job=self.job)

    def _watch(self) -> None:
        """The command's side of the connection: Ctrl-C there, or the command gone."""
        try:
            while (message := self.channel.receive()) is not None:
                if message.get("cancel"):
                    self.handle.cancel(CTRL_C)
        except (OSError, ValueError):
            pass
        self.handle.cancel(GONE)

    def _backup(self) -> int | None:
        """manual.backup as the command's process would run it; its exit status (None: not
        started because the daemon is stopping)."""
        settings = self.host.settings
        stream = _LogStream(self.terminal)
        try:
            with logs.copied_to(stream, logs.terminal_format(settings.log_format, stream)):
                code = manual.backup(settings, self.job, self.volumes, self.verbose, self.terminal,
                                     run=lambda job: self.host.run_manual(job, self.volumes,
                                                                          self.handle))
        except Cancelled:
            if not self.handle.wanted:
                return None
            code = manual.EXIT_INTERRUPTED
        except Exception as exc:  # as the command's main() says it
            message = manual.failure(exc)
            self.terminal.write("err", f"toybox-backupd: {message}\n")
            log.info("manual command failed", error=message)
            code = manual.EXIT_FAIL
        if self.handle.reason == CTRL_C:
            self.terminal.write("err", "interrupted\n", last=True)
            log.info("manual command interrupted (Ctrl-C)")
            return manual.EXIT_INTERRUPTED
        return code


def _peer_allowed(conn: socket.socket) -> bool:
    """The connecting process runs as this process's uid, or as root."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


def _listen(path: str) -> tuple[socket.socket, int]:
    """A socket listening at `path`, 0600 from the start (bound in a private directory and
    renamed into place over a stale one); with its inode."""
    directory = tempfile.mkdtemp(prefix=".socket-", dir=os.path.dirname(path))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        temporary = os.path.join(directory, "s")
        with address(temporary) as where:
            listener.bind(where)
        os.chmod(temporary, 0o600)
        listener.listen(16)
        os.replace(temporary, path)
        return listener, os.stat(path).st_ino
    except BaseException:
        listener.close()
        raise
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def remove_stale(state_dir: os.PathLike[str] | str) -> bool:
    """Remove a socket a killed daemon left in STATE_DIR (call it holding the daemon lock)."""
    path = socket_path(state_dir)
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
            return True
    return False
