"""The stream tables: `streams` (each stream's head watermark and counters), `sweeps` (the re-read tiers),
`seen` (the dedup keys of records) and `facts` (what the state knows besides records, such as read paths).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from ..events import RecordOutcome, Seen
from ..poll_state import StreamState
from .base import Tables, TransactionBase

# the `facts` table holds what the state knows besides records, such as the read path each stream found
READ_PATH_KEY = "read-path:"


def _seen_states(conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, Seen]:
    found: dict[str, Seen] = {}
    # stay well below SQLite's limit on host parameters
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for key, version, level in conn.execute(f"SELECT key, version, level FROM seen WHERE key IN ({marks})", chunk):
            found[key] = Seen(version, level)
    return found


def _sweep_watermarks(conn: sqlite3.Connection, stream: str) -> dict[float, float]:
    return dict(conn.execute("SELECT age, watermark FROM sweeps WHERE stream = ?", (stream,)).fetchall())


class StreamWrites(TransactionBase):
    """A transaction's reads and writes of the stream tables (the poller's, page by page)."""

    def seen_states(self, keys: Sequence[str]) -> dict[str, Seen]:
        """What is remembered of these records; records never seen are absent."""
        return _seen_states(self.conn, keys)

    def remember(self, stream: str, outcomes: Iterable[RecordOutcome]) -> None:
        """Keep the dedup keys (version and level) of records, in one statement."""
        self.conn.executemany(
            "INSERT INTO seen (key, stream, ts, version, level) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET version = excluded.version, level = excluded.level",
            [(s.key, stream, s.timestamp.timestamp(), s.seen.version, s.seen.level) for s in outcomes],
        )

    def sweep_watermarks(self, stream: str) -> dict[float, float]:
        """Each sweep tier's watermark, by age, as this transaction sees them."""
        return _sweep_watermarks(self.conn, stream)

    def heads(self) -> list[tuple[str, float]]:
        """(stream, head watermark) of every stream."""
        return self.conn.execute("SELECT name, head FROM streams").fetchall()

    def set_head(self, stream: str, head: float) -> None:
        """Move the head watermark of `stream` forward to `head` (never back)."""
        self.conn.execute("UPDATE streams SET head = MAX(head, ?) WHERE name = ?", (head, stream))

    def set_sweep(self, stream: str, age: float, watermark: float, ran: bool = False) -> None:
        """Move a sweep tier's watermark forward (never back); `ran`: the tier ran now."""
        self.conn.execute(
            "UPDATE sweeps SET watermark = MAX(watermark, ?), last_run_at = CASE WHEN ? THEN ? ELSE last_run_at END "
            "WHERE stream = ? AND age = ?",
            (watermark, ran, self.now, stream, age),
        )

    def count_poll(self, stream: str, requests: int, records: int, events: int) -> None:
        """Add a page's API requests, records and events to the counters of `stream`."""
        self.conn.execute(
            "UPDATE streams SET api_requests = api_requests + ?, records = records + ?, events = events + ? "
            "WHERE name = ?",
            (requests, records, events, stream),
        )


class StreamTables(Tables[StreamWrites]):
    """The store's reads and writes of the stream tables, each write in its own transaction."""

    def seen_states(self, keys: Sequence[str]) -> dict[str, Seen]:
        """What is remembered of these records (a read, outside any write transaction)."""
        return _seen_states(self._conn(), keys)

    def ensure_stream(self, name: str, start: float, ages: Sequence[float]) -> None:
        """Create a stream's state on first use, starting at `start`; add sweep tiers that are new."""
        with self.write() as tx:
            tx.conn.execute("INSERT OR IGNORE INTO streams (name, head) VALUES (?, ?)", (name, start))
            head = tx.conn.execute("SELECT head FROM streams WHERE name = ?", (name,)).fetchone()[0]
            for age in ages:
                # a new tier starts at the head: it re-reads what comes from now on, not the past
                tx.conn.execute(
                    "INSERT OR IGNORE INTO sweeps (stream, age, watermark) VALUES (?, ?, ?)",
                    (name, age, head),
                )
            marks = ",".join("?" * len(ages))
            tx.conn.execute(f"DELETE FROM sweeps WHERE stream = ? AND age NOT IN ({marks})", (name, *ages))

    def stream(self, name: str) -> StreamState | None:
        """The state of one stream, None when the state has no such stream."""
        row = (
            self._conn()
            .execute(
                "SELECT name, head, last_poll_at, last_success_at, last_error, last_error_at, api_requests, records, "
                "events FROM streams WHERE name = ?",
                (name,),
            )
            .fetchone()
        )
        if row is None:
            return None
        return StreamState(row[0], row[1], _sweep_watermarks(self._conn(), name), *row[2:])

    def streams(self) -> list[StreamState]:
        """The state of every stream, by name."""
        names = [row[0] for row in self._conn().execute("SELECT name FROM streams ORDER BY name")]
        return [state for name in names if (state := self.stream(name)) is not None]

    def sweep_last_run(self, stream: str, age: float) -> float | None:
        """When a sweep tier of `stream` last ran, None when it never did (or has no such tier)."""
        row = (
            self._conn()
            .execute("SELECT last_run_at FROM sweeps WHERE stream = ? AND age = ?", (stream, age))
            .fetchone()
        )
        return None if row is None else row[0]

    def record_poll(self, stream: str, *, error: str | None, now: float | None = None) -> None:
        """Note the outcome of a poll of `stream`: success clears the error, a failure keeps its words."""
        now = self.clock() if now is None else now
        with self.write(now) as tx:
            if error is None:
                tx.conn.execute(
                    "UPDATE streams SET last_poll_at = ?, last_success_at = ?, last_error = NULL WHERE name = ?",
                    (now, now, stream),
                )
            else:
                tx.conn.execute(
                    "UPDATE streams SET last_poll_at = ?, last_error = ?, last_error_at = ? WHERE name = ?",
                    (now, error, now, stream),
                )

    def set_read_path(self, stream: str, path: str, now: float | None = None) -> None:
        """Remember the read path ("v2" or "legacy") the poller uses for `stream`, and since when."""
        with self.write(now) as tx:
            tx.conn.execute(
                "INSERT OR REPLACE INTO facts (key, value, updated_at) VALUES (?, ?, ?)",
                (READ_PATH_KEY + stream, path, tx.now),
            )

    def read_paths(self) -> dict[str, tuple[str, float]]:
        """The read path of each stream that has one, and when it was found: {stream: (path, since)}."""
        rows = self._conn().execute("SELECT key, value, updated_at FROM facts WHERE key LIKE ?", (READ_PATH_KEY + "%",))
        return {key.removeprefix(READ_PATH_KEY): (path, since) for key, path, since in rows}

    def any_seen(self, stream: str, start: float, end: float) -> bool:
        """Whether any dedup key of `stream` lies in [start, end) (a read, outside any write transaction)."""
        row = (
            self._conn()
            .execute("SELECT 1 FROM seen WHERE stream = ? AND ts >= ? AND ts < ? LIMIT 1", (stream, start, end))
            .fetchone()
        )
        return row is not None

    def prune_seen(self, stream: str, before: float) -> int:
        """Forget dedup keys of records older than any window will read again."""
        with self.write() as tx:
            return tx.conn.execute("DELETE FROM seen WHERE stream = ? AND ts < ?", (stream, before)).rowcount
