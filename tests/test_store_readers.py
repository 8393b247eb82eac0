"""The read-only commands never wait on a writer: `healthcheck` and `status` answer while another
process writes a large file index in one long transaction (as the daemon does after a full of a
volume with millions of files). SQLite in WAL mode: readers see the last commit, never a lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Env

from toybox_backupd.core.basics import iso
from toybox_backupd.daemon import keys
from toybox_backupd.store import Store

# the writer: the daemon's own catalog call (Store.add_files, one transaction), fed rows until
# the test says stop (or WRITER_CAP_S passed); it says when it has begun and when it committed
WRITER = """
import sys, time
from datetime import UTC, datetime
from pathlib import Path
from toybox_backupd.store import Store
state, begun, stop, done, cap = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), \
    Path(sys.argv[4]), float(sys.argv[5])
def rows():
    deadline, i = time.monotonic() + cap, 0
    while True:
        yield (f"uploads/d{i // 1000}/f{i}.jpg", "f", i, i, i, i, 0o644, 0, 0, None, None)
        i += 1
        if i == 200_000:
            begun.write_text("")
        if i % 10_000 == 0 and (stop.exists() or time.monotonic() > deadline):
            return
with Store(state) as store:
    artifact = store.add_artifact(run_id=None, tier="full", target="media", path="f.tar.zst",
                                  created_at=datetime.now(UTC), size=1, sha256="0" * 64)
    store.add_files(artifact, rows())
done.write_text("")
"""
WRITER_CAP_S = 120  # longer than the 30 s busy timeout a reader used to wait out
ANSWER_WITHIN_S = 15  # generous: a reader that waits on the writer takes 30 s or more


class Writer:
    def __init__(self, state_dir: Path, tmp: Path):
        self.begun, self.stop, self.done = tmp / "begun", tmp / "stop", tmp / "done"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(state_dir), str(self.begun), str(self.stop),
             str(self.done), str(WRITER_CAP_S)], env={**os.environ, "PYTHONPATH": str(ROOT)})

    def in_transaction(self) -> bool:
        return self.begun.exists() and not self.done.exists() and self.proc.poll() is None

    def finish(self) -> int:
        self.stop.write_text("")
        return self.proc.wait(WRITER_CAP_S + 30)


@pytest.fixture
def writer(plain_env: Env) -> Iterator[Writer]:
    with Store(plain_env.state_dir) as store:  # a daemon that is alive: healthcheck says healthy
        store.set_state(keys.STATE_HEARTBEAT, iso())
    instance = Writer(plain_env.state_dir, plain_env.tmp)
    yield instance
    if instance.proc.poll() is None:
        instance.proc.kill()
        instance.proc.wait(10)


def timed(env: Env, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = env.cli(*args, timeout=WRITER_CAP_S)
    return result, time.monotonic() - start


def test_healthcheck_and_status_answer_while_a_large_file_index_is_written(
        plain_env: Env, writer: Writer) -> None:
    deadline = time.monotonic() + 60
    while not writer.in_transaction():
        assert writer.proc.poll() is None and time.monotonic() < deadline, "the writer never began"
        time.sleep(0.1)
    health, health_s = timed(plain_env, "healthcheck")
    status, status_s = timed(plain_env, "status", "--json")
    still_writing = writer.in_transaction()
    print(f"while writing: healthcheck {health_s:.2f} s, status {status_s:.2f} s")
    assert health.returncode == 0 and health.stdout.startswith("healthy: heartbeat"), (
        health.stdout + health.stderr)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["daemon"]["heartbeat"] is not None
    assert still_writing, "the writer's transaction ended before both commands answered"
    assert health_s < ANSWER_WITHIN_S and status_s < ANSWER_WITHIN_S, (health_s, status_s)
    assert writer.finish() == 0 and writer.done.exists()
    with Store(plain_env.state_dir) as store:  # the writer really wrote a large index
        count = store.db.execute("SELECT count(*) FROM files").fetchone()[0]
    print(f"the writer's transaction committed {count} rows")
    assert count >= 200_000
