"""docker_api.Exec against a real engine: exit codes, stdin, streams that stay silent a while."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import BASE_IMAGE

from toybox_backupd.adapters import docker_api


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


def test_a_helper_ends_by_itself_after_its_lifetime(images: Any) -> None:
    """A killed run cannot leave a helper holding a volume for ever (it used `sleep infinity`)."""
    import time

    with docker_api.helper(BASE_IMAGE, {}, "test", "test-owner", lifetime=2) as box:
        name = box.name
        assert docker_api.container_state(box.id) == "running"
        deadline = time.monotonic() + 30
        while docker_api.container_state(box.id) is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert docker_api.container_state(box.id) is None, f"{name} still there"


def test_a_missing_helper_image_is_named_and_never_pulled(images: Any) -> None:
    with pytest.raises(docker_api.DockerError) as info, docker_api.helper(
            "toybox-test/no-such-image:1", {}, "test", "test-owner"):
        pass
    text = str(info.value)
    assert "'toybox-test/no-such-image:1' is not on this Docker engine" in text
    assert "HELPER_IMAGE" in text and "500" not in text and "registry" not in text


def _capabilities(box: Any) -> set[int]:
    result, out = docker_api.run(box, ["sh", "-c", "grep CapEff /proc/self/status"])
    assert result.exit_code == 0, result.stderr
    mask = int(out.split()[1], 16)
    return {bit for bit in range(64) if mask >> bit & 1}


def test_helpers_keep_only_the_capabilities_tar_needs(images: Any, docker_engine: Any) -> None:
    """Reading: DAC_READ_SEARCH (2) only. Writing back: CHOWN 0, DAC_OVERRIDE 1,
    DAC_READ_SEARCH 2, FOWNER 3, FSETID 4, MKNOD 27. No network, a read-only root."""
    name = f"tbt-caps-{secrets.token_hex(4)}"
    docker_engine.volumes.create(name)
    try:
        with docker_api.helper(BASE_IMAGE, {name: ("/vol", "ro")}, "test", "test-owner") as box:
            assert _capabilities(box) == {2}
            wrote, _ = docker_api.run(box, ["sh", "-c", "touch /root-is-read-only"])
            assert wrote.exit_code != 0 and "Read-only file system" in wrote.stderr
            net, out = docker_api.run(box, ["sh", "-c", "ls /sys/class/net"])
            assert net.exit_code == 0 and out.split() == [b"lo"]
        with docker_api.helper(BASE_IMAGE, {name: ("/vol", "rw")}, "test", "test-owner") as box:
            assert _capabilities(box) == {0, 1, 2, 3, 4, 27}
            made, _ = docker_api.run(box, ["sh", "-c", "echo x > /vol/f && chown 999:999 /vol/f"])
            assert made.exit_code == 0, made.stderr
    finally:
        docker_engine.volumes.get(name).remove(force=True)


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
