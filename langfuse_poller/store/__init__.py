"""The SQLite state: watermarks, dedup keys, the event outbox, deliveries and dead letters, alert groups.

The store package owns every table: their schema (the ordered, recorded migrations of migrations.py) and every
SQL statement. Other modules call its methods, and never import sqlite3: the package names what they need of
it (SqliteError). tests/test_layout.py fails on SQL written anywhere else. One module per concept:

- database.py: the state file's connections, `write()` transactions, the lock file, applying the migrations;
- streams.py: the stream tables (streams, sweeps, seen, facts), what the poller reads and writes;
- outbox.py: the outbox (events, deliveries, dead letters), what the delivery worker reads and writes;
- alerts.py: the alert tables (alert_groups, silences), what the alerter and the silences read and write.

`Store` and `Transaction` are made of one class per table module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .alerts import AlertTables, SqliteAlertState
from .database import Database, InProcessTarget, SqliteError, Transaction
from .migrations import MIGRATIONS
from .outbox import ROWS_PER_INSERT, DeadLetter, DueDelivery, Outbox, StoredEvent, event_id_hash
from .streams import READ_PATH_KEY, StreamTables

__all__ = [
    "MIGRATIONS",
    "READ_PATH_KEY",
    "ROWS_PER_INSERT",
    "DeadLetter",
    "DueDelivery",
    "InProcessTarget",
    "SqliteAlertState",
    "SqliteError",
    "Store",
    "StoredEvent",
    "Transaction",
    "event_id_hash",
]


class Store(Database, StreamTables, Outbox, AlertTables):
    """The state database. Safe to share between threads: each thread gets its own connection.

    Its methods raise StateError when the state file cannot be opened, created or migrated, and SqliteError
    when a statement fails (a locked or read-only file, a full disk).
    """


if TYPE_CHECKING:
    from ..poll_state import PollState, PollTransaction

    # mypy proves here that the store is the poll state the poller reads and writes, as SharedPollState is
    _state: type[PollState] = Store
    _transaction: type[PollTransaction] = Transaction
