"""Langfuse's wire format: timestamps, ids and JSON answers, written the way the real server writes them.

Langfuse stores times as ClickHouse ``DateTime64(3)`` and serves them as RFC 3339 UTC strings with
milliseconds (``2026-11-27T07:37:16.522Z``); clients send ISO 8601 with any precision and offset. Ids are
uuid4 hex. Every answer, error or not, is a JSON body; endpoint modules build theirs with ``json_response``
and ``error_response``.
"""

from __future__ import annotations

import calendar
import functools
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

Record = dict[str, Any]
"""A record in wire format: camelCase keys, timestamps as strings."""

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

_ISO_RE: Final = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    # An unescaped "+" in a query string decodes to a space, so a space is accepted as a "+" sign.
    r"\s*(Z|z|[+\- ]\d{2}(?::?\d{2})?)?$"
)


def parse_iso_us(text: str) -> int:
    """Parse an ISO 8601 timestamp into integer microseconds since the epoch (UTC if no offset is given).

    Fractional seconds of any length are accepted (digits past microseconds are dropped).
    """
    m = _ISO_RE.match(text.strip())
    if m is None:
        raise ValueError(f"not an ISO 8601 datetime: {text!r}")
    year, month, day, hour, minute, sec, frac, tz = m.groups()
    seconds = calendar.timegm((int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(sec or 0)))
    micros = int((frac or "0")[:6].ljust(6, "0"))
    offset = 0
    if tz and tz not in ("Z", "z"):
        sign = -1 if tz[0] == "-" else 1
        digits = tz[1:].replace(":", "")
        offset = sign * (int(digits[:2]) * 3600 + int(digits[2:4] or 0) * 60)
    return (seconds - offset) * 1_000_000 + micros


def format_ms(ms: int) -> str:
    """Format epoch milliseconds the way Langfuse does: ``2026-11-27T07:37:16.522Z``."""
    sec, milli = divmod(ms, 1000)
    return f"{_format_second(sec)}.{milli:03d}Z"


@functools.lru_cache(maxsize=4096)
def _format_second(sec: int) -> str:
    t = time.gmtime(sec)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


def datetime_to_ms(value: datetime) -> int:
    """Epoch milliseconds of a datetime (naive means UTC), truncated like Langfuse's DateTime64(3) columns."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - EPOCH) // timedelta(milliseconds=1)


def new_id() -> str:
    """A uuid4 in hex, without the cost of building a ``uuid.UUID`` (bulk adds make tens of thousands)."""
    n = int.from_bytes(os.urandom(16))
    n = (n & ~(0xF000 << 64) & ~(0xC000 << 48)) | (0x4000 << 64) | (0x8000 << 48)
    return f"{n:032x}"


@dataclass(slots=True)
class Response:
    """One answer: status, JSON body and the headers beyond Content-Type and Content-Length."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    """An answer with ``payload`` as its JSON body."""
    # orjson: the stand-in must serve pages faster than any poller reads them (benchmarks need 50,000+/s)
    body = orjson.dumps(payload, default=str)
    return Response(status, body, list(headers))


def error_response(status: int, message: str, **extra: Any) -> Response:
    """An error answer as Langfuse writes one: ``{"message": ...}`` plus any ``extra`` keys."""
    return json_response(status, {"message": message, **extra})
