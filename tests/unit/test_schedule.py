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
