"""Logging for `docker compose logs -f`: readable key=value lines (console) or JSON lines.

stdlib loggers (APScheduler, docker, urllib3) go through the same pipeline, every line carries
the context bound with `structlog.contextvars` (job, run_id), and secrets are masked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import structlog

from . import redact


def _mask_secrets(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact.redact(value)
        elif isinstance(value, BaseException):
            event[key] = redact.redact(str(value))
    return event


def setup(log_format: str = "console", level: str = "INFO", stream: Any = None,
          mirror: Any = None, mirror_format: str | None = None) -> None:
    """Configure structlog and route the stdlib's logging through it (idempotent).

    `mirror`: a second stream that gets every line too, in `mirror_format` (default
    `log_format`): a manual command's lines in the daemon's log (`docker compose logs`).
    """
    stream = stream or sys.stderr
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handlers = [_handler(stream, log_format)]
    if mirror is not None:
        handlers.append(_handler(mirror, mirror_format or log_format))
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    echo = logging.getLogger(ECHO)  # the mirror only (the terminal has the line already)
    echo.propagate = False
    echo.handlers[:] = handlers[1:]
    # chatty libraries: their INFO lines are noise in an operator's log. APScheduler's say
    # "Running job ..." and "... executed successfully" twice a minute for the email outbox
    # (~2,900 lines a day); its warnings and job errors stay.
    for name in ("urllib3", "docker", "apscheduler"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=False),
]


def _handler(stream: Any, log_format: str) -> logging.Handler:
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        colors = bool(getattr(stream, "isatty", lambda: False)())
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _mask_secrets,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    return handler


_COPY: ContextVar[object | None] = ContextVar("log_copy", default=None)


@contextlib.contextmanager
def copied_to(stream: Any, log_format: str) -> Iterator[None]:
    """While inside, the lines this thread logs also go to `stream` in `log_format` (console
    lines in colour when `stream.isatty()`): the daemon shows a command the lines of the run it
    carries out for it, and nothing else of its own."""
    mark = object()
    handler = _handler(stream, log_format)
    handler.addFilter(lambda _record: _COPY.get() is mark)
    root = logging.getLogger()
    token = _COPY.set(mark)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        _COPY.reset(token)


def terminal_format(log_format: str, stream: Any = None) -> str:
    """The format for a command's own output: console on a terminal (LOG_FORMAT=json is for
    `docker compose logs` and log shippers), else `log_format`."""
    stream = stream or sys.stderr
    return "console" if getattr(stream, "isatty", lambda: False)() else log_format


def open_mirror(path: str | None) -> Any:
    """The stream a manual command copies its log lines to (None: no copy). In the image,
    TOYBOX_LOG_MIRROR=/proc/1/fd/1: the container's own output, which `docker compose logs`
    shows; not when this process writes there already (the daemon itself, or a command run
    with `docker compose run`, whose output is the container's)."""
    if not path:
        return None
    try:
        mirror = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - process-long
    except OSError:
        return None
    if any(_same(mirror, ours) for ours in (sys.stdout, sys.stderr)):
        mirror.close()
        return None
    return mirror


def _same(one: Any, other: Any) -> bool:
    try:
        return os.path.samestat(os.fstat(one.fileno()), os.fstat(other.fileno()))
    except (OSError, ValueError, AttributeError):
        return False


ECHO = "toybox_backupd.echo"


def echo(line: str, **context: Any) -> None:
    """Copy a line the command showed on its terminal to the mirror stream, if there is one."""
    structlog.get_logger(ECHO).info(line, **context)


def bind(**context: Any) -> None:
    """Context every later line of this process carries (e.g. command="backup")."""
    structlog.contextvars.bind_contextvars(**context)


def get(name: str = "toybox_backupd") -> Any:
    """A structlog logger called `name`."""
    return structlog.get_logger(name)
