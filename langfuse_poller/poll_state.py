"""The poll state: what the poller keeps per stream (head and sweep watermarks, dedup keys, the last poll).

`PollState` and `PollTransaction` are the contract between the poll algorithm (poller.py) and where its state
lives, listing exactly what `Poller` reads and writes. Two implementations keep it: the SQLite store
(`store.Store` and its `Transaction`) for a single poller, and, with standby pollers, `SharedPollState` and its
`SharedTransaction` (redis/standby/shared_state.py), which keep it in Redis for every replica and fence each
write with the lease's token. mypy checks that both conform, and one shared suite of poller tests
(tests/test_poller.py, through the `poll_state` fixture of tests/conftest.py) runs against both.

Errors: a state that cannot be reached raises StateError (Redis away; the SQLite file that cannot be opened,
while a failed SQLite statement raises its sqlite3.Error), which the poller records as the stream's error
before it tries again at the next poll. The Redis state also raises `Deposed` (a `Cancelled`) when another
replica took the lease: the poll then ends as a stopping daemon's does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from .events import Event, RecordOutcome, Seen


@dataclass(frozen=True)
class StreamState:
    """A stream's progress as stored: head watermark, sweep watermarks by age, last poll and last error."""

    name: str
    head: float
    sweeps: dict[float, float]
    last_poll_at: float | None
    last_success_at: float | None
    last_error: str | None
    last_error_at: float | None
    api_requests: int
    records: int
    events: int


class PollTransaction(Protocol):
    """The writes of one page (or a few pages) of a read: its events, dedup keys, dead letters and watermarks.

    Obtained from `PollState.write()`; everything written through it commits together when the block exits
    cleanly, or not at all. Its reads see its own writes.
    """

    def seen_states(self, keys: Sequence[str]) -> dict[str, Seen]:
        """What is remembered (version and level) of the records with these dedup keys, this transaction's own
        writes included; keys never seen are absent. Raises StateError when the state cannot be read."""
        ...

    def remember(self, stream: str, outcomes: Iterable[RecordOutcome]) -> None:
        """Keep the dedup keys of records of `stream` with their record time; their version and level replace
        what was kept of the same keys."""
        ...

    def enqueue_many(self, routed: Sequence[tuple[Event, Sequence[str]]]) -> int:
        """Store events, each for its delivery targets; an event id stored before is not stored again. Returns
        how many events were new (the Redis state counts every event: BullMQ does not say which job ids it
        already held)."""
        ...

    def add_bad_record(self, stream: str, raw: Any, error: str) -> None:
        """Keep a record of `stream` that could not be turned into events, with its raw JSON, as a dead letter."""
        ...

    def sweep_watermarks(self, stream: str) -> dict[float, float]:
        """Each sweep tier's watermark of `stream`, by age, as this transaction sees them. Raises StateError
        when the state cannot be read."""
        ...

    def set_head(self, stream: str, head: float) -> None:
        """Move the head watermark of `stream` to `head`; a watermark never moves back."""
        ...

    def set_sweep(self, stream: str, age: float, watermark: float, ran: bool = False) -> None:
        """Move the watermark of the sweep tier `age` of `stream`, never back; `ran`: that sweep ran now (the
        transaction's time), which `PollState.sweep_last_run` returns from then on."""
        ...

    def count_poll(self, stream: str, requests: int, records: int, events: int) -> None:
        """Add to the counters of `stream`: API requests made, records read, events made."""
        ...


class PollState(Protocol):
    """Where the poller keeps its progress: per stream, the watermarks, sweep runs, dedup keys and last poll.

    The poller is its only writer (with standby pollers: the replica that holds the lease).
    """

    def ensure_stream(self, name: str, start: float, ages: Sequence[float]) -> None:
        """Create a stream's state on first use, its head at `start`; add the sweep tiers of `ages` that are new
        (at the head) and drop those not in `ages`. Raises StateError when the state cannot be written; the
        Redis state raises Deposed when another replica took the lease meanwhile (as a standby it leaves the
        shared state to the leader)."""
        ...

    def stream(self, name: str) -> StreamState | None:
        """The state of stream `name`, or None before `ensure_stream` created it. Raises StateError when the
        state cannot be read."""
        ...

    def sweep_last_run(self, stream: str, age: float) -> float | None:
        """When the sweep tier `age` of `stream` last ran, or None if it never did. Raises StateError when the
        state cannot be read."""
        ...

    def seen_states(self, keys: Sequence[str]) -> dict[str, Seen]:
        """What is remembered (version and level) of the records with these dedup keys, outside any
        transaction; keys never seen are absent. Raises StateError when the state cannot be read."""
        ...

    def any_seen(self, stream: str, start: float, end: float) -> bool:
        """Whether any dedup key of `stream` has its record time in [start, end), outside any transaction: when
        none has, the pages of that slice need no look-up of their keys. Raises StateError when the state
        cannot be read."""
        ...

    def record_poll(self, stream: str, *, error: str | None) -> None:
        """Note the outcome of a poll of `stream` now: success (`error` None) clears the last error, a failure
        keeps its words. The SQLite store raises StateError when it cannot write; the Redis state logs that
        instead (the poll's own error says so), and raises Deposed when another replica took the lease."""
        ...

    def prune_seen(self, stream: str, before: float) -> int:
        """Forget the dedup keys of records of `stream` older than `before`, which no window reads again; how
        many were dropped. Raises StateError when the state cannot be written."""
        ...

    def writers_waiting(self) -> bool:
        """Whether another writer of this process waits for the lock that an open transaction of the poller holds
        (the webhook receiver on the SQLite store): the poller then commits its page group between pages."""
        ...

    def write(self) -> AbstractContextManager[PollTransaction]:
        """One transaction: what is written through it commits together when the block exits cleanly, and
        nothing of it when the block raises. Raises StateError when the state cannot be written; the Redis
        state raises Deposed, and writes nothing, when another replica took the lease, and a retryable
        DeliveryError when Redis refused the page's jobs (its watermark then stays)."""
        ...
