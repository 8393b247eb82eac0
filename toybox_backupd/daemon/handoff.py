"""The socket through which `toybox-backupd backup` hands its run to the running daemon.

The standard library only: the command's thin client (launcher.py) imports this before anything
heavy, and the daemon's side (daemon/handoff_server.py) speaks it too. One connection per run,
one JSON object per line each way:

    daemon  → command   {"hello": PROTOCOL, "names": [the variables the settings are made of]}
    command → daemon    {"request": {argv, job, volumes, verbose, environ (those variables),
                                     env_file: {path, text}, cwd, tty, pid, version, package}}
    daemon  → command   {"ready": true}, or {"fallback": why}: the command runs it itself
    command → daemon    {"go": true}  (from here on the run is the daemon's)
    daemon  → command   {"out": text} / {"err": text} ... {"exit": status}
                        (or, before the run has started, {"fallback": why})
    command → daemon    {"cancel": true} on Ctrl-C; a connection closed early cancels too

The socket is STATE_DIR/daemon.sock, mode 0600, and the daemon also checks the peer's uid.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

PROTOCOL = 1
SOCKET_NAME = "daemon.sock"
MAX_ADDRESS = 100  # sun_path holds 108 bytes; a longer path goes through /proc/self/fd
LINE_LIMIT = 16 * 1024 * 1024


def socket_path(state_dir: str | os.PathLike[str]) -> str:
    """Where the daemon listens, for this STATE_DIR."""
    return os.path.join(os.fspath(state_dir), SOCKET_NAME)


@contextlib.contextmanager
def address(path: str) -> Iterator[str]:
    """`path` as bind() and connect() take it: itself, or when it is too long for a socket
    address, the same file reached through an open descriptor of its directory."""
    if len(os.fsencode(path)) <= MAX_ADDRESS:
        yield path
        return
    directory, name = os.path.split(path)
    fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


class Channel:
    """JSON lines over a connected socket: `send` from any thread, `receive` from one."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buffer = bytearray()
        self._lock = threading.Lock()

    def send(self, **message: Any) -> None:
        """Send one message; OSError if the other side is gone."""
        data = json.dumps(message, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n"
        with self._lock:
            self.sock.sendall(data)

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None when the other side has closed the connection. Raises
        OSError (a time-out too) and ValueError (not a message of this protocol)."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > LINE_LIMIT:
                raise ValueError("a message longer than the protocol allows")
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("not a message of this protocol")
        return message
