"""Logging for `docker compose logs -f`: readable key=value lines (console) or JSON lines.

stdlib loggers (APScheduler, docker, urllib3) go through the same pipeline, every line carries
the context bound with `structlog.contextvars` (job, run_id), and secrets are masked.
"""

from __future__ import annotations

import logging
import sys
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


def setup(log_format: str = "console", level: str = "INFO", stream: Any = None) -> None:
    """Configure structlog and route the stdlib's logging through it (idempotent)."""
    stream = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=False),
        structlog.processors.format_exc_info,
        _mask_secrets,
    ]
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        colors = bool(getattr(stream, "isatty", lambda: False)())
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared[:-2],
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared[:-2],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _mask_secrets,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # chatty libraries: their INFO lines are noise in an operator's log
    for name in ("urllib3", "docker", "apscheduler.executors.default"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def get(name: str = "toybox_backupd") -> Any:
    """A structlog logger called `name`."""
    return structlog.get_logger(name)
