"""The `toybox-backupd` command's entry point: `backup` handed to the running daemon, the rest
(and `backup` whenever the daemon does not take it) to the CLI (cli.main).

Inside the sidecar the daemon is already running with everything imported, so a backup by hand
(`docker compose exec backupd toybox-backupd backup diff`) is sent to it over
STATE_DIR/daemon.sock (protocol: handoff.py) instead of paying for the CLI's imports here; the
daemon runs it as this process would and sends back its lines and exit status. This module
imports the standard library only. The daemon decides whether it may (the same settings, the
same toybox-backupd); no socket, no answer, another version, other settings, `--no-daemon` or
TOYBOX_NO_DAEMON=1: this process runs the backup itself, as it always did.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from typing import Any

from . import __version__
from .daemon import handoff

NO_DAEMON = "TOYBOX_NO_DAEMON"
DEFAULT_STATE_DIR = "/var/lib/toybox-backupd"  # settings.py's default (a test keeps them equal)
CONNECT_SECONDS = 5.0  # for the daemon's answers before the run; the run itself has no limit
# `backup`'s options as the CLI's parser knows them (a test keeps them equal); anything else,
# even an abbreviation argparse would take, goes to the CLI
FLAGS = {"-v": "verbose", "--verbose": "verbose", "--no-daemon": "no_daemon"}
VALUED = ("--volume",)


def main(argv: list[str] | None = None) -> int:
    """The `toybox-backupd` command; its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    request = backup_request(args)
    if request is not None:
        try:
            code = handed_over(request)
        except KeyboardInterrupt:  # before the daemon started anything
            _write(sys.stderr, "interrupted\n")
            return 130
        if code is not None:
            return code
    from .cli import main as cli_main

    return cli_main(args)


def backup_request(args: list[str]) -> dict[str, Any] | None:
    """What the daemon is asked to run for `args`, or None unless `args` is a `backup` it may
    be handed (the CLI then parses them, and says what is wrong with them)."""
    env_file = os.environ.get("TOYBOX_ENV_FILE", ".env")
    rest = list(args)
    if rest[:1] == ["--env-file"] and len(rest) > 1:
        env_file, rest = rest[1], rest[2:]
    elif rest[:1] and rest[0].startswith("--env-file="):
        env_file, rest = rest[0].split("=", 1)[1], rest[1:]
    if rest[:1] != ["backup"] or os.environ.get(NO_DAEMON, "") not in ("", "0", "false", "no"):
        return None
    options = _backup_options(rest[1:])
    if options is None:
        return None
    return {**options, "protocol": handoff.PROTOCOL, "argv": args, "env_file": env_file}


def _backup_options(words: list[str]) -> dict[str, Any] | None:
    job, volumes, verbose = None, [], False
    position = 0
    while position < len(words):
        word = words[position]
        name, equals, value = word.partition("=")
        if FLAGS.get(word) == "verbose":
            verbose = True
        elif word in VALUED and position + 1 < len(words) and words[position + 1][:1] != "-":
            volumes.append(words[position + 1])
            position += 1
        elif name in VALUED and equals:
            volumes.append(value)
        elif job is None and not word.startswith("-"):
            job = word
        else:  # --no-daemon, --help, anything unknown
            return None
        position += 1
    if job is None:
        return None
    return {"job": job, "volumes": volumes or None, "verbose": verbose}


def handed_over(request: dict[str, Any]) -> int | None:
    """The backup's exit status once the daemon has run it; None when this process must run
    it (nothing was started)."""
    try:
        path = request["env_file"]
        text = _env_text(path)
        request["env_file"] = {"path": path, "text": text}
        sock = _connect(handoff.socket_path(_state_dir(text)))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    with sock:
        channel = handoff.Channel(sock)
        try:
            if not _agreed(channel, request):
                return None
        except (OSError, ValueError):
            return None
        sock.settimeout(None)
        return _follow(channel)


def _env_text(path: str) -> str | None:
    """The env file's text (None if there is none); ValueError when it is no plain file (this
    process reads it itself then)."""
    full = os.path.expanduser(path)
    if os.path.isfile(full):
        with open(full, "rb") as handle:
            return handle.read().decode("utf-8")
    if os.path.exists(full):
        raise ValueError("not a plain file")
    return None


def _state_dir(env_text: str | None) -> str:
    """STATE_DIR as the settings will have it: the environment, else the env file, else the
    default. Only to find the socket: the daemon compares the whole settings."""
    for key, value in os.environ.items():
        if key.lower() == "state_dir":
            return value
    found = DEFAULT_STATE_DIR
    for line in (env_text or "").splitlines():
        line = line.strip()
        line = line[len("export "):].lstrip() if line.startswith("export ") else line
        key, equals, value = line.partition("=")
        if equals and key.strip().lower() == "state_dir":
            value = value.strip()
            quoted = value[:1] in ("'", '"') and value.endswith(value[:1]) and len(value) > 1
            found = value[1:-1] if quoted else value.split(" #", 1)[0].strip()
    return found


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_SECONDS)
    try:
        with handoff.address(path) as where:
            sock.connect(where)
    except BaseException:
        sock.close()
        raise
    return sock


def _agreed(channel: handoff.Channel, request: dict[str, Any]) -> bool:
    """The daemon's hello, this command's request, its yes, and this command's go."""
    hello = channel.receive()
    if not hello or hello.get("hello") != handoff.PROTOCOL:
        return False
    names = {str(name).lower() for name in hello.get("names") or ()}
    request.update(
        environ={key: value for key, value in os.environ.items() if key.lower() in names},
        cwd=os.getcwd(), tty=sys.stderr.isatty(), pid=os.getpid(), version=__version__,
        package=os.path.dirname(os.path.abspath(__file__)))
    channel.send(request=request)
    answer = channel.receive()
    if not answer or answer.get("ready") is not True:
        return False
    channel.send(go=True)
    return True


def _follow(channel: handoff.Channel) -> int | None:
    """Show what the daemon sends until the run's exit status. Ctrl-C asks the daemon to end
    the run (and waits for it to have ended, as Ctrl-C in this process would); a second one
    leaves at once."""
    cancelled = False
    while True:
        try:
            message = channel.receive()
            if message is None:
                _write(sys.stderr, "toybox-backupd: the daemon stopped before the backup "
                                   "ended; see `toybox-backupd history`\n")
                return 1
            if "exit" in message:
                return int(message["exit"])
            if "fallback" in message:  # the daemon stops: nothing was started
                return None
            for key, stream in (("out", sys.stdout), ("err", sys.stderr)):
                if key in message:
                    _write(stream, str(message[key]))
        except KeyboardInterrupt:
            if cancelled:
                _write(sys.stderr, "interrupted\n")
                return 130
            cancelled = True
            _cancel(channel)
        except (OSError, ValueError):
            _write(sys.stderr, "toybox-backupd: the connection to the daemon broke before the "
                               "backup ended; see `toybox-backupd history`\n")
            return 1


def _cancel(channel: handoff.Channel) -> None:
    with contextlib.suppress(OSError):  # gone: it ends the run all the same
        channel.send(cancel=True)


def _write(stream: Any, text: str) -> None:
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):  # a closed pipe (`| head`): the run goes on all the same
        pass


if __name__ == "__main__":
    sys.exit(main())
