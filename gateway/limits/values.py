"""The values of the Limits keys (spec section 2), parsed: sizes, rates, schedules, caps.

Pure functions: a value that does not parse raises `BadValue` with a short reason, and
the caller keeps the last good value. Sizes and rates follow rclone: binary units
(`K` = 1024), a rate without a unit is in KiB/s, and a schedule is rclone's
`--bwlimit` timetable (`"08:00,10M 19:00,off"`, `"Mon-08:00,1M"`).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from datetime import datetime

UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"([0-9]{1,15}(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([bkmgtp])(?:i?b)?)?",
                   re.IGNORECASE)
_SLOT = re.compile(r"(?:(mon|tue|wed|thu|fri|sat|sun)-)?([0-9]{1,2}):([0-9]{2})", re.IGNORECASE)
_COUNT = re.compile(r"[0-9]{1,9}")
MAX_BYTES = 1 << 62
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MINUTES_PER_WEEK = 7 * 24 * 60
OFF = ("off", "none", "unlimited")


class BadValue(ValueError):
    """A Limits value that does not parse: ignored, the last good value stays."""


def parse_size(text: str, default_unit: str = "b") -> int:
    """`1073741824`, `10G`, `1.5M`, `512KiB` -> bytes (binary units, as rclone)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise BadValue(f"not a size: {text[:40]!r}")
    number, unit = match.groups()
    value = float(number) * UNITS[(unit or default_unit).lower()]
    if value > MAX_BYTES:
        raise BadValue(f"too large: {text[:40]!r}")
    return int(value)


def parse_rate(text: str) -> int | None:
    """A bandwidth in bytes per second, None for `off` (rclone: `0` is off too)."""
    if text.strip().lower() in OFF:
        return None
    rate = parse_size(text, default_unit="k")
    return rate or None


@dataclass(frozen=True, slots=True)
class Schedule:
    """A rate per time of the week. Without a day a slot holds every day; the slot in
    force is the last one begun, the week wrapping around."""

    text: str
    starts: tuple[int, ...]  # minute of the week (Monday 00:00 = 0), sorted
    rates: tuple[int | None, ...]  # bytes per second from that minute; None: no limit

    def rate_at(self, when: datetime) -> int | None:
        minute = when.weekday() * 24 * 60 + when.hour * 60 + when.minute
        index = bisect.bisect_right(self.starts, minute) - 1
        return self.rates[index]  # -1: the last slot of the week before

    def minutes_to_next_change(self, when: datetime) -> float:
        """Minutes (with the seconds) from `when` to the next slot's start."""
        if len(self.starts) <= 1:
            return float(MINUTES_PER_WEEK)
        minute = when.weekday() * 24 * 60 + when.hour * 60 + when.minute
        index = bisect.bisect_right(self.starts, minute)
        start = self.starts[index] if index < len(self.starts) else (
            self.starts[0] + MINUTES_PER_WEEK)
        return start - minute - (when.second + when.microsecond / 1e6) / 60

    @property
    def constant(self) -> bool:
        return len(set(self.rates)) <= 1


def parse_schedule(text: str, side: int = 0) -> Schedule:
    """rclone's `--bwlimit`: one rate, or slots `[Day-]HH:MM,RATE` apart by spaces. A rate
    may be an `upload:download` pair; `side` says which half this key takes (0, 1)."""
    words = text.split()
    if not words:
        raise BadValue("empty schedule")
    if len(words) == 1 and "," not in words[0]:
        return Schedule(text, (0,), (_rate_of(words[0], side),))
    slots: dict[int, int | None] = {}
    for word in words:
        when, comma, rate_text = word.partition(",")
        match = _SLOT.fullmatch(when)
        if not comma or match is None:
            raise BadValue(f"not a [Day-]HH:MM,RATE slot: {word[:40]!r}")
        day, hour, minute = match.group(1), int(match.group(2)), int(match.group(3))
        if hour > 23 or minute > 59:
            raise BadValue(f"no such time of day: {when!r}")
        rate = _rate_of(rate_text, side)
        days = [DAYS.index(day.lower())] if day else range(7)
        for weekday in days:
            slots[weekday * 24 * 60 + hour * 60 + minute] = rate
    starts = tuple(sorted(slots))
    return Schedule(text, starts, tuple(slots[s] for s in starts))


def _rate_of(text: str, side: int) -> int | None:
    halves = text.split(":")
    if len(halves) > 2:
        raise BadValue(f"not a rate: {text[:40]!r}")
    return parse_rate(halves[min(side, len(halves) - 1)])


def parse_quota(text: str) -> int | None:
    """Bytes a repository may hold: a plain number of bytes, or with a binary unit; `off`:
    none (a module exempt from the destination's `*` default)."""
    if text.strip().lower() in OFF:
        return None
    return parse_size(text)


def parse_cap(text: str) -> int | None:
    """Requests in flight: a positive count, or `off` for no cap."""
    value = text.strip().lower()
    if value in OFF:
        return None
    if not _COUNT.fullmatch(value) or int(value) < 1:
        raise BadValue(f"not a positive count: {text[:40]!r}")
    return int(value)


def format_rate(rate: int | None) -> str:
    if rate is None:
        return "off"
    return format_size(rate) + "/s"


def format_size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= factor:
            return f"{value / factor:.1f} {unit}"
    return f"{value} B"
