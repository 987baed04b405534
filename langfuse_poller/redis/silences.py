"""Silences in Redis, for the Redis backend: the poller replicas and the queue workers on every machine read the
same ones, and `silence add` on any machine with the config reaches them all.

Keys beside the queue's (`{langfuse-poller:<queue>}` for `<queue>` on a cluster, standby/keys.py):
`<queue>:silences` (hash: id -> the silence as JSON), `<queue>:silences:id` (the last id given, INCR) and
`<queue>:silences:matched` (hash: id -> matches silenced, HINCRBY from every process).
Silences that ended more than `KEEP_ENDED` ago are dropped when one is added (not when the list is read, which
every process does each second).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any

from ..alerting.silence_book import Silence
from ..config import QueueConfig
from ..errors import StateError
from .queue import sync_client
from .standby.keys import PollerKeys

KEEP_ENDED = 7 * 86400.0


class RedisSilenceBook:
    """The SilenceBook of the Redis backend."""

    def __init__(self, queue: QueueConfig, timeout: float) -> None:
        self.client = sync_client(queue.url, timeout)
        self.key = PollerKeys.of(queue).silences
        self.where = queue.display_url

    @contextmanager
    def _redis(self, what: str) -> Iterator[None]:
        """A Redis error as a StateError: `silence` prints it as a one-line error, not a traceback."""
        try:
            yield
        except Exception as exc:
            raise StateError(
                f"cannot {what} the silences in Redis at {self.where}: {exc or type(exc).__name__}"
            ) from None

    def add(self, silence: Silence) -> Silence:
        with self._redis("keep"):
            silence = replace(silence, id=int(self.client.incr(f"{self.key}:id")), matched=0)
            fields = asdict(silence)
            del fields["id"], fields["matched"]
            self.client.hset(self.key, str(silence.id), json.dumps(fields))
            old = [str(s.id) for s in self.list() if s.ends_at < silence.created_at - KEEP_ENDED]
            if old:
                self.client.hdel(self.key, *old)
                self.client.hdel(f"{self.key}:matched", *old)
            return silence

    def list(self, *, now: float | None = None, ids: Sequence[int] | None = None) -> list[Silence]:
        with self._redis("read"):
            stored: dict[str, str] = self.client.hgetall(self.key)
            matched: dict[str, str] = self.client.hgetall(f"{self.key}:matched")
            found = []
            for key, text in stored.items():
                fields: dict[str, Any] = json.loads(text)
                silence = Silence(id=int(key), matched=int(matched.get(key, 0)), **fields)
                if (now is None or silence.ends_at > now) and (ids is None or silence.id in ids):
                    found.append(silence)
            return sorted(found, key=lambda s: s.id)

    def expire(self, silence_id: int, now: float) -> bool:
        with self._redis("expire one of"):
            text = self.client.hget(self.key, str(silence_id))
            if text is None:
                return False
            fields = json.loads(text)
            if fields["ends_at"] <= now:
                return False
            # a silence is written by one command at a time: a lost race between two expires ends it twice, harmlessly
            self.client.hset(self.key, str(silence_id), json.dumps({**fields, "ends_at": now}))
            return True

    def count(self, matched: Mapping[int, int]) -> None:
        with self._redis("count the matches of"), self.client.pipeline(transaction=False) as pipe:
            for silence_id, count in matched.items():
                pipe.hincrby(f"{self.key}:matched", str(silence_id), count)
            pipe.execute()

    def close(self) -> None:
        self.client.close()
