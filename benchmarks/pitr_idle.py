"""PITR's cost when the database is idle, and how fast a PITR daemon stops (issue 23, item 6-7).

Against a real PostgreSQL 15 container (tests/images) and the real daemon (`toybox-backupd run`
with PITR=on, its streamer writing the WAL archive):

- stop: seconds from SIGTERM (what `docker compose stop` sends) to the daemon's exit, with the
  streamer running (`--stops` times);
- idle: bytes copied off-site (a directory target) in `--idle` minutes with nothing written to
  the database; `wal_offsite.copy_offsite` is called every 5 s as the daemon's watch calls it,
  each object it stores counted (a new version under an Object Lock);
- busy: the same during one minute of `pgbench -c 2` (the completed segments go too), next to
  the WAL the server wrote in that minute.

Results: benchmarks/results/pitr-idle.json (or --out). Run the code of another tree by
PYTHONPATH (the daemon subprocess inherits it):

    python benchmarks/pitr_idle.py [--idle 10] [--stops 3] [--settle 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))
PITR = {"PITR": "on", "PGDUMP_SCHEDULE": "", "PITR_BASE_SCHEDULE": "", "CATCH_UP": "false"}
WATCH = 5.0  # streamer.WATCH_SECONDS


class Counting:
    """A target that counts what is stored through it."""

    def __init__(self, target: Any):
        self.target, self.objects, self.bytes = target, 0, 0
        self.began = time.monotonic()
        self.log: list[tuple[float, str, int]] = []  # (seconds in, key, bytes stored)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def put(self, key: str, source: Any, **options: Any) -> Any:
        stored = self.target.put(key, source, **options)
        self.objects += 1
        self.bytes += stored.size
        self.log.append((round(time.monotonic() - self.began, 1), key.rsplit("/", 1)[-1],
                         stored.size))
        return stored


def streaming(env: Any, name: str) -> Any:
    from test_daemon import Daemon, wait_for

    from toybox_backupd.tiers.pitr import wal

    daemon = Daemon(env, name, **PITR)
    settings = env.settings(**PITR)
    wait_for("the WAL streamer", lambda: any(s.partial for s in wal.segments(settings)), 120,
             lambda: daemon.log)
    return daemon


def stop_seconds(env: Any, stops: int) -> list[float]:
    found = []
    for n in range(stops):
        daemon = streaming(env, f"stop-{n}")
        time.sleep(3)
        began = time.monotonic()
        daemon.signal(signal.SIGTERM)
        daemon.wait(120)
        found.append(round(time.monotonic() - began, 2))
        daemon.kill()
    return found


def copied(env: Any, offsite: Path, minutes: float, during: Any = None) -> dict[str, Any]:
    """Bytes and objects copy_offsite stores in `minutes`, called every WATCH seconds."""
    from toybox_backupd.places.offsite import target as targets
    from toybox_backupd.store import Store
    from toybox_backupd.tiers.pitr import wal_offsite

    offsite.mkdir()
    settings = env.settings(**PITR, OFFSITE_URL=f"file://{offsite}")
    counter = Counting(targets.open_target(settings))
    wal_offsite.open_target = lambda _settings: counter  # type: ignore[attr-defined]
    last, ends = float("-inf"), time.monotonic() + minutes * 60
    work = during() if during else None
    with Store(env.state_dir) as store:
        while time.monotonic() < ends:
            last = wal_offsite.copy_offsite(settings, store, last, time.monotonic())
            time.sleep(WATCH)
    if work is not None:
        work.wait(120)
    return {"minutes": minutes, "objects": counter.objects, "bytes": counter.bytes,
            "mib": round(counter.bytes / 2**20, 3), "puts": counter.log}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=10.0, help="idle minutes (default 10)")
    parser.add_argument("--stops", type=int, default=3)
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds the streaming database is left alone before the idle "
                             "minutes (default 30; 360 lets autovacuum and a checkpoint pass)")
    parser.add_argument("--out", type=Path, default=RESULTS / "pitr-idle.json")
    args = parser.parse_args()
    import docker
    from conftest import Env, base_values, pg_values, remove_pg, start_pg

    client = docker.from_env()
    pg = start_pg(client)
    result: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            tmp = Path(scratch)
            env = Env(tmp, {**base_values(tmp), **pg_values(pg)})
            result["stop_seconds"] = stop_seconds(env, args.stops)
            print("stop seconds", result["stop_seconds"], flush=True)
            daemon = streaming(env, "offsite")
            try:
                time.sleep(args.settle)
                result["idle"] = copied(env, tmp / "idle", args.idle)
                pg.container.exec_run(["pgbench", "-i", "-q", "-s", "2", "-U", pg.user, pg.db],
                                      user="postgres")
                before = pg.psql("SELECT pg_current_wal_lsn()")
                result["busy"] = copied(env, tmp / "busy", 1.0, lambda: subprocess.Popen(
                    ["docker", "exec", "-u", "postgres", pg.name, "pgbench", "-c", "2", "-T",
                     "60", "-U", pg.user, pg.db], stdout=subprocess.DEVNULL))
                result["busy"]["wal_written_mib"] = round(int(pg.psql(
                    f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{before}')")) / 2**20, 1)
            finally:
                daemon.kill()
                beside = f"container:{pg.container.id}"  # only this run's streamer helpers
                for container in client.containers.list(
                        all=True, filters={"label": "toybox-backupd.beside=wal"}):
                    if container.attrs["HostConfig"]["NetworkMode"] == beside:
                        container.remove(force=True, v=True)
    finally:
        remove_pg(pg)
    import toybox_backupd

    result["code"] = str(Path(toybox_backupd.__file__).parent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
