"""What the server's answers hold, read without trusting them: list bodies, rate-limit headers, rows twice.

Every list endpoint answers `{"data": [...], "meta": {...}}`, except when a proxy, a login page or a broken
server answers instead: `list_body` says what is wrong, naming the endpoint, so that no answer makes a
traceback. A 429 says how long to wait in `Retry-After` and, as a JavaScript date, in `X-RateLimit-Reset`
(`retry_after`). `/v2/observations` can serve one id twice in a page (`newest_rows`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from ..errors import ApiError
from ..events import record_version


def list_body(host: str, path: str, body: Any) -> tuple[list[Any], Mapping[str, Any]]:
    """The `data` list and the `meta` object of a list endpoint's answer; ApiError saying what is unexpected."""
    if not isinstance(body, Mapping):
        kind = "a JSON list" if isinstance(body, list) else f"JSON {type(body).__name__}"
        raise ApiError(f"{host} answered GET {path} with {kind}, not an object with a 'data' list")
    data = body.get("data")
    if not isinstance(data, list):
        raise ApiError(f"{host} answered GET {path} with JSON that has no 'data' list")
    meta = body.get("meta")
    return data, meta if isinstance(meta, Mapping) else {}


# JavaScript's Date.toString(): "Sat Aug 22 2026 08:22:47 GMT+0000 (Coordinated Universal Time)"
_JS_DATE = re.compile(
    r"^\w{3} (?P<month>\w{3}) (?P<day>\d{1,2}) (?P<year>\d{4}) (?P<hms>\d{2}:\d{2}:\d{2}) GMT(?P<offset>[+-]\d{4})"
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def javascript_date(text: str) -> float | None:
    """Unix seconds of a JavaScript `Date.toString()` string (its offset applied), None when it is not one."""
    match = _JS_DATE.match(text.strip())
    if match is None or match["month"] not in _MONTHS:
        return None
    # the month by a fixed English table: strptime's %b follows this process's locale, JavaScript's does not
    month = _MONTHS.index(match["month"]) + 1
    try:
        moment = datetime.strptime(
            f"{match['year']}-{month:02d}-{int(match['day']):02d} {match['hms']} {match['offset']}",
            "%Y-%m-%d %H:%M:%S %z",
        )
    except ValueError:
        return None
    return moment.timestamp()


def retry_after(response: httpx.Response, now: float) -> float | None:
    """Seconds a 429 asks to wait: its Retry-After (whole seconds, or an HTTP date), else its X-RateLimit-Reset.

    Langfuse always sends Retry-After on a 429; X-RateLimit-Reset is the fallback for a proxy that drops it. The
    server writes that header with JavaScript's `Date.toString()`, not as Unix seconds
    (web/src/features/public-api/server/RateLimitService.ts); Unix seconds are still read, as other servers send them.
    """
    header = response.headers.get("retry-after")
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(header).timestamp() - now)
            except (TypeError, ValueError):
                pass
    reset = (response.headers.get("x-ratelimit-reset") or "").strip()
    if not reset:
        return None
    at = javascript_date(reset)
    if at is None:
        try:
            at = float(reset)
        except ValueError:
            return None
    return max(0.0, at - now)


def newest_rows(records: list[Any]) -> list[Any]:
    """The records of a page with each id once: the row with the newest updatedAt, where the first of it stood.

    `/v2/observations` reads a ReplacingMergeTree without FINAL, so until its parts merge one page can serve an
    id twice, an older version beside the newer (packages/shared/src/server/repositories/events.ts). Both rows
    would each be taken for a version of their own: the older one, seen after the newer, for a root that moved
    (an extra trace.updated), and for the dedup key to keep, disagreeing with the newer. The newest is the
    record as it now stands; an older row says nothing the newer does not.
    """
    kept: dict[str, int] = {}  # id -> its position in `out`
    out: list[Any] = []
    for record in records:
        record_id = record.get("id") if isinstance(record, Mapping) else None
        if not isinstance(record_id, str):
            out.append(record)  # malformed: passed on, to become a dead letter
            continue
        where = kept.get(record_id)
        if where is None:
            kept[record_id] = len(out)
            out.append(record)
        elif _newer(record, out[where]):
            out[where] = record
    return out


def _newer(record: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """Whether `record` is a newer version than `than`. A row whose time cannot be read loses to one whose time
    can (the readable row is the record; had it lost, the record would become a dead letter), and two such rows
    keep the first, which then becomes one: a broken time fails its row, never the page."""
    return _version(record) > _version(than)


def _version(record: Mapping[str, Any]) -> int:
    try:
        return int(record_version(record))
    except (TypeError, ValueError, OverflowError):
        return -1


def body_message(body: Any) -> str:
    if isinstance(body, Mapping) and body.get("message"):
        return str(body["message"])
    return str(body)[:200] if body else "no details"


def error_message(response: httpx.Response) -> str:
    try:
        return body_message(response.json())
    except ValueError:
        return response.text[:200] or response.reason_phrase
