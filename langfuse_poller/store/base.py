"""What each table module's methods stand on: this thread's connection, and write transactions.

`Store` and `Transaction` are made of one class per table module (streams, outbox, alerts); these are their
common bases, so that each module's methods can reach the connection that `database.Database` provides.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Generic, TypeVar


class TransactionBase:
    """The base of a transaction's table classes: its connection, its time, and how many events it stored."""

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self.now = now
        self.enqueued = 0


# the writes a table module's methods use inside their transactions: the module's own part of the Transaction,
# which database.Transaction puts together (naming it here would make this base import the modules built on it)
Writes = TypeVar("Writes", bound=TransactionBase, covariant=True)


class Tables(Generic[Writes]):
    """The base of the store's table classes; `database.Database` implements what it declares."""

    clock: Callable[[], float]

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use. Raises StateError when the file cannot be opened."""
        raise NotImplementedError

    def write(self, now: float | None = None) -> AbstractContextManager[Writes]:
        """One write transaction (see `Database.write`)."""
        raise NotImplementedError
