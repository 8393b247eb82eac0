"""The history database's schema, as numbered migrations (PRAGMA user_version)."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: runs and artifacts
    """
    CREATE TABLE runs (
        id          INTEGER PRIMARY KEY,
        job         TEXT NOT NULL,
        target      TEXT,
        trigger     TEXT NOT NULL DEFAULT 'manual',
        status      TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        ended_at    TEXT,
        bytes       INTEGER,
        artifact    TEXT,
        error       TEXT,
        details     TEXT NOT NULL DEFAULT '{}',
        host        TEXT,
        pid         INTEGER
    );
    CREATE INDEX runs_job_started ON runs(job, started_at);
    CREATE TABLE artifacts (
        id          INTEGER PRIMARY KEY,
        run_id      INTEGER REFERENCES runs(id),
        tier        TEXT NOT NULL,
        target      TEXT NOT NULL,
        path        TEXT NOT NULL UNIQUE,
        created_at  TEXT NOT NULL,
        size        INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        status      TEXT NOT NULL DEFAULT 'ok',
        base_id     INTEGER REFERENCES artifacts(id),
        extra       TEXT NOT NULL DEFAULT '{}',
        verified_at TEXT,
        deleted_at  TEXT
    );
    CREATE INDEX artifacts_tier_target ON artifacts(tier, target, created_at);
    """,
    # 2: file index of volume archives, paths deleted since the base full
    """
    CREATE TABLE files (
        artifact_id INTEGER NOT NULL REFERENCES artifacts(id) ON DELETE CASCADE,
        path        TEXT NOT NULL,
        type        TEXT NOT NULL,
        size        INTEGER NOT NULL,
        mtime_ns    INTEGER NOT NULL,
        ctime_ns    INTEGER NOT NULL,
        inode       INTEGER NOT NULL,
        mode        INTEGER NOT NULL,
        uid         INTEGER NOT NULL,
        gid         INTEGER NOT NULL,
        link        TEXT,
        hash        TEXT,
        PRIMARY KEY (artifact_id, path)
    ) WITHOUT ROWID;
    CREATE TABLE deleted_paths (
        artifact_id INTEGER NOT NULL REFERENCES artifacts(id) ON DELETE CASCADE,
        path        TEXT NOT NULL,
        PRIMARY KEY (artifact_id, path)
    ) WITHOUT ROWID;
    """,
    # 3: containers stopped for a consistent archive; email outbox; key/value state
    """
    CREATE TABLE stopped_containers (
        container_id TEXT PRIMARY KEY,
        name         TEXT NOT NULL,
        run_id       INTEGER,
        stopped_at   TEXT NOT NULL
    );
    CREATE TABLE outbox (
        id            INTEGER PRIMARY KEY,
        run_id        INTEGER REFERENCES runs(id),
        created_at    TEXT NOT NULL,
        message_id    TEXT NOT NULL UNIQUE,
        subject       TEXT NOT NULL,
        message       BLOB NOT NULL,
        recipients    TEXT NOT NULL,
        status        TEXT NOT NULL DEFAULT 'pending',
        attempts      INTEGER NOT NULL DEFAULT 0,
        next_try_at   TEXT NOT NULL,
        last_error    TEXT,
        sent_at       TEXT
    );
    CREATE TABLE state (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 4: one vocabulary: the logical job is called like its tier
    """
    UPDATE runs SET job='logical' WHERE job='pgdump';
    """,
    # 5: off-site copies: one row per artifact copied (or to be copied) off the host
    """
    CREATE TABLE offsite_copies (
        artifact_id  INTEGER PRIMARY KEY REFERENCES artifacts(id),
        url          TEXT NOT NULL,
        status       TEXT NOT NULL DEFAULT 'pending',
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_try_at  TEXT,
        last_error   TEXT,
        objects      TEXT NOT NULL DEFAULT '[]',
        recipients   TEXT NOT NULL DEFAULT '[]',
        copied_at    TEXT,
        verified_at  TEXT,
        retain_until TEXT,
        deleted_at   TEXT
    );
    CREATE INDEX offsite_status ON offsite_copies(status, next_try_at);
    """,
    # 6: the outbox carries every channel: email, Apprise (chat), dead-man's-switch pings
    """
    ALTER TABLE outbox ADD COLUMN channel TEXT NOT NULL DEFAULT 'email';
    CREATE INDEX outbox_channel_due ON outbox(channel, status, next_try_at);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
