"""The sidecar's image builds without a Debian mirror when its base already has what the
runtime needs (tini included): only what the base lacks is installed (issue 17, item 6)."""

from __future__ import annotations

import contextlib
import subprocess
from typing import Any

import pytest
from conftest import BASE_IMAGE, ROOT, unique

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

FULL_BASE = """\
FROM {base}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
      python3 python3-venv tini >/dev/null \\
 && rm -rf /var/lib/apt/lists/*
"""


def build(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "build", "--network", "host", *args], input=stdin,
                          capture_output=True, text=True, timeout=1500)


def test_a_base_that_has_tini_builds_without_a_debian_mirror(docker_engine: Any,
                                                              images: dict[str, str]) -> None:
    base, image = unique("tbt-i17-base"), unique("tbt-i17-image")
    try:
        made = build("-t", base, "-", stdin=FULL_BASE.format(base=BASE_IMAGE))
        assert made.returncode == 0, made.stderr[-3000:]
        # Debian's mirror is unreachable for this build; PyPI is not
        result = build("--add-host", "deb.debian.org:127.0.0.1", "--build-arg",
                       f"BASE_IMAGE={base}", "-t", image, str(ROOT))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out = docker_engine.containers.run(
            image, ["sh", "-c", "toybox-backupd --version && id -u && tini --version && "
                                "readlink -f /usr/bin/tini && zstd --version"], remove=True)
        text = out.decode()
        assert "toybox-backupd 0." in text and "10001" in text and "tini version" in text
        # and the mirror really was out of reach: a package the base lacks cannot be had
        probe = docker_engine.containers.run(
            base, ["sh", "-c", "apt-get update -qq 2>&1; echo rc=$?"], remove=True, user="root",
            extra_hosts={"deb.debian.org": "127.0.0.1"}, network_mode="bridge")
        assert "rc=0" not in probe.decode() or "Failed" in probe.decode()
    finally:
        for tag in (image, base):
            with contextlib.suppress(Exception):
                docker_engine.images.remove(tag, force=True)
