"""A handed-over run never waits for a command that stopped reading (Ctrl-Z at the terminal, a
stalled pipe): the real daemon, a real slow `pg_dump` with progress for a terminal, and a
command that says go and then reads nothing until the run has ended.
"""

from __future__ import annotations

import array
import fcntl
import os
import re
import signal
import socket
import termios
import time
from collections.abc import Callable
from typing import Any

from conftest import PG, Env
from test_daemon import Daemon, daemons, runs, wait_for
from test_handoff import ran_in, run_id, socket_of, start

from toybox_backupd import __version__, launcher
from toybox_backupd.core.progress import REPORT_SECONDS
from toybox_backupd.daemon import handoff
from toybox_backupd.daemon.handoff_output import (
    NOT_SHOWN,
    QUEUE_LINES,
    STALLED_SECONDS,
    Outgoing,
)

__all__ = ["daemons"]  # the fixture, from test_daemon
ROWS = 1_000_000  # ~40 MB dumped: ~5 s at full speed, minutes on 3 % of a CPU
THROTTLED = {"cpu_period": 100_000, "cpu_quota": 3_000}
UNTHROTTLED = {"cpu_period": 100_000, "cpu_quota": -1}
STILL_S = 5.0  # nothing more reached the command for this long
FULL_SOCKET = 12_000  # bytes
OVERFLOW_S = 3 * QUEUE_LINES * REPORT_SECONDS


class StalledCommand:
    """`toybox-backupd backup JOB` at a terminal, as the launcher asks it, that stops reading
    once the daemon has taken the run (Ctrl-Z)."""

    def __init__(self, env: Env, job: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        with handoff.address(socket_of(env)) as where:
            self.sock.connect(where)
        self.channel = handoff.Channel(self.sock)
        hello = self.channel.receive()
        assert hello and hello.get("hello") == handoff.PROTOCOL, hello
        names = {str(name).lower() for name in hello["names"]}
        environ = {key: value for key, value in {**os.environ, **env.values}.items()
                   if key.lower() in names and key != "TOYBOX_ENV_FILE"}
        request = launcher.backup_request(["--env-file", str(env.tmp / "none.env"), "backup", job])
        assert request is not None
        request.update(env_file={"path": str(env.tmp / "none.env"), "text": None},
                       environ=environ, cwd=str(env.tmp), tty=True, pid=os.getpid(),
                       version=__version__, package=os.path.dirname(launcher.__file__))
        self.channel.send(request=request)
        assert self.channel.receive() == {"ready": True}
        self.channel.send(go=True)

    def waiting(self) -> int:
        """Bytes the daemon sent that this command has not read."""
        count = array.array("i", [0])
        fcntl.ioctl(self.sock, termios.FIONREAD, count)
        return count[0]

    def read_to_the_end(self) -> list[dict[str, Any]]:
        """It reads again: every message up to the exit status."""
        messages = []
        self.sock.settimeout(60)
        while (message := self.channel.receive()) is not None:
            messages.append(message)
            if "exit" in message:
                break
        return messages


def partial_size(env: Env) -> int:
    return sum(path.stat().st_size for path in env.backup_dir.rglob("*.partial"))


def stopped_getting_lines(command: StalledCommand) -> bool:
    """The socket to the command is full: what waits unread stays as it is (progress comes 4
    times a second while bytes move, and the socket holds ~280 such messages, ~20 KB)."""
    waiting = command.waiting()
    time.sleep(STILL_S)
    return waiting >= FULL_SOCKET and command.waiting() == waiting


def test_a_command_that_stops_reading_never_holds_up_the_run_it_handed_over(
        env: Env, pg: PG, daemons: Callable[..., Daemon]) -> None:
    pg.psql("CREATE TABLE bulk AS SELECT i, md5(i::text) || md5((i * 7)::text) AS v "
            f"FROM generate_series(1, {ROWS}) i")
    env.values.update(PGDUMP_SCHEDULE="")
    proc = start(daemons, env)
    pg.container.update(**THROTTLED)
    try:
        command = StalledCommand(env, "logical")
        began = time.monotonic()
        wait_for("the socket to the command to fill", lambda: stopped_getting_lines(command),
                 300, lambda: proc.log)
        print(f"the socket was full after {time.monotonic() - began:.0f} s")
        # the dump goes on meanwhile, long enough for more lines than the daemon keeps waiting
        before = partial_size(env)
        time.sleep(OVERFLOW_S)
        went_on = partial_size(env) > before or any(r.status == "ok" for r in runs(env))
        assert went_on, "the run stopped when the command stopped reading"
    finally:
        pg.container.update(**UNTHROTTLED)
    wait_for("the run to end", lambda: [r for r in runs(env) if r.status != "running"], 120,
             lambda: proc.log)
    [run] = runs(env)
    assert (run.status, run.pid) == ("ok", proc.proc.pid), (run.status, run.error)

    # the daemon goes on: the next command's run is handed over and done, the first still unread
    other = env.cli("backup", "logical", timeout=120)
    assert other.returncode == 0, other.stdout + other.stderr
    assert ran_in(env, run_id(other)) == proc.proc.pid

    messages = command.read_to_the_end()  # it reads again (fg)
    err = "".join(str(m.get("err", "")) for m in messages)
    out = "".join(str(m.get("out", "")) for m in messages)
    assert messages[-1] == {"exit": 0}, messages[-3:]
    assert f"run {run.id}: ok, " in out
    notice = re.findall(r"(\d+) lines not shown: the command stopped reading\n", err)
    assert len(notice) == 1 and int(notice[0]) > 0, err[-2000:]
    assert "lines not shown: the command stopped reading" in proc.log
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_the_queue_to_a_command_never_waits_and_says_what_it_dropped() -> None:
    """The same over a socket pair, without the daemon: a thousand lines to a reader that reads
    nothing take no time; once it reads, it gets what the socket held, the notice, the newest
    lines and the exit status. A burst to a reader that reads loses nothing."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    gone: list[bool] = []
    outgoing = Outgoing(handoff.Channel(ours), False, lambda: gone.append(True))
    start = time.monotonic()
    for number in range(1000):  # the socket fills
        outgoing.put(err=f"line {number}\n")
        if number == 500:
            time.sleep(STALLED_SECONDS + 0.5)  # for this long it has read nothing
    outgoing.put(keep=True, exit=0)
    assert time.monotonic() - start < STALLED_SECONDS + 2 and not outgoing.flush(0.5)
    reader = handoff.Channel(theirs)
    messages = []
    while (message := reader.receive()) is not None and "exit" not in message:
        messages.append(message["err"])
    assert message == {"exit": 0} and outgoing.flush(5)
    [notice] = [index for index, text in enumerate(messages) if NOT_SHOWN in text]
    numbers = [int(text.split()[1]) for text in messages if text.startswith("line ")]
    held, newest = numbers[:notice], numbers[notice:]
    assert held == list(range(len(held))) and newest == list(range(1000 - len(newest), 1000))
    assert len(newest) <= QUEUE_LINES + 1  # + the one on its way when the socket filled
    assert messages[notice] == f"{1000 - len(held) - len(newest)} {NOT_SHOWN}\n"
    assert outgoing.dropped == 1000 - len(held) - len(newest)
    theirs.close()  # the command is gone: said once, nothing more is queued
    for _ in range(3):
        outgoing.put(err="more\n")
    outgoing.close()
    assert gone == [True]
    ours.close()


def test_a_burst_to_a_command_that_reads_loses_nothing() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    outgoing = Outgoing(handoff.Channel(ours), False, lambda: None)
    for number in range(5000):
        outgoing.put(err=f"line {number}\n")
    outgoing.put(keep=True, exit=0)
    reader = handoff.Channel(theirs)
    messages = []
    while (message := reader.receive()) is not None and "exit" not in message:
        messages.append(message["err"])
    outgoing.close()
    assert messages == [f"line {number}\n" for number in range(5000)] and outgoing.dropped == 0
    ours.close()
    theirs.close()
