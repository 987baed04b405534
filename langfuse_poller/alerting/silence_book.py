"""A silence, and where silences are kept: the value and the contract that both books share.

The state file's book (SqliteSilenceBook in alerting/silences.py) and Redis's (RedisSilenceBook in
redis/silences.py) implement SilenceBook, and `Silences` reads either. They sit here, below both, so that the
Redis backend does not import the alerting that chooses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Silence:
    """One silence: which rule, an optional CEL condition over the event, and when it ends."""

    id: int
    rule: str
    condition: str | None
    starts_at: float
    ends_at: float
    comment: str
    created_by: str
    created_at: float
    matched: int

    def active(self, now: float) -> bool:
        """Whether the silence applies at `now`: it has started and not yet ended."""
        return self.starts_at <= now < self.ends_at


class SilenceBook(Protocol):
    """Where silences are kept: the state file (alerting/silences.py's SqliteSilenceBook), or Redis with the Redis
    backend (redis/silences.py's RedisSilenceBook), where every poller replica and worker sees the same ones."""

    def add(self, silence: Silence) -> Silence:
        """Keep a new silence (its id is ignored) and return it with the id it got."""
        ...

    def list(self, *, now: float | None = None, ids: Sequence[int] | None = None) -> list[Silence]:
        """Silences by id; with `now`, only those not yet ended."""
        ...

    def expire(self, silence_id: int, now: float) -> bool:
        """End a silence now; False when no silence has that id or it already ended."""
        ...

    def count(self, matched: Mapping[int, int]) -> None:
        """Add to the `matched` count of silences."""
        ...

    def close(self) -> None:
        """Release the connection, if the book has one of its own."""
        ...
