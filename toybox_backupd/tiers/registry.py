"""The job registry: one declaration per job, read by everything that acts per job.

A job is scheduled, run, retained, verified and reported by its name, which is also the tier of
the artifacts it makes (`logical`, `full`, `diff`). Its declaration names the settings that
drive it and the tier module that does the work. A tier module offers:

    backup(ctx: RunContext) -> TierResult        make the artifacts of one run
    verify(settings, item: Artifact) -> str | None   re-read one artifact: None if sound

Adding a tier is one module plus one `register(Job(...))` here (or in a test). The registry
names tier modules rather than importing them, so that reading schedules (the daemon's loop,
`healthcheck`, `schedule`) does not load the Docker SDK and psycopg.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..core.settings import Settings, cron_problem


@dataclass(frozen=True)
class Job:
    name: str
    title: str                     # what an email calls it: "logical backup (pg_dump)"
    tier_module: str               # the tier module: backup(ctx), verify(settings, item)
    schedule_var: str              # crontab(5) schedule; empty turns the job off
    keep_var: str                  # days its artifacts are kept
    time_limit_var: str            # minutes one run may take
    targets_var: str               # what it backs up: a name or a comma-separated list
    family: tuple[str, ...]        # tiers retained together (a differential needs its full)
    aliases: tuple[str, ...] = ()  # other names the CLI accepts
    requires_var: str = ""         # a setting that must be on for the job to run (PITR)

    @property
    def tier(self) -> ModuleType:
        """The tier module, imported on first use (the CLI and healthcheck stay light)."""
        return importlib.import_module(self.tier_module)

    def schedule(self, settings: Settings) -> str:
        return str(settings.value(self.schedule_var) or "")

    def keep_days(self, settings: Settings) -> int:
        return int(settings.value(self.keep_var))

    def time_limit_seconds(self, settings: Settings) -> int:
        return int(settings.value(self.time_limit_var)) * 60

    def targets(self, settings: Settings, only: list[str] | None = None) -> list[str]:
        """What one run backs up: `only` if given, else the targets setting's value(s)."""
        if only:
            return list(only)
        value: Any = settings.value(self.targets_var)
        if isinstance(value, list):
            return [str(item) for item in value]
        return [str(value)] if value else []

    def problem(self, settings: Settings) -> str | None:
        """Why the job is off against the operator's wish: its schedule does not parse."""
        why = cron_problem(self.schedule(settings))
        if why is None:
            return None
        return (f"{self.schedule_var}: {why}; the {self.name} job does not run until it is "
                "fixed")

    def disabled_reason(self, settings: Settings) -> str | None:
        """Why the job does not run on schedule (None: it does)."""
        if self.requires_var and not settings.value(self.requires_var):
            return f"{self.requires_var} is off"
        if not self.schedule(settings):
            return f"{self.schedule_var} is empty"
        if cron_problem(self.schedule(settings)):
            return f"{self.schedule_var} is not a valid schedule"
        if not self.targets(settings):
            return f"{self.targets_var} is empty"
        return None

    def enabled(self, settings: Settings) -> bool:
        return self.disabled_reason(settings) is None


_REGISTRY: dict[str, Job] = {}


def register(job: Job) -> Job:
    """Add (or replace) a job; jobs due at the same moment run in registration order."""
    _REGISTRY[job.name] = job
    return job


def unregister(name: str) -> None:
    """Remove a job (tests register and remove their own)."""
    _REGISTRY.pop(name, None)


def all_jobs() -> list[Job]:
    """Every registered job, in registration (run) order."""
    return list(_REGISTRY.values())


def names() -> list[str]:
    """The registered jobs' names, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> Job:
    """The job called `name` (or one of its aliases); ValueError if there is none."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for job in _REGISTRY.values():
        if name in job.aliases:
            return job
    raise ValueError(f"unknown job {name!r} (one of {', '.join(_REGISTRY)})")


def order(name: str) -> int:
    """1-based position in the registry (run order of jobs due at the same moment)."""
    return names().index(name) + 1


def retained_with(tier: str) -> tuple[str, ...]:
    """The tiers pruned together with `tier`."""
    return get(tier).family


_TIERS = "toybox_backupd.tiers."
register(Job("logical", "logical backup (pg_dump)", _TIERS + "logical.dump", "PGDUMP_SCHEDULE",
             "PGDUMP_KEEP_DAYS", "PGDUMP_TIME_LIMIT_MIN", "POSTGRES_DB", ("logical",),
             aliases=("pgdump",)))
register(Job("full", "full volume backup", _TIERS + "volumes.archive", "VOLUME_FULL_SCHEDULE",
             "VOLUME_KEEP_DAYS", "VOLUME_FULL_TIME_LIMIT_MIN", "BACKUP_VOLUMES", ("full", "diff")))
register(Job("diff", "differential volume backup", _TIERS + "volumes.archive", "VOLUME_DIFF_SCHEDULE",
             "VOLUME_KEEP_DAYS", "VOLUME_DIFF_TIME_LIMIT_MIN", "BACKUP_VOLUMES", ("full", "diff")))
register(Job("base", "online base backup (pg_basebackup)", _TIERS + "pitr.basebackup",
             "PITR_BASE_SCHEDULE", "PITR_KEEP_DAYS", "PITR_BASE_TIME_LIMIT_MIN", "POSTGRES_DB",
             ("base",), requires_var="PITR"))
