"""The poll state: what the poller keeps per stream (head and sweep watermarks, dedup keys, the last poll).

The SQLite store (store.py) keeps it for a single poller; with standby pollers, SharedPollState
(redis/standby/shared_state.py) keeps it in Redis for every replica.
"""

from __future__ import annotations

from dataclasses import dataclass


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
