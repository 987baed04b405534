"""The SQLite state itself: migrations applied to state files written by earlier versions."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest

from langfuse_poller import events
from langfuse_poller.alerting.groups import Group
from langfuse_poller.errors import StateError
from langfuse_poller.store import MIGRATIONS, Store, event_id_hash


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
        conn = store._conn()
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "deliveries_done" in indexes and "deliveries_by_state" not in indexes
        assert {row[0] for row in conn.execute("SELECT version FROM schema_migrations")} == set(
            range(1, len(MIGRATIONS) + 1)
        )
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


def test_migration_4_finds_events_by_id_hash_and_keeps_every_event_delivery_and_seq(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _old_state(path, 3)
    conn = sqlite3.connect(path, isolation_level=None)
    # the newest event was pruned: its seq must still never be handed out again
    conn.execute(
        "INSERT INTO events (seq, id, type, ts, source, body, created_at) VALUES (3, 'gone', 'x', 0, 'poll', '{}', 0)"
    )
    conn.execute("DELETE FROM events WHERE seq = 3")
    conn.close()
    store = Store(path)
    try:
        conn = store._conn()
        # dropping the old table did not cascade to the deliveries that refer to its rows
        assert conn.execute("SELECT event_seq, state FROM deliveries ORDER BY event_seq").fetchall() == [
            (1, "done"),
            (2, "pending"),
        ]
        assert conn.execute("SELECT seq, id FROM events ORDER BY seq").fetchall() == [
            (1, "trace.created:t1"),
            (2, "trace.created:t2"),
        ]
        assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
        assert store.deliveries_of("trace.created:t2") == [("notifier:file", "pending", 0, None)]
        plan = " ".join(
            str(row[-1])
            for row in conn.execute("EXPLAIN QUERY PLAN SELECT seq FROM events WHERE id_hash = ? AND id = ?", (1, "x"))
        )
        assert "events_by_id_hash" in plan
        fresh = events.test_event("trace.created")
        with store.write() as tx:
            # an event stored before the migration is found by its id, and gets only the delivery it lacks
            old = events.Event("trace.created:t2", "trace.created", fresh.timestamp, "poll", {})
            assert tx.enqueue_many([(old, ["notifier:file", "notifier:other"]), (fresh, ["notifier:file"])]) == 1
        assert conn.execute("SELECT seq FROM events WHERE id = ?", (fresh.id,)).fetchone() == (4,)
        assert [target for target, *_ in store.deliveries_of("trace.created:t2")] == [
            "notifier:file",
            "notifier:other",
        ]
        # the rows of events with one id can be deleted, as pruning does, without touching the others
        assert store.prune_delivered(20) == 1
    finally:
        store.close()


def test_a_state_in_use_by_a_running_older_release_is_not_updated_under_it(tmp_path: Path) -> None:
    import fcntl
    import os

    path = tmp_path / "state.db"
    _old_state(path, 3)
    # the older release's daemon holds the state's lock, as `run` does
    fd = os.open(tmp_path / "state.db.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242")
    try:
        with pytest.raises(StateError, match=r"pid 4242.*must update it \(schema 3 to \d+\)"):
            Store(path)
    finally:
        os.close(fd)
    conn = sqlite3.connect(path)
    assert max(row[0] for row in conn.execute("SELECT version FROM schema_migrations")) == 3
    conn.close()
    # once it stopped, the update goes through
    Store(path).close()


def test_commands_started_at_once_on_one_state_wait_for_each_other_s_update(tmp_path: Path) -> None:
    import fcntl
    import os
    import threading

    path = tmp_path / "state.db"
    _old_state(path, 3)
    # another process of this release is updating the same file at this moment: it holds the lock briefly
    fd = os.open(tmp_path / "state.db.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    release = threading.Timer(0.5, os.close, (fd,))
    release.start()
    try:
        Store(path).close()
    finally:
        release.join()
    conn = sqlite3.connect(path)
    assert max(row[0] for row in conn.execute("SELECT version FROM schema_migrations")) == len(MIGRATIONS)
    conn.close()


def test_an_older_release_that_still_writes_after_the_update_fails_instead_of_dropping_events(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    _old_state(path, 3)
    Store(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    # the insert of the releases before migration 4: OR IGNORE would skip the row (id_hash NOT NULL), and the
    # watermark of its poll would commit without the event. It names a column that is gone, and fails
    with pytest.raises(sqlite3.OperationalError, match="no column named created_at"):
        conn.execute(
            "INSERT OR IGNORE INTO events (id, type, ts, source, body, created_at) "
            "VALUES ('trace.created:t9', 'trace.created', 0, 'poll', '{}', 0)"
        )
    conn.close()


def test_events_whose_ids_share_a_hash_are_told_apart(tmp_path: Path) -> None:
    # two ids with one CRC-32, found by a birthday search over random ids (one in ~77,000 pairs collides)
    first, second = "trace.created:2030cfcdb5dd0392", "trace.created:a6bf2b6f29e82cf4"
    assert event_id_hash(first) == event_id_hash(second)
    store = Store(tmp_path / "state.db")
    template = events.test_event("trace.created")
    a = events.Event(first, template.type, template.timestamp, "poll", {"n": 1})
    b = events.Event(second, template.type, template.timestamp, "poll", {"n": 2})
    try:
        with store.write() as tx:
            # two events with one id in one call: the first is stored
            again = events.Event(first, template.type, template.timestamp, "poll", {"n": 9})
            assert tx.enqueue_many([(a, ["t"]), (again, ["t"])]) == 1
        with store.write() as tx:
            # b shares a's hash but not its id: it is new; a again is not
            assert tx.enqueue_many([(b, ["t"]), (a, ["t", "u"])]) == 1
        stored_a, stored_b = store.event(first), store.event(second)
        assert stored_a is not None and stored_a.data == {"n": 1}
        assert stored_b is not None and stored_b.data == {"n": 2}
        assert [target for target, *_ in store.deliveries_of(first)] == ["t", "u"]
        assert [target for target, *_ in store.deliveries_of(second)] == ["t"]
    finally:
        store.close()


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


def test_alert_group_rows_written_with_json_read_back_and_new_rows_are_json(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    group = Group(
        rule="errors",
        key="k",
        labels={"data.environment": "produção"},
        state="firing",
        opened_at=1000.0,
        told=["slack"],
        samples=[{"id": "trace.updated:o1:1", "value": float("nan"), "statusMessage": "délai dépassé"}],
        arrivals=[999.5],
        measure={"b": [[1, 1, 2.5, 2.5, 2.5, {"92": 1}, None]]},
    )
    columns = {name: json.dumps(getattr(group, name), ensure_ascii=False) for name in ("labels", "told", "samples")}
    try:
        with store.write(1000.0) as tx:
            tx.alert_state.save(group)
            # the row as an earlier release wrote it: json.dumps, NaN and all
            tx.conn.execute(
                "UPDATE alert_groups SET labels = ?, told = ?, samples = ? WHERE key = 'k'",
                (columns["labels"], columns["told"], columns["samples"]),
            )
        [found] = store.alert_state().groups()
        assert math.isnan(found.samples[0].pop("value")) and found.samples == [
            {"id": "trace.updated:o1:1", "statusMessage": "délai dépassé"}
        ]
        assert (found.labels, found.told, found.arrivals, found.measure) == (
            group.labels,
            group.told,
            group.arrivals,
            group.measure,
        )
        # a sample that orjson cannot write (an integer beyond 64 bits) is written as before
        found.samples = [{"id": "score.created:s1", "value": 2**70}]
        with store.write(1001.0) as tx:
            tx.alert_state.save(found)
        with store.write(1002.0) as tx:
            row = tx.conn.execute("SELECT labels, told, samples, arrivals, measure FROM alert_groups").fetchone()
        # what is written now is JSON that the standard library reads
        assert [json.loads(text) for text in row] == [
            {"data.environment": "produção"},
            ["slack"],
            [{"id": "score.created:s1", "value": 2**70}],
            [999.5],
            group.measure,
        ]
        assert store.alert_state().groups()[0].samples == [{"id": "score.created:s1", "value": 2**70}]
    finally:
        store.close()
