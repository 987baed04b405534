"""The sort order of Langfuse's tables, and what is visible in it at a given time.

Langfuse keeps observations in ClickHouse ordered by (start time, xxHash32(trace id), id) and scores by
(timestamp, id), and a write becomes readable only after ingestion. An ``Index`` holds records in that
order, each position with its versions and the clock time each one becomes visible at; the endpoint
families read it newest first, by cursor (``page``) or whole (``visible_range``).
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .wire import Record


def trace_hash(trace_id: str) -> int:
    """The tie-breaker between records of one start time, by trace id."""
    # Stands in for Langfuse's xxHash32(trace_id): only a stable 32-bit tie-breaker is needed.
    return zlib.crc32(trace_id.encode())


@dataclass(slots=True)
class Entry:
    """One position in the sort order; its versions say what is served there at a given clock time."""

    key: tuple[Any, ...]
    trace_id: str
    raw: bool
    versions: list[tuple[float, Record | None]]

    def visible(self, now: float) -> Record | None:
        """The version served at clock time ``now``, or None (not visible yet, or moved to another key)."""
        versions = self.versions
        if len(versions) == 1:
            at, rec = versions[0]
            return rec if now >= at else None
        # Latest version in update order that is already visible; None marks "moved to another key".
        for at, rec in reversed(versions):
            if now >= at:
                return rec
        return None

    def latest(self) -> Record | None:
        """The last version written, visible or not."""
        return self.versions[-1][1]


class Index:
    """Entries kept sorted ascending by key; pages are read backwards (newest first).

    Not thread-safe: callers hold the fake's lock.
    """

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.keys: list[tuple[Any, ...]] = []
        self.by_id: dict[str, Entry] = {}
        self._dirty = False

    def add(self, entry: Entry) -> None:
        """Add ``entry`` at its key (``by_id`` is the caller's to keep)."""
        # Appending in key order (the common bulk case) keeps the list sorted without a re-sort.
        if not self._dirty and (not self.keys or entry.key >= self.keys[-1]):
            self.keys.append(entry.key)
        else:
            self._dirty = True
        self.entries.append(entry)

    def ensure_sorted(self) -> None:
        """Sort the entries if an add came out of order."""
        if self._dirty:
            self.entries.sort(key=lambda e: e.key)
            self.keys = [e.key for e in self.entries]
            self._dirty = False

    def __len__(self) -> int:
        return len(self.entries)

    def page(
        self,
        now: float,
        lo_ms: int | None,
        hi_ms: int | None,
        cursor_key: tuple[Any, ...] | None,
        limit: int,
        matches: Callable[[Record], bool],
    ) -> tuple[list[tuple[Entry, Record]], Entry | None, bool]:
        """Up to ``limit`` visible matching records, newest first, and whether another one follows."""
        self.ensure_sorted()
        keys, entries = self.keys, self.entries
        lo = 0 if lo_ms is None else bisect.bisect_left(keys, (lo_ms,))
        hi = len(keys) if hi_ms is None else bisect.bisect_left(keys, (hi_ms,))
        if cursor_key is not None:
            hi = min(hi, bisect.bisect_left(keys, cursor_key))
        page: list[tuple[Entry, Record]] = []
        last: Entry | None = None
        i = hi - 1
        while i >= lo:
            entry = entries[i]
            i -= 1
            rec = entry.visible(now)
            if rec is None or not matches(rec):
                continue
            if len(page) == limit:
                return page, last, True
            page.append((entry, rec))
            last = entry
        return page, last, False

    def visible_range(
        self, now: float, lo_ms: int | None, hi_ms: int | None, matches: Callable[[Entry, Record], bool]
    ) -> list[tuple[Entry, Record]]:
        """Every visible matching record with time in [lo, hi), oldest first (ties in key order)."""
        self.ensure_sorted()
        keys, entries = self.keys, self.entries
        lo = 0 if lo_ms is None else bisect.bisect_left(keys, (lo_ms,))
        hi = len(keys) if hi_ms is None else bisect.bisect_left(keys, (hi_ms,))
        found: list[tuple[Entry, Record]] = []
        for entry in entries[lo:hi]:
            rec = entry.visible(now)
            if rec is not None and matches(entry, rec):
                found.append((entry, rec))
        return found
