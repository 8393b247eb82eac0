"""Schedules mean what they mean in a crontab(5): checked against hand-written times."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from toybox_backupd.core.schedule import CrontabTrigger, next_times, previous_time

TOKYO = ZoneInfo("Asia/Tokyo")
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def fires(expr: str, zone: ZoneInfo, start: datetime, count: int) -> list[datetime]:
    """The next `count` times from both APIs; they must agree. Returned in UTC."""
    listed = next_times(expr, zone, start, count)
    trigger = CrontabTrigger(expr, zone)
    chained: list[datetime] = []
    previous = None
    for _ in range(count):
        # the scheduler asks "after `previous`" once it has fired, "from now" the first time
        moment = trigger.get_next_fire_time(previous, start + timedelta(microseconds=1))
        assert moment is not None
        chained.append(moment)
        previous = moment
    as_utc = [moment.astimezone(UTC) for moment in listed]
    assert as_utc == [moment.astimezone(UTC) for moment in chained]
    for moment in listed:  # times come back in the schedule's zone
        assert moment.tzinfo is not None and moment.utcoffset() == moment.astimezone(zone).utcoffset()
    return as_utc


def local(zone: ZoneInfo, *parts: int, fold: int = 0) -> datetime:
    return datetime(*parts, tzinfo=zone, fold=fold).astimezone(UTC)  # type: ignore[misc]


def tokyo(*parts: int) -> datetime:
    return local(TOKYO, *parts)


# Mon 2026-01-26 is the reference week: Sun 01-25, Mon 01-26 ... Sun 02-01.
MON = datetime(2026, 1, 26, 0, 0, tzinfo=TOKYO)


@pytest.mark.parametrize("expr", ["0 9 * * 0", "0 9 * * 7", "0 9 * * sun", "0 9 * * SUN"])
def test_sunday_is_0_7_and_sun(expr: str) -> None:
    assert fires(expr, TOKYO, MON, 3) == [
        tokyo(2026, 2, 1, 9, 0), tokyo(2026, 2, 8, 9, 0), tokyo(2026, 2, 15, 9, 0)]


def test_weekday_numbers_start_on_sunday() -> None:
    # 1 is Monday (APScheduler's own CronTrigger would read it as Tuesday)
    assert fires("0 9 * * 1", TOKYO, MON, 2) == [tokyo(2026, 1, 26, 9, 0), tokyo(2026, 2, 2, 9, 0)]
    assert fires("0 9 * * 6", TOKYO, MON, 1) == [tokyo(2026, 1, 31, 9, 0)]


def test_weekday_name_range_mon_fri() -> None:
    friday_evening = datetime(2026, 1, 30, 10, 0, tzinfo=TOKYO)
    assert fires("0 9 * * mon-fri", TOKYO, friday_evening, 4) == [
        tokyo(2026, 2, 2, 9, 0), tokyo(2026, 2, 3, 9, 0), tokyo(2026, 2, 4, 9, 0),
        tokyo(2026, 2, 5, 9, 0)]
    assert fires("0 9 * * 1-5", TOKYO, friday_evening, 1) == [tokyo(2026, 2, 2, 9, 0)]


def test_hour_range() -> None:
    start = datetime(2026, 1, 26, 9, 30, tzinfo=TOKYO)
    assert fires("0 8-10 * * *", TOKYO, start, 4) == [
        tokyo(2026, 1, 26, 10, 0), tokyo(2026, 1, 27, 8, 0), tokyo(2026, 1, 27, 9, 0),
        tokyo(2026, 1, 27, 10, 0)]


def test_steps() -> None:
    start = datetime(2026, 1, 26, 12, 7, tzinfo=TOKYO)
    assert fires("*/15 * * * *", TOKYO, start, 4) == [
        tokyo(2026, 1, 26, 12, 15), tokyo(2026, 1, 26, 12, 30), tokyo(2026, 1, 26, 12, 45),
        tokyo(2026, 1, 26, 13, 0)]
    start = datetime(2026, 1, 26, 12, 0, tzinfo=TOKYO)
    assert fires("1-30/10 * * * *", TOKYO, start, 4) == [
        tokyo(2026, 1, 26, 12, 1), tokyo(2026, 1, 26, 12, 11), tokyo(2026, 1, 26, 12, 21),
        tokyo(2026, 1, 26, 13, 1)]


def test_lists() -> None:
    assert fires("0,30 6,18 * * *", TOKYO, MON, 5) == [
        tokyo(2026, 1, 26, 6, 0), tokyo(2026, 1, 26, 6, 30), tokyo(2026, 1, 26, 18, 0),
        tokyo(2026, 1, 26, 18, 30), tokyo(2026, 1, 27, 6, 0)]


def test_day_of_month_or_day_of_week() -> None:
    # both restricted: the 1st OR any Monday (crontab(5)), not "a Monday that is the 1st"
    start = datetime(2026, 2, 27, 0, 0, tzinfo=TOKYO)  # a Friday; 03-01 is a Sunday
    assert fires("0 12 1 * mon", TOKYO, start, 4) == [
        tokyo(2026, 3, 1, 12, 0), tokyo(2026, 3, 2, 12, 0), tokyo(2026, 3, 9, 12, 0),
        tokyo(2026, 3, 16, 12, 0)]
    # only one restricted: just that one
    assert fires("0 12 1 * *", TOKYO, start, 2) == [tokyo(2026, 3, 1, 12, 0),
                                                     tokyo(2026, 4, 1, 12, 0)]
    assert fires("0 12 * * 1", TOKYO, start, 2) == [tokyo(2026, 3, 2, 12, 0),
                                                     tokyo(2026, 3, 9, 12, 0)]


def test_seed_schedules_in_tokyo() -> None:
    start = datetime(2026, 1, 26, 12, 0, tzinfo=TOKYO)  # Monday noon
    assert fires("0 17 * * *", TOKYO, start, 3) == [
        tokyo(2026, 1, 26, 17, 0), tokyo(2026, 1, 27, 17, 0), tokyo(2026, 1, 28, 17, 0)]
    # 17:00 JST is 08:00 UTC: no DST in Japan
    assert tokyo(2026, 1, 26, 17, 0) == datetime(2026, 1, 26, 8, 0, tzinfo=UTC)
    assert fires("30 17 * * 0", TOKYO, start, 2) == [
        tokyo(2026, 2, 1, 17, 30), tokyo(2026, 2, 8, 17, 30)]
    assert fires("45 17 * * *", TOKYO, start, 3) == [
        tokyo(2026, 1, 26, 17, 45), tokyo(2026, 1, 27, 17, 45), tokyo(2026, 1, 28, 17, 45)]
    # the Sunday full and the daily diff: the full comes first, the diff 15 minutes later
    sunday = datetime(2026, 2, 1, 17, 0, tzinfo=TOKYO)
    assert fires("30 17 * * 0", TOKYO, sunday, 1)[0] < fires("45 17 * * *", TOKYO, sunday, 1)[0]


def test_dst_spring_forward_skipped_time_runs_right_after_the_jump() -> None:
    # Europe/Berlin, Sun 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist
    start = datetime(2026, 3, 28, 12, 0, tzinfo=BERLIN)
    assert fires("30 2 * * *", BERLIN, start, 3) == [
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC),  # 03:00 CEST, right after the jump
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC),  # 02:30 CEST
        datetime(2026, 3, 31, 0, 30, tzinfo=UTC)]
    # a time before the jump is untouched; its UTC time moves by the hour the day after
    assert fires("30 1 * * *", BERLIN, start, 2) == [
        datetime(2026, 3, 29, 0, 30, tzinfo=UTC),  # 01:30 CET
        datetime(2026, 3, 29, 23, 30, tzinfo=UTC)]  # 01:30 CEST
    # a job that runs every 30 minutes simply has no 02:00 and 02:30 that night
    assert fires("*/30 * * * *", BERLIN, datetime(2026, 3, 29, 0, 50, tzinfo=BERLIN), 4) == [
        local(BERLIN, 2026, 3, 29, 1, 0), local(BERLIN, 2026, 3, 29, 1, 30),
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC), datetime(2026, 3, 29, 1, 30, tzinfo=UTC)]


def test_dst_fall_back_fixed_time_runs_once() -> None:
    # Europe/Berlin, Sun 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:xx happens twice
    start = datetime(2026, 10, 24, 12, 0, tzinfo=BERLIN)
    assert fires("30 2 * * *", BERLIN, start, 3) == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),  # 02:30 CEST, the first 02:30 only
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),  # 02:30 CET the next day
        datetime(2026, 10, 27, 1, 30, tzinfo=UTC)]
    # a job with a wildcard hour runs in both 02:00 hours, as in cron
    assert fires("0 * * * *", BERLIN, datetime(2026, 10, 25, 1, 10, tzinfo=BERLIN), 4) == [
        datetime(2026, 10, 25, 0, 0, tzinfo=UTC),  # 02:00 CEST
        datetime(2026, 10, 25, 1, 0, tzinfo=UTC),  # 02:00 CET
        datetime(2026, 10, 25, 2, 0, tzinfo=UTC),  # 03:00 CET
        datetime(2026, 10, 25, 3, 0, tzinfo=UTC)]


def test_dst_new_york() -> None:
    # Sun 2026-03-08 02:00 EST -> 03:00 EDT; Sun 2026-11-01 02:00 EDT -> 01:00 EST
    assert fires("30 2 * * *", NEW_YORK, datetime(2026, 3, 7, 12, 0, tzinfo=NEW_YORK), 2) == [
        datetime(2026, 3, 8, 7, 0, tzinfo=UTC),  # 03:00 EDT
        datetime(2026, 3, 9, 6, 30, tzinfo=UTC)]  # 02:30 EDT
    assert fires("30 1 * * *", NEW_YORK, datetime(2026, 11, 1, 0, 0, tzinfo=NEW_YORK), 2) == [
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC),  # 01:30 EDT, once
        datetime(2026, 11, 2, 6, 30, tzinfo=UTC)]  # 01:30 EST


def test_trigger_fires_at_now_when_now_matches() -> None:
    trigger = CrontabTrigger("0 17 * * *", TOKYO)
    at = datetime(2026, 1, 26, 17, 0, tzinfo=TOKYO)
    assert trigger.get_next_fire_time(None, at) == at
    assert trigger.get_next_fire_time(at, at) == datetime(2026, 1, 27, 17, 0, tzinfo=TOKYO)
    assert "0 17 * * *" in str(trigger) and "Asia/Tokyo" in str(trigger)


def test_previous_time() -> None:
    assert previous_time("0 17 * * *", TOKYO, datetime(2026, 1, 26, 17, 0, tzinfo=TOKYO)) == \
        datetime(2026, 1, 26, 17, 0, tzinfo=TOKYO)
    assert previous_time("0 17 * * *", TOKYO, datetime(2026, 1, 26, 16, 59, tzinfo=TOKYO)) == \
        datetime(2026, 1, 25, 17, 0, tzinfo=TOKYO)
    # Sunday's full, asked on Wednesday
    assert previous_time("30 17 * * 0", TOKYO, datetime(2026, 1, 28, 9, 0, tzinfo=UTC)) == \
        datetime(2026, 1, 25, 17, 30, tzinfo=TOKYO)


def test_cli_schedule_json(plain_env) -> None:  # type: ignore[no-untyped-def]
    result = plain_env.cli("schedule", "--json", TZ="Asia/Tokyo", BACKUP_VOLUMES="media",
                           VOLUME_FULL_SCHEDULE="30 17 * * 0",
                           VOLUME_DIFF_SCHEDULE="45 17 * * *")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["timezone"] == "Asia/Tokyo"
    jobs = {job["job"]: job for job in data["jobs"]}
    assert [job["job"] for job in data["jobs"]] == ["logical", "full", "diff", "base"]
    assert not jobs["base"]["enabled"]  # the base backups of point-in-time recovery: PITR is off
    expected = {"logical": ("0 17 * * *", (17, 0), 1), "full": ("30 17 * * 0", (17, 30), 7),
                "diff": ("45 17 * * *", (17, 45), 1)}
    for name, (expr, (hour, minute), days) in expected.items():
        job = jobs[name]
        assert job["schedule"] == expr and job["enabled"] and job["timezone"] == "Asia/Tokyo"
        times = [datetime.fromisoformat(moment) for moment in job["next"]]
        assert len(times) == 5
        for moment in times:
            assert moment.utcoffset() == timedelta(hours=9)
            assert (moment.hour, moment.minute, moment.second) == (hour, minute, 0)
            if name == "full":
                assert moment.isoweekday() == 7  # Sunday
        gaps = {later - earlier for earlier, later in pairwise(times)}
        assert gaps == {timedelta(days=days)}
        assert times[0] > datetime.now(UTC)
        assert times[0] - datetime.now(UTC) <= timedelta(days=days)
    assert jobs["full"]["targets"] == ["media"]

    off = plain_env.cli("schedule", "--json", VOLUME_DIFF_SCHEDULE="")
    assert off.returncode == 0, off.stderr
    diff = next(job for job in json.loads(off.stdout)["jobs"] if job["job"] == "diff")
    assert diff["enabled"] is False and diff["next"] == []


@pytest.mark.parametrize(("nickname", "fields"), [
    ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"), ("@Daily", "0 0 * * *")])
def test_crontab_nicknames_mean_their_fields(nickname: str, fields: str) -> None:
    from toybox_backupd.core.settings import validate_cron

    assert validate_cron(f"  {nickname} ") == nickname.lower()
    assert fires(nickname, TOKYO, MON, 3) == fires(fields, TOKYO, MON, 3)
    assert previous_time(nickname, TOKYO, MON) == previous_time(fields, TOKYO, MON)


def test_nicknames_in_settings_and_health(monkeypatch: pytest.MonkeyPatch) -> None:
    from toybox_backupd.core import settings
    from toybox_backupd.daemon.health import required_slot
    from toybox_backupd.tiers import registry as jobs

    monkeypatch.setenv("POSTGRES_DB", "toybox")
    monkeypatch.setenv("PGDUMP_SCHEDULE", "@daily")
    monkeypatch.setenv("BACKUP_VOLUMES", "media")
    monkeypatch.setenv("VOLUME_FULL_SCHEDULE", "@reboot")
    loaded = settings.load(None)  # a bad schedule is the job's problem, not start-up's
    assert jobs.get("logical").enabled(loaded)
    problem = jobs.get("full").problem(loaded)
    assert problem is not None and "'@reboot' is not a crontab nickname" in problem
    assert not jobs.get("full").enabled(loaded)
    due = required_slot("@daily", TOKYO, datetime(2026, 1, 26, 12, 0, tzinfo=TOKYO))
    assert due is not None and due.slot == datetime(2026, 1, 26, 0, 0, tzinfo=TOKYO)
