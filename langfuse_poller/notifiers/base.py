"""What every notifier is: something that sends one event, and may send a batch at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..events import Event


@runtime_checkable
class Notifier(Protocol):
    """Sends events somewhere. `send` raises DeliveryError (or any exception) when the event did not arrive."""

    def send(self, event: Event) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchNotifier(Notifier, Protocol):
    """A notifier that can make a batch durable at once (one fsync), and knows what it already holds."""

    def send_many(self, events: Sequence[Event]) -> None: ...
