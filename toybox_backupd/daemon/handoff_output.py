"""What a handed-over run sends its command, never waiting for the command to read it.

The messages are queued and sent by a thread of the connection's own, so a command that stopped
reading (Ctrl-Z at the terminal, a pipe nobody reads) never holds up the run, the run lock or
the daemon. Once the command has read nothing for STALLED_SECONDS, at most QUEUE_LINES messages
wait (QUEUE_BYTES at any time): beyond that the oldest waiting are dropped, and when the command
reads again it is told where ("n lines not shown: the command stopped reading"). The last word
and the exit status are never dropped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .handoff import Channel

# what waits for a command that does not read, besides what the socket holds (~280 messages):
# at a terminal a progress line comes 4 times a second, and a run logs a dozen lines
QUEUE_LINES = 40
QUEUE_BYTES = 1024 * 1024
STALLED_SECONDS = 1.0
NOT_SHOWN = "lines not shown: the command stopped reading"


def not_shown(count: int, tty: bool) -> str:
    """The line that stands for `count` dropped lines (on a line of its own at a terminal,
    where a progress line may be showing)."""
    return ("\r\x1b[K" if tty else "") + f"{count} {NOT_SHOWN}\n"


@dataclass
class _Item:
    message: dict[str, Any]
    size: int
    keep: bool  # never dropped


class Outgoing:
    """The queue to one command and the thread that sends it. `gone` is called (once, from that
    thread) when the command is found gone."""

    def __init__(self, channel: Channel, tty: bool, gone: Callable[[], None]):
        self.channel = channel
        self.tty = tty
        self.dropped = 0  # lines dropped in all
        self._gone = gone
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._bytes = self._lines = 0  # of the messages that may be dropped
        self._skipped = 0  # lines dropped since the last message sent
        self._sending: float | None = None  # since when the message on its way is
        self._closed = False  # the command is gone
        self._ending = False
        threading.Thread(target=self._send_all, name="handoff-send", daemon=True).start()

    def put(self, keep: bool = False, **message: Any) -> None:
        """Queue `message`; it never waits. When too much waits (_over), the oldest waiting
        messages are dropped (not those to `keep`)."""
        item = _Item(message, sum(len(str(value)) for value in message.values()), keep)
        with self._cond:
            if self._closed:
                return
            self._queue.append(item)
            if not keep:
                self._bytes += item.size
                self._lines += 1
            while self._over() and self._drop_oldest():
                pass
            self._cond.notify_all()

    def flush(self, timeout: float | None) -> bool:
        """Wait until all queued was sent or the command is gone; False if `timeout` passed."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or not (self._queue or self._sending is not None
                                             or self._skipped),
                timeout)

    def close(self) -> None:
        """Send what is queued, however long the command takes to read it; then end the thread."""
        with self._cond:
            self._ending = True
            self._cond.notify_all()
        self.flush(None)

    def _over(self) -> bool:
        """More than QUEUE_BYTES wait, or more than QUEUE_LINES while the command reads nothing
        (a burst to a command that reads loses nothing)."""
        stalled = (self._sending is not None
                   and time.monotonic() - self._sending > STALLED_SECONDS)
        return self._bytes > QUEUE_BYTES or (stalled and self._lines > QUEUE_LINES)

    def _drop_oldest(self) -> bool:
        for index, item in enumerate(self._queue):
            if not item.keep:
                del self._queue[index]
                self._bytes -= item.size
                self._lines -= 1
                lines = max(1, sum(str(value).count("\n") for value in item.message.values()))
                self._skipped += lines
                self.dropped += lines
                return True
        return False

    def _next(self) -> tuple[int, _Item | None] | None:
        """The lines dropped before the next message, and it; None: the end."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._skipped or self._ending)
            if not (self._queue or self._skipped):
                return None
            item = self._queue.popleft() if self._queue else None
            if item is not None and not item.keep:
                self._bytes -= item.size
                self._lines -= 1
            skipped, self._skipped = self._skipped, 0
            self._sending = time.monotonic()
            return skipped, item

    def _send_all(self) -> None:
        while (step := self._next()) is not None:
            skipped, item = step
            try:
                if skipped:
                    self.channel.send(err=not_shown(skipped, self.tty))
                if item is not None:
                    self.channel.send(**item.message)
            except OSError:
                with self._cond:
                    self._closed, self._sending = True, None
                    self._queue.clear()
                    self._cond.notify_all()
                self._gone()
                return
            with self._cond:
                self._sending = None
                self._cond.notify_all()
