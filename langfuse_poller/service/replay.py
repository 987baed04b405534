"""Replaying dead letters: failed deliveries go back in the queue; unparseable records are parsed again."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..events import MalformedRecord
from ..runtime import Runtime


def replay_dead_letters(runtime: Runtime, ids: Sequence[int] | None) -> tuple[int, int]:
    """Requeue the given dead letters (all when None): (how many were queued, how many records still fail)."""
    store = runtime.store
    queued = still_bad = 0
    factory = runtime.poller.factory
    for letter in store.dead_letters(ids):
        if letter.kind == "delivery":
            store.requeue_delivery(letter.id)
            queued += 1
            continue
        try:
            synthesis = factory.from_record(letter.stream or "observations", json.loads(letter.raw or "null"), None)
        except (MalformedRecord, ValueError, TypeError, KeyError, AttributeError):
            still_bad += 1
            continue
        with store.write() as tx:
            for event in synthesis.events:
                targets = runtime.router.targets(event)
                if targets and tx.enqueue(event, targets):
                    queued += 1
            tx.conn.execute("DELETE FROM dead_letters WHERE id = ?", (letter.id,))
    return queued, still_bad
