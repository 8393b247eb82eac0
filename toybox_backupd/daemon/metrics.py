"""Prometheus metrics (METRICS_PORT): what `status` shows, read from the store at each scrape.

Nothing is kept in memory between scrapes, so the numbers are the history database's, also for
runs made by hand beside the daemon.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from ..core import logs
from ..core.settings import Settings
from . import status as state

log = logs.get("toybox_backupd.metrics")
PREFIX = "toybox_backupd_"


def _seconds(text: str | None) -> float | None:
    return datetime.fromisoformat(text).timestamp() if text else None


def _gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, labels=labels)


class StoreCollector(Collector):
    """Gauges per job (last success, last run's duration, size and outcome), per restore
    point group, for the outbox, the heartbeat, the free space and what needs attention."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        found = state.gather(self.settings)
        yield from self._jobs(found)
        points = _gauge("restore_points", "restore points kept", ["tier", "target"])
        newest = _gauge("newest_restore_point_timestamp_seconds",
                        "when the newest restore point was made", ["tier", "target"])
        for group in found.restore_points:
            points.add_metric([group.tier, group.target], group.count)
            newest.add_metric([group.tier, group.target], _seconds(group.newest) or 0)
        yield points
        yield newest
        waiting = _gauge("outbox_waiting", "reports (email, chat, ping) not sent yet", ["channel"])
        for channel in ("email", "apprise", "ping"):
            waiting.add_metric([channel], sum(1 for row in found.outbox if row["channel"] == channel
                                              and row["status"] != "given_up"))
        yield waiting
        yield from self._host(found)

    def _jobs(self, found: state.Status) -> Iterator[GaugeMetricFamily]:
        success = _gauge("last_success_timestamp_seconds", "start of the job's last successful run",
                         ["job"])
        duration = _gauge("last_run_duration_seconds", "duration of the job's last run", ["job"])
        size = _gauge("last_run_bytes", "bytes the job's last run wrote", ["job"])
        ok = _gauge("last_run_ok", "1 if the job's last run succeeded, else 0", ["job"])
        for job in found.jobs:
            last: dict[str, Any] | None = job.last_run
            if job.last_success:
                success.add_metric([job.job], _seconds(job.last_success) or 0)
            if last is None:
                continue
            if last["duration_s"] is not None:
                duration.add_metric([job.job], last["duration_s"])
            size.add_metric([job.job], last["bytes"] or 0)
            ok.add_metric([job.job], 1 if last["status"] == "ok" else 0)
        yield from (success, duration, size, ok)

    def _host(self, found: state.Status) -> Iterator[GaugeMetricFamily]:
        beat = _gauge("heartbeat_timestamp_seconds", "the daemon's last heartbeat", [])
        beat.add_metric([], _seconds(found.daemon["heartbeat"]) or 0)
        free = _gauge("backup_dir_free_bytes", "free space where BACKUP_DIR lives", [])
        free.add_metric([], found.disk.get("free") or 0)
        attention = _gauge("attention_items", "how many items `status` lists as needing "
                                              "attention", [])
        attention.add_metric([], len(found.attention))
        yield from (beat, free, attention)


def serve(settings: Settings, port: int) -> Any:
    """Serve /metrics on `port` (all addresses) from a thread; the server (to shut down)."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(settings))
    server, _thread = start_http_server(port, registry=registry)
    log.info(f"metrics: Prometheus metrics on port {port} (/metrics)")
    return server
