"""Durable delivery: drains the SQLite outbox to handlers and notifiers, with retries and dead letters.

Each target drains in its own thread, oldest event first, so a slow or failing target never delays the
others. A delivery is recorded right after it succeeded: a crash between the two repeats that one delivery,
never more. Failures back off exponentially with jitter (tenacity's wait strategy, persisted as `next_at`);
a target that looks down (timeouts, 5xx, 429) rests until its retry is due instead of being hammered with
the rest of its queue; a delivery that keeps failing becomes a dead letter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .config import DeliveryConfig
from .errors import DeliveryError
from .events import Event
from .notifiers.base import BatchNotifier, Notifier, RawBatchNotifier
from .store import DueDelivery, InProcessTarget, Store
from .util.backoff import backoff_seconds, jittered_backoff

log = logging.getLogger(__name__)

BATCH = 500
# targets that take a whole batch at once (a file, an in-process target): a catch-up hands them thousands of
# events, and each batch costs a query, a write transaction and, for the jsonl file, an fsync
BULK_BATCH = 2000
SHORT_REST = 1.0
# the drain job of every in-process target at once (no target is named so: names are `kind:name`)
IN_PROCESS = "in-process"
FORGOTTEN_TARGET_CHECK = 60.0
# `once` waits for retries due within this long; later ones stay pending for the next run
ONCE_RETRY_HORIZON = 5.0


class HandlerTarget(Notifier):
    """A registered handler function, as a delivery target."""

    # `worker --concurrency N` runs handlers in parallel, each job in a thread of its own (README, Scaling out)
    concurrent = True

    def __init__(self, func: Callable[[Event], Any]) -> None:
        self.func = func

    def send(self, event: Event) -> None:
        """Call the handler; whatever it raises is the delivery's failure (DeliveryError to choose no retry)."""
        self.func(event)

    def close(self) -> None:
        """Nothing to release: the handler belongs to its module."""


@dataclass
class DeliveryStats:
    """What deliveries did since the worker started, per target and outcome."""

    delivered: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)

    def add(self, bucket: dict[str, int], target: str, count: int = 1) -> None:
        """Count `count` outcomes of `target` in one of the buckets above."""
        bucket[target] = bucket.get(target, 0) + count


class DeliveryWorker:
    """Delivers due deliveries to `targets` (name -> notifier or handler target)."""

    def __init__(
        self,
        store: Store,
        targets: Mapping[str, Notifier],
        config: DeliveryConfig,
        *,
        clock: Callable[[], float] = time.time,
        cancel: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.targets = dict(targets)
        self.config = config
        self.clock = clock
        self.cancel = cancel or threading.Event()
        self.stats = DeliveryStats()
        self._wait = jittered_backoff(config.backoff.total_seconds(), config.max_backoff.total_seconds())
        self._resting_until: dict[str, float] = {}
        self._running: dict[str, Future[None]] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(32, len(self.targets))), thread_name_prefix="deliver")
        self._lock = threading.Lock()
        self._checked_forgotten = 0.0

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt + 1`, exponential with jitter."""
        return backoff_seconds(self._wait, attempt)

    def kick(self) -> None:
        """Start draining every target that has nothing in flight; returns at once."""
        now = self.clock()
        if now - self._checked_forgotten > FORGOTTEN_TARGET_CHECK:
            self._checked_forgotten = now
            self.dead_letter_forgotten_targets()
        with self._lock:
            # the in-process targets (one per alerting rule) mostly get the same events: drained together, each
            # event is parsed once for all of them and they take one write turn (BENCHMARKS.md, "Catch-up with
            # alerting rules and usage metrics")
            together = [name for name, target in self.targets.items() if isinstance(target, InProcessTarget)]
            for name in self.targets:
                job = IN_PROCESS if name in together else name
                running = self._running.get(job)
                if running is not None and not running.done():
                    continue
                if self.cancel.is_set():
                    continue
                if job == IN_PROCESS:
                    if all(self._resting(each, now) for each in together):
                        continue
                    self._running[job] = self._pool.submit(self._drain_in_process_safely, together)
                elif not self._resting(name, now):
                    self._running[job] = self._pool.submit(self._drain_safely, name)

    def count_applied(self, applied: Mapping[str, int], failed: Mapping[str, int]) -> None:
        """Count the events that the store applied to in-process targets as it stored them as delivered, and
        those they failed on (queued for them instead) as failed attempts."""
        for name, count in applied.items():
            self.stats.add(self.stats.delivered, name, count)
        for name, count in failed.items():
            self.stats.add(self.stats.failed, name, count)

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait for the drains in flight to finish."""
        with self._lock:
            running = list(self._running.values())
        for future in running:
            future.result(timeout=timeout)

    def run_until_idle(self, max_rounds: int = 1000) -> None:
        """Drain until nothing is due now (what backs off for later stays pending); used by `once`."""
        for _ in range(max_rounds):
            self.kick()
            self.wait_idle()
            now = self.clock()
            if self.cancel.is_set():
                return
            # what backs off after a failure is retried within the run when it is due soon, not left for the next
            wakes = [
                max(next_at, self._resting_until.get(name, 0.0))
                for name in self.targets
                if (next_at := self.store.next_due_at(name)) is not None
            ]
            wake = min(wakes, default=None)
            if wake is None or wake - now > ONCE_RETRY_HORIZON:
                return
            if wake > now and self.cancel.wait(wake - now):
                return

    def close(self) -> None:
        """Stop: cancel waits, let the deliveries in flight finish, then close every target."""
        self.cancel.set()
        self._pool.shutdown(wait=True)
        for target in self.targets.values():
            try:
                target.close()
            except Exception:
                log.exception("closing a notifier failed")

    def _drain_safely(self, name: str) -> None:
        try:
            self.drain(name)
        except Exception:
            # the store itself failed (disk full, locked too long): the next kick tries again
            log.exception("delivery to %s stopped on an unexpected error", name)

    def _drain_in_process_safely(self, names: Sequence[str]) -> None:
        try:
            self.drain_in_process(names)
        except Exception:
            log.exception("delivery to the in-process targets stopped on an unexpected error")

    def drain_in_process(self, names: Sequence[str]) -> int:
        """Deliver the due deliveries of in-process targets, batch by batch: each round, the batches of every target
        in one transaction, each target's in a part of it that fails alone (its deliveries are then retried)."""
        sent = 0
        while not self.cancel.is_set():
            now = self.clock()
            batches = {
                name: batch
                for name in names
                if not self._resting(name, now) and (batch := self.store.due(name, now, BULK_BATCH))
            }
            if not batches:
                break
            events = _shared_events(batches.values())
            failed: dict[str, Exception] = {}
            try:
                with self.store.write() as tx:
                    for name, batch in batches.items():
                        target = self.targets[name]
                        assert isinstance(target, InProcessTarget)
                        try:
                            with tx.part():
                                target.apply(tx, [events[due.event_id] for due in batch])
                                tx.mark_done([due.id for due in batch])
                        except Exception as exc:
                            failed[name] = exc
            except Exception as exc:
                # the transaction itself failed (the disk, the lock): nothing of it was recorded
                failed = dict.fromkeys(batches, exc)
            for name, batch in batches.items():
                if name in failed:
                    for due in batch:
                        self._failed(name, due, failed[name])
                else:
                    self.stats.add(self.stats.delivered, name, len(batch))
                    sent += len(batch)
        return sent

    def drain(self, name: str) -> int:
        """Deliver the due deliveries of one target until none is due, the target rests, or we stop."""
        target = self.targets[name]
        sent = 0
        while not self.cancel.is_set():
            now = self.clock()
            if self._resting(name, now):
                # a short rest is waited out by this thread: left to the next delivery tick, each retry of a
                # flaky target would wait up to a tick longer (BENCHMARKS.md, "Chaos").
                # Waiting only passes real time, so an injected clock (tests) leaves it to the ticks
                rest = self._resting_until[name] - now
                if self.clock is time.time and rest <= SHORT_REST and not self.cancel.wait(rest):
                    continue
                break
            bulk = isinstance(target, InProcessTarget | BatchNotifier | RawBatchNotifier)
            batch = self.store.due(name, now, BULK_BATCH if bulk else BATCH)
            if not batch:
                break
            if isinstance(target, InProcessTarget):
                ok = self._apply_batch(name, target, batch)
            elif isinstance(target, BatchNotifier | RawBatchNotifier):
                ok = self._send_batch(name, target, batch)
            else:
                ok = self._send_each(name, target, batch)
            sent += ok
        return sent

    def _send_each(self, name: str, target: Notifier, batch: Sequence[DueDelivery]) -> int:
        ok = 0
        for due in batch:
            if self.cancel.is_set():
                break
            if self._deliver_one(name, target, due) is None:
                ok += 1
            elif self._resting(name):
                break
        return ok

    def _apply_batch(self, name: str, target: InProcessTarget, batch: Sequence[DueDelivery]) -> int:
        """Apply deliveries to an in-process target in the transaction that records them done."""
        try:
            with self.store.write() as tx:
                target.apply(tx, [due.event for due in batch])
                tx.mark_done([due.id for due in batch])
        except Exception as exc:
            for due in batch:
                self._failed(name, due, exc)
            return 0
        self.stats.add(self.stats.delivered, name, len(batch))
        return len(batch)

    def _deliver_one(self, name: str, target: Notifier, due: DueDelivery) -> Exception | None:
        """Send one delivery and record its outcome; the failure, if any."""
        if isinstance(target, InProcessTarget):
            return None if self._apply_batch(name, target, [due]) else DeliveryError(f"{name} failed")
        try:
            target.send(due.event)
        except Exception as exc:
            self._failed(name, due, exc)
            return exc
        self.store.mark_done([due.id])
        self.stats.add(self.stats.delivered, name)
        return None

    def _resting(self, name: str, now: float | None = None) -> bool:
        """Whether a target that looked down is waiting for its retry."""
        return self._resting_until.get(name, 0.0) > (self.clock() if now is None else now)

    def _send_batch(self, name: str, target: BatchNotifier | RawBatchNotifier, batch: Sequence[DueDelivery]) -> int:
        try:
            if isinstance(target, RawBatchNotifier):
                target.send_raw([(due.event_id, due.body) for due in batch])
            else:
                target.send_many([due.event for due in batch])
        except Exception as exc:
            for due in batch:
                self._failed(name, due, exc)
            return 0
        self.store.mark_done([due.id for due in batch])
        self.stats.add(self.stats.delivered, name, len(batch))
        return len(batch)

    def _failed(self, name: str, due: DueDelivery, exc: Exception) -> None:
        attempts = due.attempts + 1
        if isinstance(exc, DeliveryError):
            message, retryable, retry_after, rest = str(exc), exc.retryable, exc.retry_after, exc.retryable
        else:
            # a handler's own exception: retried, but the handler's other events go on meanwhile
            message, retryable, retry_after, rest = f"{type(exc).__name__}: {exc}", True, None, False
        self.stats.add(self.stats.failed, name)
        # a queue that hands events on (Redis) is waited for however long it is down: giving up would turn an
        # outage into dead letters; its own jobs count the attempts of the handlers and notifiers
        target = self.targets.get(name)
        patient = retryable and target is not None and target.retries_forever
        if not retryable or (attempts >= self.config.max_attempts and not patient):
            reason = message if not retryable else f"{message} (gave up after {attempts} attempts)"
            self.store.mark_dead(due.id, error=reason)
            self.stats.add(self.stats.dead, name)
            log.error("delivery of %s to %s failed for good: %s", due.event_id, name, reason)
            return
        delay = max(self.backoff(attempts), retry_after or 0.0)
        next_at = self.clock() + delay
        self.store.mark_retry(due.id, next_at=next_at, error=message)
        if rest:
            self._resting_until[name] = next_at
        log.warning(
            "delivery of %s to %s failed (%s); retry %d in %.1fs",
            due.event_id,
            name,
            message,
            attempts,
            delay,
        )

    def deliver_event(self, event_id: str) -> dict[str, str | None]:
        """Deliver one event's pending deliveries now, whatever else is queued: target -> error or None."""
        outcomes: dict[str, str | None] = {}
        for due in self.store.pending_of_event(event_id):
            target = self.targets.get(due.target)
            if target is None:
                outcomes[due.target] = "not configured"
                continue
            error = self._deliver_one(due.target, target, due)
            outcomes[due.target] = None if error is None else str(error) or type(error).__name__
        return outcomes

    def replace_targets(self, targets: Mapping[str, Notifier], config: DeliveryConfig) -> dict[str, Notifier]:
        """Deliver to `targets`, with `config`, from now on (a reload); returns the old targets for the caller to
        close. Only while nothing drains: `cancel` set and `wait_idle` returned, so no delivery is in flight."""
        with self._lock:
            if any(not future.done() for future in self._running.values()):
                raise RuntimeError("replace_targets() while deliveries are in flight")
            old, self.targets = self.targets, dict(targets)
            self.config = config
            self._wait = jittered_backoff(config.backoff.total_seconds(), config.max_backoff.total_seconds())
            # new settings may have fixed a target that looked down: it tries again at its next due delivery
            self._resting_until.clear()
            # deliveries pending for a target the new config removed become dead letters at the next kick
            self._checked_forgotten = 0.0
            self._running.clear()
            pool, self._pool = (
                self._pool,
                ThreadPoolExecutor(max_workers=max(1, min(32, len(self.targets))), thread_name_prefix="deliver"),
            )
        pool.shutdown(wait=False)
        return old

    def dead_letter_forgotten_targets(self) -> int:
        """Pending deliveries to targets no longer configured become dead letters, visible and replayable."""
        count = 0
        for target in self.store.pending_targets():
            if target in self.targets:
                continue
            for due in self.store.due(target, float("inf"), 10_000):
                self.store.mark_dead(
                    due.id,
                    error=f"{target} is no longer configured; add it back and replay this dead letter",
                    attempted=False,
                )
                count += 1
        return count


def _shared_events(batches: Iterable[Sequence[DueDelivery]]) -> dict[str, Event]:
    """The events of several targets' batches, by id, each parsed once: the batches mostly hold the same events."""
    events: dict[str, Event] = {}
    for batch in batches:
        for due in batch:
            if due.event_id not in events:
                events[due.event_id] = due.event
    return events
