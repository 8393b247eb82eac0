"""Chat messages (Apprise, NOTIFY_URLS) and dead-man's-switch pings (PING_URL) go through the
same outbox as email: delivered to a real HTTP receiver on 127.0.0.1, retried while it is down,
tokens never stored or logged."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from http_receiver import Receiver
from pydantic import SecretStr
from test_new_tier import SnapshotSettings, snapshot  # noqa: F401 - the fake tier's fixture
from test_notify import make_run, outbox

from toybox_backupd.actions import runner
from toybox_backupd.core.basics import utcnow
from toybox_backupd.notify import channels
from toybox_backupd.notify import outbox as notify
from toybox_backupd.store import Store

TOKEN = "tok" + secrets.token_hex(12)
PING_ID = "5f2c" + secrets.token_hex(14)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.start()
    yield server
    server.stop()


def chat_env(plain_env: Any, receiver: Receiver, **extra: str) -> Any:
    plain_env.values.update({"NOTIFY_URLS": f"json://127.0.0.1:{receiver.port}/hook/{TOKEN}",
                             **extra})
    return plain_env


def logged(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    return out + err


def no_token_in(history: Store, *texts: str) -> None:
    rows = json.dumps([{k: v for k, v in row.items() if k != "message"} for row in outbox(history)])
    for text in (rows, *texts):
        assert TOKEN not in text and PING_ID not in text


def test_chat_messages_arrive_for_success_and_failure(
        plain_env: Any, receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    settings = chat_env(plain_env, receiver).settings()
    with Store(settings.state_dir) as history:
        notify.after_run(settings, history, make_run(history))
        notify.after_run(settings, history, make_run(
            history, status="failed", error="pg_dump exited 1: connection refused"))
        ok, failed = receiver.wait_for(2)
        rows = outbox(history)
        no_token_in(history, logged(capsys))
    assert ok.method == "POST" and ok.path == f"/hook/{TOKEN}"
    good, bad = json.loads(ok.body), json.loads(failed.body)
    assert good["type"] == "success" and good["title"].startswith("[toybox-backupd] OK logical")
    assert "OK: logical backup (pg_dump) of toybox on " in good["message"]
    assert "Size: 120.6 KiB" in good["message"] and "Next logical run" in good["message"]
    assert bad["type"] == "failure" and "FAILED logical" in bad["title"]
    assert "Error: pg_dump exited 1: connection refused" in bad["message"]
    assert [(row["channel"], row["status"]) for row in rows] == [("apprise", "sent")] * 2
    assert rows[0]["recipients"] == f"json://127.0.0.1:{receiver.port}"


def test_notify_on_failure_holds_back_the_chat_message_of_a_success(
        plain_env: Any, receiver: Receiver) -> None:
    settings = chat_env(plain_env, receiver, NOTIFY_ON="failure").settings()
    with Store(settings.state_dir) as history:
        notify.after_run(settings, history, make_run(history))
        notify.after_run(settings, history, make_run(history, status="failed", error="boom"))
        assert [row["channel"] for row in outbox(history)] == ["apprise"]
    [only] = receiver.wait_for(1)
    assert json.loads(only.body)["type"] == "failure"


def test_chat_receiver_down_then_back_is_retried_and_delivered_once(
        plain_env: Any, receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    settings = chat_env(plain_env, receiver).settings()
    receiver.stop()
    with Store(settings.state_dir) as history:
        notify.after_run(settings, history, make_run(history, status="failed", error="disk full"))
        [row] = outbox(history)
        assert row["status"] == "retrying" and row["attempts"] == 1
        assert row["last_error"].startswith("not delivered: A Connection error occurred")
        receiver.start()
        assert notify.flush_outbox(settings, history) == 0  # not due yet
        later = utcnow() + timedelta(minutes=1, seconds=5)
        assert notify.flush_outbox(settings, history, now=later) == 1
        assert notify.flush_outbox(settings, history, now=later + timedelta(hours=1)) == 0
        [row] = outbox(history)
        no_token_in(history, logged(capsys))
    assert row["status"] == "sent" and row["attempts"] == 2
    [received] = receiver.wait_for(1)
    assert "Error: disk full" in json.loads(received.body)["message"]
    assert len(receiver.requests) == 1


def test_bad_notify_urls_are_named_without_their_tokens(plain_env: Any) -> None:
    plain_env.values["NOTIFY_URLS"] = f"json://h/{TOKEN} not-a-url"
    result = plain_env.cli("check")
    assert result.returncode == 2
    assert "NOTIFY_URLS: 1 of the 2 entries are not URLs" in result.stderr
    assert TOKEN not in result.stderr + result.stdout
    plain_env.values["NOTIFY_URLS"] = f"json://h/{TOKEN}, nosuchservice://x/{TOKEN}"
    result = plain_env.cli("check")
    assert result.returncode == 1
    [line] = [line for line in result.stdout.splitlines() if " chat " in line]
    assert line.startswith("FAIL  chat") and "entry 2: 'nosuchservice'… is not a URL Apprise" in line
    assert TOKEN not in result.stderr + result.stdout


# pings -------------------------------------------------------------------------------------------
def pinged(settings: SnapshotSettings, receiver: Receiver, var: str = "ping_url") -> Any:
    return settings.model_copy(update={var: SecretStr(f"{receiver.url}/ping/{PING_ID}")})


def test_scheduled_runs_ping_start_then_success_or_fail(
        snapshot: SnapshotSettings, receiver: Receiver,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = pinged(snapshot, receiver)
    good = runner.run_job(settings, "snapshot", trigger="schedule")
    start, success = receiver.wait_for(2)
    assert (start.method, start.path) == ("POST", f"/ping/{PING_ID}/start")
    assert (success.method, success.path) == ("POST", f"/ping/{PING_ID}")
    assert success.body.decode() == f"toybox-backupd snapshot run #{good} (schedule): success"

    broken = settings.model_copy(update={"snapshot_dirs": str(Path(snapshot.snapshot_dirs) / "gone")})
    bad = runner.run_job(broken, "snapshot", trigger="catchup")
    start, fail = receiver.wait_for(4)[2:]
    assert start.path == f"/ping/{PING_ID}/start"
    assert fail.path == f"/ping/{PING_ID}/fail"
    assert fail.body.decode().startswith(f"toybox-backupd snapshot run #{bad} (catchup): fail: ")
    assert "is not a directory" in fail.body.decode()

    runner.run_job(settings, "snapshot")  # manual: the dead-man's switch is not told
    with Store(settings.state_dir) as history:
        assert notify.flush_outbox(settings, history) == 0
        assert len(receiver.requests) == 4
        assert [row["status"] for row in outbox(history)] == ["sent"] * 4
        no_token_in(history, logged(capsys))


def test_a_job_ping_url_overrides_and_a_down_monitor_gets_the_end_later(
        snapshot: SnapshotSettings, receiver: Receiver) -> None:  # noqa: F811
    settings = snapshot.model_copy(update={"ping_url": SecretStr("http://127.0.0.1:9/other"),
                                           "ping_url_snapshot": SecretStr(
                                               f"{receiver.url}/ping/{PING_ID}")})
    receiver.stop()
    run_id = runner.run_job(settings, "snapshot", trigger="schedule")
    with Store(settings.state_dir) as history:
        rows = outbox(history)
        assert [(row["subject"], row["status"]) for row in rows] == [
            ("start (PING_URL_SNAPSHOT)", "retrying"), ("success (PING_URL_SNAPSHOT)", "retrying")]
        assert "cannot reach the monitor at 127.0.0.1" in rows[0]["last_error"]
        receiver.start()
        later = utcnow() + timedelta(minutes=1, seconds=5)
        assert notify.flush_outbox(settings, history, now=later) == 1
        start, end = outbox(history)
    # the start of a run that has ended is dropped: the monitor hears the end only
    assert start["status"] == "given_up" and "superseded" in start["last_error"]
    assert end["status"] == "sent" and end["run_id"] == run_id
    [received] = receiver.wait_for(1)
    assert received.path == f"/ping/{PING_ID}"


def test_ping_urls_follow_healthchecks_and_uptime_kuma() -> None:
    hc = "https://hc-ping.com/" + PING_ID
    assert channels.ping_target(hc, "start", "x") == (hc + "/start", b"x")
    assert channels.ping_target(hc + "/", "success", "x") == (hc, b"x")
    assert channels.ping_target(hc, "fail", "x") == (hc + "/fail", b"x")
    kuma = f"https://kuma.example/api/push/{PING_ID}?status=up&msg=OK&ping="
    assert channels.ping_target(kuma, "start", "x") is None
    assert channels.ping_target(kuma, "fail", "disk full") == (
        f"https://kuma.example/api/push/{PING_ID}?ping=&status=down&msg=disk+full", None)


@pytest.mark.docker
def test_a_real_logical_run_pings_and_chats(env: Any, pg: Any, receiver: Receiver,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    settings = env.settings(NOTIFY_URLS=f"json://127.0.0.1:{receiver.port}/hook/{TOKEN}",
                            PING_URL=f"{receiver.url}/ping/{PING_ID}")
    run_id = runner.run_job(settings, "logical", trigger="schedule")
    start, chat, success = receiver.wait_for(3)
    assert start.path == f"/ping/{PING_ID}/start"
    assert chat.path == f"/hook/{TOKEN}"
    message = json.loads(chat.body)
    assert message["type"] == "success" and f"schedule run #{run_id}" in message["message"]
    assert "Artifact: logical/toybox/toybox_" in message["message"]
    assert success.path == f"/ping/{PING_ID}"
    with Store(settings.state_dir) as history:
        assert history.run(run_id).status == "ok"  # type: ignore[union-attr]
        no_token_in(history, logged(capsys))


def test_notify_test_sends_a_chat_message_to_each_url(plain_env: Any, receiver: Receiver) -> None:
    plain_env.values["NOTIFY_URLS"] = (f"json://127.0.0.1:{receiver.port}/hook/{TOKEN} "
                                       f"json://127.0.0.1:9/down/{TOKEN}")
    result = plain_env.cli("notify", "test")
    assert result.returncode == 1  # one of the two did not go through
    assert result.stdout.strip() == f"test message sent to json://127.0.0.1:{receiver.port}"
    assert result.stderr.startswith("test message NOT sent to json://127.0.0.1:9: ")
    assert TOKEN not in result.stdout + result.stderr
    [received] = receiver.wait_for(1)
    assert json.loads(received.body)["title"].startswith("[toybox-backupd] test message from ")
