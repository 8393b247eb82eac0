"""Off-site upload benchmark: our S3Target.put against boto3's own `upload_file`, on a real S3
server (SeaweedFS on loopback, tests/s3_server.py).

For each size (default 2048 and 256 MiB of incompressible data, written once) three variants
upload the same file, each in a fresh subprocess:

- baseline: `client.upload_file(path, ...)` with boto3's default TransferConfig (reads the
  seekable file by parts, 8 MiB parts, 10 threads);
- ours: `S3Target.put(key, file)`: the file read as a non-seekable stream, hashed (sha256 of
  all, MD5 of each part) and verified against the server's ETag afterwards (a HEAD);
- ours+age: the same through `crypto.encrypting` (age, X25519).

Measured in the child: wall seconds of the upload alone (client set up before) and the growth
of the process's RSS during it (VmHWM at the end minus VmRSS before: the peak extra memory).
Ratios are ours/baseline (wall). Results: benchmarks/results/offsite-upload.json.

    python benchmarks/offsite_upload.py [--sizes 2048,256] [--rounds 1] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("baseline", "ours", "ours+age")
MIB = 1024 * 1024
sys.path.insert(0, str(ROOT / "tests"))


def status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def make_file(path: Path, size_mib: int) -> None:
    """Incompressible bytes (urandom), really written (no holes)."""
    with path.open("wb") as handle:
        for _ in range(size_mib):
            handle.write(os.urandom(MIB))


# the child: one upload ------------------------------------------------------------------------
def child(variant: str, path: Path, endpoint: str, bucket: str) -> dict[str, Any]:
    from s3_server import ACCESS_KEY, REGION, SECRET_KEY

    env = {"OFFSITE_URL": f"s3://{bucket}/bench", "S3_ENDPOINT_URL": endpoint, "S3_REGION": REGION,
           "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "POSTGRES_DB": "toybox", "BACKUP_VOLUMES": "", "VOLUME_FULL_SCHEDULE": "",
           "VOLUME_DIFF_SCHEDULE": "", "NOTIFY_EMAIL_TO": "",
           "BACKUP_DIR": str(path.parent / "b"), "STATE_DIR": str(path.parent / "s")}
    os.environ.update(env)
    import pyrage

    from toybox_backupd.core import settings
    from toybox_backupd.places.offsite import crypto
    from toybox_backupd.places.offsite.s3 import S3Target

    target = S3Target(settings.load(None, strict=False))
    client = target._client
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    key = f"{variant}-{path.name}"
    before = status_kib("VmRSS")
    began = time.monotonic()
    verified = None
    if variant == "baseline":
        client.upload_file(str(path), bucket, f"bench/{key}")
    elif variant == "ours":
        with path.open("rb") as source:
            verified = target.put(key, source).verified_by
    else:
        with path.open("rb") as source, crypto.encrypting(source, [recipient]) as stream:
            verified = target.put(key, stream).verified_by
    wall = time.monotonic() - began
    peak = status_kib("VmHWM")
    client.delete_object(Bucket=bucket, Key=f"bench/{key}")
    return {"wall": round(wall, 3), "rss_growth_mb": round((peak - before) / 1024, 1),
            "peak_rss_mb": round(peak / 1024, 1), "verified_by": verified}


def run_child(variant: str, path: Path, endpoint: str, bucket: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--file", str(path), "--endpoint", endpoint,
         "--bucket", bucket], capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# the parent ---------------------------------------------------------------------------------
def bench_size(server: Any, work: Path, size_mib: int, rounds: int) -> dict[str, Any]:
    path = work / f"data-{size_mib}m.bin"
    print(f"writing {size_mib} MiB of random data to {path}", flush=True)
    make_file(path, size_mib)
    bucket = f"bench-{size_mib}m"
    server.client().create_bucket(Bucket=bucket)
    samples: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    try:
        for round_ in range(rounds):  # alternating order: no variant always goes first
            for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
                sample = run_child(variant, path, server.endpoint, bucket)
                samples[variant].append(sample)
                print(f"  {size_mib} MiB round {round_ + 1} {variant:9} {sample['wall']:7.2f} s "
                      f"{size_mib / sample['wall']:7.1f} MiB/s  RSS +{sample['rss_growth_mb']} MB "
                      f"({sample['verified_by'] or 'unverified'})", flush=True)
    finally:
        path.unlink()
    best = {variant: sorted(rows, key=lambda row: row["wall"])[(len(rows) - 1) // 2]  # median
            for variant, rows in samples.items()}
    ratios = {variant: round(best[variant]["wall"] / best["baseline"]["wall"], 3)
              for variant in VARIANTS[1:]}
    return {"size_mib": size_mib, "best": best, "ratio_wall_vs_baseline": ratios, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,256", help="MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dir", help="scratch directory (data file and SeaweedFS data)")
    parser.add_argument("--tag", help="write results/offsite-upload-<tag>.json")
    parser.add_argument("--child", choices=VARIANTS)
    parser.add_argument("--file")
    parser.add_argument("--endpoint")
    parser.add_argument("--bucket")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.file), args.endpoint, args.bucket)))
        return
    from s3_server import S3Server

    from toybox_backupd.places.offsite import s3

    work = Path(tempfile.mkdtemp(prefix="toybox-offsite-bench-", dir=args.dir))
    server = S3Server(work / "seaweedfs")
    server.start()
    try:
        runs = [bench_size(server, work, int(size), args.rounds) for size in args.sizes.split(",")]
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    result = {"finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cpus": os.cpu_count(), "rounds": args.rounds,
              "part_size_mib": s3.PART_SIZE // MIB, "grow_every_parts": s3.GROW_EVERY,
              "concurrency": s3.CONCURRENCY, "spool_mib": s3.SPOOL // MIB,
              "seaweedfs_startup_s": round(server.startup_seconds or 0, 2), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    name = f"offsite-upload-{args.tag}.json" if args.tag else "offsite-upload.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        print(f"{run['size_mib']} MiB: ours/baseline wall {run['ratio_wall_vs_baseline']}, RSS growth "
              + ", ".join(f"{v} +{run['best'][v]['rss_growth_mb']} MB" for v in VARIANTS))
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
