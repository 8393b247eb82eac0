"""A backup by hand (`toybox-backupd backup JOB`): one run now, shown to the operator.

The same code runs in the command's own process (cli.py) and, when the command hands its run
over (daemon/handoff_server.py), in the running daemon: everything it shows goes through a
`Terminal`, which the CLI writes to its stdout/stderr and the daemon sends back to the command,
so the operator sees the same lines and gets the same exit status either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from ..core import progress, redact
from ..core.basics import ToyboxError, describe_unexpected, duration_text, human
from ..core.settings import Settings
from ..store import Store
from ..tiers import registry as jobs

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130
PLAIN_PROGRESS_SECONDS = 30.0  # without a terminal: a progress line at most this often


class Terminal(Protocol):
    """Where a command's lines go: `write("out" | "err", text)`; `tty`: stderr is a terminal;
    `progress`: whether progress lines are wanted now (the daemon: once the run has started)."""

    tty: bool

    @property
    def progress(self) -> bool: ...

    def write(self, stream: str, text: str) -> None: ...


def failure(exc: BaseException) -> str:
    """What a command that failed with `exc` says (secrets masked): a clear line, never a
    traceback."""
    return redact.redact(str(exc) if isinstance(exc, ToyboxError) else describe_unexpected(exc))


def backup(settings: Settings, job_name: str, volumes: list[str] | None, verbose: bool,
           terminal: Terminal, run: Callable[[str], int]) -> int:
    """`backup JOB`: `run(job)` carries the run out and returns its id; the exit status (1
    unless it succeeded, 2 for an unknown job)."""
    try:
        job = jobs.get(job_name)
    except ValueError as exc:
        terminal.write("err", f"toybox-backupd backup: {exc}\n")
        return EXIT_CONFIG
    targets = job.targets(settings, volumes)
    with Store(settings.state_dir) as store:  # the last run's size: what this one may write
        last = [store.artifacts(tier=job.name, target=target) for target in targets]
    estimate = sum(items[-1].size for items in last if items) or None
    label = f"{job.name} backup of {', '.join(targets)}" + (" (total: the last one's size)"
                                                            if estimate else "")
    with progress.listening(ProgressPrinter(terminal)), progress.task(label, estimate):
        run_id = run(job.name)
    with Store(settings.state_dir) as store:
        done = store.run(run_id)
    assert done is not None
    if verbose:
        _print_steps(terminal, done.details or {})
    if done.status == "ok":
        terminal.write("out", f"run {run_id}: ok, {done.artifact}\n")
        return EXIT_OK
    terminal.write("err", f"run {run_id}: {done.status}: {done.error}\n")
    return EXIT_FAIL


def _print_steps(terminal: Terminal, details: dict[str, Any]) -> None:
    """The seconds each step of a run took, as its details recorded them (`backup -v`)."""
    def line(steps: dict[str, float]) -> str:
        return ", ".join(f"{step} {seconds:.2f} s" for step, seconds in steps.items())

    if "helper" in details:
        kept = " (kept from the last run)" if details["helper"].get("kept") else ""
        terminal.write("out", f"  helper container{kept}: {line(details['helper']['seconds'])}\n")
    for volume, steps in details.get("volumes", {}).items():
        terminal.write("out", f"  {volume} ({steps['transport']}): {line(steps['seconds'])}\n")


class ProgressPrinter:
    """Progress of restores, verify and manual backups on stderr: on a terminal one line that
    updates in place (bytes done of the total, rate, ETA); otherwise (logs, pipes) a plain line
    every PLAIN_PROGRESS_SECONDS and one when each piece of work ends."""

    def __init__(self, terminal: Terminal) -> None:
        self.terminal = terminal
        self._last = time.monotonic()

    def __call__(self, item: progress.Progress) -> None:
        if not self.terminal.progress:
            return
        text = redact.redact(progress_text(item))  # labels name volumes and files
        if self.terminal.tty:
            self.terminal.write("err", "\r\x1b[K" + text + ("\n" if item.ended else ""))
            return
        now = time.monotonic()
        if item.ended or (item.done and now - self._last >= PLAIN_PROGRESS_SECONDS):
            self._last = now
            self.terminal.write("err", text + "\n")


def progress_text(item: progress.Progress) -> str:
    """"restoring X: 1.2 GiB of 3.4 GiB (35%), 85.0 MiB/s, 27 s left" (or how it ended)."""
    rate = f"{human(item.rate)}/s"
    if item.ended:
        return f"{item.label}: {human(item.done)} in {duration_text(item.elapsed)} ({rate})"
    if not item.total:
        return f"{item.label}: {human(item.done)}, {rate}"
    percent = min(100, 100 * item.done // item.total)
    eta = item.eta
    left = f", {duration_text(eta)} left" if eta is not None else ""
    return f"{item.label}: {human(item.done)} of {human(item.total)} ({percent}%), {rate}{left}"
