"""Reading a list endpoint's query string the way the real server does, and when it answers 400.

What every data endpoint shares: the last of a repeated parameter wins, ``limit`` has a range, booleans
are ``true``/``false``/``1``/``0``, time filters are ISO 8601 (``from`` inclusive, ``to`` exclusive), and
plain equality filters. What one endpoint family alone accepts lives in that family's module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .wire import Record, parse_iso_us

Query = dict[str, list[str]]
"""A parsed query string: every value of each parameter, in order."""


class BadRequest(Exception):
    """A query the real server rejects with HTTP 400.

    ``issues``, when given, are the zod issues a strict schema reports: the server's body then carries them
    as the ``error`` list (``{"message": "Invalid request data", "error": [...]}``).
    """

    def __init__(self, message: str, issues: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.issues = issues


def ceil_div(a: int, b: int) -> int:
    """``a / b`` rounded up, in integers."""
    return -((-a) // b)


def query_value(query: Query, name: str) -> str | None:
    """The value of parameter ``name`` (the last one when repeated), or None when it is absent."""
    values = query.get(name)
    return values[-1] if values else None


def parse_limit(text: str | None, default: int, maximum: int) -> int:
    """The page size from ``limit``: ``default`` when absent or empty, else 1 to ``maximum``."""
    if text is None or text == "":
        return default
    try:
        limit = int(text)
    except ValueError as exc:
        raise BadRequest(f"limit must be an integer, got {text!r}") from exc
    if not 1 <= limit <= maximum:
        raise BadRequest(f"limit must be between 1 and {maximum}, got {limit}")
    return limit


def parse_bool(query: Query, name: str) -> bool | None:
    """A boolean parameter (``true``/``false``/``1``/``0``, any case), or None when it is absent."""
    text = query_value(query, name)
    if text is None:
        return None
    lowered = text.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise BadRequest(f"{name} must be true or false, got {text!r}")


def time_bounds(query: Query, from_name: str, to_name: str) -> tuple[int | None, int | None]:
    """Millisecond bounds [lo, hi) for the index from inclusive/exclusive microsecond query datetimes."""
    bounds: list[int | None] = []
    for name in (from_name, to_name):
        text = query_value(query, name)
        if text is None or text == "":
            bounds.append(None)
            continue
        try:
            # Stored times are whole milliseconds: t_ms*1000 >= us  <=>  t_ms >= ceil(us/1000), same for <.
            bounds.append(ceil_div(parse_iso_us(text), 1000))
        except ValueError as exc:
            raise BadRequest(f"{name}: {exc}") from exc
    return bounds[0], bounds[1]


def comma_values(query: Query, name: str) -> frozenset[str] | None:
    """The values of a filter that is repeated (each value as it is) or one comma-separated string; None when absent.

    The server's `StringOptionsFilter` params (`z.union([z.array(z.string()), z.string()])`) split only the
    single-string form (packages/shared/src/server/queries/public-api-filter-builder.ts).
    """
    values = query.get(name)
    if not values:
        return None
    parts = values if len(values) > 1 else values[0].split(",")
    return frozenset(part.strip() for part in parts if part.strip())


def equality_checks(query: Query, names: Iterable[str]) -> list[tuple[str, Any]]:
    """``(field, value)`` for each of ``names`` given in the query: filters a record must match exactly."""
    return [(name, value) for name in names if (value := query_value(query, name)) is not None]


def check(rec: Record, checks: list[tuple[str, Any]]) -> bool:
    """Whether ``rec`` passes every equality check."""
    return all(rec.get(name) == expected for name, expected in checks)
