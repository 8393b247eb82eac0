"""Crontab(5) schedules (and its nicknames, `@daily`...), evaluated by cronsim, and an
APScheduler trigger built on them.

APScheduler 3.x's own CronTrigger numbers weekdays from Monday=0 and ANDs day-of-month with
day-of-week; crontab(5) numbers from Sunday=0 (7 is Sunday too) and ORs the two day fields when
both are restricted. cronsim implements crontab(5) exactly, including cron's handling of DST
changes (a time skipped by spring-forward runs right after it, a repeated hour runs fixed-time
jobs once), so schedules here mean what they mean in a crontab.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, tzinfo

from apscheduler.triggers.base import BaseTrigger
from cronsim import CronSim

from .settings import cron_fields

_EPSILON = timedelta(microseconds=1)


def next_times(expr: str, zone: tzinfo, start: datetime, count: int) -> list[datetime]:
    """The next `count` fire times strictly after `start`, in `zone`."""
    iterator = _iterate(expr, zone, start)
    return [next(iterator) for _ in range(count)]


def previous_time(expr: str, zone: tzinfo, before: datetime) -> datetime | None:
    """The latest fire time at or before `before` (None if none in the last 400 days)."""
    local = before.astimezone(zone)
    for fire in crontab(expr, local + _EPSILON, reverse=True):
        return fire
    return None


def crontab(expr: str, start: datetime, reverse: bool = False) -> CronSim:
    """cronsim's iterator over `expr` (nicknames such as `@daily` spelled out) from `start`."""
    return CronSim(cron_fields(expr), start, reverse=reverse)


def _iterate(expr: str, zone: tzinfo, start: datetime) -> Iterator[datetime]:
    return iter(crontab(expr, start.astimezone(zone)))


class CrontabTrigger(BaseTrigger):
    """An APScheduler 3.x trigger with crontab(5) semantics."""

    def __init__(self, expr: str, zone: tzinfo):
        self.expr = expr
        self.zone = zone

    def get_next_fire_time(self, previous_fire_time: datetime | None,
                           now: datetime) -> datetime | None:
        start = previous_fire_time if previous_fire_time is not None else now - _EPSILON
        return next(_iterate(self.expr, self.zone, start), None)

    def __str__(self) -> str:
        return f"crontab[{self.expr} {self.zone}]"

    def __repr__(self) -> str:
        return f"<CrontabTrigger {self.expr!r} {self.zone}>"


def runs_within(expr: str, zone: tzinfo, days: float, end: datetime, limit: int = 100_000) -> int:
    """How many times `expr` fires in the `days` days up to `end` (0 for an empty schedule)."""
    if not expr:
        return 0
    start = end - timedelta(days=days)
    count = 0
    for fire in _iterate(expr, zone, start):
        if fire > end or count >= limit:
            break
        count += 1
    return count
