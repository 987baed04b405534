"""`langfuse-poller worker`: a BullMQ worker on the Redis queue that runs the handlers and notifiers.

Each job is one event (name = event type, data = the envelope). The worker routes it with the same Router as the
poller, handlers and forwarding rules only (alert grouping and absence stay in the poller, which enqueued the job);
the silences of forwarding rules apply here too, read from Redis, where all processes share them. A target that
fails makes the job fail, and BullMQ retries it with the job's backoff; the targets that succeeded are written into
the job's progress first, so a retry sends only to the others (at least once per (event, target), as with the
SQLite backend). After its attempts the job stays in BullMQ's failed set. Any number of workers, on any machines,
share one queue: BullMQ gives each job to one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..alerting.silences import Silences, silence_book
from ..config import Config
from ..delivery import HandlerTarget
from ..errors import DeliveryError, StateError
from ..events import Event
from ..notifiers import Notifier, build_notifier
from ..registry import Registry, Router, import_handler_modules, registry
from ..util.redis_url import is_cluster_url
from .cluster import async_cluster_client, kind_mismatch
from .queue import bullmq_options
from .standby.replica import default_replica

log = logging.getLogger(__name__)

# how long a job stays locked by a worker that stopped renewing it (crashed) before another worker takes it
LOCK_DURATION_MS = 30_000
# how often the matches a worker silenced are added to the silences' counts (`silence list`), and Redis checked
WATCH_INTERVAL = 5.0


class TargetFailed(Exception):
    """Raised inside a job when a handler or notifier failed; BullMQ records the message and retries."""


class Dispatcher:
    """Delivers one event to handler and notifier targets by name, each target isolated from the others.

    A target is called under its own lock unless it says it is `concurrent` (its client serves several
    threads at once: the HTTP ones); the others (a file) were written for one caller at a time, as the SQLite
    backend drains each in one thread. Handlers are concurrent: they run side by side, up to the worker's
    concurrency."""

    def __init__(self, targets: Mapping[str, Notifier]) -> None:
        self.targets = dict(targets)
        self._locks = {name: threading.Lock() for name, target in self.targets.items() if not target.concurrent}

    def deliver(self, event: Event, names: Sequence[str]) -> dict[str, Exception | None]:
        """Send `event` to each named target: name -> the failure, or None when it arrived."""
        outcomes: dict[str, Exception | None] = {}
        for name in names:
            target = self.targets.get(name)
            if target is None:
                outcomes[name] = DeliveryError(f"{name} is not configured in this worker", retryable=False)
                continue
            lock = self._locks.get(name)
            try:
                if lock is None:
                    target.send(event)
                else:
                    with lock:
                        target.send(event)
            except Exception as exc:
                outcomes[name] = exc
                continue
            outcomes[name] = None
        return outcomes

    def close(self) -> None:
        for target in self.targets.values():
            try:
                target.close()
            except Exception:
                log.exception("closing a notifier failed")


def build_dispatcher(config: Config, handlers: Registry) -> Dispatcher:
    """Handler targets (`handler:NAME`) and notifier targets (`notifier:NAME`) from the config."""
    targets: dict[str, Notifier] = {
        f"handler:{name}": HandlerTarget(handler.func) for name, handler in handlers.handlers.items()
    }
    targets.update({f"notifier:{name}": build_notifier(nc) for name, nc in config.notifiers.items()})
    return Dispatcher(targets)


def _delivered_before(progress: Any) -> set[str]:
    """The targets a previous attempt of this job reached, from its progress."""
    if isinstance(progress, dict) and isinstance(progress.get("delivered"), list):
        return {str(name) for name in progress["delivered"]}
    return set()


class JobProcessor:
    """The bullmq processor: one job, one event, its handler and notifier targets."""

    def __init__(self, router: Router, dispatcher: Dispatcher, concurrency: int = 1) -> None:
        self.router = router
        self.dispatcher = dispatcher
        self.processed = 0
        # a thread per job in flight, of its own: asyncio's default pool (cpu_count + 4 threads) would cap
        # --concurrency at 6 on 2 cores, and Redis's host lookups, which use that pool, would wait behind jobs
        self.threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="job")

    async def __call__(self, job: Any, token: str) -> dict[str, Any]:
        from bullmq.custom_errors import UnrecoverableError

        event = Event.from_envelope(job.data)
        done = _delivered_before(job.progress)
        # a retry's silenced matches were counted at the first attempt
        targets = self.router.direct_targets(event, count_silenced=not job.attemptsMade)
        wanted = [name for name in targets if name not in done]
        # handlers and notifiers block (HTTP, files, user code): off the loop, so that locks are renewed meanwhile
        loop = asyncio.get_running_loop()
        outcomes = await loop.run_in_executor(self.threads, self.dispatcher.deliver, event, wanted)
        done.update(name for name, error in outcomes.items() if error is None)
        failures = {name: error for name, error in outcomes.items() if error is not None}
        self.processed += 1
        if not failures:
            return {"delivered": sorted(done)}
        await job.updateProgress({"delivered": sorted(done)})
        message = "; ".join(f"{name}: {_describe(error)}" for name, error in failures.items())
        log.warning("job %s (%s): %s", job.id, event.type, message)
        if all(isinstance(error, DeliveryError) and not error.retryable for error in failures.values()):
            # a refusal that cannot change (a 4xx): to the failed set at once, as the outbox makes a dead letter
            raise UnrecoverableError(message)
        raise TargetFailed(message)


class RedisCheck:
    """Whether Redis answers, said once per change: bullmq's worker waits for a lost Redis without a word, so a
    worker whose Redis is down, or refuses its password, would look idle rather than broken."""

    def __init__(self, config: Config) -> None:
        from .queue import sync_client

        self.where = config.queue.display_url
        self.cluster = config.queue.cluster
        self.client = sync_client(config.queue.url, config.delivery.timeout.total_seconds())
        self.failing = False

    def first(self) -> None:
        """At the start: a Redis that does not answer, or refuses, stops the worker with a one-line error."""
        try:
            self.client.ping()
            mismatch = kind_mismatch(self.client, self.cluster)
        except Exception as exc:
            self.client.close()
            raise StateError(f"Redis at {self.where} did not let the worker in: {_reason(exc)}") from None
        if mismatch is not None:
            self.client.close()
            raise StateError(f"Redis at {self.where}: {mismatch}")

    def again(self) -> None:
        try:
            self.client.ping()
        except Exception as exc:
            if not self.failing:
                log.error("Redis at %s does not answer: %s; jobs wait until it does", self.where, _reason(exc))
            self.failing = True
            return
        if self.failing:
            log.info("Redis at %s answers again", self.where)
        self.failing = False


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


async def _keep_watch(router: Router, redis: RedisCheck, stopping: asyncio.Event) -> None:
    """Until the stop, every few seconds: add the matches silenced here to the silences' counts in Redis, and
    say when Redis stops (or starts again) answering."""
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), WATCH_INTERVAL)
        await asyncio.to_thread(redis.again)
        if isinstance(router.silences, Silences) and not redis.failing:
            await asyncio.to_thread(router.silences.flush_counts)


def worker_connection(url: str) -> Any:
    """The worker's bullmq connection. On one server, the URL: bullmq makes its clients from it, and they retry a
    lost Redis for a long time, which a worker that waits for jobs wants. bullmq cannot make a cluster client
    from a URL, so on a cluster it gets one, retrying as bullmq's own would, with the redirects a cluster sends
    (a node that failed over, a slot that moved) followed by the client."""
    if not is_cluster_url(url):
        return url
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    # bullmq's blocking wait for a job lasts up to `drainDelay`: no read timeout, as with bullmq's own clients
    options = {"decode_responses": True, "socket_timeout": None, "retry": Retry(ExponentialBackoff(cap=20, base=1), 20)}
    return async_cluster_client(url, options)


def _describe(error: Exception) -> str:
    return str(error) if isinstance(error, DeliveryError) else f"{type(error).__name__}: {error}"


def run_worker(
    config: Config,
    *,
    concurrency: int = 1,
    handlers: Registry | None = None,
    stop: threading.Event | None = None,
    install_signals: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Process the queue's jobs until SIGTERM/SIGINT (or `stop`), then finish the jobs in flight and return 0."""
    handlers = handlers or registry
    import_handler_modules(config.handler_modules, config.source)
    redis = RedisCheck(config)
    redis.first()
    # the silences of forwarding rules apply here, where the notifiers are: they are read from Redis, where
    # `silence add` keeps them with this backend
    silences = Silences(silence_book(config, None))
    router = Router(config.rules, handlers, config.source, silences=silences)
    dispatcher = build_dispatcher(config, handlers)
    try:
        return asyncio.run(_work(config, router, dispatcher, redis, concurrency, stop, install_signals, on_ready))
    finally:
        dispatcher.close()
        silences.close()
        redis.client.close()


async def _work(
    config: Config,
    router: Router,
    dispatcher: Dispatcher,
    redis: RedisCheck,
    concurrency: int,
    stop: threading.Event | None,
    install_signals: bool,
    on_ready: Callable[[], None] | None,
) -> int:
    from bullmq import Worker

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    if install_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
    if stop is not None:
        threading.Thread(target=lambda: (stop.wait(), loop.call_soon_threadsafe(stopping.set)), daemon=True).start()
    processor = JobProcessor(router, dispatcher, concurrency)
    worker = Worker(
        config.queue.name,
        processor,
        {
            **bullmq_options(config.queue, worker_connection(config.queue.url)),
            # the connection's client name: `status` lists the workers it sees by it
            "name": default_replica(),
            "concurrency": concurrency,
            "lockDuration": LOCK_DURATION_MS,
            # an idle worker blocks on Redis this long at most between checks for a stop
            "drainDelay": 1,
        },
    )
    worker.on("failed", lambda job, err: log.info("job %s failed (attempt %s): %s", job.id, job.attemptsMade, err))
    worker.on("error", lambda err, *_: log.error("worker: %s", err))
    log.info(
        "langfuse-poller worker on queue %s at %s, concurrency %d, %d handler and notifier targets",
        config.queue.name,
        config.queue.display_url,
        concurrency,
        len(dispatcher.targets),
    )
    if on_ready is not None:
        on_ready()
    await _keep_watch(router, redis, stopping)
    log.info("stopping: finishing the jobs in flight")
    await worker.close()
    processor.threads.shutdown(wait=True)
    log.info("stopped after %d jobs", processor.processed)
    return 0
