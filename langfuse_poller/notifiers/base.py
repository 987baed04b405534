"""What every notifier is: something that sends one event, and may send a batch at once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..events import Event


@runtime_checkable
class Notifier(Protocol):
    """Sends events somewhere. `send` raises DeliveryError (or any exception) when the event did not arrive.

    The delivery targets subclass it, and so inherit False for the attributes they do not set.
    """

    concurrent: bool = False
    """Safe to call from several threads at once (its client serves them, as the HTTP ones do). The Redis
    worker calls any other target under a lock of its own; the SQLite backend drains each target in one
    thread whatever this says."""

    retries_forever: bool = False
    """Retried however long an outage lasts, never made a dead letter for running out of attempts (the Redis
    queue target: giving up would turn an outage into dead letters). A failure that says no retry can help
    still makes one."""

    def send(self, event: Event) -> None:
        """Send one event; return once it arrived. Raises DeliveryError (`retryable=False` when no retry can help,
        `retry_after` when the other side said when to come back), or any exception, which is retried."""
        ...

    def close(self) -> None:
        """Release clients and files; called once, when the routing that built this target is replaced or the
        process stops."""
        ...


@runtime_checkable
class BatchNotifier(Notifier, Protocol):
    """A notifier that can make a batch durable at once (one fsync), and knows what it already holds."""

    def send_many(self, events: Sequence[Event]) -> None:
        """Send a batch, all of it or none: raises as `send` does, and then every event of the batch is retried."""
        ...


@runtime_checkable
class RawBatchNotifier(Notifier, Protocol):
    """A batch notifier that takes the events' stored JSON as it is: (event id, envelope JSON) pairs."""

    def send_raw(self, items: Sequence[tuple[str, str]]) -> None:
        """Send a batch of (event id, envelope JSON) pairs, all or none; raises as `send` does."""
        ...


def retry_after(headers: Mapping[str, Any] | None) -> float | None:
    """A response's Retry-After in seconds, if it sent one; header values may be lists (slack-sdk's are)."""
    for key, value in (headers or {}).items():
        if key.lower() == "retry-after":
            text = value[0] if isinstance(value, list) and value else value
            try:
                return float(text)
            except (TypeError, ValueError):
                return None
    return None


@dataclass(frozen=True)
class NotifierConfig:
    """A configured notifier: its name, its type and the settings that type parsed."""

    name: str
    type: str
    settings: Any
    key: str
