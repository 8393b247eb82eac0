"""End to end: the shipped compose files, the seed's four recovery scenarios, a stop mid-backup.

What runs: the project's image built from its Dockerfile (on the local Debian base), started by
Debian's docker-compose (v1) from the SHIPPED docker-compose.yml plus docker-compose.demo.yml (the
stand-in TOYBOX stack: PostgreSQL seeded by tests/e2e/initdb, an app owning a media volume, a mail
catcher) plus tests/e2e/docker-compose.test.yml (test-only: external network, fast health check,
labels). The settings are .env.example with a few values changed, in a temporary project
directory under a unique project name; the backups go to a bind-mounted host directory there.
Every command goes through `docker-compose exec -T backupd toybox-backupd ...`, as an operator's
would.

Mail: a real SMTP server (aiosmtpd from Debian) runs as the demo's `mail` service on the test
network, storing messages in a Maildir that the test reads through `docker exec`.

The stop in the middle of a full archive relies on the daemon's start-up recovery: the backup is
run by `docker-compose exec` (a process beside the daemon), so stopping the container kills it
outright with the database container still stopped; when backupd comes back, recovery starts the
database container again and records the run as interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import BASE_IMAGE, IN_CI, PG_IMAGE, ROOT

E2E = ROOT / "tests" / "e2e"
IMAGE = "toybox-backupd:test"
SMTP_IMAGE = "toybox-backupd-smtp:test"
HASH_LABEL = "toybox-backupd.test.source-hash"
TEST_LABEL = "toybox-backupd.test"
UID = 10001  # the image's backupd user
TABLES = ("users", "orders", "media_items")
RECIPIENTS = {"maki@ayatori-inc.co.jp", "tech@ayatori-inc.co.jp"}
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.demo.yml", "docker-compose.test.yml")

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]


def _log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


# images -----------------------------------------------------------------------------------------
def _tree_hash(paths: list[Path], *extra: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    for item in extra:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:32]


def _build_context_files() -> list[Path]:
    """What .dockerignore lets into the build: pyproject.toml and the package."""
    files = [ROOT / "Dockerfile", ROOT / ".dockerignore", ROOT / "pyproject.toml"]
    for path in (ROOT / "toybox_backupd").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            files.append(path)
    return files


def _ensure_image(client: Any, tag: str, digest: str, build: list[str]) -> float:
    """Build `tag` unless an image with this source hash exists; return the seconds spent."""
    with contextlib.suppress(Exception):
        if client.images.get(tag).labels.get(HASH_LABEL) == digest:
            return 0.0
    started = time.monotonic()
    _log(f"building {tag}")
    result = subprocess.run(
        ["docker", "build", "--network", "host", "--label", f"{HASH_LABEL}={digest}",
         "-t", tag, *build], capture_output=True, text=True, timeout=1500)
    if result.returncode != 0:
        pytest.fail(f"docker build of {tag} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return time.monotonic() - started


@pytest.fixture(scope="module")
def e2e_images(docker_engine: Any, images: dict[str, str]) -> dict[str, str]:
    base_id = docker_engine.images.get(BASE_IMAGE).id
    seconds = _ensure_image(
        docker_engine, IMAGE, _tree_hash(_build_context_files(), base_id),
        ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", str(ROOT)])
    seconds += _ensure_image(
        docker_engine, SMTP_IMAGE, _tree_hash([E2E / "smtp.Dockerfile"], base_id),
        ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-f", str(E2E / "smtp.Dockerfile"), str(E2E)])
    _log(f"images ready ({seconds:.0f} s building)")
    return {"backupd": IMAGE, "smtp": SMTP_IMAGE}


# the compose project ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env_file(example: str, overrides: dict[str, str]) -> str:
    """.env.example with `overrides` applied (keys not in it are appended)."""
    lines, seen = [], set()
    for line in example.splitlines():
        key = line.split("=", 1)[0] if "=" in line and not line.lstrip().startswith("#") else None
        if key in overrides:
            lines.append(f"{key}={overrides[key]}")
            seen.add(key)
        else:
            lines.append(line)
    lines += [f"{key}={value}" for key, value in overrides.items() if key not in seen]
    return "\n".join(lines) + "\n"


@dataclass
class Stack:
    project: str
    directory: Path
    network: str
    password: str
    pg_volume: str
    media_volume: str
    client: Any
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def backups(self) -> Path:
        return self.directory / "backups"

    # docker-compose ------------------------------------------------------------------------
    def compose(self, *args: str, check: bool = True, timeout: float = 300,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
        files = [arg for name in COMPOSE_FILES for arg in ("-f", name)]
        # a clean environment: only .env feeds compose's ${...}, as on an operator's host
        environ = {key: os.environ[key] for key in ("PATH", "HOME", "DOCKER_HOST") if key in os.environ}
        result = subprocess.run(
            ["docker-compose", "-p", self.project, *files, *args], cwd=self.directory,
            capture_output=True, text=True, timeout=timeout, env=environ, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def tool(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`docker-compose exec -T backupd toybox-backupd ARGS`."""
        started = time.monotonic()
        result = self.compose("exec", "-T", "backupd", "toybox-backupd", *args, check=False,
                              timeout=timeout)
        first = (result.stdout.strip().splitlines() or [""])[0][:160]
        _log(f"toybox-backupd {' '.join(args)} -> {result.returncode} "
             f"({time.monotonic() - started:.1f} s) {first}")
        if check and result.returncode != 0:
            raise AssertionError(f"toybox-backupd {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def sh(self, service: str, script: str, user: str = "root") -> str:
        result = self.compose("exec", "-T", "-u", user, service, "sh", "-euc", script)
        return result.stdout

    def container(self, service: str) -> Any:
        ids = self.compose("ps", "-q", service).stdout.split()
        assert ids, f"no container for service {service}"
        return self.client.containers.get(ids[0])

    def state(self, service: str) -> str:
        container = self.container(service)
        container.reload()
        return str(container.status)

    # PostgreSQL ---------------------------------------------------------------------------
    def psql(self, sql: str, db: str = "toybox") -> str:
        result = self.compose("exec", "-T", "-u", "postgres", "postgres", "psql", "-X", "-q", "-A",
                              "-t", "-v", "ON_ERROR_STOP=1", "-U", "toybox", "-d", db, "-c", sql)
        return result.stdout.strip()

    def table(self, name: str) -> list[str]:
        return self.psql(f"SELECT t::text FROM {name} t ORDER BY 1").splitlines()

    def rows(self) -> dict[str, list[str]]:
        return {name: self.table(name) for name in TABLES}

    def wait_pg(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.compose("exec", "-T", "postgres", "pg_isready", "-h", "127.0.0.1",
                                  "-U", "toybox", "-d", "toybox", check=False, timeout=30)
            if result.returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError("PostgreSQL did not become ready:\n"
                             + self.compose("logs", "--tail", "50", "postgres", check=False).stdout)

    # media ----------------------------------------------------------------------------------
    def media(self) -> dict[str, str]:
        """{relative path: sha256} of every file in the media volume, seen from the app."""
        out = self.sh("app", "cd /srv/media && find . -type f -print0 | xargs -0 -r sha256sum")
        return {line[66:].removeprefix("./"): line[:64] for line in out.splitlines() if line}

    def wait_file(self, service: str, path: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.compose("exec", "-T", service, "test", "-e", path, check=False)
            if result.returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"{path} did not appear in {service}")

    # the sidecar ---------------------------------------------------------------------------
    def health(self) -> str:
        container = self.container("backupd")
        container.reload()
        return str(container.attrs["State"].get("Health", {}).get("Status", "none"))

    def wait_backupd(self, timeout: float = 60) -> None:
        """Until the daemon has started (its container runs and the CLI answers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state("backupd") == "running":
                result = self.compose("exec", "-T", "backupd", "toybox-backupd", "history",
                                      "--json", check=False, timeout=60)
                if result.returncode == 0:
                    return
            time.sleep(0.5)
        raise AssertionError("backupd did not come up:\n" + self.logs("backupd"))

    def history(self) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = json.loads(self.tool("history", "--json", "--limit", "100").stdout)
        return runs

    def mail(self) -> list[dict[str, str]]:
        script = (
            "import json, mailbox\n"
            "box = mailbox.Maildir('/mail', create=False)\n"
            "print(json.dumps([{k: str(m.get(k, '')) for k in ('Subject', 'To', 'From', 'X-RcptTo')}"
            " for m in box]))\n")
        result = self.compose("exec", "-T", "mail", "python3", "-c", script)
        messages: list[dict[str, str]] = json.loads(result.stdout)
        return messages

    def logs(self, service: str = "backupd", tail: int = 120) -> str:
        result = self.compose("logs", "--no-color", "--tail", str(tail), service, check=False)
        return result.stdout[-12000:]

    def volumes(self) -> set[str]:
        return {v.name for v in self.client.volumes.list()
                if v.name in (self.pg_volume, self.media_volume) or v.name.startswith(self.project)}

    def leaked_volumes(self, since: datetime) -> list[str]:
        """Anonymous volumes created since `since` that no container uses any more."""
        leaked = []
        for volume in self.client.volumes.list(filters={"dangling": True}):
            created = datetime.fromisoformat(volume.attrs["CreatedAt"].replace("Z", "+00:00"))
            if re.fullmatch(r"[0-9a-f]{64}", volume.name) and created >= since:
                leaked.append(volume.name)
        return leaked

    def helpers(self) -> list[Any]:
        return [c for c in self.client.containers.list(all=True,
                                                       filters={"label": "toybox-backupd.helper"})
                if any(m.get("Name") in (self.pg_volume, self.media_volume)
                       for m in c.attrs.get("Mounts", []))]


@pytest.fixture(scope="module")
def stack(docker_engine: Any, e2e_images: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which("docker-compose") is None:
        message = "docker-compose (v1, Debian's package) is not installed"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    project = "tbte2e" + uuid.uuid4().hex[:8]
    directory = tmp_path_factory.mktemp("e2e-project")
    for name in ("docker-compose.yml", "docker-compose.demo.yml"):
        shutil.copy(ROOT / name, directory / name)
    shutil.copy(E2E / "docker-compose.test.yml", directory / "docker-compose.test.yml")
    shutil.copytree(E2E / "initdb", directory / "tests" / "e2e" / "initdb")
    backups = directory / "backups"
    backups.mkdir()
    os.chown(backups, UID, UID)  # README: the backup directory belongs to uid 10001
    directory.chmod(0o755)

    network = f"{project}_toybox"
    docker_engine.networks.create(network, driver="bridge", labels={TEST_LABEL: "e2e"})
    password = "e2e-" + uuid.uuid4().hex[:12]
    st = Stack(project=project, directory=directory, network=network, password=password,
               pg_volume=f"{project}_postgres_data", media_volume=f"{project}_media",
               client=docker_engine)
    overrides = {
        "TOYBOX_NETWORK": network,
        "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
        "BACKUP_HOST_DIR": "./backups",
        "BACKUPD_IMAGE": IMAGE,
        "BACKUPD_BASE_IMAGE": BASE_IMAGE,
        "BACKUPD_STOP_GRACE_PERIOD": "5s",
        # nothing fires by itself during the test: every run below is started by hand
        "PGDUMP_SCHEDULE": "0 3 1 1 *",
        "VOLUME_FULL_SCHEDULE": "30 3 1 1 *",
        "VOLUME_DIFF_SCHEDULE": "45 3 1 1 *",
        "CATCH_UP": "false",
        # only the label on the database container makes it stop during a volume archive
        "STOP_DURING_BACKUP": "",
        "POSTGRES_USER": "toybox",
        "POSTGRES_PASSWORD": password,
        "POSTGRES_DB": "toybox",
        "DEMO_POSTGRES_IMAGE": PG_IMAGE,
        "DEMO_APP_IMAGE": BASE_IMAGE,
        "DEMO_MAIL_IMAGE": SMTP_IMAGE,
        "DEMO_MAIL_UI_PORT": str(_free_port()),
        "DEMO_VOLUME_PREFIX": project,
        "DEMO_NETWORK": network,
    }
    (directory / ".env").write_text(
        _env_file((ROOT / ".env.example").read_text(encoding="utf-8"), overrides), encoding="utf-8")
    try:
        started = time.monotonic()
        st.compose("up", "-d", timeout=300)
        st.wait_pg()
        st.wait_file("app", "/srv/media/.demo-seeded")
        st.wait_backupd()
        st.timings["up"] = time.monotonic() - started
        _log(f"stack {project} up in {st.timings['up']:.1f} s")
        yield st
    finally:
        _teardown(st)


def _teardown(st: Stack) -> None:
    with contextlib.suppress(Exception):
        st.compose("down", "-v", "--remove-orphans", "-t", "3", check=False, timeout=180)
    client = st.client
    with contextlib.suppress(Exception):
        for container in client.containers.list(
                all=True, filters={"label": f"com.docker.compose.project={st.project}"}):
            container.remove(force=True)
    with contextlib.suppress(Exception):
        for container in st.helpers():
            container.remove(force=True, v=True)
    for name in (st.pg_volume, st.media_volume, f"{st.project}_state"):
        with contextlib.suppress(Exception):
            client.volumes.get(name).remove(force=True)
    with contextlib.suppress(Exception):
        client.networks.get(st.network).remove()
    # the backups belong to uid 10001 and may hold root-owned restored files: remove them here
    shutil.rmtree(st.directory / "backups", ignore_errors=True)


# the test ---------------------------------------------------------------------------------------
def _runs_by_id(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(run["id"]): run for run in runs}


def _run_id(output: str) -> int:
    match = re.search(r"run (\d+)", output)
    assert match, f"no run id in {output!r}"
    return int(match.group(1))


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
        run_ids.append(_run_id(result.stdout))
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

    # 5. scenario 2: the server is lost -> only the backup directory is left ----------------
    started = time.monotonic()
    st.compose("down", "-v", "-t", "5", timeout=180)
    assert not st.volumes(), st.volumes()  # database, media and the sidecar's state: all gone
    assert (st.backups / "volumes").is_dir()
    shutil.rmtree(st.backups / "restore")
    st.compose("up", "-d", "backupd", "mail", timeout=180)
    st.wait_backupd()
    assert st.history() == []  # a new catalog: nothing known yet
    result = st.tool("reindex")
    assert int(re.search(r"(\d+) artifact", result.stdout).group(1)) >= 7  # type: ignore[union-attr]
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

    # 6. `docker-compose stop backupd` in the middle of a full archive of the database volume
    started = time.monotonic()
    # incompressible ballast in the database volume, and the slowest zstd level for this one run,
    # so that the archive of the database volume lasts long enough to be interrupted
    st.sh("postgres", "head -c 200M /dev/urandom > /var/lib/postgresql/data/e2e-ballast.bin")
    pg_archives = st.backups / "volumes" / st.pg_volume
    postgres = st.container("postgres")
    runner = subprocess.Popen(
        ["docker-compose", "-p", st.project, *[a for n in COMPOSE_FILES for a in ("-f", n)],
         "exec", "-T", "-e", "VOLUME_COMPRESSION_LEVEL=19", "backupd",
         "toybox-backupd", "backup", "full"],
        cwd=st.directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ})
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
        _log("the database volume is being archived (database stopped); stopping backupd")
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
    # helper containers run the sidecar's image, whose VOLUME lines make anonymous volumes:
    # they go with the helpers
    assert not st.leaked_volumes(test_started)
    _log("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


def test_env_example_lists_every_setting() -> None:
    """.env.example names every variable of settings.py, and loads as valid settings."""
    from toybox_backupd.settings import Settings, load

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
