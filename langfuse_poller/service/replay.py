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
            outcome = factory.from_record(letter.stream or "observations", json.loads(letter.raw or "null"), None)
        except (MalformedRecord, ValueError, TypeError, KeyError, AttributeError):
            still_bad += 1
            continue
        routed = [(event, targets) for event in outcome.events if (targets := runtime.router.targets(event))]
        queued += store.requeue_record(letter.id, routed)
    return queued, still_bad
