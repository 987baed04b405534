"""Parsing of the loose duration and time forms that the config accepts ("10s", "-1h", RFC 3339)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_SECONDS = 100 * 365 * 86400.0  # a century: beyond it, datetime arithmetic overflows
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
DURATION_FORM = 'a duration such as "250ms", "10s", "5m", "2h", "1d", or a number of seconds'
START_FORM = '"now", a time relative to now such as "-1h" or "-7d", or an RFC 3339 time'


def parse_duration(value: object) -> timedelta:
    """Turn "250ms", "10s", "5m", "2h", "1d" or a number of seconds into a timedelta; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(DURATION_FORM)
    seconds: float | None = None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds is None or not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(DURATION_FORM)
    return timedelta(seconds=seconds)


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 / ISO 8601 time into an aware UTC datetime; a naive time is taken as UTC."""
    parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        # "0001-01-01T00:00:00+01:00" is valid ISO 8601 but before year 1 in UTC: a bad time like any other, so
        # that a record holding one becomes a dead letter instead of failing its whole poll
        raise ValueError(f"{text!r} is out of the range of dates") from None


def parse_start(value: object, now: datetime) -> datetime:
    """Resolve a start point: "now", a negative duration relative to now ("-1h"), or an RFC 3339 time."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if text == "now":
                return now
            if text.startswith("-"):
                return now - parse_duration(text[1:])
            return parse_time(text)
        except (ValueError, OverflowError):
            pass
    raise ValueError(START_FORM)


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds and "Z", the form Langfuse uses on the wire."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_duration(seconds: float) -> str:
    """A short human form of a number of seconds, for status output: "45s", "12m", "3h 5m"."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    hours, rest = divmod(int(seconds), 3600)
    if hours < 48:
        return f"{hours}h {rest // 60}m"
    return f"{hours // 24}d {hours % 24}h"
