"""Time in keyroom: durations, signing windows and the next moment something changes.

An offline key may sign only inside a window: an absolute one (start, end) or a
recurring one (a cron schedule that opens it for a duration, in a time zone).
These functions answer, for a given instant, whether a key is online, until
when, and when it next opens, so the operator can sleep until exactly the next
edge instead of polling. All pure: the clock is a parameter.
"""
from __future__ import annotations

import dataclasses
import datetime
import re
import zoneinfo
from typing import Iterable, Mapping

from croniter import croniter

UTC = datetime.timezone.utc
_UNITS = {
    "ns": datetime.timedelta(microseconds=0.001), "us": datetime.timedelta(microseconds=1),
    "ms": datetime.timedelta(milliseconds=1), "s": datetime.timedelta(seconds=1),
    "m": datetime.timedelta(minutes=1), "h": datetime.timedelta(hours=1), "d": datetime.timedelta(days=1),
}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h|d)")
#: How far ahead a recurring window is searched: a schedule that never fires within it has no next window.
_HORIZON = datetime.timedelta(days=400)


def parse_duration(text: str) -> datetime.timedelta:
    """``90d``, ``36h``, ``1d12h``, ``1.5h``: Go-style durations plus ``d`` for days."""
    position, total = 0, datetime.timedelta()
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if not text or position != len(text):
        raise ValueError(f"{text!r} is not a duration such as 90m, 36h, 90d or 1d12h")
    return total


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def format_time(moment: datetime.datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether a key may sign at an instant, and when that changes."""

    online: bool
    #: online: when the current window closes (None: never); offline: None
    until: datetime.datetime | None
    #: offline: when a window next opens (None: no window ahead); online: None
    next_open: datetime.datetime | None

    @property
    def next_edge(self) -> datetime.datetime | None:
        return self.until if self.online else self.next_open


def _open_intervals(window: Mapping, around: datetime.datetime) -> Iterable[tuple[datetime.datetime, datetime.datetime]]:
    """The window's open intervals that contain ``around`` or start after it (a few of them)."""
    if "start" in window:
        yield parse_time(window["start"]), parse_time(window["end"])
        return
    length = parse_duration(window["duration"])
    zone = zoneinfo.ZoneInfo(window.get("timeZone") or "UTC")
    local = around.astimezone(zone)
    # The latest opening at or before `around` may still be open.
    previous = croniter(window["schedule"], local + datetime.timedelta(seconds=1)).get_prev(datetime.datetime)
    yield previous.astimezone(UTC), previous.astimezone(UTC) + length
    upcoming = croniter(window["schedule"], local)
    for _ in range(3):
        opening = upcoming.get_next(datetime.datetime).astimezone(UTC)
        if opening - around > _HORIZON:
            return
        yield opening, opening + length


def availability(offline: Mapping | None, now: datetime.datetime) -> Availability:
    """Whether a key with this ``spec.offline`` may sign at ``now``."""
    if not offline or not offline.get("enabled", True):
        return Availability(online=True, until=None, next_open=None)
    intervals = sorted(i for w in offline.get("windows") or [] for i in _open_intervals(w, now) if i[1] > now)
    current = [i for i in intervals if i[0] <= now < i[1]]
    if not current:
        upcoming = [start for start, _ in intervals if start > now]
        return Availability(online=False, until=None, next_open=min(upcoming, default=None))
    # Windows that overlap or touch extend the current one.
    until = max(end for _, end in current)
    for start, end in intervals:
        if start <= until < end:
            until = end
    return Availability(online=True, until=until, next_open=None)


def validate_windows(offline: Mapping | None) -> list[str]:
    """Problems the CRD schema cannot see: unknown time zones, cron expressions croniter refuses."""
    problems = []
    for index, window in enumerate((offline or {}).get("windows") or []):
        if "schedule" not in window:
            continue
        if window.get("timeZone"):
            try:
                zoneinfo.ZoneInfo(window["timeZone"])
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                problems.append(f"windows[{index}].timeZone {window['timeZone']!r} is not an IANA time zone")
        if not croniter.is_valid(window["schedule"]):
            problems.append(f"windows[{index}].schedule {window['schedule']!r} is not a valid cron expression")
    return problems
