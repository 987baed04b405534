"""The SQLite state: watermarks, dedup keys, the event outbox, deliveries and dead letters.

One file, WAL mode, a busy timeout, one connection per thread, and write transactions that take the write
lock up front (BEGIN IMMEDIATE) so two writers never deadlock on a lock upgrade. Schema changes go through
ordered migrations, each applied in its own transaction and recorded.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StateError
from .events import Event, Seen, Synthesis
from .poll_state import PollState, PollTransaction, StreamState
from .util.lockfile import lock_path, read_holder, write_holder

# the `facts` table holds what the state knows besides records, such as the read path each stream found
READ_PATH_KEY = "read-path:"
# rows per multi-row INSERT: 6 parameters each stays far below SQLite's limit on host parameters
ROWS_PER_INSERT = 500

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    """
    CREATE TABLE streams (
        name TEXT PRIMARY KEY,
        head REAL NOT NULL,
        last_poll_at REAL,
        last_success_at REAL,
        last_error TEXT,
        last_error_at REAL,
        api_requests INTEGER NOT NULL DEFAULT 0,
        records INTEGER NOT NULL DEFAULT 0,
        events INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE sweeps (
        stream TEXT NOT NULL,
        age REAL NOT NULL,
        watermark REAL NOT NULL,
        last_run_at REAL,
        PRIMARY KEY (stream, age)
    );
    CREATE TABLE seen (
        key TEXT PRIMARY KEY,
        stream TEXT NOT NULL,
        ts REAL NOT NULL,
        version TEXT NOT NULL,
        level TEXT NOT NULL DEFAULT ''
    ) WITHOUT ROWID;
    CREATE INDEX seen_by_time ON seen (stream, ts);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        ts REAL NOT NULL,
        source TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        event_seq INTEGER NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
        target TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        ts REAL NOT NULL,
        last_error TEXT,
        updated_at REAL NOT NULL,
        UNIQUE (event_seq, target)
    );
    CREATE INDEX deliveries_pending ON deliveries (target, ts, id) WHERE state = 'pending';
    CREATE INDEX deliveries_by_state ON deliveries (state, updated_at);
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        delivery_id INTEGER REFERENCES deliveries (id) ON DELETE CASCADE,
        stream TEXT,
        raw TEXT,
        error TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 2: alerting (alert groups of grouping rules, silences); facts (the read path of each stream)
    """
    CREATE TABLE alert_groups (
        rule TEXT NOT NULL,
        key TEXT NOT NULL,
        labels TEXT NOT NULL,
        state TEXT NOT NULL,
        opened_at REAL NOT NULL,
        last_match_at REAL,
        first_ts REAL,
        last_ts REAL,
        count INTEGER NOT NULL DEFAULT 0,
        silenced INTEGER NOT NULL DEFAULT 0,
        notified_count INTEGER NOT NULL DEFAULT 0,
        last_notified_at REAL,
        seq INTEGER NOT NULL DEFAULT 0,
        told TEXT NOT NULL DEFAULT '[]',
        samples TEXT NOT NULL DEFAULT '[]',
        arrivals TEXT NOT NULL DEFAULT '[]',
        next_at REAL,
        PRIMARY KEY (rule, key)
    );
    CREATE INDEX alert_groups_due ON alert_groups (next_at) WHERE next_at IS NOT NULL;
    CREATE TABLE facts (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE silences (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rule TEXT NOT NULL,
        condition TEXT,
        starts_at REAL NOT NULL,
        ends_at REAL NOT NULL,
        comment TEXT NOT NULL DEFAULT '',
        created_by TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        matched INTEGER NOT NULL DEFAULT 0
    );
    """,
    # 3: the index that prune_delivered reads holds only the finished deliveries it looks for. Over every
    # delivery, (state, updated_at) cost an insert when an event was queued and a move when it was delivered;
    # the partial index costs one insert, on delivery (a catch-up: 10-14% of the SQLite time, BENCHMARKS.md)
    """
    DROP INDEX IF EXISTS deliveries_by_state;
    CREATE INDEX deliveries_done ON deliveries (updated_at) WHERE state = 'done';
    """,
    # 4: events are found by a 32-bit hash of their id (the id compared on a match) instead of a unique index
    # of the id text. Event ids are long and random, so each new event rewrote a page of that index; once the
    # index outgrew the page cache, every commit wrote thousands of its pages to the WAL (the 620,000 events of
    # a 1M-observation catch-up, their inserts alone: 18.7 s with the text index, 12.3-13.8 s with this one).
    # SQLite cannot drop a column's UNIQUE, so the table is rebuilt, with its seq and its AUTOINCREMENT counter
    # kept (deliveries refer to seq). created_at becomes stored_at so that an older release still writing to the
    # file fails on the column it names: its INSERT OR IGNORE, without id_hash, would skip every event (NOT NULL)
    # and still commit the poll's watermark. (A trigger that refuses a missing id_hash costs 2-3 us per event.)
    """
    CREATE TABLE events_v4 (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        id_hash INTEGER NOT NULL,
        type TEXT NOT NULL,
        ts REAL NOT NULL,
        source TEXT NOT NULL,
        body TEXT NOT NULL,
        stored_at REAL NOT NULL
    );
    INSERT INTO events_v4 (seq, id, id_hash, type, ts, source, body, stored_at)
        SELECT seq, id, event_id_hash(id), type, ts, source, body, created_at FROM events;
    DELETE FROM sqlite_sequence WHERE name = 'events_v4';
    INSERT INTO sqlite_sequence (name, seq) SELECT 'events_v4', seq FROM sqlite_sequence WHERE name = 'events';
    DROP TABLE events;
    ALTER TABLE events_v4 RENAME TO events;
    CREATE INDEX events_by_id_hash ON events (id_hash);
    """,
)


def event_id_hash(event_id: str) -> int:
    """The key events are found by: CRC-32 of the id, stable across processes and versions (unlike `hash`).
    Ids that share a hash are told apart by comparing the id itself."""
    return zlib.crc32(event_id.encode())


@dataclass(frozen=True)
class Due:
    """A delivery that is due: which event (its id and stored JSON), to which target, how many attempts so far."""

    id: int
    target: str
    attempts: int
    event_id: str
    body: str

    @cached_property
    def event(self) -> Event:
        # parsed only for targets that need the object: a file notifier writes the stored JSON as it is
        return Event.from_json(self.body)


@dataclass(frozen=True)
class DeadLetter:
    """A dead letter: a delivery that failed for good, or a record that could not be parsed."""

    id: int
    kind: str
    error: str
    created_at: float
    target: str | None
    event_id: str | None
    event_type: str | None
    attempts: int | None
    stream: str | None
    raw: str | None


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


@dataclass(frozen=True)
class StoredEvent:
    """What `Store.on_stored` is told of an event a transaction stored: its type, source, and rule (alerts)."""

    type: str
    source: str
    rule: str | None


def _stored_by(tx: Transaction) -> list[StoredEvent]:
    """The events `tx` stored: the last `tx.enqueued` rows, since the transaction holds the write lock and
    `seq` only grows. Read inside the transaction, before another writer can add any."""
    rows = tx.conn.execute(
        "SELECT type, source, CASE WHEN source = 'rule' THEN body END FROM events ORDER BY seq DESC LIMIT ?",
        (tx.enqueued,),
    )
    return [
        StoredEvent(kind, source, str(json.loads(body).get("data", {}).get("rule")) if body else None)
        for kind, source, body in rows
    ]


class Transaction:
    """The writes of one transaction; obtained from `Store.write()`."""

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self.now = now
        self.enqueued = 0

    def seen_states(self, keys: Sequence[str]) -> dict[str, Seen]:
        """What is remembered of these records; records never seen are absent."""
        return _seen_states(self.conn, keys)

    def remember(self, stream: str, syntheses: Iterable[Synthesis]) -> None:
        """Keep the dedup keys (version and level) of records, in one statement."""
        self.conn.executemany(
            "INSERT INTO seen (key, stream, ts, version, level) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET version = excluded.version, level = excluded.level",
            [(s.key, stream, s.timestamp.timestamp(), s.seen.version, s.seen.level) for s in syntheses],
        )

    def enqueue(self, event: Event, targets: Iterable[str]) -> bool:
        """Store an event and one pending delivery per target; False when the event id is already stored."""
        return self.enqueue_many([(event, list(targets))]) == 1

    def enqueue_many(self, routed: Sequence[tuple[Event, Sequence[str]]]) -> int:
        """Store events, each with one pending delivery per target, in a few statements; how many were new.

        An event id already stored is not stored again, and gets no delivery it already has. The look-up and the
        insert are atomic: the transaction holds the write lock from its start (BEGIN IMMEDIATE).
        """
        stored: dict[str, int] = {}
        # events stored before (a re-read, a replay): (seq, ts), since one may lack a delivery to a target added
        # since then
        earlier: dict[str, tuple[int, float]] = {}
        for start in range(0, len(routed), ROWS_PER_INSERT):
            fresh: dict[str, tuple[int, Event]] = {}
            for event, _ in routed[start : start + ROWS_PER_INSERT]:
                # the first of two events with one id is the one stored, as an insert that ignores conflicts would
                if event.id not in stored and event.id not in earlier and event.id not in fresh:
                    fresh[event.id] = (event_id_hash(event.id), event)
            if not fresh:
                continue
            hashes = list({id_hash for id_hash, _ in fresh.values()})
            for event_id, seq, ts in self.conn.execute(
                f"SELECT id, seq, ts FROM events WHERE id_hash IN ({','.join('?' * len(hashes))})", hashes
            ):
                if fresh.pop(event_id, None) is not None:
                    earlier[event_id] = (seq, ts)
            if not fresh:
                continue
            # RETURNING hands back the seq of each new event: its deliveries need no lookup by id
            rows = self.conn.execute(
                "INSERT INTO events (id, id_hash, type, ts, source, body, stored_at) VALUES "
                + ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(fresh))
                + " RETURNING id, seq",
                [
                    value
                    for id_hash, e in fresh.values()
                    for value in (e.id, id_hash, e.type, e.timestamp.timestamp(), e.source, e.to_json(), self.now)
                ],
            ).fetchall()
            stored.update(rows)
        deliveries: list[tuple[int, str, float, float, float]] = []
        for e, targets in routed:
            if (seq := stored.get(e.id)) is not None:
                ts = e.timestamp.timestamp()
            else:
                seq, ts = earlier[e.id]
            deliveries.extend((seq, target, self.now, ts, self.now) for target in dict.fromkeys(targets))
        self.conn.executemany(
            "INSERT OR IGNORE INTO deliveries (event_seq, target, next_at, ts, updated_at) VALUES (?, ?, ?, ?, ?)",
            deliveries,
        )
        self.enqueued += len(stored)
        return len(stored)

    def mark_done(self, ids: Sequence[int]) -> None:
        """Record deliveries as done, in one statement per 500."""
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            self.conn.execute(
                "UPDATE deliveries SET state = 'done', attempts = attempts + 1, updated_at = ?, last_error = NULL "
                f"WHERE id IN ({','.join('?' * len(chunk))})",
                (self.now, *chunk),
            )

    def add_bad_record(self, stream: str, raw: Any, error: str) -> None:
        """Keep a record that could not be turned into events, with its raw JSON, as a dead letter."""
        text = raw if isinstance(raw, str) else json.dumps(raw, default=str, ensure_ascii=False)
        self.conn.execute(
            "INSERT INTO dead_letters (kind, stream, raw, error, created_at) VALUES ('record', ?, ?, ?, ?)",
            (stream, text, error, self.now),
        )

    def sweep_watermarks(self, stream: str) -> dict[float, float]:
        """Each sweep tier's watermark, by age, as this transaction sees them."""
        return _sweep_watermarks(self.conn, stream)

    def set_head(self, stream: str, head: float) -> None:
        self.conn.execute("UPDATE streams SET head = MAX(head, ?) WHERE name = ?", (head, stream))

    def set_sweep(self, stream: str, age: float, watermark: float, ran: bool = False) -> None:
        self.conn.execute(
            "UPDATE sweeps SET watermark = MAX(watermark, ?), last_run_at = CASE WHEN ? THEN ? ELSE last_run_at END "
            "WHERE stream = ? AND age = ?",
            (watermark, ran, self.now, stream, age),
        )

    def count_poll(self, stream: str, requests: int, records: int, events: int) -> None:
        self.conn.execute(
            "UPDATE streams SET api_requests = api_requests + ?, records = records + ?, events = events + ? "
            "WHERE name = ?",
            (requests, records, events, stream),
        )


class Store:
    """The state database. Safe to share between threads: each thread gets its own connection."""

    def __init__(self, path: Path | str, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._lock_fd: int | None = None
        # told of the events each transaction stored, once it committed (the metrics count them by type)
        self.on_stored: Callable[[Sequence[StoredEvent]], None] | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {self.path.parent}: {exc.strerror}") from None
        self._migrate()

    # connections and transactions

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode = WAL")
                # NORMAL in WAL mode survives a process crash; a power cut may drop the last commits, which
                # rolls back the watermark together with its events, so nothing is lost, only re-read
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA foreign_keys = ON")
                # the page cache stays at SQLite's default 2 MB: a connection drops its whole cache whenever another
                # one has committed since its last read, and the poller and the delivery threads commit in turns.
                # A larger cache was only refilled, and it made the peak RSS grow with the backlog (8 MB: 10,300 /
                # 10,700 events/s and 74-79 / 84-85 MB at 100k / 1M observations; 2 MB: 11,100-12,200 events/s,
                # 69-70 / 72-74 MB; BENCHMARKS.md). Fewer, larger checkpoints do pay in a catch-up
                conn.execute("PRAGMA wal_autocheckpoint = 4000")
                conn.execute("PRAGMA busy_timeout = 30000")
            except sqlite3.Error as exc:
                raise StateError(f"cannot open the state database {self.path}: {exc}") from None
            self._local.conn = conn
        return conn

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, for the read queries of modules that own a table (alerting, silences)."""
        return self._conn()

    @contextmanager
    def write(self, now: float | None = None) -> Iterator[Transaction]:
        """One write transaction: everything inside commits together, or nothing does.

        Threads of this process queue on a lock first: SQLite's own busy handler sleeps in growing steps (up
        to 100 ms) before it retries, which in a catch-up made the poller and the delivery threads wait for
        each other far longer than their transactions last. Other processes still meet the busy timeout.
        """
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            tx = Transaction(conn, self.clock() if now is None else now)
            try:
                yield tx
                stored = _stored_by(tx) if tx.enqueued and self.on_stored is not None else []
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        if stored and self.on_stored is not None:
            try:
                self.on_stored(stored)
            except Exception:
                # the transaction committed: an observer's failure must not look like the write's
                logging.getLogger(__name__).exception("an observer of stored events failed")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _migrate(self) -> None:
        conn = self._conn()
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        if applied and max(applied) > len(MIGRATIONS):
            raise StateError(
                f"{self.path} was written by a newer langfuse-poller (schema {max(applied)}, "
                f"this version knows {len(MIGRATIONS)}): upgrade langfuse-poller or use another state path"
            )
        if len(applied) == len(MIGRATIONS):
            return
        fd: int | None = None
        if applied:
            # an existing state is updated only under its lock: a langfuse-poller of the older release still
            # running on it would go on writing the old schema into the new one
            fd = self._take_lock(f"and this release must update it (schema {max(applied)} to {len(MIGRATIONS)})")
            # a rebuild of a large outbox takes a while (migration 4: about 7 s for 600,000 events)
            logging.getLogger(__name__).info(
                "updating the state in %s from schema %d to %d", self.path, max(applied), len(MIGRATIONS)
            )
        try:
            conn.create_function("event_id_hash", 1, event_id_hash, deterministic=True)
            # a migration may rebuild a table that others refer to: with foreign keys enforced, dropping the old
            # table would cascade to the rows that refer to it (SQLite's documented way: enforcement off meanwhile,
            # and a foreign key check before each commit). The pragma cannot change inside a transaction
            conn.execute("PRAGMA foreign_keys = OFF")
            try:
                for version, script in enumerate(MIGRATIONS, start=1):
                    if version not in applied:
                        self._apply(conn, version, script)
            finally:
                conn.execute("PRAGMA foreign_keys = ON")
        finally:
            if fd is not None:
                os.close(fd)

    def _apply(self, conn: sqlite3.Connection, version: int, script: str) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # another process may have applied it since this one looked
            if conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,)).fetchone():
                conn.execute("ROLLBACK")
                return
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            broken = conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise StateError(f"migration {version} of {self.path} broke {len(broken)} references: {broken[:3]}")
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, self.clock()))
        except BaseException as exc:
            conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StateError(f"cannot update the state in {self.path} to schema {version}: {exc}") from None
            raise
        conn.execute("COMMIT")

    def _take_lock(self, why: str = "") -> int:
        """The state's exclusive lock (an flock on `<path>.lock`, which holds the holder's pid): its descriptor.
        Raises StateError naming the process that holds it."""
        import fcntl

        fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise StateError(
                f"another langfuse-poller (pid {holder}) is using {self.path}{' ' + why if why else ''}; stop it "
                "first, or give this one its own [state] path"
            ) from None
        return fd

    def lock(self) -> None:
        """Take the state's exclusive lock: two pollers on one state would deliver everything twice."""
        fd = self._take_lock()
        write_holder(fd)
        self._lock_fd = fd

    # streams

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
        names = [row[0] for row in self._conn().execute("SELECT name FROM streams ORDER BY name")]
        return [state for name in names if (state := self.stream(name)) is not None]

    def sweep_last_run(self, stream: str, age: float) -> float | None:
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

    # deliveries

    def pending_targets(self) -> list[str]:
        return [
            row[0] for row in self._conn().execute("SELECT DISTINCT target FROM deliveries WHERE state = 'pending'")
        ]

    def due(self, target: str, now: float, limit: int = 100) -> list[Due]:
        """Pending deliveries of one target whose time has come, oldest event first."""
        rows = (
            self._conn()
            .execute(
                "SELECT d.id, d.attempts, e.id, e.body FROM deliveries d JOIN events e ON e.seq = d.event_seq "
                "WHERE d.state = 'pending' AND d.target = ? AND d.next_at <= ? ORDER BY d.ts, d.id LIMIT ?",
                (target, now, limit),
            )
            .fetchall()
        )
        return [Due(row[0], target, row[1], row[2], row[3]) for row in rows]

    def pending_of_event(self, event_id: str) -> list[Due]:
        """The pending deliveries of one event, whatever their due time."""
        rows = (
            self._conn()
            .execute(
                "SELECT d.id, d.target, d.attempts, e.id, e.body FROM deliveries d JOIN events e "
                "ON e.seq = d.event_seq WHERE e.id_hash = ? AND e.id = ? AND d.state = 'pending' ORDER BY d.target",
                (event_id_hash(event_id), event_id),
            )
            .fetchall()
        )
        return [Due(*row) for row in rows]

    def next_due_at(self, target: str) -> float | None:
        row = (
            self._conn()
            .execute("SELECT MIN(next_at) FROM deliveries WHERE state = 'pending' AND target = ?", (target,))
            .fetchone()
        )
        return None if row is None else row[0]

    def mark_done(self, ids: Sequence[int], now: float | None = None) -> None:
        with self.write(now) as tx:
            tx.mark_done(ids)

    def mark_retry(self, delivery_id: int, *, next_at: float, error: str, now: float | None = None) -> None:
        with self.write(now) as tx:
            tx.conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_at = ?, last_error = ?, updated_at = ? "
                "WHERE id = ?",
                (next_at, error, tx.now, delivery_id),
            )

    def mark_dead(self, delivery_id: int, *, error: str, attempted: bool = True, now: float | None = None) -> None:
        with self.write(now) as tx:
            tx.conn.execute(
                "UPDATE deliveries SET state = 'dead', attempts = attempts + ?, last_error = ?, updated_at = ? "
                "WHERE id = ?",
                (1 if attempted else 0, error, tx.now, delivery_id),
            )
            tx.conn.execute(
                "INSERT INTO dead_letters (kind, delivery_id, error, created_at) VALUES ('delivery', ?, ?, ?)",
                (delivery_id, error, tx.now),
            )

    def queue_depth(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").fetchone()[0])

    def pending_by_target(self) -> dict[str, int]:
        return dict(
            self._conn().execute("SELECT target, COUNT(*) FROM deliveries WHERE state = 'pending' GROUP BY target")
        )

    def event(self, event_id: str) -> Event | None:
        row = (
            self._conn()
            .execute("SELECT body FROM events WHERE id_hash = ? AND id = ?", (event_id_hash(event_id), event_id))
            .fetchone()
        )
        return None if row is None else Event.from_json(row[0])

    def deliveries_of(self, event_id: str) -> list[tuple[str, str, int, str | None]]:
        """(target, state, attempts, last error) of each delivery of one event."""
        return [
            (row[0], row[1], row[2], row[3])
            for row in self._conn().execute(
                "SELECT d.target, d.state, d.attempts, d.last_error FROM deliveries d "
                "JOIN events e ON e.seq = d.event_seq WHERE e.id_hash = ? AND e.id = ? ORDER BY d.target",
                (event_id_hash(event_id), event_id),
            )
        ]

    def prune_delivered(self, before: float) -> int:
        """Drop events whose deliveries all finished before `before` (dead letters stay until purged)."""
        with self.write() as tx:
            tx.conn.execute("DELETE FROM deliveries WHERE state = 'done' AND updated_at < ?", (before,))
            return tx.conn.execute(
                "DELETE FROM events WHERE stored_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM deliveries d WHERE d.event_seq = events.seq)",
                (before,),
            ).rowcount

    # dead letters

    def dead_letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        query = (
            "SELECT l.id, l.kind, l.error, l.created_at, d.target, e.id, e.type, d.attempts, l.stream, l.raw "
            "FROM dead_letters l LEFT JOIN deliveries d ON d.id = l.delivery_id "
            "LEFT JOIN events e ON e.seq = d.event_seq"
        )
        params: list[Any] = []
        if ids is not None:
            query += f" WHERE l.id IN ({','.join('?' * len(ids))})"
            params = list(ids)
        rows = self._conn().execute(query + " ORDER BY l.id", params).fetchall()
        return [DeadLetter(*row) for row in rows]

    def dead_letter_count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])

    def requeue_delivery(self, letter_id: int, now: float | None = None) -> None:
        """Put a dead delivery back in the queue, with a fresh count of attempts."""
        with self.write(now) as tx:
            row = tx.conn.execute("SELECT delivery_id FROM dead_letters WHERE id = ?", (letter_id,)).fetchone()
            if row is None or row[0] is None:
                return
            tx.conn.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_at = ?, updated_at = ? WHERE id = ?",
                (tx.now, tx.now, row[0]),
            )
            tx.conn.execute("DELETE FROM dead_letters WHERE id = ?", (letter_id,))

    def delete_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Purge dead letters (all when `ids` is None); their deliveries are dropped with them."""
        with self.write() as tx:
            if ids is None:
                rows = tx.conn.execute("SELECT id, delivery_id FROM dead_letters").fetchall()
            else:
                marks = ",".join("?" * len(ids))
                rows = tx.conn.execute(
                    f"SELECT id, delivery_id FROM dead_letters WHERE id IN ({marks})", list(ids)
                ).fetchall()
            tx.conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(r[0],) for r in rows])
            tx.conn.executemany("DELETE FROM deliveries WHERE id = ?", [(r[1],) for r in rows if r[1] is not None])
            return len(rows)


if TYPE_CHECKING:
    # mypy proves here that the store is the poll state the poller reads and writes, as SharedPollState is
    _state: type[PollState] = Store
    _transaction: type[PollTransaction] = Transaction
