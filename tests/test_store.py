"""The SQLite state itself: migrations applied to state files written by earlier versions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from langfuse_poller import events
from langfuse_poller.store import MIGRATIONS, Store


def _old_state(path: Path, version: int) -> None:
    """A state file as a langfuse-poller with schema `version` left it: one delivered event, one pending."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
    for number, script in enumerate(MIGRATIONS[:version], start=1):
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (number,))
    for seq, state in ((1, "done"), (2, "pending")):
        conn.execute(
            "INSERT INTO events (seq, id, type, ts, source, body, created_at) VALUES (?, ?, 'trace.created', 0, "
            "'poll', '{}', 0)",
            (seq, f"trace.created:t{seq}"),
        )
        conn.execute(
            "INSERT INTO deliveries (event_seq, target, state, next_at, ts, updated_at) "
            "VALUES (?, 'notifier:file', ?, 0, 0, 10)",
            (seq, state),
        )
    conn.close()


def test_migration_3_swaps_the_delivery_state_index_on_an_existing_state(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _old_state(path, 2)
    store = Store(path)
    try:
        conn = store.connection()
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "deliveries_done" in indexes and "deliveries_by_state" not in indexes
        assert {row[0] for row in conn.execute("SELECT version FROM schema_migrations")} == {1, 2, 3}
        plan = " ".join(
            str(row[-1])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN DELETE FROM deliveries WHERE state = 'done' AND updated_at < ?", (20,)
            )
        )
        assert "deliveries_done" in plan
        # the delivered event goes, the pending one stays
        assert store.prune_delivered(20) == 1
        assert store.queue_depth() == 1
        assert [row[0] for row in conn.execute("SELECT id FROM events")] == ["trace.created:t2"]
    finally:
        store.close()
    # opening it again applies nothing twice
    Store(path).close()


def test_enqueue_many_stores_each_event_once_and_adds_only_missing_deliveries(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    first = events.test_event("trace.created")
    second = events.test_event("score.created")
    try:
        with store.write() as tx:
            # the same event twice in one call: stored once, one delivery per target
            assert tx.enqueue_many([(first, ["a"]), (second, ["a", "a"]), (first, ["a"])]) == 2
        with store.write() as tx:
            # a re-read: nothing new, but a target added since gets its delivery
            assert tx.enqueue_many([(first, ["a", "b"]), (second, ["a"])]) == 0
        assert sorted((target, state) for target, state, _, _ in store.deliveries_of(first.id)) == [
            ("a", "pending"),
            ("b", "pending"),
        ]
        assert [target for target, *_ in store.deliveries_of(second.id)] == ["a"]
        stored = store.event(first.id)
        assert stored is not None and stored.to_json() == first.to_json()
    finally:
        store.close()
