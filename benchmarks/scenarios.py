"""The seed's four restore scenarios, timed end to end with the real CLI, beside its promises.

    python -m benchmarks.scenarios                  # the benchmark data: 2 GB media, ~470 MB DB
    python -m benchmarks.scenarios --profile x10    # ten times that (~20 GB, ~4.7 GB)

Builds the data as `benchmarks.run` does (`tbb-scn-<profile>-*`: a media volume and a PostgreSQL
container with its data volume), takes the backups the TOYBOX schedule would have (a dump, a
full of both volumes with the database stopped for its own, 1 % of the uploads changed, a
differential), then times each scenario as an operator would run it:

1. the database is broken: `restore db --yes` (the newest dump replaces the live database);
2. the server is lost: `restore volume` of the database's volume and of the media volume into
   new volumes, then PostgreSQL started on the restored data until it answers;
3. one table deleted: `DROP TABLE media_items`, then `restore db --table media_items --yes`;
4. yesterday's uploads: `restore files MEDIA 'uploads/*'` from the full + differential chain.

Each is checked (row counts, file counts) so a fast wrong answer cannot pass. Wall seconds go to
`benchmarks/results/scenarios-<profile>.json` and the table in BENCHMARKS.md (between its
`<!-- scenarios:<profile> -->` markers). `--keep` keeps the data for another run (`--reuse`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from . import dataset
from .dataset import HELPER_IMAGE, PROFILES
from .run import RESULTS, ROOT, machine, update_report

PROMISES = {  # the seed (backup-design-ja.txt), minutes
    "db": ("1. database broken → whole database back from the dump", 1, 5),
    "server": ("2. server lost → database volume + media volume back", 10, 30),
    "table": ("3. one table deleted → that table back", 1, 3),
    "files": ("4. yesterday's uploads → back from full + differential", 30, 60),
}
PASSWORD = "tbb-scenarios"


def say(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def sh(*cmd: str, **kwargs: Any) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs).stdout


class Scenarios:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.profile = PROFILES[args.profile]
        prefix = f"tbb-scn-{self.profile.name}"
        self.media, self.pg_volume, self.pg = f"{prefix}-media", f"{prefix}-pgdata", f"{prefix}-pg"
        self.work = (ROOT / "benchmarks" / "work" / prefix).resolve()
        self.made: list[str] = []  # volumes made by restores, removed at the end
        self.port = 0

    def psql(self, sql: str, container: str | None = None) -> str:
        return sh("docker", "exec", "-u", "postgres", container or self.pg, "psql", "-X", "-A",
                  "-t", "-U", "toybox", "-d", "toybox", "-c", sql).strip()

    def cli(self, *args: str) -> float:
        """Run our CLI; its wall seconds."""
        # the full stops and starts PostgreSQL, and its loopback port is picked anew
        self.port = int(sh("docker", "port", self.pg, "5432/tcp").split(":")[-1])
        values = {
            "BACKUP_DIR": str(self.work / "backups"), "STATE_DIR": str(self.work / "state"),
            "TZ": "UTC", "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": "toybox", "POSTGRES_PASSWORD": PASSWORD, "POSTGRES_DB": "toybox",
            "PG_CONTAINER": self.pg, "BACKUP_VOLUMES": f"{self.pg_volume},{self.media}",
            "STOP_DURING_BACKUP": self.pg, "HELPER_IMAGE": HELPER_IMAGE, "NOTIFY_EMAIL_TO": "",
            "LOG_FORMAT": "console", "CATCH_UP": "false",
        }
        env = {**os.environ, **values, "PYTHONPATH": str(ROOT)}
        started = time.monotonic()
        log = self.work / "cli.log"
        with open(log, "a") as out:
            done = subprocess.run([sys.executable, "-m", "toybox_backupd.cli", "--env-file",
                                   str(self.work / "none.env"), *args], env=env, stdout=out,
                                  stderr=out, cwd=self.work)
        if done.returncode != 0:
            raise RuntimeError(f"toybox-backupd {' '.join(args)} failed; see {log}")
        return time.monotonic() - started

    def setup(self) -> dict[str, Any]:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "none.env").write_text("")
        subprocess.run(["bash", str(ROOT / "tests" / "images" / "build-images.sh")], check=True,
                       capture_output=True)
        fresh = not (self.args.reuse and self.exists("volume", self.media))
        if fresh:
            self.teardown(data=True)
            say(f"generating {self.media} (~{self.profile.approx_mb:,} MB)")
            dataset.generate(self.media, self.profile, 1)
        running = sh("docker", "ps", "-q", "--filter", f"name=^{self.pg}$").strip()
        if fresh or not running:
            subprocess.run(["docker", "rm", "-f", self.pg], capture_output=True)
            self.port = dataset.start_pg(self.pg, self.pg_volume, PASSWORD)
            if fresh:
                say(f"pgbench -i -s {self.profile.pg_scale} + {self.profile.pg_rows:,} rows")
                dataset.pgbench_init(self.pg, self.profile.pg_scale, self.profile.pg_rows)
        files, size = dataset.summary(self.media)
        return {"media_files": files, "media_bytes": size,
                "db_bytes": int(self.psql("SELECT pg_database_size('toybox')"))}

    def exists(self, kind: str, name: str) -> bool:
        return subprocess.run(["docker", kind, "inspect", name], capture_output=True).returncode == 0

    def backups(self) -> dict[str, float]:
        shutil.rmtree(self.work / "backups", ignore_errors=True)
        shutil.rmtree(self.work / "state", ignore_errors=True)
        say("backups: logical, full (both volumes), 1 % of the uploads changed, differential")
        taken = {"logical": self.cli("backup", "logical"), "full": self.cli("backup", "full")}
        dataset.mutate(self.media, seed=7)
        taken["diff"] = self.cli("backup", "diff", "--volume", self.media)
        return {k: round(v, 1) for k, v in taken.items()}

    def timed(self, name: str, run: Callable[[], float]) -> dict[str, Any]:
        subprocess.run(["sync"], check=True)
        say(f"scenario {name} …")
        seconds = run()
        say(f"scenario {name}: {seconds:.1f} s")
        return {"seconds": round(seconds, 1)}

    def db(self) -> float:
        rows = self.psql("SELECT count(*) FROM media_items")
        seconds = self.cli("restore", "db", "--yes")
        assert self.psql("SELECT count(*) FROM media_items") == rows, "rows differ after restore"
        return seconds

    def server(self) -> float:
        """Both volumes restored and checked one after the other (each removed once checked:
        the x10 profile needs the disk); the seconds of the restores and of PostgreSQL's
        start on the restored data."""
        seconds = 0.0
        new_pg, new_media, name = (f"{self.pg}-restored-data", f"{self.media}-restored",
                                   f"{self.pg}-restored")
        self.made += [new_pg, new_media]
        seconds += self.cli("restore", "volume", self.pg_volume, "--to", new_pg, "--yes")
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        started = time.monotonic()
        dataset.start_pg(name, new_pg, PASSWORD)
        seconds += time.monotonic() - started
        try:
            want = self.psql("SELECT count(*) FROM media_items")
            assert self.psql("SELECT count(*) FROM media_items", name) == want, "rows differ"
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
            subprocess.run(["docker", "volume", "rm", "-f", new_pg], capture_output=True)
        seconds += self.cli("restore", "volume", self.media, "--to", new_media, "--yes")
        try:
            assert dataset.summary(new_media) == dataset.summary(self.media), "media differ"
        finally:
            subprocess.run(["docker", "volume", "rm", "-f", new_media], capture_output=True)
        return seconds

    def table(self) -> float:
        rows = self.psql("SELECT count(*) FROM media_items")
        self.psql("DROP TABLE media_items")
        seconds = self.cli("restore", "db", "--table", "media_items", "--yes")
        assert self.psql("SELECT count(*) FROM media_items") == rows, "table rows differ"
        return seconds

    def files(self) -> float:
        dest = self.work / "restored-files"
        shutil.rmtree(dest, ignore_errors=True)
        seconds = self.cli("restore", "files", self.media, "uploads/*", "--dest", str(dest))
        count = sum(len(names) for _, _, names in os.walk(dest))
        want = sum(1 for path, _ in dataset.listing(self.media) if path.startswith("uploads/"))
        assert count == want, f"{count} files restored, {want} in the volume"
        shutil.rmtree(dest, ignore_errors=True)
        return seconds

    def teardown(self, data: bool) -> None:
        for volume in self.made:
            subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True)
        if data:
            subprocess.run(["docker", "rm", "-f", self.pg], capture_output=True)
            for volume in (self.media, self.pg_volume):
                subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True)
            shutil.rmtree(self.work / "backups", ignore_errors=True)


def render(result: dict[str, Any]) -> str:
    data = result["data"]
    lines = [
        f"Run {result['when']} · profile `{result['profile']}` · commit `{result['commit']}` · "
        f"media {data['media_files']:,} files, {data['media_bytes'] / 1e6:,.0f} MB; database "
        f"{data['db_bytes'] / 1e6:,.0f} MB · backups taken before: "
        + ", ".join(f"{k} {v} s" for k, v in result["backups"].items()),
        "",
        "| scenario | the seed promises | measured | within |",
        "|---|---:|---:|---|",
    ]
    for key, (title, low, high) in PROMISES.items():
        seconds = result["scenarios"][key]["seconds"]
        shown = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
        lines.append(f"| {title} | {low}–{high} min | **{shown}** | "
                     f"{'yes' if seconds <= high * 60 else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scenarios")
    parser.add_argument("--profile", choices=["default", "x10", "small"], default="default")
    parser.add_argument("--keep", action="store_true", help="keep the data for --reuse")
    parser.add_argument("--reuse", action="store_true", help="reuse the data of a --keep run")
    parser.add_argument("--only", default=",".join(PROMISES), help="db,server,table,files")
    args = parser.parse_args(argv)
    bench = Scenarios(args)
    result: dict[str, Any] = {"profile": args.profile, "scenarios": {},
                              "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                              "commit": sh("git", "-C", str(ROOT), "rev-parse", "--short",
                                           "HEAD").strip()}
    try:
        result["data"] = bench.setup()
        result["machine"] = machine(bench.work)
        result["backups"] = bench.backups()
        for key in ("server", "files", "db", "table"):  # the volumes first: they need the disk
            if key in args.only.split(","):
                result["scenarios"][key] = bench.timed(key, getattr(bench, key))
    finally:
        bench.teardown(data=not args.keep)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"scenarios-{args.profile}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result) if len(result["scenarios"]) == len(PROMISES) else ""
    if text:
        print(text)
        update_report(args.profile, text, marker="scenarios")
    return 0


if __name__ == "__main__":
    sys.exit(main())
