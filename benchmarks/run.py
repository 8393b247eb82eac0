"""toybox-backupd against the standard tools, on the same data, in one run, as ratios.

    python -m benchmarks.run [--small] [--rounds 4]

Builds the data (a ~2 GB media volume of many small and some large files, mostly
incompressible, and a ~500 MB database: pgbench's tables plus an app-like table of text and
jsonb; `--small`: ~200 MB and ~75 MB), then runs
`--rounds` rounds. Each round runs every operation twice, ours and the baseline back to back,
the order swapped every round:

- full: `toybox-backupd backup full` vs `tar -C /vol -cf - . | zstd -3 -T0 -o /out/F && sync F`
  in a helper container that mounts the same volume read-only;
- restore: `toybox-backupd restore volume V --to NEW` vs `zstd -d -c F | tar -C /vol -xf -` into a
  new volume in a helper container (both from our full archive of that round);
- diff (after changing 1 % of the files): `toybox-backupd backup diff` vs GNU tar's level-1
  `--listed-incremental` (snapshot taken at the full) `| zstd -3 -T0` + sync;
- pgdump: `toybox-backupd backup logical` vs `docker exec PG pg_dump -Fc > F && sync F`.

Ours runs as in the sidecar: a daemon (`toybox-backupd run`, no schedules) runs for ours' state
dir during the rounds, and `toybox-backupd backup` (the console script's entry, launcher.py)
hands each backup to it, as `docker compose exec backupd toybox-backupd backup diff` does;
the daemon keeps its helper container between runs (HELPER_KEEP_SECONDS). Ours' CPU includes
the daemon's over each operation and its kept helper's (measure.py); peak RSS is the daemon's
when it is the larger. Restores run in the command's own process, as ever. The peak-RSS probe
at the second size runs in the command's own process (no daemon for its state dir).

Both sides read the same volume (mounted read-only), write to the same disk, use zstd level 3
and fsync what they write; before each timed run the page cache is synced and left to settle
(`--settle`, 3 s). Before the rounds the idle daemon is watched for `--idle-seconds`; in
each round our peak RSS is also taken on a volume a tenth of the size. Results: the medians, the
median per-round ratio ours/baseline, `benchmarks/results/<profile>.json`, and the table in
BENCHMARKS.md (between its `<!-- results:<profile> -->` markers). What is counted as CPU is
described in benchmarks/measure.py. Everything it creates is named `tbb-*` and removed at the
end (`--keep` keeps the data volumes and the PostgreSQL container for another run with
`--reuse`). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import dataset, measure
from .dataset import HELPER_IMAGE, PROBE_OF, PROFILES, Profile
from .measure import Sample

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
REPORT = ROOT / "BENCHMARKS.md"
OPS = ("full", "restore", "diff", "pgdump")
TARGETS = {
    "full": ("wall ≤ 1.10× tar | zstd", 1.10),
    "restore": ("wall ≤ 1.20× zstd -d | tar -x", 1.20),
    "diff": ("wall ≤ 0.10× our own full", 0.10),
    "pgdump": ("wall ≤ 1.05× bare pg_dump -Fc", 1.05),
}
RSS_LIMIT_MB = 150
IDLE_RSS_MB = 80
IDLE_CPU_PERCENT = 0.5


def say(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace):
        import docker

        self.args = args
        self.profile: Profile = PROFILES["small" if args.small else "default"]
        self.probe: Profile = PROFILES[PROBE_OF[self.profile.name]]
        self.tag = "keep" if (args.keep or args.reuse) else secrets.token_hex(3)
        prefix = f"tbb-{self.profile.name}-{self.tag}"
        self.media = f"{prefix}-media"
        self.probe_volume = f"{prefix}-probe"
        self.pg_volume = f"{prefix}-pgdata"
        self.pg = f"{prefix}-pg"
        self.base_prefix = f"tbb-{secrets.token_hex(3)}-base"
        self.work = Path(args.workdir or ROOT / "benchmarks" / "work" / prefix).resolve()
        self.ours_dir = self.work / "ours"
        self.probe_dir = self.work / "probe"
        self.base_dir = self.work / "base"
        self.logs = self.work / "logs"
        self.password = "tbb-keep" if self.tag == "keep" else "tbb-" + secrets.token_urlsafe(12)
        self.port = 0
        self.api = docker.from_env(timeout=300).api
        self.restores: list[str] = []
        self.only = set(args.only.split(","))
        self.code = Path(args.code or ROOT).resolve()
        self.daemon: subprocess.Popen[bytes] | None = None
        self.samples: dict[str, dict[str, list[dict[str, Any]]]] = {
            op: {"ours": [], "baseline": []} for op in OPS}
        self.probe_samples: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {"mutations": [], "restore_checks": []}

    # set-up ------------------------------------------------------------------------------------
    def setup(self) -> None:
        for path in (self.ours_dir, self.probe_dir, self.base_dir, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        (self.work / "none.env").write_text("")
        subprocess.run(["bash", str(ROOT / "tests" / "images" / "build-images.sh")], check=True,
                       capture_output=True)
        data: dict[str, Any] = {"profile": self.profile.as_dict(),
                                "probe_profile": self.probe.as_dict()}
        for volume, profile, seed in ((self.media, self.profile, 1), (self.probe_volume,
                                                                      self.probe, 2)):
            if self.args.reuse and _volume_exists(volume):
                say(f"reusing {volume}")
                continue
            say(f"generating {volume} (~{profile.approx_mb} MB, {profile.files} files)")
            data[volume] = dataset.generate(volume, profile, seed)
        files, size = dataset.summary(self.media)
        data["media"] = {"volume": self.media, "files": files, "bytes": size}
        if self.args.reuse and _container_running(self.pg):
            say(f"reusing {self.pg}")
            port = subprocess.run(["docker", "port", self.pg, "5432/tcp"], check=True,
                                  capture_output=True, text=True).stdout.split(":")[-1]
            self.port = int(port)
        else:
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["docker", "rm", "-f", self.pg], capture_output=True, check=True)
            self.port = dataset.start_pg(self.pg, self.pg_volume, self.password)
            say(f"pgbench -i -s {self.profile.pg_scale} + {self.profile.pg_rows:,} app rows")
            data["pg"] = dataset.pgbench_init(self.pg, self.profile.pg_scale, self.profile.pg_rows)
        size = subprocess.run(
            ["docker", "exec", "-u", "postgres", self.pg, "psql", "-X", "-A", "-t", "-U", "toybox",
             "-d", "toybox", "-c", "SELECT pg_database_size('toybox')"],
            check=True, capture_output=True, text=True).stdout.strip()
        data["pg_database_bytes"] = int(size)
        self.extra["data"] = data
        say(f"data: {self.media} {files} files {size_mb(data['media']['bytes'])}; "
            f"database {size_mb(int(size))}")

    # our side ------------------------------------------------------------------------------------
    def values(self, state: Path) -> dict[str, str]:
        return {
            "BACKUP_DIR": str(state / "backups"), "STATE_DIR": str(state / "state"),
            "TZ": "UTC", "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": "toybox", "POSTGRES_PASSWORD": self.password,
            "POSTGRES_DB": "toybox", "PG_CONTAINER": self.pg, "BACKUP_VOLUMES": self.media,
            "HELPER_IMAGE": HELPER_IMAGE, "PGDUMP_SCHEDULE": "", "VOLUME_FULL_SCHEDULE": "",
            "VOLUME_DIFF_SCHEDULE": "", "NOTIFY_EMAIL_TO": "", "LOG_FORMAT": "console",
            "VOLUME_COMPRESSION": "zstd", "VOLUME_COMPRESSION_LEVEL": "3", "CATCH_UP": "false",
        }

    def environ(self, values: dict[str, str]) -> dict[str, str]:
        env = {**os.environ, **values, "PYTHONPATH": str(self.code)}
        env.pop("TOYBOX_ENV_FILE", None)
        return env

    def cli(self, *args: str) -> list[str]:
        """The `toybox-backupd` command (its console script's entry point; a checkout from
        before the daemon took backups over has only the CLI)."""
        entry = ("toybox_backupd.launcher" if (self.code / "toybox_backupd" / "launcher.py").exists()
                 else "toybox_backupd.cli")
        return [sys.executable, "-m", entry, "--env-file", str(self.work / "none.env"), *args]

    def start_daemon(self) -> None:
        """Ours' daemon, as in the sidecar (no schedules): `backup` hands its runs to it."""
        log = open(self.logs / "ours-daemon.log", "ab")  # noqa: SIM115 - the daemon's lifetime
        self.daemon = subprocess.Popen(self.cli("run"), stdout=log, stderr=log, cwd=str(self.work),
                                       env=self.environ(self.values(self.ours_dir)))
        log.close()
        sock = self.ours_dir / "state" / "daemon.sock"
        deadline = time.monotonic() + 60
        while not sock.exists():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ours' daemon did not start; see {self.logs / 'ours-daemon.log'}")
            time.sleep(0.1)
        say(f"ours' daemon: pid {self.daemon.pid} (backups are handed to it)")

    def stop_daemon(self) -> None:
        """SIGTERM: it removes the helper it keeps (it mounts our volumes) before it exits."""
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.terminate()
        try:
            self.daemon.wait(120)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()

    def ours_match(self, info: dict[str, Any]) -> bool:
        ours = {self.media, self.probe_volume, *self.restores}
        mounts = {m.get("Name") for m in info.get("Mounts", [])}
        return info.get("Name", "").startswith("/toybox-backupd-helper-") and bool(mounts & ours)

    def base_match(self, info: dict[str, Any]) -> bool:
        return info.get("Name", "").startswith("/" + self.base_prefix)

    def ours(self, op: str, args: list[str], state: Path | None = None) -> Sample:
        state = state or self.ours_dir
        backups = state / "backups"
        before = measure.tree_size(backups)
        daemon = self.daemon.pid if self.daemon is not None and state == self.ours_dir else None
        sample = measure.measure(
            self.cli(*args), api=self.api, match=self.ours_match,
            fixed=[self.pg] if op == "pgdump" else (),
            env=self.environ(self.values(state)), log=self.logs / f"ours-{op}.log",
            cwd=str(self.work), daemon=daemon)
        if sample.exit_code != 0:
            raise RuntimeError(f"ours {op} failed (exit {sample.exit_code}); see "
                               f"{self.logs / f'ours-{op}.log'}:\n{_tail(self.logs / f'ours-{op}.log')}")
        sample.bytes_written = measure.written(before, measure.tree_size(backups))
        return sample

    # the baseline ----------------------------------------------------------------------------------
    def container(self, name: str, mounts: list[str], script: str) -> list[str]:
        cmd = ["docker", "run", "--rm", "--name", f"{self.base_prefix}-{name}",
               "--network", "none", "--log-driver", "none"]
        for mount in mounts:
            cmd += ["-v", mount]
        return [*cmd, HELPER_IMAGE, "bash", "-o", "pipefail", "-c", script]

    def baseline(self, op: str, cmd: list[str], output: Path | None) -> Sample:
        sample = measure.measure(cmd, api=self.api, match=self.base_match,
                                 fixed=[self.pg] if op == "pgdump" else (),
                                 log=self.logs / f"baseline-{op}.log", cwd=str(self.work))
        if sample.exit_code != 0:
            raise RuntimeError(f"baseline {op} failed (exit {sample.exit_code}):\n"
                               f"{_tail(self.logs / f'baseline-{op}.log')}")
        if output is not None:
            sample.bytes_written = output.stat().st_size
        return sample

    # the operations ----------------------------------------------------------------------------
    def latest(self, state: Path, tier: str) -> Path:
        out = subprocess.run(self.cli("list", "--json", "--tier", tier),
                             env=self.environ(self.values(state)), capture_output=True,
                             text=True, check=True, cwd=str(self.work)).stdout
        items = json.loads(out)
        return state / "backups" / max(items, key=lambda item: item["id"])["path"]

    def pair(self, op: str, round_: int, ours: Callable[[], Sample],
             baseline: Callable[[], Sample]) -> tuple[Sample, Sample]:
        results: dict[str, Sample] = {}
        order = (("ours", ours), ("baseline", baseline))
        if round_ % 2:
            order = order[::-1]
        for side, run in order:
            os.sync()  # start each timed run with no dirty pages left by the one before
            time.sleep(self.args.settle)
            results[side] = sample = run()
            self.samples[op][side].append({"round": round_, **sample.as_dict()})
            daemon = (f", daemon {sample.cpu_daemon:.2f}" if sample.cpu_daemon is not None
                      else "")
            say(f"  {op:<8} {side:<9} wall {sample.wall:7.2f} s  cpu {sample.cpu_total:7.2f} s"
                f" (+engine {sample.cpu_engine or 0:5.2f}{daemon})  rss {sample.peak_rss_mb:6.1f}"
                f" MB  wrote {size_mb(sample.bytes_written)}")
        return results["ours"], results["baseline"]

    def round(self, r: int) -> None:
        say(f"round {r + 1}/{self.args.rounds}")
        only = self.only
        if {"full", "restore", "diff"} & only:
            self.full(r)
        if "restore" in only:
            self.restore(r)
        if "diff" in only:
            self.diff(r)
        if "pgdump" in only:
            dump = self.base_dir / f"pg-{r}.dump"
            self.pair("pgdump", r, lambda: self.ours("pgdump", ["backup", "logical"]),
                      lambda: self.baseline("pgdump", [
                          "sh", "-c", f"docker exec {self.pg} pg_dump -U toybox -Fc -d toybox"
                          f" > '{dump}' && sync '{dump}'"], dump))
        if {"full", "restore", "diff"} & only:
            # peak RSS at the second size
            probe = self.ours("full", ["backup", "full", "--volume", self.probe_volume],
                              state=self.probe_dir)
            self.probe_samples.append({"round": r, **probe.as_dict()})
            say(f"  probe    ours      wall {probe.wall:7.2f} s  rss {probe.peak_rss_mb:6.1f} MB "
                f"({self.probe.name}, ~{self.probe.approx_mb} MB)")
        # keep the disk tidy: this round's baseline outputs, our archives but the newest
        for path in self.base_dir.glob(f"*-{r}.*"):
            path.unlink()
        for state in (self.ours_dir, self.probe_dir):
            archives = sorted((state / "backups").rglob("*.tar.zst"), key=lambda p: p.stat().st_mtime)
            for path in archives[:-2]:
                path.unlink()

    def full(self, r: int) -> None:
        full_out = self.base_dir / f"full-{r}.tar.zst"
        self.pair("full", r, lambda: self.ours("full", ["backup", "full"]),
                  lambda: self.baseline("full", self.container(
                      f"full-{r}", [f"{self.media}:/vol:ro", f"{self.base_dir}:/out"],
                      f"tar -C /vol -cf - . | zstd -3 -T0 -q -f -o /out/{full_out.name}"
                      f" && sync /out/{full_out.name}"), full_out))

    def restore(self, r: int) -> None:
        """Both sides restore our full archive of this round into a new volume."""
        archive = self.latest(self.ours_dir, "full")
        source = dataset.summary(self.media)
        target_ours, target_base = f"{self.media}-r{r}-ours", f"{self.media}-r{r}-base"
        self.restores += [target_ours, target_base]
        relative = archive.relative_to(self.ours_dir / "backups")
        extract = f"zstd -d -c '/in/{relative}' | tar -C /vol -xf -"
        try:
            self.pair("restore", r,
                      lambda: self.ours("restore", ["restore", "volume", self.media, "--to",
                                                    target_ours, "--yes"]),
                      lambda: self.baseline("restore", self.container(
                          f"restore-{r}", [f"{self.ours_dir / 'backups'}:/in:ro",
                                           f"{target_base}:/vol"], extract), None))
            for side, volume in (("ours", target_ours), ("baseline", target_base)):
                got = dataset.summary(volume)
                self.extra["restore_checks"].append(
                    {"round": r, "side": side, "files": got[0], "bytes": got[1],
                     "same_as_source": got == source})
                if got != source:
                    raise RuntimeError(f"restored {volume} holds {got}, the source {source}")
            for side in ("ours", "baseline"):
                self.samples["restore"][side][-1]["bytes_written"] = source[1]
        finally:
            for volume in (target_ours, target_base):
                _remove_volume(volume)

    def diff(self, r: int) -> None:
        """The baseline's level-0 snapshot (untimed), a day of changes, both differentials."""
        mounts = [f"{self.media}:/vol:ro", f"{self.base_dir}:/out"]
        snapshot = f"snap-{r}"
        subprocess.run(self.container(
            f"snap-{r}", mounts,
            f"tar -C /vol --listed-incremental=/out/{snapshot}.0 --no-check-device -cf /dev/null ."),
            check=True, capture_output=True)
        change = dataset.mutate(self.media, seed=1000 + r)
        self.extra["mutations"].append({"round": r, **change})
        say(f"  changed {change['changed']} of {change['files_before']} files")
        diff_out = self.base_dir / f"diff-{r}.tar.zst"
        self.pair("diff", r, lambda: self.ours("diff", ["backup", "diff"]),
                  lambda: self.baseline("diff", self.container(
                      f"diff-{r}", mounts,
                      f"cp /out/{snapshot}.0 /out/{snapshot}.1 && tar -C /vol"
                      f" --listed-incremental=/out/{snapshot}.1 --no-check-device -cf - ."
                      f" | zstd -3 -T0 -q -f -o /out/{diff_out.name} && sync /out/{diff_out.name}"),
                      diff_out))
        for path in self.base_dir.glob(f"{snapshot}.*"):
            path.unlink()

    def idle(self) -> dict[str, Any]:
        """The daemon with every job scheduled half a year away."""
        month = (datetime.now(UTC).month + 5) % 12 + 1
        far = f"0 3 1 {month} *"
        state = self.work / "idle"
        values = {**self.values(state), "PGDUMP_SCHEDULE": far, "VOLUME_FULL_SCHEDULE": far,
                  "VOLUME_DIFF_SCHEDULE": far}
        say(f"idle daemon: {self.args.idle_seconds:.0f} s (schedules '{far}')")
        result = measure.idle(self.cli("run"), env=self.environ(values),
                              seconds=self.args.idle_seconds, warmup=10.0,
                              log=self.logs / "idle-daemon.log")
        say(f"  idle: rss {result['rss_mb_median']} MB (max {result['rss_mb_max']}), "
            f"cpu {result['cpu_percent']} %")
        return result

    # results ---------------------------------------------------------------------------------
    def summary(self, idle: dict[str, Any] | None) -> dict[str, Any]:
        ops: dict[str, Any] = {}
        for op in OPS:
            ours, base = self.samples[op]["ours"], self.samples[op]["baseline"]
            if not ours:
                continue
            entry: dict[str, Any] = {"ours": medians(ours), "baseline": medians(base)}
            if op == "diff":
                fulls = {s["round"]: s["wall"] for s in self.samples["full"]["ours"]}
                per_round = [s["wall"] / fulls[s["round"]] for s in ours]
                entry["ratio_to_own_full"] = round(statistics.median(per_round), 4)
                entry["ratio_to_own_full_rounds"] = [round(x, 4) for x in per_round]
                measured = entry["ratio_to_own_full"]
            for key in ("wall", "cpu_total", "bytes_written"):
                rounds = [o[key] / b[key] for o, b in zip(ours, base, strict=True) if b[key]]
                if rounds:
                    entry[f"ratio_{key}"] = round(statistics.median(rounds), 4)
                    entry[f"ratio_{key}_rounds"] = [round(x, 4) for x in rounds]
            entry["wall_by_position"] = {
                side: {pos: _median([s["wall"] for s in samples
                                     if (s["round"] % 2 == (0 if side == "ours" else 1)) == first])
                       for pos, first in (("first", True), ("second", False))}
                for side, samples in (("ours", ours), ("baseline", base))}
            if op != "diff":
                measured = entry["ratio_wall"]
            text, limit = TARGETS[op]
            entry["target"] = text
            entry["met"] = measured <= limit
            ops[op] = entry
        all_rss = [s["peak_rss_mb"] for op in OPS for s in self.samples[op]["ours"]]
        rss = {
            "main_size": {"profile": self.profile.name, "approx_mb": self.profile.approx_mb,
                          "full_peak_rss_mb": medians(self.samples["full"]["ours"])["peak_rss_mb"]
                          if self.samples["full"]["ours"] else None},
            "second_size": {"profile": self.probe.name, "approx_mb": self.probe.approx_mb,
                            "full_peak_rss_mb": medians(self.probe_samples)["peak_rss_mb"]
                            if self.probe_samples else None},
            "max_any_op_mb": round(max(all_rss), 1) if all_rss else None,
            "target": f"≤ {RSS_LIMIT_MB} MB whatever the volume size",
        }
        rss["met"] = rss["max_any_op_mb"] is not None and rss["max_any_op_mb"] <= RSS_LIMIT_MB
        if idle:
            idle["target"] = f"≤ {IDLE_RSS_MB} MB RSS and < {IDLE_CPU_PERCENT} % CPU"
            idle["met"] = idle["rss_mb_max"] <= IDLE_RSS_MB and idle["cpu_percent"] < IDLE_CPU_PERCENT
        return {"ops": ops, "rss": rss, "idle": idle}

    def cleanup(self) -> None:
        self.stop_daemon()
        for volume in self.restores:
            _remove_volume(volume)
        subprocess.run(f"docker ps -aq --filter name={self.base_prefix} | xargs -r docker rm -f",
                       shell=True, capture_output=True)
        if not self.args.keep:
            subprocess.run(["docker", "rm", "-f", self.pg], capture_output=True)
            for volume in (self.media, self.probe_volume, self.pg_volume):
                _remove_volume(volume)
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)


def medians(samples: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("wall", "cpu_tree", "cpu_containers", "cpu_daemon", "cpu_total", "cpu_engine",
            "peak_rss_mb", "bytes_written")
    result: dict[str, Any] = {"n": len(samples)}
    for key in keys:
        values = [s[key] for s in samples if s.get(key) is not None]
        result[key] = round(statistics.median(values), 3) if values else None
    return result


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def size_mb(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _volume_exists(name: str) -> bool:
    return subprocess.run(["docker", "volume", "inspect", name], capture_output=True).returncode == 0


def _container_running(name: str) -> bool:
    out = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name],
                         capture_output=True, text=True)
    return out.stdout.strip() == "true"


def _remove_volume(name: str) -> None:
    subprocess.run(["docker", "volume", "rm", "-f", name], capture_output=True)


# the machine -------------------------------------------------------------------------------
def machine(work: Path) -> dict[str, Any]:
    def first(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return "?"
        return out.strip().splitlines()[0] if out.strip() else "?"

    meminfo = Path("/proc/meminfo").read_text().split()
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    df = first(["sh", "-c", f"df -hT '{work}' | tail -1"])
    device = df.split()[0] if df != "?" else "?"
    rotational = "?"
    with contextlib.suppress(OSError, IndexError):
        rotational = Path(f"/sys/block/{Path(device).name}/queue/rotational").read_text().strip()
    return {
        "cores": os.cpu_count(), "cpu": model,
        "memory_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024 / 1024, 1),
        "disk": df, "disk_rotational": rotational, "kernel": platform.release(),
        "os": first(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "docker": first(["docker", "version", "--format", "{{.Server.Version}}"]),
        "cgroup": first(["docker", "info", "--format", "{{.CgroupDriver}} v{{.CgroupVersion}}"]),
        "python": platform.python_version(),
        "zstd_in_helper": first(["docker", "run", "--rm", HELPER_IMAGE, "zstd", "--version"]),
        "tar_in_helper": first(["docker", "run", "--rm", HELPER_IMAGE, "tar", "--version"]),
    }


# the report --------------------------------------------------------------------------------
def render(result: dict[str, Any]) -> str:
    s = result["summary"]
    m = result["machine"]
    data = result["data"]
    lines = [
        f"Run {result['finished_at']} · profile `{result['profile']}` · {result['rounds']} rounds "
        f"(order swapped each round) · commit `{result.get('commit', '?')}`",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB RAM, disk `{m['disk']}` "
        f"(rotational={m['disk_rotational']}), kernel {m['kernel']}, {m['os']}, Docker "
        f"{m['docker']} ({m['cgroup']}), Python {m['python']}, helper: {m['tar_in_helper']}, "
        f"{m['zstd_in_helper']}.",
        "",
        f"Data: media volume {data['media']['files']:,} files, {size_mb(data['media']['bytes'])}; "
        f"PostgreSQL database {size_mb(data.get('pg_database_bytes'))} "
        f"(pgbench scale {data['profile']['pg_scale']} + {data['profile']['pg_rows']:,} rows of "
        f"text/jsonb); differential after changing "
        f"{result['mutations'][0]['changed'] if result['mutations'] else '?'} files (1 %).",
        "",
        "| operation | ours wall | baseline wall | **ratio wall** | ours CPU | baseline CPU "
        "| ratio CPU | engine CPU ours / base | ours peak RSS | written ours / base | target | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    names = {"full": "full", "restore": "restore volume", "diff": "differential (1 %)",
             "pgdump": "pgdump"}
    for op in OPS:
        e = s["ops"].get(op)
        if not e:
            continue
        o, b = e["ours"], e["baseline"]
        ratio = f"**{e['ratio_wall']:.2f}×**"
        if op == "diff":
            ratio += f" (vs own full: **{e['ratio_to_own_full']:.3f}×**)"
        lines.append(
            f"| {names[op]} | {o['wall']:.2f} s | {b['wall']:.2f} s | {ratio} | "
            f"{o['cpu_total']:.2f} s | {b['cpu_total']:.2f} s | {e.get('ratio_cpu_total', 0):.2f}× | "
            f"{o['cpu_engine']:.2f} / {b['cpu_engine']:.2f} s | {o['peak_rss_mb']:.0f} MB | "
            f"{size_mb(o['bytes_written'])} / {size_mb(b['bytes_written'])} | "
            f"{e['target'].replace('|', chr(92) + '|')} | "
            f"{'yes' if e['met'] else '**no**'} |")
    positions = []
    for op in OPS:
        e = s["ops"].get(op)
        if not e or "wall_by_position" not in e:
            continue
        o, b = e["wall_by_position"]["ours"], e["wall_by_position"]["baseline"]
        if None in (o["first"], o["second"], b["first"], b["second"]):
            continue
        if max(o["first"] / o["second"], b["first"] / b["second"]) > 1.3:
            positions.append(
                f"{names[op]}: ours {o['first']:.2f} s when it ran first, {o['second']:.2f} s "
                f"second; baseline {b['first']:.2f} s first, {b['second']:.2f} s second "
                f"(second vs second: {o['second'] / b['second']:.2f}×)")
    if positions:
        lines += ["", "Position effect (whoever runs first in a round is slower): "
                  + "; ".join(positions) + "."]
    rss = s["rss"]
    lines += [
        "",
        f"Peak RSS of `backup full`: **{rss['main_size']['full_peak_rss_mb']:.0f} MB** at "
        f"~{rss['main_size']['approx_mb']} MB ({rss['main_size']['profile']}), "
        f"**{rss['second_size']['full_peak_rss_mb']:.0f} MB** at ~{rss['second_size']['approx_mb']}"
        f" MB ({rss['second_size']['profile']}); largest of any operation "
        f"{rss['max_any_op_mb']:.0f} MB (target {rss['target']}: "
        f"{'met' if rss['met'] else '**missed**'}).",
    ]
    idle = s.get("idle")
    if idle:
        lines += [
            "",
            f"Idle daemon over {idle['seconds']:.0f} s: RSS **{idle['rss_mb_median']:.1f} MB** "
            f"(max {idle['rss_mb_max']:.1f}), CPU **{idle['cpu_percent']:.3f} %** "
            f"({idle['cpu_seconds']:.2f} s), {idle['threads']} threads (target {idle['target']}: "
            f"{'met' if idle['met'] else '**missed**'}).",
        ]
    lines += [
        "",
        "Walls and CPU are medians; a ratio is the median of the per-round ratios. Ours runs "
        "as in the sidecar: `toybox-backupd backup` hands the run to a daemon running for its "
        "state dir (restores run in the command). CPU = the command's process tree (`wait4`) + "
        "the daemon's CPU over the operation + what ran in the containers it started or kept "
        "(cgroup `cpuacct`; for a container that ran already, the daemon's kept helper or for "
        "pgdump the PostgreSQL container, its delta); peak RSS is the daemon's when larger; "
        "engine = dockerd + containerd + the containers' shims (approximate: shared with "
        "anything else on the machine), not included in CPU.",
    ]
    return "\n".join(lines)


def update_report(profile: str, text: str, marker: str = "results") -> bool:
    """Put `text` between BENCHMARKS.md's `<!-- {marker}:{profile} -->` markers."""
    begin, end = f"<!-- {marker}:{profile} -->", f"<!-- /{marker}:{profile} -->"
    if not REPORT.exists():
        return False
    content = REPORT.read_text()
    if begin not in content or end not in content:
        return False
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    REPORT.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="~200 MB volume, ~75 MB database")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds, ours and the baseline back to back, the order swapped each "
                             "round (default 4: an even number, so each side goes first as often)")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to wait after the sync before each timed run")
    parser.add_argument("--only", default=",".join((*OPS, "idle")),
                        help="comma-separated subset of full,restore,diff,pgdump,idle "
                             "(restore and diff need full)")
    parser.add_argument("--workdir", help="backup disk for both sides (default benchmarks/work/)")
    parser.add_argument("--keep", action="store_true", help="keep the data volumes and database")
    parser.add_argument("--reuse", action="store_true", help="reuse data kept by --keep")
    parser.add_argument("--keep-work", action="store_true", help="keep the archives and logs")
    parser.add_argument("--code", metavar="DIR",
                        help="run our side from this checkout (default: this one), for before/after")
    parser.add_argument("--no-report", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--tag", help="write results/<profile>-<tag>.json; BENCHMARKS.md untouched")
    parser.add_argument("--render", metavar="JSON", help="only print the table of a results file")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    bench = Bench(args)
    started = time.monotonic()
    idle = None
    try:
        bench.setup()
        info = machine(bench.work)
        if "idle" in bench.only:
            idle = bench.idle()
        bench.start_daemon()
        for r in range(args.rounds):
            bench.round(r)
    except BaseException:
        traceback.print_exc()
        say(f"logs kept in {bench.logs}")
        bench.args.keep_work = True
        bench.cleanup()
        return 1
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    result = {
        "profile": bench.profile.name, "rounds": args.rounds, "commit": commit,
        "code": str(bench.code), "only": sorted(bench.only),
        "finished_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.monotonic() - started), "machine": info,
        "data": bench.extra["data"], "mutations": bench.extra["mutations"],
        "restore_checks": bench.extra["restore_checks"],
        "summary": bench.summary(idle), "samples": bench.samples, "probe": bench.probe_samples,
    }
    bench.cleanup()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench.profile.name}{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    text = render(result)
    print()
    print(text)
    print()
    say(f"results: {path.relative_to(ROOT)} ({result['seconds']} s)")
    complete = bench.only >= {*OPS, "idle"} and not args.tag and not args.code
    if complete and not args.no_report and update_report(bench.profile.name, text):
        say(f"updated {REPORT.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
