"""Exponential backoff with jitter, shared by the API reader and the delivery worker (tenacity's strategies)."""

from __future__ import annotations

import tenacity
from tenacity.wait import wait_base


def jittered_backoff(initial: float, maximum: float) -> wait_base:
    """initial * 2**n, capped at `maximum`, plus up to `initial` of random jitter so retries spread out."""
    return tenacity.wait_exponential(multiplier=initial, max=maximum) + tenacity.wait_random(0, initial)


def backoff_seconds(wait: wait_base, attempt: int) -> float:
    """What `wait` gives after `attempt` failed attempts, outside a tenacity retry loop (persisted retries)."""
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return float(wait(state))
