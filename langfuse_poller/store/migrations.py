"""The schema: every table's, as ordered migrations that `Database` applies once each and records.

A migration is never edited once released: state files carry its number in `schema_migrations`, and a file that
has it applied is not shaped again. A change to a table is a new migration at the end. The comment above each
names the module whose tables it shapes (that module writes every statement that reads or writes them).
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # shapes streams.py (streams, sweeps, seen) and outbox.py (events, deliveries, dead_letters)
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
    # shapes alerts.py (alert_groups, silences) and streams.py (facts)
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
    # shapes outbox.py (deliveries)
    # 3: the index that prune_delivered reads holds only the finished deliveries it looks for. Over every
    # delivery, (state, updated_at) cost an insert when an event was queued and a move when it was delivered;
    # the partial index costs one insert, on delivery (BENCHMARKS.md, "Catch-up", has what it saves)
    """
    DROP INDEX IF EXISTS deliveries_by_state;
    CREATE INDEX deliveries_done ON deliveries (updated_at) WHERE state = 'done';
    """,
    # shapes outbox.py (events)
    # 4: events are found by a 32-bit hash of their id (the id compared on a match) instead of a unique index
    # of the id text. Event ids are long and random, so each new event rewrote a page of that index; once the
    # index outgrew the page cache, every commit wrote thousands of its pages to the WAL (BENCHMARKS.md,
    # "Catch-up", measures both at 1M observations).
    # SQLite cannot drop a column's UNIQUE, so the table is rebuilt, with its seq and its AUTOINCREMENT counter
    # kept (deliveries refer to seq). created_at becomes stored_at so that an older release still writing to the
    # file fails on the column it names: its INSERT OR IGNORE, without id_hash, would skip every event (NOT NULL)
    # and still commit the poll's watermark. (A trigger that refuses a missing id_hash would cost a little on
    # every insert; the rename costs nothing.)
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
    # shapes alerts.py (alert_groups, alert_rules, alert_values)
    # 5: the rules that measure. A group's window and judging state is one JSON column of its row, so that whatever
    # stores a group stores its window; a new_value rule's first run and the values it knows are rule-wide
    """
    ALTER TABLE alert_groups ADD COLUMN measure TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE alert_rules (
        rule TEXT PRIMARY KEY,
        started REAL NOT NULL
    );
    CREATE TABLE alert_values (
        rule TEXT NOT NULL,
        key TEXT NOT NULL,
        last_ts REAL NOT NULL,
        PRIMARY KEY (rule, key)
    ) WITHOUT ROWID;
    CREATE INDEX alert_values_by_time ON alert_values (rule, last_ts);
    """,
)
