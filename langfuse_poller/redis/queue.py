"""The Redis backend: events leave the SQLite outbox as BullMQ jobs, which `langfuse-poller worker` processes
(or any BullMQ worker, Node.js included) on as many machines as needed.

The poller stays the only writer of its SQLite state: an event and its delivery to `queue:redis` are stored in
the transaction that moves the watermark, and the delivery is marked done only once Redis has accepted the
job. An event therefore always has a durable copy, in SQLite until Redis holds it; a crash between the add
and the mark re-adds the same job id, which BullMQ ignores. Redis down is a retryable DeliveryError: the event
waits in the outbox with its backoff like any other delivery.

Job: name = event type, data = the envelope, id = event id, attempts and exponential backoff from `[delivery]`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import orjson

from ..config import DeliveryConfig, QueueConfig
from ..errors import DeliveryError
from ..events import Event
from ..notifiers.base import Notifier
from ..util.redis_url import is_cluster_url
from .cluster import async_cluster_client, sync_cluster_client
from .standby.keys import PollerKeys

log = logging.getLogger(__name__)

QUEUE_TARGET = "queue:redis"
# completed jobs stay this long: long enough that a job re-added after a crash between the add and its record
# in SQLite still finds its id and is ignored; short enough that Redis does not grow with every event ever seen
KEEP_COMPLETED_SECONDS = 3600
T = TypeVar("T")


def job_options(delivery: DeliveryConfig) -> dict[str, Any]:
    """BullMQ job options from `[delivery]`: attempts, exponential backoff, what is kept when done.

    Failed jobs are kept (BullMQ's default): after `max_attempts` they wait in the failed set, the dead letters
    of this backend, until retried or removed."""
    return {
        "attempts": delivery.max_attempts,
        "backoff": {"type": "exponential", "delay": int(delivery.backoff.total_seconds() * 1000)},
        "removeOnComplete": {"age": KEEP_COMPLETED_SECONDS},
    }


def longest_backoff(delivery: DeliveryConfig) -> float:
    """BullMQ's longest wait between two attempts of a job, in seconds: its exponential backoff has no cap, so
    the wait before the last attempt is `backoff × 2^(attempts − 2)`, whatever `max_backoff` says."""
    return delivery.backoff.total_seconds() * float(2 ** max(0, delivery.max_attempts - 2))


def redis_client(url: str, timeout: float) -> Any:
    """An asyncio Redis client for bullmq that fails fast: the outbox, not the client, retries a Redis outage.

    A `redis+cluster://` URL makes a cluster client (cluster.py)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options: dict[str, Any] = {
        "decode_responses": True,  # bullmq reads strings
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if is_cluster_url(url):
        return async_cluster_client(url, options)
    import redis.asyncio as redis

    return redis.from_url(url, **options)


def sync_client(url: str, timeout: float) -> Any:
    """A Redis client whose calls fail within `timeout`: a renewal that hangs must not outlive the lease.

    For a `redis+cluster://` URL, a cluster client (cluster.py): each command goes to the node of its key's slot,
    and a MULTI (`pipeline(transaction=True)`) works there because all its keys share the deployment's slot."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 0,
    }
    if is_cluster_url(url):
        return sync_cluster_client(url, options)
    import redis

    return redis.Redis.from_url(url, **options)


def bullmq_options(config: QueueConfig, connection: Any) -> dict[str, Any]:
    """The options of a bullmq Queue or Worker on this deployment's queue: `connection` and, on a cluster, the
    hash-tagged `prefix` (standby/keys.py) that puts every BullMQ key of the queue in one slot."""
    return {"connection": connection, "prefix": PollerKeys.of(config).bullmq_prefix}


class LoopThread:
    """A private asyncio loop in a daemon thread: bullmq's API is asyncio, the delivery worker uses threads.

    One loop for the life of the target keeps the Redis connection and bullmq's loaded scripts between batches
    (asyncio.run per batch would reconnect each time)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"no answer within {timeout:.0f}s") from None

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class RedisQueueTarget(Notifier):
    """The delivery target `queue:redis`: adds the events it gets as BullMQ jobs, a batch in one MULTI (one add
    after the other on a cluster)."""

    # the outbox keeps retrying (with its capped backoff) while Redis is down, rather than making dead letters
    retries_forever = True

    def __init__(self, config: QueueConfig, delivery: DeliveryConfig) -> None:
        self.config = config
        self.options = job_options(delivery)
        longest = longest_backoff(delivery)
        if longest > delivery.max_backoff.total_seconds():
            log.warning(
                "BullMQ's backoff has no cap: with [delivery] backoff = %gs and max_attempts = %d a job waits up to "
                "%.0fs between attempts, beyond max_backoff (%gs); lower max_attempts to stay within it",
                delivery.backoff.total_seconds(),
                delivery.max_attempts,
                longest,
                delivery.max_backoff.total_seconds(),
            )
        self.timeout = delivery.timeout.total_seconds()
        self._loop: LoopThread | None = None
        self._queue: Any = None

    def send(self, event: Event) -> None:
        self.send_raw([(event.id, event.to_json())])

    def send_raw(self, items: Sequence[tuple[str, str]]) -> None:
        """Add (event id, envelope JSON) pairs as jobs; returns once Redis accepted all of them."""
        jobs = []
        for event_id, text in items:
            envelope = orjson.loads(text)
            jobs.append({"name": envelope["event"], "data": envelope, "opts": {**self.options, "jobId": event_id}})
        if self._loop is None:
            self._loop = LoopThread("redis-queue")
        try:
            self._loop.run(self._add(jobs), self.timeout)
        except Exception as exc:
            self._reset()
            reason = str(exc) or type(exc).__name__
            raise DeliveryError(
                f"Redis at {self.config.display_url} did not accept {len(jobs)} jobs: {reason}", retryable=True
            ) from None

    async def _add(self, jobs: list[dict[str, Any]]) -> None:
        if self._queue is None:
            from bullmq import Queue

            connection = redis_client(self.config.url, self.timeout)
            self._queue = Queue(self.config.name, bullmq_options(self.config, connection))
        if not self.config.cluster:
            # addBulk: one MULTI for the batch, all or nothing; an id already in the queue is left as it is
            await self._queue.addBulk(jobs)
            return
        # on a cluster, redis-py refuses EVALSHA inside a pipeline, and addBulk is a pipeline of bullmq's add
        # script: one add per job, in order (each is atomic, a script). A batch cut short by a failure is sent
        # again whole by the outbox, and the jobs already added keep their ids, which BullMQ then ignores
        for job in jobs:
            await self._queue.add(job["name"], job["data"], job["opts"])

    def _reset(self) -> None:
        """After a failure, the next batch starts with a new connection."""
        queue, self._queue = self._queue, None
        if queue is not None and self._loop is not None:
            try:
                self._loop.run(queue.close(), 2.0)
            except Exception:
                log.debug("closing the failed Redis connection failed", exc_info=True)

    def close(self) -> None:
        if self._loop is None:
            return
        self._reset()
        self._loop.close()
        self._loop = None
