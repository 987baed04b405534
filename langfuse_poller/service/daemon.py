"""The daemon: APScheduler runs the poll job and the delivery worker; signals stop it cleanly.

Signal handlers only set a flag. The main thread then cancels waits (rate-limit sleeps, backoffs), lets the
poll in flight finish or roll back its transaction, lets deliveries in flight finish, and exits 0. SIGHUP
reloads the config, on the main thread too; systemd readiness, watchdog and metrics are `lifecycle.py`'s.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from ..alerting.resend import RESEND_TICK, Resender
from ..config import Config
from ..errors import LangfusePollerError
from ..langfuse.reader import Cancelled
from ..poller import PollResult
from ..runtime import Runtime
from ..util.durations import format_duration
from .lifecycle import Service

log = logging.getLogger(__name__)

# deliveries start at once after a poll commits; this tick picks up retries whose backoff ended
DELIVERY_TICK = 0.25
# alert groups are looked at this often: group_wait and friends are kept to within a second
ALERT_TICK = 1.0
MAINTENANCE_EVERY = 600.0
# how long a stop waits for the poll in flight; past it the process exits anyway, which is safe: a page is
# committed in one transaction or not at all, and an HTTP request in flight holds no transaction open
STOP_GRACE = 3.0


class Daemon:
    """Runs a Runtime until `stop()` (or SIGTERM/SIGINT when `run(install_signals=True)`)."""

    def __init__(self, runtime: Runtime, *, load_config: Callable[[], Config] | None = None) -> None:
        self.runtime = runtime
        self.stopping = threading.Event()
        self._poll_done = threading.Event()
        # the leadership term (token) the shared streams were last shaped in; None: no standby, streams made at run
        self._streams_term: int | None = None
        self._poll_done.set()
        self._reload = threading.Event()
        self._scheduler: Any = None
        self.service = Service(runtime, self.stopping, load_config=load_config)
        self.resender = Resender()

    def poll_job(self) -> None:
        replica = self.runtime.replica
        if replica is not None and not replica.may_poll():
            # a standby: nothing to poll is a finished poll to the service (readiness, the watchdog), which
            # must not restart a process that is waiting on purpose
            self.service.poll_started()
            self.service.poll_finished(PollResult())
            return
        self._poll_done.clear()
        self.service.poll_started()
        result: PollResult | None = None
        failure: str | None = None
        try:
            with self.runtime.leader_term() as term:
                if term != self._streams_term:
                    # a new leader shapes the shared streams (their sweep tiers) by its config, under its token
                    self.runtime.poller.start_streams()
                    self._streams_term = term
                result = self.runtime.poller.poll_once()
        except Cancelled:
            return
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            if not self.stopping.is_set():
                log.exception("poll failed unexpectedly; the next poll tries again")
            return
        finally:
            self._poll_done.set()
            self.service.poll_finished(result, failure)
        for error in result.errors:
            log.error("%s", error)
        if result.events:
            log.info("poll: %d new events from %d API requests", result.events, result.requests)
        self.runtime.worker.kick()

    def _poll_now(self) -> None:
        """After a takeover: poll at once rather than at the next interval, the failover's last part."""
        if self._scheduler is None or not self.runtime.config.poll.streams:
            return
        job = self._scheduler.get_job("poll")
        # a paused job (a reload in progress) has no next run: setting one would resume it mid-reload
        if job is not None and job.next_run_time is not None:
            job.modify(next_run_time=datetime.now(UTC))

    def deliver_job(self) -> None:
        self.runtime.worker.kick()

    def alert_job(self) -> None:
        try:
            if self.runtime.alerter.tick():
                self.runtime.worker.kick()
        except Cancelled:
            pass  # deposed meanwhile (the alert state in Redis refused the write): the new leader ticks
        except Exception:
            log.exception("alert groups could not be evaluated; the next tick tries again")

    def resend_job(self) -> None:
        replica = self.runtime.replica
        if replica is not None and not replica.may_poll():
            return  # a standby tells nobody: the leader re-sends the groups it told
        runtime = self.runtime
        try:
            # the alerter's store: with standby pollers, the groups in Redis, so a new leader re-sends those the
            # old one told
            state = runtime.alerter.store.alert_state()
            self.resender.run(state, runtime.alerter.rules, runtime.worker.targets)
        except Exception:
            log.exception("open alerts could not be re-sent; the next tick tries again")

    def maintenance_job(self) -> None:
        retention = self.runtime.config.delivery.retention.total_seconds()
        removed = self.runtime.store.prune_delivered(time.time() - retention)
        if removed:
            log.info("maintenance: dropped %d delivered events older than the retention", removed)

    def stop(self, *_: object) -> None:
        self.stopping.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping.set()

    def _on_reload_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._reload.set()

    def run(self, *, install_signals: bool = True) -> int:
        """Start the jobs, serve reloads until `stop()` or a stop signal, then shut down; returns the exit status."""
        scheduler = self._start_scheduling(install_signals)
        while not self.stopping.wait(0.5):
            if self._reload.is_set():
                self._reload.clear()
                self.service.reload()
        return self._shut_down(scheduler)

    def _start_scheduling(self, install_signals: bool) -> Any:
        """Signals, the receiver, the streams and the alerter, then the scheduler with its jobs and the replica's
        lease thread; returns the running scheduler."""
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        if install_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGHUP, self._on_reload_signal)
        runtime = self.runtime
        if runtime.config.webhook.enabled:
            runtime.start_receiver()  # first: a port in use stops the start before anything runs
        elif os.environ.get("LISTEN_FDS"):
            log.warning(
                "systemd handed over a socket (langfuse-poller-webhooks.socket), but [webhook] enabled is false: "
                "webhooks sent to it wait unanswered; set enabled = true, or disable the socket unit"
            )
        try:
            # a standby only seeds its local copy of the heads: the shared streams are the leader's to shape, at
            # its first poll (poll_job)
            runtime.poller.start_streams()
        except LangfusePollerError as exc:
            if runtime.replica is None:
                raise
            log.warning("the shared poll state could not be read yet: %s", exc)
        runtime.alerter.start()
        scheduler = BackgroundScheduler(
            timezone=UTC,
            # one poll at a time; a poll that overran its interval is followed by one, not a burst
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        now = datetime.now(UTC)
        self._scheduler = scheduler
        if runtime.config.poll.streams:  # none: `serve-webhooks`, which only receives
            scheduler.add_job(
                self.poll_job,
                IntervalTrigger(seconds=runtime.config.poll.interval.total_seconds()),
                id="poll",
                next_run_time=now,
            )
        scheduler.add_job(self.deliver_job, IntervalTrigger(seconds=DELIVERY_TICK), id="deliver", next_run_time=now)
        scheduler.add_job(self.alert_job, IntervalTrigger(seconds=ALERT_TICK), id="alerts", next_run_time=now)
        scheduler.add_job(self.resend_job, IntervalTrigger(seconds=RESEND_TICK), id="resend", next_run_time=now)
        scheduler.add_job(self.maintenance_job, IntervalTrigger(seconds=MAINTENANCE_EVERY), id="maintenance")
        self.service.start(scheduler)
        if self.service.metrics is not None:
            self.service.metrics.registry.register(self.resender.collector())
        scheduler.start()
        if runtime.replica is not None:
            # its own thread, not a scheduler job: a reload pauses the jobs, and a lease must never wait for it
            runtime.replica.on_acquired = self._poll_now
            runtime.replica.start(self.stopping)
            log.info(
                "replica %s: standby poller sharing the lease at %s (queue %s, lease %s)",
                runtime.replica.name,
                runtime.config.queue.display_url,
                runtime.config.queue.name,
                format_duration(runtime.config.queue.lease.total_seconds()),
            )
        if runtime.config.poll.streams:
            log.info(
                "langfuse-poller running: %s, every %s, state %s",
                runtime.config.langfuse.base_url,
                runtime.config.poll.interval,
                runtime.config.state_path,
            )
        else:
            log.info("langfuse-poller running without polling (webhooks only), state %s", runtime.config.state_path)
        return scheduler

    def _shut_down(self, scheduler: Any) -> int:
        """Stop receiving, cancel the waits, stop the scheduler, give the poll in flight STOP_GRACE, close; returns
        0, or exits the process at once when the poll did not end in time."""
        runtime = self.runtime
        log.info("stopping: finishing the poll and deliveries in flight")
        self.service.stopping_now()
        if runtime.receiver is not None:
            # nothing new comes in; the requests in flight are stored and answered
            runtime.receiver.stop()
        runtime.cancel.set()
        scheduler.shutdown(wait=False)
        poll_ended = self._poll_done.wait(STOP_GRACE)
        runtime.close()
        self.service.close()
        if not poll_ended:
            log.warning("the poll in flight did not end within %.0fs; stopped without it", STOP_GRACE)
            logging.shutdown()
            # the scheduler's worker threads are joined at interpreter exit, which would wait out the request
            os._exit(0)
        log.info("stopped")
        return 0
