"""The outbox: `events` (each event stored once, found by a hash of its id), `deliveries` (one per event and
target, pending until done or dead) and `dead_letters` (deliveries that failed for good, records that could
not be parsed).
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..events import Event
from .base import Tables, TransactionBase

# rows per multi-row INSERT: 6 parameters each stays far below SQLite's limit on host parameters
ROWS_PER_INSERT = 500


def event_id_hash(event_id: str) -> int:
    """The key events are found by: CRC-32 of the id, stable across processes and versions (unlike `hash`).
    Ids that share a hash are told apart by comparing the id itself."""
    return zlib.crc32(event_id.encode())


@dataclass(frozen=True)
class DueDelivery:
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


@dataclass(frozen=True)
class StoredEvent:
    """What `Store.on_stored` is told of an event a transaction stored: its type, source, and rule (alerts)."""

    type: str
    source: str
    rule: str | None


def stored_by(tx: OutboxWrites) -> list[StoredEvent]:
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


class OutboxWrites(TransactionBase):
    """A transaction's writes to the outbox: the events a poll or a webhook stores, and finished deliveries."""

    def __init__(self, conn: sqlite3.Connection, now: float, at_once: Collection[str] = ()) -> None:
        super().__init__(conn, now)
        # the targets that new events are applied to by the transaction that stores them, not delivered to
        # (`Database.apply_at_once`), and the events that wait for that: (seq, event) by target and event id
        self.at_once = at_once
        self.waiting: dict[str, dict[str, tuple[int, Event]]] = {}

    def enqueue(self, event: Event, targets: Iterable[str]) -> bool:
        """Store an event and one pending delivery per target; False when the event id is already stored."""
        return self.enqueue_many([(event, list(targets))]) == 1

    def enqueue_many(self, routed: Sequence[tuple[Event, Sequence[str]]]) -> int:
        """Store events, each with one pending delivery per target, in a few statements; how many were new.

        An event id already stored is not stored again, and gets no delivery it already has. The look-up and the
        insert are atomic: the transaction holds the write lock from its start (BEGIN IMMEDIATE).

        A new event routed to an `at_once` target gets no delivery to it: it waits in `waiting`, and the
        transaction applies it before it commits, with the events of all its pages (`Transaction.apply_waiting`).
        An event stored before gets none either: it was applied when it was stored. In a catch-up, writing,
        reading back, parsing and marking done a delivery per alerting rule and event cost more than the rules
        themselves (BENCHMARKS.md, "Catch-up with alerting rules and usage metrics").
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
            for target in dict.fromkeys(targets):
                if target not in self.at_once:
                    deliveries.append((seq, target, self.now, ts, self.now))
                elif e.id in stored:
                    # an id the page holds twice is applied once
                    self.waiting.setdefault(target, {}).setdefault(e.id, (seq, e))
                # an event stored before was applied then (or given its delivery, when that failed); without a row
                # to say which, a target added since does not get it: a rule counts the events stored after it
        self._add_deliveries(deliveries)
        self.enqueued += len(stored)
        return len(stored)

    def deliver_instead(self, target: str, waiting: Iterable[tuple[int, Event]]) -> None:
        """Give events that waited for an `at_once` target their deliveries to it after all: it failed on them,
        or older ones still wait for it as deliveries."""
        self._add_deliveries([(seq, target, self.now, event.timestamp.timestamp(), self.now) for seq, event in waiting])

    def _add_deliveries(self, rows: Sequence[tuple[int, str, float, float, float]]) -> None:
        """Pending deliveries: (event seq, target, next_at, event time, updated_at); one that exists stays as it is."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO deliveries (event_seq, target, next_at, ts, updated_at) VALUES (?, ?, ?, ?, ?)", rows
        )

    @contextmanager
    def part(self) -> Iterator[None]:
        """A part of the transaction that fails alone (a savepoint): on an exception its writes are undone and the
        exception goes on; the rest of the transaction stays, to commit."""
        enqueued = self.enqueued
        waiting = {target: dict(pending) for target, pending in self.waiting.items()}
        self.conn.execute("SAVEPOINT part")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK TO part")
            self.conn.execute("RELEASE part")
            # what `stored_by` reads back counts only the events that stay, and only they are applied
            self.enqueued, self.waiting = enqueued, waiting
            raise
        self.conn.execute("RELEASE part")

    def mark_done(self, ids: Sequence[int]) -> None:
        """Record deliveries as done, in one statement per 500."""
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            self.conn.execute(
                "UPDATE deliveries SET state = 'done', attempts = attempts + 1, updated_at = ?, last_error = NULL "
                f"WHERE id IN ({','.join('?' * len(chunk))})",
                (self.now, *chunk),
            )

    def oldest_pending_ts(self, target: str) -> float | None:
        """The event time of the oldest event still waiting for `target`, None when none waits."""
        (waiting,) = self.conn.execute(
            "SELECT MIN(ts) FROM deliveries WHERE state = 'pending' AND target = ?", (target,)
        ).fetchone()
        return waiting  # type: ignore[no-any-return]

    def add_bad_record(self, stream: str, raw: Any, error: str) -> None:
        """Keep a record that could not be turned into events, with its raw JSON, as a dead letter."""
        text = raw if isinstance(raw, str) else json.dumps(raw, default=str, ensure_ascii=False)
        self.conn.execute(
            "INSERT INTO dead_letters (kind, stream, raw, error, created_at) VALUES ('record', ?, ?, ?, ?)",
            (stream, text, error, self.now),
        )


class Outbox(Tables[OutboxWrites]):
    """The store's reads and writes of the outbox: the delivery queue and the dead letters."""

    def pending_targets(self) -> list[str]:
        """The targets that have pending deliveries."""
        return [
            row[0] for row in self._conn().execute("SELECT DISTINCT target FROM deliveries WHERE state = 'pending'")
        ]

    def due(self, target: str, now: float, limit: int = 100) -> list[DueDelivery]:
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
        return [DueDelivery(row[0], target, row[1], row[2], row[3]) for row in rows]

    def pending_of_event(self, event_id: str) -> list[DueDelivery]:
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
        return [DueDelivery(*row) for row in rows]

    def next_due_at(self, target: str) -> float | None:
        """When the next pending delivery of `target` falls due, None when it has none."""
        row = (
            self._conn()
            .execute("SELECT MIN(next_at) FROM deliveries WHERE state = 'pending' AND target = ?", (target,))
            .fetchone()
        )
        return None if row is None else row[0]

    def mark_done(self, ids: Sequence[int], now: float | None = None) -> None:
        """Record deliveries as done, in a transaction of their own."""
        with self.write(now) as tx:
            tx.mark_done(ids)

    def mark_retry(self, delivery_id: int, *, next_at: float, error: str, now: float | None = None) -> None:
        """Count a failed attempt of a delivery, which is tried again at `next_at`."""
        with self.write(now) as tx:
            tx.conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_at = ?, last_error = ?, updated_at = ? "
                "WHERE id = ?",
                (next_at, error, tx.now, delivery_id),
            )

    def mark_dead(self, delivery_id: int, *, error: str, attempted: bool = True, now: float | None = None) -> None:
        """Give a delivery up (counting the attempt, when one was made) and keep it as a dead letter."""
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
        """How many deliveries are pending, of every target."""
        return int(self._conn().execute("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").fetchone()[0])

    def pending_by_target(self) -> dict[str, int]:
        """How many deliveries are pending, by target."""
        return dict(
            self._conn().execute("SELECT target, COUNT(*) FROM deliveries WHERE state = 'pending' GROUP BY target")
        )

    def event(self, event_id: str) -> Event | None:
        """The stored event with this id, None when it is not stored (or was pruned)."""
        row = (
            self._conn()
            .execute("SELECT body FROM events WHERE id_hash = ? AND id = ?", (event_id_hash(event_id), event_id))
            .fetchone()
        )
        return None if row is None else Event.from_json(row[0])

    def alert_notifications(self) -> list[Event]:
        """The alert notifications (`rule.firing`, `rule.resolved`) stored and not yet pruned, oldest first."""
        rows = self._conn().execute(
            "SELECT body FROM events WHERE type IN ('rule.firing', 'rule.resolved') ORDER BY seq"
        )
        return [Event.from_json(body) for (body,) in rows]

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
        """Dead letters by id (only those in `ids`, when given), with their delivery's target and event."""
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
        """How many dead letters are kept."""
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

    def requeue_record(
        self, letter_id: int, routed: Sequence[tuple[Event, Sequence[str]]], now: float | None = None
    ) -> int:
        """Replace the dead letter of a record that failed to parse by the events it makes now (each with its
        targets), in one transaction: the events are queued and the letter dropped, or neither. How many of the
        events were new (an event id already stored is not queued again)."""
        queued = 0
        with self.write(now) as tx:
            for event, targets in routed:
                if tx.enqueue(event, targets):
                    queued += 1
            tx.conn.execute("DELETE FROM dead_letters WHERE id = ?", (letter_id,))
        return queued

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
