"""docker_api.Exec against a real engine: exit codes, stdin, streams that stay silent a while."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import BASE_IMAGE

from toybox_backupd import docker_api


@pytest.fixture
def short_api_timeout(monkeypatch: pytest.MonkeyPatch, images: Any) -> Iterator[None]:
    monkeypatch.setenv("DOCKER_CLIENT_TIMEOUT", "2")
    docker_api.client.cache_clear()
    yield
    docker_api.client.cache_clear()


def test_exit_status_stderr_and_stdin(images: Any) -> None:
    with docker_api.helper(BASE_IMAGE, {}, "test", "test-owner") as box:
        result, out = docker_api.run(box, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (result.exit_code, result.stderr, out) == (3, "err", b"out\n")
        proc = docker_api.Exec(box, ["sh", "-c", "wc -c; exit 5"], stdin=True)
        proc.feed(iter([b"x" * 1_000_000] * 5))
        output = b"".join(proc.stdout())
        assert proc.wait().exit_code == 5 and output.strip() == b"5000000"


def test_streams_outlive_the_api_timeout(short_api_timeout: None) -> None:
    """A silent reader or writer for longer than DOCKER_CLIENT_TIMEOUT is not an error."""
    with docker_api.helper(BASE_IMAGE, {}, "test", "test-owner") as box:
        quiet = docker_api.Exec(box, ["sh", "-c", "sleep 4; echo late"])
        assert b"".join(quiet.stdout()) == b"late\n" and quiet.wait().exit_code == 0
        # stdin far larger than the socket buffers, read only after a pause
        slow = docker_api.Exec(box, ["sh", "-c", "sleep 4; wc -c"], stdin=True)
        slow.feed(iter([b"y" * 1_000_000] * 16))
        out = b"".join(slow.stdout())
        assert slow.wait().exit_code == 0 and out.strip() == b"16000000"


def test_input_that_does_not_all_arrive_is_an_error(images: Any) -> None:
    """A command that stops reading its stdin and exits 0 did not do what it was given."""
    with docker_api.helper(BASE_IMAGE, {}, "test", "test-owner") as box:
        proc = docker_api.Exec(box, ["sh", "-c", "head -c 1000 >/dev/null; echo done"],
                               stdin=True)
        proc.feed(iter([b"z" * 1_000_000] * 64))
        assert b"".join(proc.stdout()) == b"done\n"
        with pytest.raises(docker_api.DockerError, match="did not take all of its input"):
            proc.wait()
        # told that it may stop early (e.g. pg_restore --list reads only the table of contents)
        lazy = docker_api.Exec(box, ["sh", "-c", "head -c 1000 >/dev/null; echo done"],
                               stdin=True)
        lazy.feed(iter([b"z" * 1_000_000] * 64), partial_ok=True)
        assert b"".join(lazy.stdout()) == b"done\n" and lazy.wait().exit_code == 0
