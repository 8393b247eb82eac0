"""Measuring one operation: wall time, CPU (ours, containers, engine), peak RSS, bytes written.

- wall: from starting the command to reaping it (`os.wait4`).
- cpu_tree: user+sys of the command's own process tree, from `wait4`'s rusage (the process
  and every descendant it waited for). For our side that is the `toybox-backupd` Python process
  (tar-stream parsing, hashing, zstd threads, SQLite); for the baseline only the `docker`/`sh`
  clients, which do almost nothing.
- cpu_containers: what ran inside containers the operation started (tar, zstd, find, pg_dump
  and its server backend), polled every 20 ms from each container's cpuacct cgroup
  (`cpuacct.usage`) until it disappears; for a long-lived container given in `fixed` (the
  PostgreSQL server) the difference between start and end.
- cpu_engine: dockerd + containerd, plus the containerd-shim of each container above; the shims
  and dockerd carry every byte of a `docker exec` stream, so this is where streaming through the
  Docker API costs. dockerd/containerd are shared with anything else using Docker on the
  machine at the same time, so this figure is approximate.
- cpu_daemon: when the command hands its work to a running daemon (`toybox-backupd backup` in
  the sidecar), the daemon's own CPU over the operation (user+sys of the process and its
  reaped children, end minus start), counted in cpu_total so that nothing it does is hidden.
  A container that already runs when the operation starts and matches (the helper the daemon
  keeps between runs) is counted by its cgroup's delta, like `fixed`.
- peak_rss_mb: `ru_maxrss` of the command's process tree (its largest process), or the daemon's
  peak over the operation if larger (its high-water mark is reset first: /proc/PID/clear_refs).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    wall: float
    cpu_tree: float
    cpu_containers: float | None
    cpu_engine: float | None
    peak_rss_mb: float
    bytes_written: int
    exit_code: int
    cpu_daemon: float | None = None
    daemon_rss_mb: float | None = None

    @property
    def cpu_total(self) -> float:
        return self.cpu_tree + (self.cpu_containers or 0.0) + (self.cpu_daemon or 0.0)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_total"] = round(self.cpu_total, 3)
        for key in ("wall", "cpu_tree", "cpu_containers", "cpu_engine", "peak_rss_mb",
                    "cpu_daemon", "daemon_rss_mb"):
            if data[key] is not None:
                data[key] = round(data[key], 3)
        return data


# processes ---------------------------------------------------------------------------------
def proc_cpu(pid: int) -> float | None:
    """user+sys seconds of one process (not its children), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_cpu_all(pid: int) -> float | None:
    """user+sys seconds of one process and of its children it has reaped, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return sum(int(field) for field in fields[11:15]) / TICK


class Daemon:
    """A long-running process the operation hands its work to: its CPU and peak RSS over it."""

    def __init__(self, pid: int):
        self.pid = pid
        self.cpu = 0.0
        self.rss_mb: float | None = None
        self._start: float | None = None

    def __enter__(self) -> Daemon:
        with contextlib.suppress(OSError):  # its high-water mark from now on (Linux >= 4.0)
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self._start = proc_cpu_all(self.pid)
        return self

    def __exit__(self, *_: Any) -> None:
        end = proc_cpu_all(self.pid)
        if self._start is None or end is None:
            raise RuntimeError(f"the daemon (pid {self.pid}) is gone")
        self.cpu = end - self._start
        self.rss_mb = _status_kb(self.pid, "VmHWM") / 1024


def pids_named(names: Iterable[str]) -> list[int]:
    wanted = set(names)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as handle:
                if handle.read().strip() in wanted:
                    found.append(int(entry))
        except OSError:
            continue
    return found


def shim_of(container_id: str) -> int | None:
    needle = b"-id\0" + container_id.encode() + b"\0"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if needle in handle.read():
                    return int(entry)
        except OSError:
            continue
    return None


# cgroups -----------------------------------------------------------------------------------
def _cgroup_layout() -> tuple[Path, Callable[[str], Path | None], Callable[[Path], float]] | None:
    """(directory to list, name → container id, usage file → seconds) for this machine."""
    v1 = Path("/sys/fs/cgroup/cpuacct/docker")
    if v1.is_dir():
        return (v1, lambda name: v1 / name / "cpuacct.usage" if len(name) == 64 else None,
                lambda path: int(path.read_text()) / 1e9)

    def v2(path: Path) -> float:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        return 0.0

    for root, fmt in ((Path("/sys/fs/cgroup/docker"), "{}"),
                      (Path("/sys/fs/cgroup/system.slice"), "docker-{}.scope")):
        if root.is_dir():
            prefix, _, suffix = fmt.partition("{}")

            def usage(name: str, root: Path = root, prefix: str = prefix,
                      suffix: str = suffix) -> Path | None:
                if name.startswith(prefix) and name.endswith(suffix):
                    return root / name / "cpu.stat"
                return None
            return root, usage, v2
    return None


LAYOUT = _cgroup_layout()


def _cid(name: str) -> str:
    return name.removeprefix("docker-").removesuffix(".scope")


class Watch:
    """CPU of the containers an operation starts (matched by `match(inspect)`) and of the engine."""

    def __init__(self, api: Any, match: Callable[[dict[str, Any]], bool],
                 fixed: Iterable[str] = (), interval: float = 0.02):
        self.api = api
        self.match = match
        self.fixed = list(fixed)
        self.interval = interval
        self.known: set[str] = set()
        self.usage: dict[str, float] = {}
        self.base: dict[str, float] = {}
        self.shims: dict[str, tuple[int, float, float]] = {}  # id -> (pid, first, last)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.engine = pids_named(("dockerd", "containerd"))
        self._engine_start: dict[int, float] = {}

    def _read(self, name: str) -> float | None:
        if LAYOUT is None:
            return None
        path = LAYOUT[1](name)
        if path is None:
            return None
        try:
            return LAYOUT[2](path)
        except (OSError, ValueError):
            return None

    def _names(self) -> list[str]:
        try:
            return os.listdir(LAYOUT[0]) if LAYOUT else []
        except OSError:
            return []

    def _fixed_name(self, cid: str) -> str | None:
        for name in self._names():
            if _cid(name).startswith(cid):
                return name
        return None

    def __enter__(self) -> Watch:
        for pid in self.engine:
            value = proc_cpu(pid)
            if value is not None:
                self._engine_start[pid] = value
        ids = []
        for ref in self.fixed:
            with contextlib.suppress(Exception):
                ids.append(self.api.inspect_container(ref)["Id"])
        self.fixed = [name for cid in ids if (name := self._fixed_name(cid))]
        for name in self.fixed:
            self.base[name] = self.usage[name] = self._read(name) or 0.0
            self.known.add(name)
        for name in self._names():  # running already, and ours (a kept helper): its delta
            if name not in self.known:
                self._track(name, already=True)
        self._thread.start()
        return self

    def _track(self, name: str, already: bool = False) -> None:
        self.known.add(name)
        cid = _cid(name)
        try:
            info = self.api.inspect_container(cid)
        except Exception:  # gone already
            return
        if not self.match(info):
            return
        value = self._read(name) or 0.0
        self.usage[name] = value
        if already:
            self.base[name] = value
        pid = shim_of(cid)
        if pid is not None:
            start = proc_cpu(pid) or 0.0
            self.shims[name] = (pid, start if already else 0.0, start)

    def _poll(self) -> None:
        for name in self._names():
            if name not in self.known:
                self._track(name)
        for name in list(self.usage):
            value = self._read(name)
            if value is not None:
                self.usage[name] = value
        for name, (pid, first, _last) in list(self.shims.items()):
            value = proc_cpu(pid)
            if value is not None:
                self.shims[name] = (pid, first, value)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __exit__(self, *_: Any) -> None:
        self._poll()
        self._stop.set()
        self._thread.join()
        self._poll()

    @property
    def containers(self) -> float | None:
        """CPU of the containers started during the operation, and the deltas of those that
        ran already (`fixed`, or matched at the start); a container's last reading counts if it
        has gone since."""
        if LAYOUT is None:
            return None
        return sum(value - self.base.get(name, 0.0) for name, value in self.usage.items())

    @property
    def engine_cpu(self) -> float:
        total = 0.0
        for pid, start in self._engine_start.items():
            end = proc_cpu(pid)
            if end is not None:
                total += end - start
        # a shim's CPU before we first saw it is part of container start-up: count it all
        # (for a container that ran already: what it used during the operation)
        total += sum(last - first for _pid, first, last in self.shims.values())
        return total


# one command -------------------------------------------------------------------------------
def run(cmd: list[str], *, env: dict[str, str] | None = None, watch: Watch | None = None,
        log: Path | None = None, cwd: str | None = None) -> tuple[Sample, int]:
    """Run `cmd` to its end; return its Sample (bytes_written 0: the caller knows) and pid."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, cwd=cwd)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    sample = Sample(
        wall=wall, cpu_tree=usage.ru_utime + usage.ru_stime,
        cpu_containers=None, cpu_engine=None, peak_rss_mb=usage.ru_maxrss / 1024,
        bytes_written=0, exit_code=proc.returncode)
    return sample, proc.pid


def measure(cmd: list[str], *, api: Any, match: Callable[[dict[str, Any]], bool],
            fixed: Iterable[str] = (), env: dict[str, str] | None = None,
            log: Path | None = None, cwd: str | None = None,
            daemon: int | None = None) -> Sample:
    """Run `cmd` and measure it (see the module's docstring); `daemon`: the pid of a daemon
    it may hand its work to, whose CPU and peak RSS over the run are counted too."""
    helper = Daemon(daemon) if daemon is not None else contextlib.nullcontext()
    with Watch(api, match, fixed) as watch, helper:
        sample, _ = run(cmd, env=env, log=log, cwd=cwd)
    sample.cpu_containers = watch.containers
    sample.cpu_engine = watch.engine_cpu
    if isinstance(helper, Daemon):
        sample.cpu_daemon, sample.daemon_rss_mb = helper.cpu, helper.rss_mb
        sample.peak_rss_mb = max(sample.peak_rss_mb, helper.rss_mb or 0.0)
    return sample


def tree_size(root: Path) -> dict[str, int]:
    sizes = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                sizes[path] = os.stat(path).st_size
            except OSError:
                continue
    return sizes


def written(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(size for path, size in after.items() if before.get(path) != size)


# the idle daemon ---------------------------------------------------------------------------
def idle(cmd: list[str], *, env: dict[str, str], seconds: float, warmup: float,
         log: Path) -> dict[str, Any]:
    """Start the daemon, let it settle, then sample its RSS and CPU once a second."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env)
    try:
        time.sleep(warmup)
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited during start-up (see {log})")
        pid = proc.pid
        rss: list[float] = []
        cpu0 = proc_cpu(pid) or 0.0
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            rss.append(_status_kb(pid, "VmRSS") / 1024)
            time.sleep(1.0)
        cpu1 = proc_cpu(pid) or 0.0
        elapsed = time.monotonic() - t0
        hwm = _status_kb(pid, "VmHWM") / 1024
        threads = _status_kb(pid, "Threads")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    rss.sort()
    return {
        "seconds": round(elapsed, 1), "warmup_seconds": warmup,
        "rss_mb_median": round(rss[len(rss) // 2], 1), "rss_mb_max": round(rss[-1], 1),
        "rss_hwm_mb": round(hwm, 1), "threads": threads,
        "cpu_seconds": round(cpu1 - cpu0, 3),
        "cpu_percent": round(100 * (cpu1 - cpu0) / elapsed, 3),
        "exit_code_after_sigterm": proc.returncode,
    }


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0
