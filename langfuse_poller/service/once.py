"""One pass without the daemon (`langfuse-poller once`): poll every stream up to now, deliver what is pending.

The command line builds the runtime, calls `run_once`, prints the result and picks the exit code; what a pass
does, and in which order, is here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import LangfusePollerError
from ..langfuse.reader import Cancelled
from ..runtime import Runtime


class LeaseUnavailable(LangfusePollerError):
    """Raised when `once` may not poll under the standby lease: another replica holds it, or it was lost."""


@dataclass(frozen=True)
class OnceResult:
    """What one pass did: its poll, its deliveries, and what it left behind."""

    streams: int
    requests: int
    # events the poll made
    events: int
    # deliveries that succeeded during this pass
    delivered: int
    # deliveries still queued at the end (retries waiting out their backoff)
    pending: int
    # dead letters this pass added (never below zero: a concurrent purge is not this pass's doing)
    dead_letters: int
    # the errors of the streams that could not be polled, "<stream>: <error>"
    errors: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether every stream was polled and everything was delivered, without a new dead letter."""
        return not self.errors and self.pending == 0 and self.dead_letters == 0


def run_once(runtime: Runtime) -> OnceResult:
    """Poll every stream of `runtime` up to now (every sweep due), deliver until nothing is due, send the alert
    groups whose timers ran out, and drop delivered events past the retention. The caller closes `runtime`.

    With standby replicas, the pass takes the lease first and renews it until `runtime.close()`. Raises
    LeaseUnavailable when another replica holds the lease or this one lost it mid-poll, and the errors of the
    runtime's parts (an AuthError when nothing was read and the keys are refused, a StateError).
    """
    dead_before = runtime.store.dead_letter_count()
    if runtime.replica is not None:
        if not runtime.replica.try_lead():
            who = runtime.replica.describe_holder()
            raise LeaseUnavailable(f"the poller lease is held by {who}; `once` polls only when no `run` does")
        # a long catch-up outlives the lease: renew it meanwhile, until `close` sets `cancel`
        runtime.replica.start(runtime.cancel)
    try:
        with runtime.leader_term():
            runtime.poller.start_streams()
            runtime.alerter.start()
            result = runtime.poller.poll_once(force_sweeps=True)
    except Cancelled:
        # only a lost lease cancels a poll here; what this one committed stays, for whoever leads next
        raise LeaseUnavailable("the poller lease was lost mid-poll (taken over, or not renewed in time)") from None
    if result.requests == 0 and not result.errors:
        # nothing to read yet (a fresh start = "now"): still prove the host and the keys
        runtime.reader.check()
    runtime.worker.run_until_idle()
    # alert groups whose timers ran out are sent now; open groups wait in the state for the next run
    if runtime.alerter.tick():
        runtime.worker.run_until_idle()
    runtime.store.prune_delivered(time.time() - runtime.config.delivery.retention.total_seconds())
    pending = runtime.store.queue_depth()
    dead = runtime.store.dead_letter_count() - dead_before
    return OnceResult(
        streams=len(result.streams),
        requests=result.requests,
        events=result.events,
        delivered=sum(runtime.worker.stats.delivered.values()),
        pending=pending,
        dead_letters=max(0, dead),
        errors=tuple(result.errors),
    )
