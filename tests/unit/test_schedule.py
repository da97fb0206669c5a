"""Durations, signing windows and their edges, with the clock as a parameter."""
from __future__ import annotations

import datetime

import pytest

from keyroom.schedule import availability, format_time, parse_duration, parse_time, validate_windows


def t(text: str) -> datetime.datetime:
    return parse_time(text)


@pytest.mark.parametrize("text,expected", [
    ("90d", datetime.timedelta(days=90)), ("36h", datetime.timedelta(hours=36)),
    ("1d12h", datetime.timedelta(days=1, hours=12)), ("1.5h", datetime.timedelta(minutes=90)),
    ("90m", datetime.timedelta(minutes=90)), ("500ms", datetime.timedelta(milliseconds=500)),
    ("1h30m10s", datetime.timedelta(hours=1, minutes=30, seconds=10)),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "90", "d", "3 months", "1y", "h1", "1h 2m"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_no_offline_spec_is_always_online():
    state = availability(None, t("2026-12-01T00:00:00Z"))
    assert state.online and state.until is None and state.next_edge is None
    assert availability({"enabled": False, "windows": []}, t("2026-12-01T00:00:00Z")).online


def test_offline_without_windows_never_signs():
    state = availability({"enabled": True}, t("2026-12-01T00:00:00Z"))
    assert not state.online and state.next_open is None


ABSOLUTE = {"enabled": True, "windows": [{"start": "2026-12-01T10:00:00Z", "end": "2026-12-01T12:00:00Z"}]}


@pytest.mark.parametrize("now,online,edge", [
    ("2026-12-01T09:59:59Z", False, "2026-12-01T10:00:00Z"),
    ("2026-12-01T10:00:00Z", True, "2026-12-01T12:00:00Z"),   # the start is inside
    ("2026-12-01T11:59:59Z", True, "2026-12-01T12:00:00Z"),
    ("2026-12-01T12:00:00Z", False, None),                    # the end is outside
])
def test_absolute_window_edges(now, online, edge):
    state = availability(ABSOLUTE, t(now))
    assert state.online is online
    assert (format_time(state.next_edge) if state.next_edge else None) == edge


BERLIN_WEEKDAYS = {"enabled": True, "windows": [
    {"schedule": "0 9 * * 1-5", "duration": "8h", "timeZone": "Europe/Berlin"}]}


def test_recurring_window_in_a_time_zone():
    # Tuesday 2026-12-01, Berlin is UTC+1 in winter: open 08:00Z to 16:00Z.
    assert not availability(BERLIN_WEEKDAYS, t("2026-12-01T07:59:59Z")).online
    opened = availability(BERLIN_WEEKDAYS, t("2026-12-01T08:00:00Z"))
    assert opened.online and format_time(opened.until) == "2026-12-01T16:00:00Z"
    closed = availability(BERLIN_WEEKDAYS, t("2026-12-01T16:00:00Z"))
    assert not closed.online and format_time(closed.next_open) == "2026-12-02T08:00:00Z"


def test_recurring_window_skips_the_weekend():
    friday_evening = availability(BERLIN_WEEKDAYS, t("2026-12-04T17:00:00Z"))
    assert format_time(friday_evening.next_open) == "2026-12-07T08:00:00Z"


def test_recurring_window_follows_daylight_saving_time():
    # Berlin is UTC+2 in summer: 09:00 local is 07:00Z.
    state = availability(BERLIN_WEEKDAYS, t("2026-07-01T06:00:00Z"))
    assert format_time(state.next_open) == "2026-07-01T07:00:00Z"


def test_touching_windows_merge():
    windows = {"windows": [{"start": "2026-12-01T10:00:00Z", "end": "2026-12-01T11:00:00Z"},
                           {"start": "2026-12-01T11:00:00Z", "end": "2026-12-01T12:00:00Z"}]}
    state = availability(windows, t("2026-12-01T10:30:00Z"))
    assert state.online and format_time(state.until) == "2026-12-01T12:00:00Z"


def test_earliest_of_several_windows_is_next():
    windows = {"windows": [{"start": "2026-12-05T10:00:00Z", "end": "2026-12-05T11:00:00Z"},
                           {"schedule": "0 6 * * *", "duration": "1h"}]}
    state = availability(windows, t("2026-12-01T07:00:00Z"))
    assert format_time(state.next_open) == "2026-12-02T06:00:00Z"


def test_validate_windows_reports_unknown_zones_and_bad_cron():
    problems = validate_windows({"windows": [
        {"schedule": "0 9 * * 1-5", "duration": "1h", "timeZone": "Mars/Olympus"},
        {"schedule": "99 9 * * *", "duration": "1h"},
        {"start": "2026-12-01T10:00:00Z", "end": "2026-12-01T11:00:00Z"},
    ]})
    assert len(problems) == 2 and "Mars/Olympus" in problems[0] and "99 9" in problems[1]


# ---------------------------------------------------------------- daylight-saving time
#
# The 2026 transitions: the EU changes at 01:00 UTC (Berlin: 2026-03-29 02:00 CET -> 03:00 CEST,
# 2026-10-25 03:00 CEST -> 02:00 CET); the US at 2am local (New York: 2026-03-08 02:00 EST -> 03:00 EDT,
# 2026-11-01 02:00 EDT -> 01:00 EST). Every instant below is UTC.

def recurring(schedule: str, duration: str, zone: str) -> dict:
    return {"enabled": True, "windows": [{"schedule": schedule, "duration": duration, "timeZone": zone}]}


def assert_online(offline: dict, now: str, until: str) -> None:
    state = availability(offline, t(now))
    assert state.online, f"offline at {now}"
    assert format_time(state.until) == until


def assert_offline(offline: dict, now: str, next_open: str | None) -> None:
    state = availability(offline, t(now))
    assert not state.online, f"online at {now} until {state.until}"
    assert (format_time(state.next_open) if state.next_open else None) == next_open


BERLIN_0230 = recurring("30 2 * * *", "1h", "Europe/Berlin")
NEW_YORK_HOURLY = recurring("0 * * * *", "30m", "America/New_York")


def test_berlin_fall_back_opens_a_fixed_hour_window_once_at_the_first_0230():
    # 02:30 happens at 00:30Z (CEST) and again at 01:30Z (CET): the window opens at the first only.
    assert_offline(BERLIN_0230, "2026-10-25T00:29:59Z", "2026-10-25T00:30:00Z")
    assert_online(BERLIN_0230, "2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z")
    assert_online(BERLIN_0230, "2026-10-25T01:29:59Z", "2026-10-25T01:30:00Z")
    assert_offline(BERLIN_0230, "2026-10-25T01:30:00Z", "2026-10-26T01:30:00Z")   # the second 02:30
    assert_offline(BERLIN_0230, "2026-10-25T01:45:00Z", "2026-10-26T01:30:00Z")
    assert_offline(BERLIN_0230, "2026-10-25T02:00:00Z", "2026-10-26T01:30:00Z")
    # A window lasts its duration in real time across the change: 00:00 CEST (22:00Z) for 8h closes at
    # 07:00 CET, not 08:00.
    midnight = recurring("0 0 * * *", "8h", "Europe/Berlin")
    assert_online(midnight, "2026-10-24T22:00:00Z", "2026-10-25T06:00:00Z")
    assert_offline(midnight, "2026-10-25T06:00:00Z", "2026-10-25T23:00:00Z")


def test_berlin_hourly_window_opens_in_both_repeated_hours():
    hourly = recurring("0 * * * *", "30m", "Europe/Berlin")
    assert_online(hourly, "2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z")   # 02:00 CEST
    assert_offline(hourly, "2026-10-25T00:30:00Z", "2026-10-25T01:00:00Z")
    assert_online(hourly, "2026-10-25T01:00:00Z", "2026-10-25T01:30:00Z")   # 02:00 CET
    assert_offline(hourly, "2026-10-25T01:30:00Z", "2026-10-25T02:00:00Z")


def test_berlin_spring_forward_opens_a_skipped_window_when_the_clock_jumps():
    # 02:30 does not exist on 2026-03-29: the window opens at 03:00 CEST (01:00Z) for one real hour.
    assert_offline(BERLIN_0230, "2026-03-28T02:30:00Z", "2026-03-29T01:00:00Z")
    assert_offline(BERLIN_0230, "2026-03-29T00:59:59Z", "2026-03-29T01:00:00Z")
    assert_online(BERLIN_0230, "2026-03-29T01:00:00Z", "2026-03-29T02:00:00Z")
    assert_online(BERLIN_0230, "2026-03-29T01:59:59Z", "2026-03-29T02:00:00Z")
    assert_offline(BERLIN_0230, "2026-03-29T02:00:00Z", "2026-03-30T00:30:00Z")   # 02:30 CEST the next day
    # The day before, 02:30 CET is 01:30Z.
    assert_online(BERLIN_0230, "2026-03-28T01:30:00Z", "2026-03-28T02:30:00Z")


def test_berlin_spring_forward_opens_several_skipped_times_as_one_window():
    quarters = recurring("*/15 2 * * *", "10m", "Europe/Berlin")
    assert_online(quarters, "2026-03-29T01:00:00Z", "2026-03-29T01:10:00Z")
    assert_offline(quarters, "2026-03-29T01:10:00Z", "2026-03-30T00:00:00Z")


def test_new_york_hourly_window_opens_every_real_hour_across_fall_back():
    # 00:00 EDT = 04:00Z, 01:00 EDT = 05:00Z, 01:00 EST = 06:00Z, 02:00 EST = 07:00Z.
    for hour in ("04", "05", "06", "07"):
        assert_offline(NEW_YORK_HOURLY, f"2026-11-01T{int(hour) - 1:02d}:59:59Z", f"2026-11-01T{hour}:00:00Z")
        assert_online(NEW_YORK_HOURLY, f"2026-11-01T{hour}:00:00Z", f"2026-11-01T{hour}:30:00Z")
        assert_online(NEW_YORK_HOURLY, f"2026-11-01T{hour}:29:59Z", f"2026-11-01T{hour}:30:00Z")
        assert_offline(NEW_YORK_HOURLY, f"2026-11-01T{hour}:30:00Z", f"2026-11-01T{int(hour) + 1:02d}:00:00Z")


def test_new_york_finer_than_hourly_windows_keep_real_time_order_in_the_repeated_hour():
    # 01:00, 01:20, 01:40 happen first in EDT (05:xxZ), then again in EST (06:xxZ).
    thirds = recurring("*/20 * * * *", "10m", "America/New_York")
    assert_online(thirds, "2026-11-01T05:45:00Z", "2026-11-01T05:50:00Z")
    assert_offline(thirds, "2026-11-01T05:50:00Z", "2026-11-01T06:00:00Z")
    assert_offline(thirds, "2026-11-01T06:15:00Z", "2026-11-01T06:20:00Z")
    assert_online(thirds, "2026-11-01T06:40:00Z", "2026-11-01T06:50:00Z")


def test_new_york_fall_back_opens_a_fixed_hour_window_once():
    # 01:30 is 05:30Z (EDT) and again 06:30Z (EST): only the first opens.
    night = recurring("30 1 * * *", "1h", "America/New_York")
    assert_offline(night, "2026-11-01T05:29:59Z", "2026-11-01T05:30:00Z")
    assert_online(night, "2026-11-01T05:30:00Z", "2026-11-01T06:30:00Z")
    assert_offline(night, "2026-11-01T06:30:00Z", "2026-11-02T06:30:00Z")
    assert_offline(night, "2026-11-01T06:45:00.500000Z", "2026-11-02T06:30:00Z")


def test_new_york_spring_forward_opens_skipped_windows_when_the_clock_jumps():
    # 02:30 does not exist on 2026-03-08: the window opens at 03:00 EDT (07:00Z).
    night = recurring("30 2 * * *", "1h", "America/New_York")
    assert_online(night, "2026-03-07T07:30:00Z", "2026-03-07T08:30:00Z")          # 02:30 EST the day before
    assert_offline(night, "2026-03-08T06:59:59Z", "2026-03-08T07:00:00Z")
    assert_online(night, "2026-03-08T07:00:00Z", "2026-03-08T08:00:00Z")
    assert_offline(night, "2026-03-08T08:00:00Z", "2026-03-09T06:30:00Z")        # 02:30 EDT the day after


def test_new_york_hourly_window_follows_real_time_across_spring_forward():
    # 02:00 and 02:30 do not exist on 2026-03-08; 01:00 EST and 03:00 EDT are one real hour apart.
    assert_online(NEW_YORK_HOURLY, "2026-03-08T06:00:00Z", "2026-03-08T06:30:00Z")   # 01:00 EST
    assert_offline(NEW_YORK_HOURLY, "2026-03-08T06:30:00Z", "2026-03-08T07:00:00Z")
    assert_online(NEW_YORK_HOURLY, "2026-03-08T07:00:00Z", "2026-03-08T07:30:00Z")   # 03:00 EDT
    assert_offline(NEW_YORK_HOURLY, "2026-03-08T07:30:00Z", "2026-03-08T08:00:00Z")
    # Hourly at :30 needs no stand-in for the skipped 02:30: 01:30 EST (06:30Z), then 03:30 EDT (07:30Z).
    half_past = recurring("30 * * * *", "30m", "America/New_York")
    assert_online(half_past, "2026-03-08T06:30:00Z", "2026-03-08T07:00:00Z")
    assert_offline(half_past, "2026-03-08T07:00:00Z", "2026-03-08T07:30:00Z")
    assert_online(half_past, "2026-03-08T07:30:00Z", "2026-03-08T08:00:00Z")


# ---------------------------------------------------------------- schedules that never fire

@pytest.mark.parametrize("schedule", ["0 0 30 2 *", "0 0 31 4 *"])
def test_validate_windows_reports_a_schedule_that_never_fires(schedule):
    offline = {"windows": [{"schedule": schedule, "duration": "1h"}]}
    assert validate_windows(offline) == [f"windows[0].schedule {schedule!r} never fires (no date matches it)"]


@pytest.mark.parametrize("schedule", ["0 0 30 2 *", "0 0 31 4 *"])
def test_availability_of_a_schedule_that_never_fires_is_offline_without_raising(schedule):
    alone = {"windows": [{"schedule": schedule, "duration": "1h", "timeZone": "Europe/Berlin"}]}
    assert availability(alone, t("2026-02-27T12:00:00Z")) == availability({"windows": []}, t("2026-02-27T12:00:00Z"))
    state = availability(alone, t("2026-04-30T23:00:00Z"))
    assert not state.online and state.next_open is None
    # Another window still counts.
    both = {"windows": [*alone["windows"], {"start": "2026-12-01T10:00:00Z", "end": "2026-12-01T12:00:00Z"}]}
    assert format_time(availability(both, t("2026-04-30T23:00:00Z")).next_open) == "2026-12-01T10:00:00Z"


def test_validate_windows_reports_a_schedule_rarer_than_the_search_horizon():
    # February 29 fires, but up to four years apart: the key would sit offline with no window ahead.
    problems = validate_windows({"windows": [{"schedule": "0 0 29 2 *", "duration": "1h"}]})
    assert len(problems) == 1 and "fires too rarely" in problems[0] and "400 days" in problems[0]
    # Either February 30 or any Monday: fires every year.
    assert validate_windows({"windows": [{"schedule": "0 0 30 2 1", "duration": "1h"}]}) == []


def test_validate_windows_reports_what_availability_cannot_read():
    problems = validate_windows({"windows": [
        {"schedule": "0 9 * * *", "duration": "8 hours"},
        {"schedule": "0 0 9 * * *", "duration": "1h"},   # six fields: croniter reads seconds
        {"start": "yesterday", "end": "2026-12-01T11:00:00Z"},
        {"duration": "1h"},
    ]})
    assert [p.split(" ")[0] for p in problems] == ["windows[0].duration", "windows[1].schedule", "windows[2]",
                                                   "windows[3]"]


@pytest.mark.parametrize("schedule", [
    "0 9 * * 1-5", "30 2 * * *", "0 * * * *", "*/20 * * * *", "*/15 2 * * *", "0 1-3 * * *", "0 */2 * * *",
    "59 23 31 12 *", "0 0 30 2 1", "0 0 1 * *", "@hourly", "@yearly", "* * * * *", "0 0 30 2 *", "0 0 31 4 *",
    "0 0 29 2 *",
])
@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "UTC"])
@pytest.mark.parametrize("duration", ["30m", "99999999d"])
def test_availability_never_raises_and_finds_the_next_window_of_a_valid_schedule(schedule, zone, duration):
    offline = {"windows": [{"schedule": schedule, "duration": duration, "timeZone": zone}]}
    valid = not validate_windows(offline)
    for now in ["2026-03-08T06:59:59.999999Z", "2026-03-29T01:00:00Z", "2026-10-25T00:30:00Z",
                "2026-10-25T01:30:00Z", "2026-11-01T05:45:00Z", "2026-11-01T06:45:00Z", "2026-12-31T23:59:59Z"]:
        state = availability(offline, t(now))
        if valid:
            # A schedule validate_windows accepts always has a window within the search horizon.
            assert state.online or state.next_open - t(now) <= datetime.timedelta(days=401)
            assert state.next_edge is None or state.next_edge > t(now)
