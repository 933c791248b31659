"""Periodic schedules: cron parsing, the next tick in a time zone (daylight-saving changes
included), intervals, deterministic tick ids. Pure logic: no server."""

from __future__ import annotations

import datetime as dt
import uuid
from zoneinfo import ZoneInfo

import pytest

from hedwig_tasks.exceptions import ConfigurationError
from hedwig_tasks.periodic import Cron, Schedule

UTC = dt.timezone.utc
PARIS = ZoneInfo("Europe/Paris")


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, tz: dt.tzinfo = UTC) -> int:
    return int(dt.datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp())


def cron(text: str, tz: str | None = None) -> Schedule:
    return Schedule.build("cleanup", "1.0", cron=text, tz=tz)


def test_fields_ranges_steps_lists_and_names() -> None:
    parsed = Cron.parse("*/15 9-17/4 1,15,28-31 jan,Jul-sep mon-FRI,7")
    assert parsed.minutes == {0, 15, 30, 45}
    assert parsed.hours == {9, 13, 17}
    assert parsed.days == {1, 15, 28, 29, 30, 31}
    assert parsed.months == {1, 7, 8, 9}
    assert parsed.weekdays == {0, 1, 2, 3, 4, 5}  # 7 is Sunday, 0
    assert Cron.parse("5/20 * * * *").minutes == {5, 25, 45}  # a/n runs to the field's end
    assert Cron.parse("@hourly").minutes == {0} and Cron.parse("@daily").hours == {0}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("* * * *", "expected 5 fields"),
        ("60 * * * *", "outside the minute field's 0-59"),
        ("* 5-3 * * *", "runs backwards"),
        ("*/0 * * * *", "step '0'"),
        ("* * * * funday", "not a number or a name"),
        ("* * * mon *", "not a number or a name"),  # a weekday's name in the month field
        ("0 0 31 2,4 *", "no month of the year has that day"),
    ],
)
def test_bad_expressions_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ConfigurationError, match=why):
        Cron.parse(text)


def _brute_next(parsed: Cron, t: int) -> int:
    minute = (t // 60 + 1) * 60
    while True:
        d = dt.datetime.fromtimestamp(minute, UTC)
        if d.minute in parsed.minutes and d.hour in parsed.hours and d.month in parsed.months and parsed.day_matches(d):
            return minute
        minute += 60


@pytest.mark.parametrize(
    "text",
    ["*/5 * * * *", "0 */3 * * *", "7,23 4-6 * * *", "30 12 * * mon,wed", "0 0 13 * fri", "15 1 1-3 * *", "@hourly"],
)
def test_next_tick_agrees_with_trying_every_minute(text: str) -> None:
    schedule, parsed = cron(text), Cron.parse(text)
    t = at(2024, 2, 27, 22, 13) + 17  # across a month end and a leap day
    for _ in range(30):
        expected = _brute_next(parsed, t)
        assert schedule.next_after(t) == expected
        t = expected


def test_both_day_fields_restricted_means_either() -> None:
    ticks = list(cron("0 0 13 * fri").ticks(at(2024, 9, 1), at(2024, 9, 30)))
    days = [dt.datetime.fromtimestamp(t, UTC).day for t in ticks]
    assert days == [6, 13, 20, 27]  # Fridays, and the 13th (itself a Friday)
    ticks = list(cron("0 0 12 * fri").ticks(at(2024, 9, 1), at(2024, 9, 30)))
    assert [dt.datetime.fromtimestamp(t, UTC).day for t in ticks] == [6, 12, 13, 20, 27]


def test_a_leap_day_schedule_waits_for_the_next_leap_year() -> None:
    assert cron("0 0 29 2 *").next_after(at(2025, 1, 1)) == at(2028, 2, 29)


def test_a_time_the_clocks_skip_does_not_run_that_day() -> None:
    # Paris, 31 March 2024: 02:00 CET became 03:00 CEST; 02:30 did not exist
    ticks = list(cron("30 2 * * *", "Europe/Paris").ticks(at(2024, 3, 30), at(2024, 4, 2)))
    assert ticks == [at(2024, 3, 30, 2, 30, tz=PARIS), at(2024, 4, 1, 2, 30, tz=PARIS)]


def test_a_time_that_occurs_twice_runs_once() -> None:
    # Paris, 27 October 2024: 03:00 CEST became 02:00 CET; 02:00-02:59 happened twice
    ticks = list(cron("30 2 * * *", "Europe/Paris").ticks(at(2024, 10, 26), at(2024, 10, 28)))
    assert ticks == [at(2024, 10, 26, 0, 30), at(2024, 10, 27, 0, 30)]  # 02:30 CEST, in UTC
    hourly = list(cron("0 * * * *", "Europe/Paris").ticks(at(2024, 10, 26, 22, 59), at(2024, 10, 27, 3)))
    # local 01:00 CEST, 02:00 CEST, (02:00 CET again: not run), 03:00 CET, 04:00 CET
    assert hourly == [at(2024, 10, 26, 23), at(2024, 10, 27, 0), at(2024, 10, 27, 2), at(2024, 10, 27, 3)]


def test_every_ticks_on_multiples_of_the_interval() -> None:
    schedule = Schedule.build("cleanup", "1.0", every=dt.timedelta(minutes=5))
    assert schedule.next_after(at(2024, 1, 1, 10, 3, 59)) == at(2024, 1, 1, 10, 5)
    assert schedule.next_after(at(2024, 1, 1, 10, 5)) == at(2024, 1, 1, 10, 10)  # strictly after
    assert list(Schedule.build("c", "1.0", every=1).ticks(100.5, 103)) == [101, 102, 103]


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({}, "either cron"),
        ({"cron": "* * * * *", "every": 60}, "either cron"),
        ({"every": dt.timedelta(milliseconds=1500)}, "whole number of seconds"),
        ({"every": 0}, "whole number of seconds"),
        ({"cron": "* * * * *", "tz": "Mars/Olympus"}, "not a time zone"),
        ({"every": 60, "tz": "UTC"}, "tz applies to cron"),
    ],
)
def test_bad_schedules_are_refused(options: dict[str, object], why: str) -> None:
    with pytest.raises(ConfigurationError, match=why):
        Schedule.build("cleanup", "1.0", **options)  # type: ignore[arg-type]


def test_tick_ids_are_the_same_everywhere_and_differ_per_tick_schedule_and_app() -> None:
    a = Schedule.build("cleanup", "1.0", every=60)
    b = Schedule.build("cleanup", "1.0", every=60, name="other")
    ids = {a.tick_id("app", 60), a.tick_id("app", 120), b.tick_id("app", 60), a.tick_id("app2", 60)}
    assert len(ids) == 4
    assert a.tick_id("app", 60) == Schedule.build("cleanup", "1.0", every=60).tick_id("app", 60)
    assert uuid.UUID(a.tick_id("app", 60)).version == 5
    assert a.describe() == "every 60s" and cron("*/5 * * * *", "Europe/Paris").describe().endswith("(Europe/Paris)")
