"""How much of a full archive's cost is the `docker exec` stream? A what-if, not the product.

    python -m benchmarks.transport --volume NAME [--rounds 3]

Archives the whole volume three ways, alternating, each writing a zstd -3 archive (fsynced)
to the same disk:

- exec: what toybox-backupd does today: GNU tar in a helper container writes to stdout, the
  stream comes back over `docker exec` (dockerd + containerd-shim carry every byte), and is
  indexed, hashed, compressed and written by the package's own tarstream/archive code;
- fifo: the same Python pipeline, but tar writes into a named pipe in a directory that the
  helper container bind-mounts, so the bytes go from tar to this process through the kernel
  only; `docker exec` just starts tar and reports its exit status;
- fifo+writer: as fifo, and the compressed output is written and sha256-hashed by a second
  thread (hashlib and file writes release the GIL), off the thread that parses and hashes the
  tar stream;
- baseline: `tar | zstd -3 -T0 -o F && sync F` inside the helper container.

It prints wall, CPU of this process, of the containers and of the engine (see measure.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from toybox_backupd.adapters import docker_api
from toybox_backupd.core import atomic, compression, tarstream

from .dataset import HELPER_IMAGE
from .measure import Watch

RESULTS = Path(__file__).resolve().parent / "results"
TAR = ["tar", "--create", "--format=posix", "--numeric-owner", "--ignore-failed-read",
       "--pax-option=delete=atime", "--xattrs", "--directory=/vol"]


def _pipeline(chunks: Iterator[bytes], out: Path, threaded: bool = False) -> int:
    members = 0
    with atomic.AtomicFile(out) as target:
        writer = atomic.WriteBehind(target) if threaded else None
        with compression.compressor(writer or target, "zstd", 3) as sink:
            reader = tarstream.TeeReader(chunks, sink)
            for _member in tarstream.members(reader):
                members += 1
            reader.drain()
        if writer:
            writer.finish()
        target.commit()
    return members


def _fifo_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as pipe:
        while chunk := pipe.read(atomic.CHUNK):
            yield chunk


def run_exec(volume: str, out: Path, api: Any) -> dict[str, Any]:
    with docker_api.helper(HELPER_IMAGE, {volume: ("/vol", "ro")}, "tbb-transport") as helper:
        proc = docker_api.Exec(helper, [*TAR, "--file=-", "."])
        members = _pipeline(proc.stdout(), out)
        result = proc.wait()
    return {"members": members, "exit": result.exit_code}


def run_fifo(volume: str, out: Path, api: Any, threaded: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tbb-fifo-", dir=out.parent) as scratch:
        fifo = Path(scratch) / "stream"
        os.mkfifo(fifo)
        client = docker_api.client()
        helper = client.containers.run(
            HELPER_IMAGE, ["sleep", "infinity"], detach=True, network_mode="none",
            volumes={volume: {"bind": "/vol", "mode": "ro"}, scratch: {"bind": "/xfer", "mode": "rw"}},
            labels={docker_api.HELPER_LABEL: "tbb-transport"}, entrypoint=[], user="0:0",
            name=f"toybox-backupd-helper-tbb-{os.getpid()}", log_config={"type": "none"})
        try:
            proc = docker_api.Exec(helper, [*TAR, "--file=/xfer/stream", "."])
            done: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: done.update(r=proc.wait(timeout=3600)))
            thread.start()
            members = _pipeline(_fifo_chunks(fifo), out, threaded)
            thread.join()
        finally:
            helper.remove(force=True, v=True)
    return {"members": members, "exit": done["r"].exit_code}


def run_baseline(volume: str, out: Path, api: Any) -> dict[str, Any]:
    name = out.name
    code = subprocess.run(
        ["docker", "run", "--rm", "--name", f"tbb-transport-base-{os.getpid()}", "--network",
         "none", "-v", f"{volume}:/vol:ro", "-v", f"{out.parent}:/out", HELPER_IMAGE, "bash",
         "-o", "pipefail", "-c", f"tar -C /vol -cf - . | zstd -3 -T0 -q -f -o /out/{name}"
         f" && sync /out/{name}"], capture_output=True).returncode
    return {"exit": code}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transport",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--volume", required=True, help="a Docker volume to archive")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=str(Path(__file__).parent / "work"))
    args = parser.parse_args(argv)
    api = docker_api.client().api
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ways: dict[str, Callable[[str, Path, Any], dict[str, Any]]] = {
        "exec": run_exec, "fifo": run_fifo,
        "fifo+writer": lambda v, o, a: run_fifo(v, o, a, threaded=True),
        "baseline": run_baseline}
    results: dict[str, list[dict[str, float]]] = {way: [] for way in ways}

    def match(info: dict[str, Any]) -> bool:  # every container here mounts the volume
        return any(m.get("Name") == args.volume for m in info.get("Mounts", []))

    with tempfile.TemporaryDirectory(prefix="tbb-transport-", dir=work) as scratch:
        for r in range(args.rounds):
            order = list(ways) if r % 2 == 0 else list(ways)[::-1]
            for way in order:
                out = Path(scratch) / f"{way.replace('+', '-')}.tar.zst"

                before = os.times()
                with Watch(api, match) as watch:
                    started = time.perf_counter()
                    info = ways[way](args.volume, out, api)
                    wall = time.perf_counter() - started
                after = os.times()
                own = (after.user - before.user) + (after.system - before.system)
                own += (after.children_user - before.children_user
                        + after.children_system - before.children_system)
                row = {"wall": wall, "cpu_process": own, "cpu_containers": watch.containers or 0.0,
                       "cpu_engine": watch.engine_cpu, "size": out.stat().st_size}
                results[way].append(row)
                print(f"round {r + 1} {way:<11} wall {wall:6.2f} s  process {own:5.2f} s  "
                      f"containers {row['cpu_containers']:5.2f} s  engine {row['cpu_engine']:5.2f} s"
                      f"  {row['size'] / 1e6:8.1f} MB  {info}", flush=True)
                out.unlink()
    print("\nmedians:")
    medians = {}
    for way, rows in results.items():
        med = {key: round(statistics.median(row[key] for row in rows), 3) for key in rows[0]}
        medians[way] = med
        print(f"  {way:<11} wall {med['wall']:6.2f} s  process {med['cpu_process']:5.2f} s  "
              f"containers {med['cpu_containers']:5.2f} s  engine {med['cpu_engine']:5.2f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "transport.json").write_text(json.dumps({
        "volume": args.volume, "rounds": args.rounds,
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "medians": medians, "samples": results}, indent=2) + "\n")
    print(f"results: {RESULTS / 'transport.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
