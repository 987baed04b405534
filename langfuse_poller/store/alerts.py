"""The alert tables: `alert_groups` (the open groups of grouping rules, the alerter's state), `alert_rules` and
`alert_values` (what a new_value rule knows), and `silences`.

The alerter's reads and writes of its groups go through `SqliteAlertState`, the SQLite side of the alert state
(the contract is `alerting/state.py`; with standby pollers the Redis side, `redis/standby/alert_state.py`, keeps
the same state behind the same methods). Silences are rows here; `alerting.silences.SqliteSilenceBook` turns
them into `Silence` values.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any

import orjson

from ..alerting.groups import Group
from ..alerting.silence_book import Silence
from ..events import Event
from ..notifiers.base import Notifier
from .base import Tables, TransactionBase

COLUMNS = (
    "rule",
    "key",
    "labels",
    "state",
    "opened_at",
    "last_match_at",
    "first_ts",
    "last_ts",
    "count",
    "silenced",
    "notified_count",
    "last_notified_at",
    "seq",
    "told",
    "samples",
    "arrivals",
    "next_at",
    "measure",
)
JSON_COLUMNS = frozenset({"labels", "told", "samples", "arrivals", "measure"})
SELECT = f"SELECT {', '.join(COLUMNS)} FROM alert_groups"
SAVE = f"INSERT OR REPLACE INTO alert_groups ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
# what json.dumps(default=str) writes as text, orjson writes as text too
PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


class SqliteAlertState:
    """The alert groups of grouping rules, in the `alert_groups` table: the SQLite side of the alert state.

    Bound to one connection: a transaction's (`Transaction.alert_state`), whose writes commit or roll back with
    everything else the transaction does (the delivery of the match that moved a group, the notification its new
    state sends), or this thread's own (`Store.alert_state()`), for reads only. Groups come ordered by rule and
    key. Every method raises SqliteError when a statement fails (a locked or read-only file, a full disk).
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def _load(self, where: str = "", params: Iterable[Any] = ()) -> list[Group]:
        query = SELECT + (f" WHERE {where}" if where else "")
        groups = []
        for row in self._conn.execute(query + " ORDER BY rule, key", tuple(params)):
            values = dict(zip(COLUMNS, row, strict=True))
            for name in JSON_COLUMNS:
                values[name] = _decode(values[name])
            groups.append(Group(**values))
        return groups

    def group(self, rule: str, key: str) -> Group | None:
        """The group of `rule` with this key, None when it has none open."""
        found = self._load("rule = ? AND key = ?", (rule, key))
        return found[0] if found else None

    def groups(self) -> list[Group]:
        """Every stored group, of every rule."""
        return self._load()

    def due(self, now: float) -> list[Group]:
        """The groups whose next look (`next_at`) has come by `now`."""
        return self._load("next_at IS NOT NULL AND next_at <= ?", (now,))

    def open_groups(self) -> list[Group]:
        """The groups that are firing or pending (not watching, not resolved)."""
        return self._load("state IN ('firing', 'pending')")

    def any_due(self, now: float) -> bool:
        """Whether any group's next look has come by `now` (cheaper than `due`: nothing is loaded)."""
        return (
            self._conn.execute("SELECT 1 FROM alert_groups WHERE next_at <= ? LIMIT 1", (now,)).fetchone() is not None
        )

    def next_due_after(self, now: float) -> float | None:
        """The earliest next look later than `now`, None when no group has one."""
        (future,) = self._conn.execute("SELECT MIN(next_at) FROM alert_groups WHERE next_at > ?", (now,)).fetchone()
        return future  # type: ignore[no-any-return]

    def firing_count(self) -> int:
        """How many groups are firing."""
        (count,) = self._conn.execute("SELECT COUNT(*) FROM alert_groups WHERE state = 'firing'").fetchone()
        return int(count)

    def counts(self) -> list[tuple[str, str, int]]:
        """(rule, state, how many groups) for each rule and state that has groups, ordered by rule and state."""
        return [
            (rule, state, count)
            for rule, state, count in self._conn.execute(
                "SELECT rule, state, COUNT(*) FROM alert_groups GROUP BY rule, state ORDER BY rule, state"
            )
        ]

    def save(self, group: Group) -> None:
        """Keep the group's new state; a resolved group is dropped (its next match opens a new one)."""
        if group.state == "resolved":
            self.delete(group.rule, group.key)
            return
        values = [
            _encode(name, getattr(group, name)) if name in JSON_COLUMNS else getattr(group, name) for name in COLUMNS
        ]
        self._conn.execute(SAVE, values)

    def delete(self, rule: str, key: str) -> None:
        """Drop the group of `rule` with this key, if there is one."""
        self._conn.execute("DELETE FROM alert_groups WHERE rule = ? AND key = ?", (rule, key))

    def group_count(self, rule: str) -> int:
        """How many groups `rule` keeps, in any state (what `max_groups` caps)."""
        (count,) = self._conn.execute("SELECT COUNT(*) FROM alert_groups WHERE rule = ?", (rule,)).fetchone()
        return int(count)

    def rule_started(self, rule: str) -> float | None:
        """When (event time) a new_value rule first ran, None before it has."""
        row = self._conn.execute("SELECT started FROM alert_rules WHERE rule = ?", (rule,)).fetchone()
        return None if row is None else float(row[0])

    def start_rule(self, rule: str, at: float) -> None:
        """Record that `rule` first ran at `at` (event time); a rule that ran before keeps its first run."""
        self._conn.execute("INSERT OR IGNORE INTO alert_rules (rule, started) VALUES (?, ?)", (rule, at))

    def seen_values(self, rule: str, keys: Sequence[str]) -> dict[str, float]:
        """Of these value keys of a new_value rule, those it knows, with when (event time) each was last seen."""
        seen: dict[str, float] = {}
        # at most 500 parameters a statement: well under SQLite's limit
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            rows = self._conn.execute(
                f"SELECT key, last_ts FROM alert_values WHERE rule = ? AND key IN ({','.join('?' * len(chunk))})",
                (rule, *chunk),
            )
            seen.update((key, float(last_ts)) for key, last_ts in rows)
        return seen

    def see_values(self, rule: str, seen: Mapping[str, float]) -> None:
        """Keep when each value key of a new_value rule was last seen (the later of the stored time and this)."""
        self._conn.executemany(
            "INSERT INTO alert_values (rule, key, last_ts) VALUES (?, ?, ?) "
            "ON CONFLICT (rule, key) DO UPDATE SET last_ts = MAX(last_ts, excluded.last_ts)",
            [(rule, key, ts) for key, ts in seen.items()],
        )

    def forget_values(self, rule: str, before: float) -> int:
        """Forget the values of a new_value rule last seen before `before` (event time); how many were."""
        cursor = self._conn.execute("DELETE FROM alert_values WHERE rule = ? AND last_ts < ?", (rule, before))
        return cursor.rowcount

    def kept_rules(self) -> list[str]:
        """The rules that keep state beyond their groups (a new_value rule's first run and known values), sorted."""
        # read at start and at a takeover only: a scan of 500,000 values takes about 70 ms
        rows = self._conn.execute("SELECT rule FROM alert_rules UNION SELECT rule FROM alert_values ORDER BY 1")
        return [rule for (rule,) in rows]

    def forget_rule(self, rule: str) -> None:
        """Forget what `rule` keeps beyond its groups: its first run and every value it knows."""
        self._conn.execute("DELETE FROM alert_values WHERE rule = ?", (rule,))
        self._conn.execute("DELETE FROM alert_rules WHERE rule = ?", (rule,))


def _encode(name: str, value: Any) -> str:
    # a group is loaded and saved with every batch of its matches: orjson writes a p95 window of an hour (20 kB)
    # in 60 us where json takes 850, and five samples in 2.4 us where json takes 25. What it writes, json.loads
    # reads; what it cannot write (an integer beyond 64 bits, a key that is not a string) json writes as before.
    # A NaN becomes null, as it does in the stored event (json wrote a bare NaN, which is not JSON)
    if name == "measure":
        return orjson.dumps(value, default=str).decode()
    try:
        return orjson.dumps(value, default=str, option=PASSTHROUGH).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, default=str)


def _decode(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # what json.dumps wrote that orjson does not read: NaN and Infinity
        return json.loads(text)


class AlertWrites(TransactionBase):
    """A transaction's alert state, whose writes commit with the transaction."""

    @cached_property
    def alert_state(self) -> SqliteAlertState:
        """The alert groups as this transaction sees them."""
        return SqliteAlertState(self.conn)

    def matches(self) -> list[tuple[str, list[Event]]]:
        """None wait here: the outbox's delivery worker hands each match to the alerter in its own transaction."""
        return []


class AlertTables(Tables[AlertWrites]):
    """The store's reads of the alert groups, and its reads and writes of the silences."""

    def alert_state(self) -> SqliteAlertState:
        """The alert groups as this thread's connection sees them, for reads outside a write transaction."""
        return SqliteAlertState(self._conn())

    def alert_term(self) -> int | None:
        """Always 0: this state is this process's own, nobody else writes it."""
        return 0

    def keep_matches(self, target: str, events: Sequence[Event]) -> bool:
        """False: the delivery's transaction records them, with the groups it writes."""
        return False

    def use_targets(self, targets: Mapping[str, Notifier]) -> None:
        """Nothing to do: the delivery worker holds the targets of the outbox's deliveries."""

    def send_notices(self, now: float) -> int:
        """0: the notifications are deliveries of the outbox, which the delivery worker sends."""
        return 0

    def add_silence(
        self,
        rule: str,
        condition: str | None,
        *,
        starts_at: float,
        ends_at: float,
        comment: str,
        created_by: str,
        created_at: float,
    ) -> int:
        """Keep a new silence; the id it got."""
        with self.write(created_at) as tx:
            cursor = tx.conn.execute(
                "INSERT INTO silences (rule, condition, starts_at, ends_at, comment, created_by, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rule, condition, starts_at, ends_at, comment, created_by, created_at),
            )
        return int(cursor.lastrowid or 0)

    def silences(self, *, now: float | None = None, ids: Sequence[int] | None = None) -> list[Silence]:
        """Silences by id (only those in `ids`, when given); with `now`, only those not yet ended."""
        query = "SELECT id, rule, condition, starts_at, ends_at, comment, created_by, created_at, matched FROM silences"
        params: list[Any] = []
        clauses = []
        if now is not None:
            clauses.append("ends_at > ?")
            params.append(now)
        if ids is not None:
            clauses.append(f"id IN ({','.join('?' * len(ids))})")
            params.extend(ids)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        return [Silence(*row) for row in self._conn().execute(query + " ORDER BY id", params)]

    def expire_silence(self, silence_id: int, now: float) -> bool:
        """End a silence at `now`; False when no silence has that id or it already ended."""
        with self.write(now) as tx:
            cursor = tx.conn.execute(
                "UPDATE silences SET ends_at = ? WHERE id = ? AND ends_at > ?", (now, silence_id, now)
            )
            return cursor.rowcount > 0

    def count_silenced(self, matched: Mapping[int, int]) -> None:
        """Add to the `matched` count of silences: {silence id: matches it silenced}."""
        with self.write() as tx:
            tx.conn.executemany(
                "UPDATE silences SET matched = matched + ? WHERE id = ?",
                [(count, silence_id) for silence_id, count in matched.items()],
            )
