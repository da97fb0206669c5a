"""Time in keyroom: durations, signing windows and the next moment something changes.

An offline key may sign only inside a window: an absolute one (start, end) or a
recurring one (a cron schedule that opens it for a duration, in a time zone).
These functions answer, for a given instant, whether a key is online, until
when, and when it next opens, so the operator can sleep until exactly the next
edge instead of polling. All pure: the clock is a parameter.

Daylight-saving time. A schedule names wall-clock times in its time zone; a
window lasts ``duration`` of real elapsed time from its opening (so an 8h
window that spans a clock change still lasts 8 hours). Most wall-clock times
name exactly one instant; around a clock change the rule depends on whether the
schedule fires in every hour of the day (hour field ``*``, ``*/1``, ``0-23``,
``@hourly``: "hourly" below) or at fixed hours (``30 2 * * *``, ``0 1-3 * * *``,
``0 */2 * * *``):

* Fall back (a fold; Europe/Berlin 2026-10-25 02:00-03:00 happens twice): a
  fixed-hour schedule fires once, at the first occurrence (``30 2 * * *``
  opens at 02:30 CEST = 00:30 UTC, not again at 02:30 CET); an hourly schedule
  follows real time and fires in both occurrences, so every real hour gets its
  window (New York ``0 * * * *`` opens at 01:00 EDT and again at 01:00 EST).
* Spring forward (a gap; Berlin 2026-03-29 02:00-03:00 does not exist): a
  fixed-hour schedule whose time is skipped fires once, at the moment the clock
  jumps (``30 2 * * *`` opens at 03:00 CEST = 01:00 UTC): "run once when
  skipped"; several skipped times (``*/15 2 * * *``) open one window. An hourly
  schedule again follows real time: the skipped hour never happened, and its
  neighbours are already an hour apart (New York ``30 * * * *`` opens at 01:30
  EST, then 03:30 EDT).

This is Vixie cron's rule for fixed-time and wildcard jobs, except that Vixie
cron counts any hour field starting with ``*`` (``*/2``) as a wildcard; here
only a schedule that really fires every hour follows real time. It is computed
on naive wall-clock times (croniter never sees a time zone), each converted to
UTC explicitly with PEP 495's ``fold``.

A schedule that never fires (``0 0 30 2 *``) or can go longer than the search
horizon without firing (``0 0 29 2 *``) is refused by ``validate_windows``;
``availability`` treats such a window as one that never opens, and never raises
for a spec that ``validate_windows`` accepts.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import heapq
import re
import zoneinfo
from typing import Iterable, Iterator, Mapping

from croniter import croniter
from croniter.croniter import CroniterError

UTC = datetime.timezone.utc
_UNITS = {
    "ns": datetime.timedelta(microseconds=0.001), "us": datetime.timedelta(microseconds=1),
    "ms": datetime.timedelta(milliseconds=1), "s": datetime.timedelta(seconds=1),
    "m": datetime.timedelta(minutes=1), "h": datetime.timedelta(hours=1), "d": datetime.timedelta(days=1),
}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h|d)")
#: How far ahead a recurring window is searched. ``validate_windows`` refuses a schedule that can go longer
#: than this without firing, so every valid recurring window has an opening within it from any instant.
_HORIZON = datetime.timedelta(days=400)
#: The search looks a little further than the horizon: the horizon is checked on wall-clock times, and a
#: change of UTC offset (at most a day, even when a zone moves across the date line) stretches real time.
_SEARCH = _HORIZON + datetime.timedelta(days=1)
#: Overlapping or touching windows merge; a chain of them is followed at most this many openings ahead
#: (``* * * * *`` for 1h never closes). ``until`` is then the end of the last one looked at: the operator
#: wakes then, finds the key still online and looks further.
_MERGE_LIMIT = 32
#: Cron expressions repeat with the calendar: days of the week and leap years line up again after 28 years
#: (within 1901-2099), so 29 years from any start sees every gap between a schedule's firings.
_CYCLE_START = datetime.datetime(2001, 1, 1)
_CYCLE_END = datetime.datetime(2030, 1, 1)
_MINUTE = datetime.timedelta(minutes=1)
#: How many years croniter searches for a firing when computing windows: enough for the horizon, and short,
#: because croniter searches that long every time half of an "either day" schedule (``* * 30 2 1``) fails.
_CRON_YEARS = 2
_LATEST = datetime.datetime.max.replace(tzinfo=UTC)
#: (opens, closes): a window is open from its opening instant up to, not including, its closing one.
_Interval = tuple[datetime.datetime, datetime.datetime]


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


def _after(start: datetime.datetime, length: datetime.timedelta) -> datetime.datetime:
    """``start + length`` in real elapsed time; a duration past year 9999 is simply open to the end of time."""
    try:
        return start + length
    except OverflowError:
        return _LATEST


def _every_hour(walls: croniter) -> bool:
    """Whether the schedule fires in every hour of the day (croniter expands ``*``, ``*/1``, ``0-23`` to ``*``)."""
    return walls.expanded[1] == ["*"]


def _jump(wall: datetime.datetime, zone: zoneinfo.ZoneInfo) -> datetime.datetime:
    """The instant the clock jumps over ``wall``, a wall-clock time inside a spring-forward gap."""
    # fold=1 reads the gap with the offset after the jump, which lands before it; fold=0 with the offset
    # before, which lands after it. zoneinfo does not say when the offset changes, but it changes on a whole
    # second: halve the whole seconds between the two until the jump is pinned to one.
    before = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    after = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    offset_after = after.astimezone(zone).utcoffset()
    seconds = int((after - before).total_seconds())
    while seconds > 1:
        middle = before + datetime.timedelta(seconds=seconds // 2)
        if middle.astimezone(zone).utcoffset() == offset_after:
            after = middle
        else:
            before = middle
        seconds = int((after - before).total_seconds())
    return after


def _instants(wall: datetime.datetime, zone: zoneinfo.ZoneInfo, every_hour: bool) -> list[datetime.datetime]:
    """The instants at which a schedule firing at naive wall-clock time ``wall`` opens a window, earliest first."""
    # Convert explicitly rather than letting croniter iterate aware datetimes: PEP 495's fold tells the
    # first occurrence of a repeated time (fold=0) from the second (fold=1), and a time in a gap apart.
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first == second:
        return [first]
    if first > second:
        # Read with the offsets before and after a spring-forward jump, a time in the gap comes out in the
        # wrong order: it does not exist. A fixed-hour window opens when the clock jumps over it; an hourly
        # one needs no stand-in, as the firings either side of the gap are already an hour apart.
        return [] if every_hour else [_jump(wall, zone)]
    # A time repeated by a fall-back: hourly (and finer) schedules follow real time and fire in both
    # hours; a schedule at fixed hours fires once, at the first.
    return [first, second] if every_hour else [first]


def _openings(walls: croniter, first_wall: datetime.datetime, zone: zoneinfo.ZoneInfo) -> Iterator[datetime.datetime]:
    """Every instant the schedule opens a window, in order, from its firing at naive wall time ``first_wall``
    on; ``walls`` stands at ``first_wall``."""
    every_hour = _every_hour(walls)
    # Wall-clock order is real-time order except inside a fold: the second occurrence of 01:00 comes after
    # the first occurrence of 01:30. The first occurrences are in order (and so are the jumps out of a gap),
    # so a second occurrence waits in `repeats` until no earlier first occurrence can follow it.
    repeats: list[datetime.datetime] = []
    last: datetime.datetime | None = None
    wall = first_wall
    while True:
        instants = _instants(wall, zone, every_hour)
        if instants:  # none for an hourly schedule's time in a gap
            earliest, *repeated = instants
            while repeats and repeats[0] <= earliest:
                moment = heapq.heappop(repeats)
                if moment != last:
                    last = moment
                    yield moment
            if earliest != last:  # several times in one gap open a single window
                last = earliest
                yield earliest
            for moment in repeated:
                heapq.heappush(repeats, moment)
        try:
            wall = walls.get_next(datetime.datetime)
        except CroniterError:  # no firing within croniter's search: none within the horizon either
            break
    yield from (moment for moment in sorted(repeats) if moment != last)


def _open_intervals(window: Mapping, around: datetime.datetime) -> Iterator[_Interval]:
    """The window's open intervals in order of opening: the latest to open at or before ``around``, then the
    ones after it up to the search horizon."""
    if "start" in window:
        yield parse_time(window["start"]), parse_time(window["end"])
        return
    length = parse_duration(window["duration"])
    zone = zoneinfo.ZoneInfo(window.get("timeZone") or "UTC")
    wall = around.astimezone(zone).replace(tzinfo=None)
    # Inside the first pass through a repeated hour, the second occurrences of wall times before `around`'s
    # are still ahead: start that much earlier on the wall clock (the length of the fold, else nothing).
    # (Aware datetimes in the same zone subtract as wall times: compare them in UTC.)
    first, second = (wall.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1))
    fold = max(second - first, datetime.timedelta())
    minute = (wall - fold).replace(second=0, microsecond=0)
    # One croniter for the whole walk: building one (parsing the expression) costs more than a step.
    walls = croniter(window["schedule"], minute + _MINUTE, max_years_between_matches=_CRON_YEARS)
    try:
        # croniter's get_prev is strictly before its start: from the next minute it is the latest firing at
        # or before this one. (From `around + 1s` it could be a firing after `around`, within that second.)
        first_wall = walls.get_prev(datetime.datetime)
    except CroniterError:  # no firing in years: a schedule that never fires (or too rarely to be valid)
        return
    # Same-length intervals: the latest to open at or before `around` is the only one that may still be
    # open. Inside a fold its wall time may come after `around`'s, so walk from `first_wall` to find it.
    latest: datetime.datetime | None = None
    for opening in _openings(walls, first_wall, zone):
        if opening <= around:
            latest = opening
            continue
        if latest is not None:
            yield latest, _after(latest, length)
            latest = None
        if opening - around > _SEARCH:
            return
        yield opening, _after(opening, length)
    if latest is not None:
        yield latest, _after(latest, length)


def availability(offline: Mapping | None, now: datetime.datetime) -> Availability:
    """Whether a key with this ``spec.offline`` may sign at ``now``."""
    if not offline or not offline.get("enabled", True):
        return Availability(online=True, until=None, next_open=None)
    # In order of opening, so every interval open at `now` comes before any that opens after it.
    intervals: Iterable[_Interval] = heapq.merge(
        *(_open_intervals(window, now) for window in offline.get("windows") or []))
    until: datetime.datetime | None = None
    merged = 0
    for start, end in intervals:
        if end <= now:
            continue
        if start <= now:
            until = end if until is None else max(until, end)
        elif until is None:
            return Availability(online=False, until=None, next_open=start)
        elif start <= until and merged < _MERGE_LIMIT:
            # Windows that overlap or touch extend the current one.
            until, merged = max(until, end), merged + 1
        else:
            break
    if until is None:
        return Availability(online=False, until=None, next_open=None)
    # A window that closes after year 9999 never closes.
    return Availability(online=True, until=None if until == _LATEST else until, next_open=None)


@functools.lru_cache(maxsize=256)
def _schedule_problem(schedule: str) -> str | None:
    """Why a cron expression cannot drive a window, or None. Cached: it is asked on every reconcile."""
    # Five fields (or a macro), as the CRD's pattern says: croniter would also take a sixth for seconds,
    # which the minute arithmetic above does not expect.
    if not croniter.is_valid(schedule) or (not schedule.startswith("@") and len(schedule.split()) != 5):
        return "is not a valid cron expression"
    try:
        # is_valid only parses: `0 0 30 2 *` (February 30) parses and never fires.
        firing = croniter(schedule, _CYCLE_START - datetime.timedelta(seconds=1)).get_next(datetime.datetime)
    except CroniterError:
        return "never fires (no date matches it)"
    # Walk the calendar cycle gap by gap: from each firing, the latest one within the horizon is the
    # start of the next gap to measure, so every gap is seen in a few dozen steps.
    while firing < _CYCLE_END:
        try:
            reach = croniter(schedule, firing + _HORIZON + _MINUTE).get_prev(datetime.datetime)
            following = croniter(schedule, reach).get_next(datetime.datetime)
        except CroniterError:
            following = None
        if following is None or following - reach > _HORIZON:
            return (f"fires too rarely: it can go more than {_HORIZON.days} days without firing (e.g. after "
                    f"{reach:%Y-%m-%d}), and keyroom looks for the next window only {_HORIZON.days} days ahead")
        firing = following
    return None


def validate_windows(offline: Mapping | None) -> list[str]:
    """Problems the CRD schema cannot see: unknown time zones, cron expressions croniter refuses or that never
    (or too rarely) fire, durations and times that do not parse. ``availability`` does not raise for a spec
    without any."""
    problems = []
    for index, window in enumerate((offline or {}).get("windows") or []):
        where = f"windows[{index}]"
        # The same test for absolute windows as `_open_intervals`, so what passes here is what it reads.
        if "start" in window:
            try:
                parse_time(window["start"]), parse_time(window["end"])
            except (KeyError, TypeError, ValueError):
                problems.append(f"{where} needs an RFC 3339 start and end")
            continue
        if "schedule" not in window:
            problems.append(f"{where} needs a start and end, or a schedule and duration")
            continue
        if window.get("timeZone"):
            try:
                zoneinfo.ZoneInfo(window["timeZone"])
            except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
                problems.append(f"{where}.timeZone {window['timeZone']!r} is not an IANA time zone")
        try:
            parse_duration(window.get("duration") or "")
        except (TypeError, ValueError, OverflowError):
            problems.append(f"{where}.duration {window.get('duration')!r} is not a duration such as 8h or 1d12h")
        schedule = window["schedule"]
        problem = _schedule_problem(schedule) if isinstance(schedule, str) else "is not a valid cron expression"
        if problem:
            problems.append(f"{where}.schedule {schedule!r} {problem}")
    return problems
