"""Builds the standby parts of a runtime from `[queue]`: one Redis client, the replica, the shared state."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ...config import Config
from ...store import Store
from ..queue import RedisQueueTarget, sync_client
from .alert_state import RedisAlertStore
from .keys import PollerKeys
from .replica import PollCancel, Replica, default_replica
from .shared_state import SharedPollState


def build_standby(
    config: Config, store: Store, stop: threading.Event, clock: Callable[[], float]
) -> tuple[Replica, SharedPollState, PollCancel, RedisQueueTarget, RedisAlertStore]:
    """The replica (lease and role), the shared poll state it fences, the reader's cancel, the job adder, and the
    alert state it fences."""
    queue = config.queue
    lease = queue.lease.total_seconds()
    # a third of the lease: a renewal that waits longer could not be followed by another before expiry
    client = sync_client(queue.url, min(config.delivery.timeout.total_seconds(), lease / 3))
    keys = PollerKeys.of(queue)
    cancel = PollCancel(stop)
    replica = Replica(client, keys, queue.replica or default_replica(), lease, cancel, clock=clock)
    jobs = RedisQueueTarget(queue, config.delivery)
    shared = SharedPollState(
        client,
        keys,
        local=store,
        add_jobs=jobs.send_raw,
        token=replica.token,
        on_deposed=replica.deposed,
        clock=clock,
        where=f"Redis at {queue.display_url}",
        alert_matches=True,
    )
    alerts = RedisAlertStore(
        client,
        keys,
        token=replica.token,
        delivery=config.delivery,
        on_deposed=replica.deposed,
        clock=clock,
        where=f"Redis at {queue.display_url}",
        local=store,
    )
    return replica, shared, cancel, jobs, alerts
