"""The benchmark's data: a media volume like TOYBOX's uploads, and a pgbench database.

The media volume is generated in this process as a tar stream (deterministic, seeded) and
extracted into a Docker volume by a helper container, so nothing depends on the host's paths:

- thumbnails (`uploads/2025/MM/DD/img_*.jpg`): thousands of 1–50 KB random-byte files,
  standing in for already-compressed JPEGs;
- sidecar metadata (`uploads/.../img_*.json`): 1–50 KB JSON, compressible;
- videos (`media/videos/*.mp4`): tens of MB of random bytes, standing in for MP4;
- exports (`data/exports/*.json`): 50–300 KB JSON lines, compressible;
- logs (`logs/app-*.log`): tens of MB of text lines, compressible.

Most bytes are incompressible (as real media is); about a fifth compress 4–6×.
"""

from __future__ import annotations

import io
import random
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

HELPER_IMAGE = "toybox-test/debian:bookworm"
PG_IMAGE = "toybox-test/postgres:15"
KB = 1024
MB = 1024 * 1024
EPOCH_2025 = 1735689600  # 2025-01-01T00:00:00Z


@dataclass(frozen=True)
class Profile:
    name: str
    thumbs: int                 # 1–50 KB random bytes
    metas: int                  # 1–50 KB JSON
    videos: int                 # random bytes, video_mb each
    video_mb: tuple[int, int]
    exports: int                # 50–300 KB JSON lines
    logs: int                   # log_mb each, text
    log_mb: int
    pg_scale: int               # pgbench -i -s
    pg_rows: int                # rows of the app-like `media_items` table (text + jsonb)

    @property
    def files(self) -> int:
        return self.thumbs + self.metas + self.videos + self.exports + self.logs

    @property
    def approx_mb(self) -> int:
        small = (self.thumbs + self.metas) * 25.5 / 1024
        return round(small + self.videos * sum(self.video_mb) / 2 + self.exports * 175 / 1024
                     + self.logs * self.log_mb)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "files": self.files, "approx_mb": self.approx_mb}


PROFILES = {
    # ~2 GB, ~17 000 files, ~18 % of the bytes compressible; database ≈ 500 MB
    "default": Profile("default", thumbs=14000, metas=2500, videos=26, video_mb=(20, 80),
                       exports=800, logs=4, log_mb=40, pg_scale=10, pg_rows=800_000),
    # ~200 MB, ~2 300 files; database ≈ 75 MB
    "small": Profile("small", thumbs=1800, metas=400, videos=3, video_mb=(20, 40),
                     exports=100, logs=1, log_mb=35, pg_scale=2, pg_rows=100_000),
    # ten times "default" (~20 GB, ~170 000 files; database ≈ 4.7 GB): benchmarks.scenarios
    "x10": Profile("x10", thumbs=140000, metas=25000, videos=260, video_mb=(20, 80),
                   exports=8000, logs=40, log_mb=40, pg_scale=100, pg_rows=8_000_000),
    # ~20 MB: the second size of the --small run's memory probe
    "tiny": Profile("tiny", thumbs=200, metas=50, videos=1, video_mb=(10, 10),
                    exports=10, logs=1, log_mb=3, pg_scale=1, pg_rows=1000),
}
PROBE_OF = {"default": "small", "small": "tiny"}


# content -------------------------------------------------------------------------------------
class Text:
    """Realistic-looking JSON lines: a vocabulary, users, paths, numbers (compress ~5×)."""

    ACTIONS = ("upload", "view", "delete", "rename", "share", "login", "logout", "comment")

    def __init__(self, rng: random.Random):
        letters = "abcdefghijklmnopqrstuvwxyz"
        self.rng = rng
        self.words = ["".join(rng.choices(letters, k=rng.randint(3, 10))) for _ in range(4000)]
        self.users = [f"{rng.choice(self.words)}.{rng.choice(self.words)}" for _ in range(2000)]
        self.notes = [" ".join(rng.choices(self.words, k=rng.randint(4, 14))) for _ in range(6000)]
        self.serial = 0

    def line(self) -> str:
        rng = self.rng
        self.serial += 1
        t = time.gmtime(EPOCH_2025 + rng.randrange(365 * 86400))
        return (f'{{"id":{self.serial},"ts":"{time.strftime("%Y-%m-%dT%H:%M:%SZ", t)}",'
                f'"user":"{rng.choice(self.users)}","action":"{rng.choice(self.ACTIONS)}",'
                f'"path":"/uploads/{rng.choice(self.words)}/{rng.choice(self.words)}.jpg",'
                f'"bytes":{rng.randrange(1, 50_000_000)},"status":{rng.choice((200, 200, 201, 404))},'
                f'"note":"{rng.choice(self.notes)}"}}\n')

    def bytes(self, size: int) -> bytes:
        parts: list[str] = []
        have = 0
        while have < size:
            line = self.line()
            parts.append(line)
            have += len(line)
        return "".join(parts).encode()[:size]


class Source(io.RawIOBase):
    """A file object of `size` bytes made on demand by `make(n)`."""

    def __init__(self, size: int, make: Callable[[int], bytes]):
        super().__init__()
        self.remaining = size
        self.make = make

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self.remaining
        n = min(n, self.remaining, 4 * MB)
        self.remaining -= n
        return self.make(n) if n else b""


# volumes ---------------------------------------------------------------------------------------
@dataclass
class Entry:
    path: str
    size: int
    text: bool


def plan(profile: Profile, seed: int) -> list[Entry]:
    rng = random.Random(seed)
    entries: list[Entry] = []

    def day_dir(i: int) -> str:
        t = time.gmtime(EPOCH_2025 + (i % 365) * 86400)
        return f"uploads/{t.tm_year}/{t.tm_mon:02d}/{t.tm_mday:02d}"

    for i in range(profile.thumbs):
        entries.append(Entry(f"{day_dir(i)}/img_{i:06d}.jpg", rng.randint(KB, 50 * KB), False))
    for i in range(profile.metas):
        entries.append(Entry(f"{day_dir(i)}/img_{i:06d}.json", rng.randint(KB, 50 * KB), True))
    for i in range(profile.videos):
        entries.append(Entry(f"media/videos/vid_{i:04d}.mp4",
                             rng.randint(profile.video_mb[0] * MB, profile.video_mb[1] * MB), False))
    for i in range(profile.exports):
        entries.append(Entry(f"data/exports/export_{i:05d}.json", rng.randint(50 * KB, 300 * KB),
                             True))
    for i in range(profile.logs):
        entries.append(Entry(f"logs/app-{i}.log", profile.log_mb * MB, True))
    return entries


def write_tar(entries: list[Entry], volume: str, seed: int, mtime: float | None = None) -> int:
    """Extract `entries` (generated content) into `volume`; return the bytes written."""
    rng = random.Random(seed)
    text = Text(random.Random(seed + 1))
    proc = subprocess.Popen(
        ["docker", "run", "--rm", "-i", "--network", "none", "-v", f"{volume}:/vol",
         HELPER_IMAGE, "tar", "-x", "-C", "/vol", "-f", "-"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    total = 0
    with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.copybufsize = MB  # type: ignore[attr-defined]
        for entry in entries:
            info = tarfile.TarInfo(entry.path)
            info.size = entry.size
            info.mode = 0o644
            info.uid = info.gid = 1000
            info.uname = info.gname = ""
            info.mtime = int(mtime if mtime is not None
                             else EPOCH_2025 + rng.randrange(365 * 86400))
            make = text.bytes if entry.text else rng.randbytes
            tar.addfile(info, Source(entry.size, make))
            total += entry.size
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"extracting the generated data into {volume} failed")
    return total


def listing(volume: str) -> list[tuple[str, int]]:
    """(path, size) of every regular file in `volume`."""
    out = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "-v", f"{volume}:/vol:ro", HELPER_IMAGE,
         "find", "/vol", "-type", "f", "-printf", r"%s %P\0"],
        check=True, capture_output=True).stdout
    result = []
    for item in out.split(b"\0"):
        if item:
            size, _, path = item.decode().partition(" ")
            result.append((path, int(size)))
    return result


def generate(volume: str, profile: Profile, seed: int) -> dict[str, object]:
    subprocess.run(["docker", "volume", "create", volume], check=True, capture_output=True)
    started = time.monotonic()
    entries = plan(profile, seed)
    total = write_tar(entries, volume, seed)
    return {"volume": volume, "files": len(entries), "bytes": total,
            "compressible_bytes": sum(e.size for e in entries if e.text),
            "seconds": round(time.monotonic() - started, 1)}


def mutate(volume: str, seed: int, fraction: float = 0.01) -> dict[str, int]:
    """Change `fraction` of the files (by count) the way uploads change.

    70 % of the changed files are rewritten (same size, new content and mtime), 20 % are new
    uploads, 10 % are deleted; all of them among the small upload files (thumbnails and their
    JSON sidecars), as in a day of a web app's life. Returns what was done.
    """
    rng = random.Random(seed)
    files = listing(volume)
    small = sorted(p for p in files if p[0].startswith("uploads/"))
    count = max(3, round(len(files) * fraction))
    n_new, n_del = max(1, count * 2 // 10), max(1, count // 10)
    n_mod = count - n_new - n_del
    chosen = rng.sample(small, n_mod + n_del)
    modified, deleted = chosen[:n_mod], chosen[n_mod:]
    now = time.time()
    entries = [Entry(path, size, path.endswith(".json")) for path, size in modified]
    entries += [Entry(f"uploads/2026/01/{1 + k % 28:02d}/new_{seed}_{k:05d}.jpg",
                      rng.randint(KB, 50 * KB), False) for k in range(n_new)]
    written = write_tar(entries, volume, seed, mtime=now)
    names = b"".join(p.encode() + b"\0" for p, _ in deleted)
    subprocess.run(["docker", "run", "--rm", "-i", "--network", "none", "-v", f"{volume}:/vol",
                    HELPER_IMAGE, "sh", "-c", "cd /vol && xargs -0 rm -f --"],
                   input=names, check=True, capture_output=True)
    return {"files_before": len(files), "changed": count, "rewritten": n_mod, "new": n_new,
            "deleted": n_del, "bytes_written": written}


def summary(volume: str) -> tuple[int, int]:
    """(regular files, total bytes of regular files) in `volume`."""
    files = listing(volume)
    return len(files), sum(size for _, size in files)


# PostgreSQL -------------------------------------------------------------------------------------
def start_pg(name: str, volume: str, password: str) -> int:
    """Start a PostgreSQL container; return its loopback port once it accepts connections."""
    subprocess.run(
        ["docker", "run", "-d", "--name", name, "-e", "POSTGRES_USER=toybox",
         "-e", f"POSTGRES_PASSWORD={password}", "-e", "POSTGRES_DB=toybox",
         "-v", f"{volume}:/var/lib/postgresql/data", "-p", "127.0.0.1::5432",
         "--shm-size=1g", PG_IMAGE],  # parallel index builds of the x10 table need > 64 MB
        check=True, capture_output=True)
    port = subprocess.run(["docker", "port", name, "5432/tcp"], check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[0].rsplit(":", 1)[1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready = subprocess.run(["docker", "exec", name, "pg_isready", "-h", "127.0.0.1",
                                "-U", "toybox", "-d", "toybox"], capture_output=True)
        if ready.returncode == 0:
            return int(port)
        time.sleep(0.5)
    raise RuntimeError(f"PostgreSQL in {name} did not become ready")


APP_TABLE = """
CREATE TABLE media_items (
  id bigserial PRIMARY KEY, user_id int NOT NULL, path text NOT NULL, title text NOT NULL,
  meta jsonb NOT NULL, created timestamptz NOT NULL);
INSERT INTO media_items(user_id, path, title, meta, created)
SELECT (random() * 100000)::int,
       'uploads/2025/' || lpad((1 + i % 12)::text, 2, '0') || '/' || md5(i::text) || '.jpg',
       'photo ' || substr(md5(random()::text), 1, (8 + random() * 24)::int),
       jsonb_build_object('w', (random() * 4000)::int, 'h', (random() * 3000)::int,
                          'camera', 'cam-' || (random() * 50)::int,
                          'tags', jsonb_build_array(substr(md5(random()::text), 1, 6),
                                                    substr(md5(random()::text), 1, 9)),
                          'sha256', md5(random()::text) || md5(random()::text)),
       timestamptz '2025-01-01' + random() * interval '365 days'
FROM generate_series(1, {rows}) i;
CREATE INDEX ON media_items (user_id);
CREATE INDEX ON media_items (created);
VACUUM ANALYZE media_items;
"""


def pgbench_init(name: str, scale: int, rows: int) -> dict[str, object]:
    """pgbench's tables (very compressible) plus an app-like table of text and jsonb."""
    started = time.monotonic()
    subprocess.run(["docker", "exec", "-u", "postgres", name, "pgbench", "-i", "-q",
                    "-s", str(scale), "-U", "toybox", "toybox"], check=True, capture_output=True)
    made = subprocess.run(["docker", "exec", "-i", "-u", "postgres", name, "psql", "-X", "-q",
                           "-v", "ON_ERROR_STOP=1", "-U", "toybox", "-d", "toybox"],
                          input=APP_TABLE.replace("{rows}", str(rows)).encode(), capture_output=True)
    if made.returncode != 0:
        raise RuntimeError(f"the app table could not be made: {made.stderr.decode()[-2000:]}")
    size = subprocess.run(
        ["docker", "exec", "-u", "postgres", name, "psql", "-X", "-A", "-t", "-U", "toybox",
         "-d", "toybox", "-c", "SELECT pg_database_size('toybox')"],
        check=True, capture_output=True, text=True).stdout.strip()
    return {"pgbench_scale": scale, "media_items_rows": rows, "database_bytes": int(size),
            "seconds": round(time.monotonic() - started, 1)}
