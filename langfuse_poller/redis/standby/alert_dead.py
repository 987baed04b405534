"""Alert notifications that failed for good, in Redis: what `dead-letters` lists, replays and purges of them.

With standby pollers the leader sends the alert state's notifications from its outbox in Redis
(alert_state.py), and one that keeps failing ends in `<prefix>:alert-dead`, a list of the outbox entries
with the time they died. Its dead letters are named by the notification's id (`rule.firing:<rule>:...`), which
no SQLite dead letter (a number) can be.

A replay puts the entry back in the outbox with a fresh count of attempts, for the leader's next tick to send to
the notifiers it had not reached. It is not fenced by the lease's token, as the webhook receiver's matches are
not: it changes no group, and only the leader sends from the outbox. It moves the entry in one script, so a
letter purged meanwhile is not sent again, and one replayed twice is queued once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ...config import QueueConfig
from ...errors import StateError
from ...events import Event
from .alert_script import AlertKeys, number
from .keys import PollerKeys

# KEYS: the dead list, the outbox, its due set; ARGV: the dead entry as stored, the notification's id, the entry
# to queue, when it is due. 1 when moved, 0 when the dead entry was gone.
REPLAY = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 1 then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2]) end
return 1
"""


@dataclass(frozen=True)
class AlertDeadLetter:
    """An alert notification that failed for good: the notifiers it had not reached, and the last error."""

    id: str
    error: str
    created_at: float
    targets: list[str]
    event_type: str
    attempts: int
    kind: str = "alert"

    def as_json(self) -> dict[str, Any]:
        """What `dead-letters list --json` prints for it."""
        return {**self.__dict__, "event_id": self.id}


class AlertDeadLetters:
    """The dead alert notifications of one deployment in Redis (`client` and its keys)."""

    def __init__(self, client: Any, keys: PollerKeys, where: str = "Redis") -> None:
        self.client = client
        self.keys = AlertKeys(keys)
        self.where = where
        self._replay = client.register_script(REPLAY)

    def _call(self, what: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            raise StateError(f"cannot {what} in {self.where}: {exc or type(exc).__name__}") from None

    def _entries(self, ids: Sequence[str] | None) -> Iterator[tuple[str, dict[str, Any], AlertDeadLetter]]:
        """(the stored text, the entry, the letter) of each dead notification, oldest first; only `ids` when given."""
        for text in self._call("read the dead alert notifications", self.client.lrange, self.keys.dead, 0, -1):
            entry = json.loads(text)
            event = Event.from_json(entry["e"])
            if ids is not None and event.id not in ids:
                continue
            letter = AlertDeadLetter(
                id=event.id,
                error=str(entry.get("err") or ""),
                created_at=float(entry.get("at") or 0.0),
                targets=list(entry["t"]),
                event_type=event.type,
                attempts=int(entry["n"]),
            )
            yield text, entry, letter

    def list(self) -> list[AlertDeadLetter]:
        """Every dead alert notification, oldest first."""
        return [letter for _, _, letter in self._entries(None)]

    def replay(self, ids: Sequence[str] | None, now: float) -> int:
        """Queue these dead notifications (all when None) for the leader to send again; how many were."""
        queued = 0
        for text, entry, letter in list(self._entries(ids)):
            again = {"e": entry["e"], "t": entry["t"], "n": 0, "err": None}
            args = [text, letter.id, json.dumps(again), number(now)]
            keys = [self.keys.dead, self.keys.outbox, self.keys.outbox_due]
            queued += int(self._call("replay a dead alert notification", self._replay, keys=keys, args=args))
        return queued

    def purge(self, ids: Sequence[str] | None) -> int:
        """Delete these dead notifications (all when None); how many were."""
        removed = 0
        for text, _, _ in list(self._entries(ids)):
            removed += int(self._call("purge a dead alert notification", self.client.lrem, self.keys.dead, 1, text))
        return removed


@contextmanager
def alert_dead_letters(config: QueueConfig, *, timeout: float = 3.0) -> Iterator[AlertDeadLetters]:
    """The dead alert notifications of the deployment `config` names, on a client closed on exit."""
    from ..queue import sync_client

    client = sync_client(config.url, timeout)
    try:
        yield AlertDeadLetters(client, PollerKeys.of(config), where=f"Redis at {config.display_url}")
    finally:
        client.close()
