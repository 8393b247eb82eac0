"""Rows of the history database as typed records."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..core.basics import parse_iso


@dataclass
class Run:
    id: int
    job: str
    target: str | None
    trigger: str
    status: str
    started_at: datetime
    ended_at: datetime | None
    bytes: int | None
    artifact: str | None
    error: str | None
    details: dict[str, Any]
    host: str | None
    pid: int | None

    @property
    def duration(self) -> float | None:
        if self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Run:
        return cls(
            id=row["id"], job=row["job"], target=row["target"], trigger=row["trigger"],
            status=row["status"], started_at=datetime.fromisoformat(row["started_at"]),
            ended_at=parse_iso(row["ended_at"]), bytes=row["bytes"], artifact=row["artifact"],
            error=row["error"], details=json.loads(row["details"] or "{}"), host=row["host"],
            pid=row["pid"],
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "job": self.job, "target": self.target, "trigger": self.trigger,
            "status": self.status, "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "duration_s": round(self.duration, 3) if self.duration is not None else None,
            "bytes": self.bytes, "artifact": self.artifact, "error": self.error,
            "details": self.details,
        }


@dataclass
class Artifact:
    id: int
    run_id: int | None
    tier: str
    target: str
    path: str
    created_at: datetime
    size: int
    sha256: str
    status: str
    base_id: int | None
    extra: dict[str, Any]
    verified_at: datetime | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Artifact:
        return cls(
            id=row["id"], run_id=row["run_id"], tier=row["tier"], target=row["target"],
            path=row["path"], created_at=datetime.fromisoformat(row["created_at"]),
            size=row["size"], sha256=row["sha256"], status=row["status"], base_id=row["base_id"],
            extra=json.loads(row["extra"] or "{}"), verified_at=parse_iso(row["verified_at"]),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "run_id": self.run_id, "tier": self.tier, "target": self.target,
            "path": self.path, "created_at": self.created_at.isoformat(), "size": self.size,
            "sha256": self.sha256, "status": self.status, "base_id": self.base_id,
            "verified_at": self.verified_at.isoformat() if self.verified_at else None,
            "extra": self.extra,
        }


@dataclass
class Copy:
    """An artifact's off-site copy: pending, ok, corrupt or deleted."""

    artifact_id: int
    url: str
    status: str
    attempts: int
    next_try_at: datetime | None
    last_error: str | None
    objects: list[dict[str, Any]]
    recipients: list[str]
    copied_at: datetime | None
    verified_at: datetime | None
    retain_until: datetime | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Copy:
        return cls(
            artifact_id=row["artifact_id"], url=row["url"], status=row["status"],
            attempts=row["attempts"], next_try_at=parse_iso(row["next_try_at"]),
            last_error=row["last_error"], objects=json.loads(row["objects"] or "[]"),
            recipients=json.loads(row["recipients"] or "[]"),
            copied_at=parse_iso(row["copied_at"]), verified_at=parse_iso(row["verified_at"]),
            retain_until=parse_iso(row["retain_until"]),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url, "status": self.status, "attempts": self.attempts,
            "next_try_at": self.next_try_at.isoformat() if self.next_try_at else None,
            "last_error": self.last_error, "encrypted": bool(self.recipients),
            "copied_at": self.copied_at.isoformat() if self.copied_at else None,
            "verified_at": self.verified_at.isoformat() if self.verified_at else None,
            "retain_until": self.retain_until.isoformat() if self.retain_until else None,
            "objects": [item["key"] for item in self.objects],
        }
