"""The database: the state file's connections, its write transactions, its lock file, and its migrations.

One file, WAL mode, a busy timeout, one connection per thread, and write transactions that take the write
lock up front (BEGIN IMMEDIATE) so two writers never deadlock on a lock upgrade. Schema changes go through
ordered migrations (migrations.py), each applied in its own transaction and recorded.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import StateError
from ..events import Event
from ..util.lockfile import lock_path, read_holder, write_holder
from .alerts import AlertWrites
from .base import Tables
from .migrations import MIGRATIONS
from .outbox import OutboxWrites, StoredEvent, event_id_hash, stored_by
from .streams import StreamWrites

log = logging.getLogger(__name__)

# what a statement raises when SQLite fails (a locked or read-only file, a full disk), by the store's name: a
# caller that answers such a failure itself (the webhook receiver: 503, so that Langfuse sends again) catches
# it without importing sqlite3, which only the store package uses
SqliteError = sqlite3.Error
# the longest an ordinary writer stands aside for urgent ones (each holds the lock for one small insert)
URGENT_TURN = 1.0


# tries to put a new state in WAL mode, 50 ms apart (see _use_wal)
WAL_ATTEMPTS = 60
# how long an update of the schema waits for the state's lock: long enough for another process of this release that
# creates or updates the same file at the same moment (several commands started at once on a new state), short
# enough that a running daemon, which holds the lock for good, is named soon
MIGRATION_LOCK_WAIT = 5.0


@runtime_checkable
class InProcessTarget(Protocol):
    """A target inside this process whose work is a state change (an alerting rule's groups): done in a write
    transaction of this store, the one that stores its events (`Database.apply_at_once`) or the one that marks
    their deliveries done."""

    def apply(self, tx: Transaction, events: Sequence[Event]) -> None:
        """Apply the events' effect through `tx`; raise to roll it back (the events are then delivered to this
        target later, with retries)."""
        ...


class Transaction(StreamWrites, OutboxWrites, AlertWrites):
    """The writes of one transaction; obtained from `Store.write()`."""

    def __init__(self, conn: sqlite3.Connection, now: float, at_once: Mapping[str, InProcessTarget]) -> None:
        super().__init__(conn, now, at_once)
        self._targets = at_once
        # how many new events each `at_once` target was applied to, or failed on (they were queued for it)
        self.applied: dict[str, int] = {}
        self.failed: dict[str, int] = {}

    def apply_waiting(self) -> None:
        """Apply the new events of this transaction to their `at_once` targets, oldest first (a page comes newest
        first), each target in a part of the transaction that fails alone: its writes are then undone, and its
        events get their deliveries to it after all (retried, and dead letters if they keep failing).
        `Database.write` calls this before it commits."""
        while self.waiting:
            # what a target enqueues (alert notifications) goes to notifiers, never back to it: this ends
            waiting, self.waiting = self.waiting, {}
            for target, pending in waiting.items():
                ordered = sorted(pending.values(), key=lambda stored: (stored[1].timestamp, stored[0]))
                if self.oldest_pending_ts(target) is not None:
                    # older events still wait as deliveries (a failure, an upgrade): these queue behind them, since
                    # a rule judges its windows in event time and takes the waiting ones for its oldest
                    self.deliver_instead(target, ordered)
                    continue
                events = [event for _, event in ordered]
                try:
                    with self.part():
                        self._targets[target].apply(self, events)
                except Exception as exc:
                    log.warning(
                        "%s failed on %d new events in the transaction that stored them (%s: %s); they are queued",
                        target,
                        len(events),
                        type(exc).__name__,
                        exc,
                    )
                    self.failed[target] = self.failed.get(target, 0) + len(events)
                    self.deliver_instead(target, ordered)
                else:
                    self.applied[target] = self.applied.get(target, 0) + len(events)


def _use_wal(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode (a no-op once it is). Two commands started at once on a new state were seen to
    get "database is locked" at once from this, the busy timeout notwithstanding: it is tried again, a few
    seconds at most."""
    for attempt in range(WAL_ATTEMPTS):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == WAL_ATTEMPTS - 1:
                raise
            time.sleep(0.05)


class Database(Tables["Transaction"]):
    """The state file: connections, transactions, the lock and the schema. Safe to share between threads: each
    thread gets its own connection."""

    def __init__(self, path: Path | str, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._local = threading.local()
        self._write_lock = threading.Lock()
        # urgent writers waiting for the write lock (the webhook receiver, whose sender gives up within a second),
        # and the condition that ordinary writers wait on while there are any
        self._urgent = 0
        self._turn = threading.Condition()
        self._lock_fd: int | None = None
        # told of the events each transaction stored, once it committed (the metrics count them by type)
        self.on_stored: Callable[[Sequence[StoredEvent]], None] | None = None
        # see apply_at_once
        self._at_once: Mapping[str, InProcessTarget] = {}
        self._on_applied: Callable[[Mapping[str, int], Mapping[str, int]], None] | None = None
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
                _use_wal(conn)
                # NORMAL in WAL mode survives a process crash; a power cut may drop the last commits, which
                # rolls back the watermark together with its events, so nothing is lost, only re-read
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA foreign_keys = ON")
                # the page cache stays at SQLite's default 2 MB: a connection drops its whole cache whenever another
                # one has committed since its last read, and the poller and the delivery threads commit in turns.
                # A larger cache was only refilled, and it made the peak RSS grow with the backlog (BENCHMARKS.md,
                # "Catch-up", has the figures). Fewer, larger checkpoints do pay in a catch-up
                conn.execute("PRAGMA wal_autocheckpoint = 4000")
                conn.execute("PRAGMA busy_timeout = 30000")
            except sqlite3.Error as exc:
                raise StateError(f"cannot open the state database {self.path}: {exc}") from None
            self._local.conn = conn
        return conn

    def writers_waiting(self) -> bool:
        """Whether an urgent writer waits for the write lock: whoever holds a long transaction commits it now."""
        return self._urgent > 0

    @contextmanager
    def write(self, now: float | None = None, *, urgent: bool = False) -> Iterator[Transaction]:
        """One write transaction: everything inside commits together, or nothing does.

        Threads of this process queue on a lock first: SQLite's own busy handler sleeps in growing steps (up
        to 100 ms) before it retries, which in a catch-up made the poller and the delivery threads wait for
        each other far longer than their transactions last. Other processes still meet the busy timeout.
        An `urgent` writer goes first: ordinary ones do not take the lock while one waits (the lock itself is
        not fair: the poller, committing a page and opening the next, would take it again at once), and the
        poller's page group commits early when `writers_waiting()` says so.
        """
        conn = self._conn()
        with self._locked(urgent):
            conn.execute("BEGIN IMMEDIATE")
            tx = Transaction(conn, self.clock() if now is None else now, self._at_once)
            try:
                yield tx
                tx.apply_waiting()
                stored = stored_by(tx) if tx.enqueued and self.on_stored is not None else []
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        if (tx.applied or tx.failed) and self._on_applied is not None:
            self._on_applied(tx.applied, tx.failed)
        if stored and self.on_stored is not None:
            try:
                self.on_stored(stored)
            except Exception:
                # the transaction committed: an observer's failure must not look like the write's
                log.exception("an observer of stored events failed")

    def apply_at_once(
        self,
        targets: Mapping[str, InProcessTarget],
        on_applied: Callable[[Mapping[str, int], Mapping[str, int]], None] | None = None,
    ) -> None:
        """From the next transaction on, apply each new event to those of `targets` it is routed to in the
        transaction that stores it, just before it commits, rather than give it a delivery to them; when that
        fails, it gets the delivery after all (`Transaction.apply_waiting`). `on_applied` is told, after each
        commit, how many events each target took so, and how many it failed on."""
        self._at_once, self._on_applied = dict(targets), on_applied

    @contextmanager
    def _locked(self, urgent: bool) -> Iterator[None]:
        """Hold the write lock; an urgent caller is counted while it waits, an ordinary one lets urgent ones by."""
        if urgent:
            with self._turn:
                self._urgent += 1
            try:
                self._write_lock.acquire()
            finally:
                with self._turn:
                    self._urgent -= 1
                    self._turn.notify_all()
        else:
            with self._turn:
                # bounded: an urgent writer holds the lock for one small insert and never waits on an ordinary one
                self._turn.wait_for(lambda: self._urgent == 0, URGENT_TURN)
            self._write_lock.acquire()
        try:
            yield
        finally:
            self._write_lock.release()

    def close(self) -> None:
        """Close this thread's connection and release the state's lock, if this store took it."""
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
            # (waited for a while: another process of this release may be creating or updating it at this moment)
            fd = self._take_lock(
                f"and this release must update it (schema {max(applied)} to {len(MIGRATIONS)})",
                wait=MIGRATION_LOCK_WAIT,
            )
            # a rebuild of a large outbox takes a while (migration 4: about 7 s for 600,000 events)
            log.info("updating the state in %s from schema %d to %d", self.path, max(applied), len(MIGRATIONS))
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

    def _take_lock(self, why: str = "", *, wait: float = 0.0) -> int:
        """The state's exclusive lock (an flock on `<path>.lock`, which holds the holder's pid): its descriptor.
        Tries for up to `wait` seconds; raises StateError naming the process that holds it."""
        import fcntl

        fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
            holder = read_holder(fd)
            os.close(fd)
            raise StateError(
                f"another langfuse-poller (pid {holder}) is using {self.path}{' ' + why if why else ''}; stop it "
                "first, or give this one its own [state] path"
            ) from None

    def lock(self) -> None:
        """Take the state's exclusive lock: two pollers on one state would deliver everything twice."""
        fd = self._take_lock()
        write_holder(fd)
        self._lock_fd = fd
