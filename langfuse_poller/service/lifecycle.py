"""The daemon as a service: readiness, watchdog and status for systemd, config reloads, metrics.

The Daemon calls in at a few points (`start`, `poll_started`, `poll_finished`, `reload`, `stopping`, `close`);
everything here runs on the scheduler's threads or the main thread, never in a signal handler.

* **READY=1** follows the first poll: once it finished, successfully or not (STATUS says how: a Langfuse that
  is down at boot must not hold up the boot, nor make systemd kill and restart the daemon in a loop, while the
  daemon retries by itself and delivers what is queued), or once it has run `READY_WITHIN` seconds (a long
  catch-up, or retries against a Langfuse that does not answer), whichever comes first.
* **WATCHDOG=1** is sent every `$WATCHDOG_USEC / 2` by a job on the scheduler, so a stuck scheduler stops it,
  and only while polling is alive: a poll in flight must show a sign of life (an API request answered or
  failed, or a deliberate wait such as a Retry-After, counted until it ends) at least once per watchdog
  timeout, and a new poll must start within an interval plus that timeout of the last one. A poll that hangs
  stops the pings; systemd kills the daemon (SIGABRT: `faulthandler` prints every thread's stack to the
  journal first) and restarts it; the state makes that safe.
* **STATUS=** says lag, the last poll's outcome, the queue and the dead letters, updated every few seconds.
* **RELOADING=1** (with MONOTONIC_USEC) then READY=1 around a reload; **STOPPING=1** when a stop begins.

A reload runs on the main thread: it checks the new config while everything runs on; then it quiets the
daemon (pauses the scheduler's jobs but its own, interrupts the poll in flight at its next request, whose
committed pages stay; lets each delivery in flight finish), swaps the routing in (`reload.py`) and resumes.
"""

from __future__ import annotations

import faulthandler
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import LangfusePollerError
from ..util.durations import format_duration
from .sdnotify import ServiceManager

if TYPE_CHECKING:
    from ..poller import PollResult
    from ..redis.standby.replica import Replica
    from ..runtime import Runtime
    from .metrics import Metrics

log = logging.getLogger(__name__)

STATUS_EVERY = 5.0
# READY=1 at the latest this long after the first poll began: well within systemd's TimeoutStartSec (90 s)
READY_WITHIN = 30.0
# without a systemd watchdog, a poll that shows no sign of life for this long is reported (log, STATUS, metrics)
HANG_WITHOUT_WATCHDOG = 120.0
# a reload waits this long for the deliveries in flight (a slow webhook, a slow handler) before giving up
RELOAD_DRAIN_WAIT = 30.0
SERVICE_JOBS = ("service-watchdog", "service-status")


class Service:
    """systemd notifications, the watchdog, status, reloads and metrics around one Daemon."""

    def __init__(
        self,
        runtime: Runtime,
        stopping: threading.Event,
        *,
        load_config: Callable[[], Config] | None = None,
        manager: ServiceManager | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.stopping = stopping
        self.manager = manager or ServiceManager()
        self.clock = clock
        self.load_config = load_config
        self.metrics: Metrics | None = None
        self.scheduler: Any = None
        self.polls = True
        self.ready = False
        timeout = self.manager.watchdog_timeout
        self.hang_limit = timeout if timeout is not None else HANG_WITHOUT_WATCHDOG
        self._lock = threading.Lock()
        self._started = clock()
        self._poll_started: float | None = None  # the poll in flight began (None: no poll in flight)
        self._poll_ended = self._started
        self._last_life = self._started
        self._alive_until = 0.0
        self._poll_idle = threading.Event()
        self._poll_idle.set()
        self._last_result: PollResult | None = None
        self._last_failure: str | None = None  # the last poll ended with an unexpected exception
        self._hang_reported = False
        self._status_sent: str | None = None

    # the daemon's lifecycle

    def start(self, scheduler: Any) -> None:
        """Before the scheduler starts: metrics, hooks, the watchdog and status jobs. Raises when the metrics
        port cannot be listened on."""
        from apscheduler.triggers.interval import IntervalTrigger

        runtime = self.runtime
        # a watchdog kill is SIGABRT: the stacks of all threads in the journal show where it hung
        if not faulthandler.is_enabled():
            faulthandler.enable(all_threads=True)
        if runtime.config.metrics.enabled:
            from .metrics import Metrics

            self.metrics = Metrics(runtime, stalled=self.stalled)
            self.metrics.serve(runtime.config.metrics.host, runtime.config.metrics.port)
            runtime.store.on_stored = self.metrics.on_stored
            if self.metrics.usage is not None:
                runtime.poller.on_made = self.metrics.usage.tally
        runtime.reader.on_request = self._on_request
        runtime.reader.on_wait = self._on_wait
        self.scheduler = scheduler
        self.polls = scheduler.get_job("poll") is not None
        timeout = self.manager.watchdog_timeout
        if timeout is not None:
            if timeout < runtime.config.langfuse.timeout.total_seconds():
                log.warning(
                    "the systemd watchdog (%s) is shorter than [langfuse] timeout (%s): a slow request will restart "
                    "the service; raise WatchdogSec",
                    format_duration(timeout),
                    format_duration(runtime.config.langfuse.timeout.total_seconds()),
                )
            scheduler.add_job(
                self.watchdog_job, IntervalTrigger(seconds=timeout / 2), id=SERVICE_JOBS[0], next_run_time=_now()
            )
        scheduler.add_job(
            self.status_job, IntervalTrigger(seconds=STATUS_EVERY), id=SERVICE_JOBS[1], next_run_time=_now()
        )
        if not self.polls:
            # nothing to poll (a receive-only daemon): ready once everything is listening
            self._ready("running without polling")

    def stopping_now(self) -> None:
        self.manager.stopping("stopping: finishing the poll and deliveries in flight")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.manager.close()

    # polls

    def poll_started(self) -> None:
        now = self.clock()
        with self._lock:
            self._poll_started = now
            self._last_life = now
            self._poll_idle.clear()

    def poll_finished(self, result: PollResult | None, failure: str | None = None) -> None:
        """The poll job ended: with its result, or None when it failed unexpectedly or was interrupted."""
        now = self.clock()
        with self._lock:
            self._poll_started = None
            self._poll_ended = now
            self._last_life = now
            if result is not None or failure is not None:
                self._last_result = result
                self._last_failure = failure
            self._poll_idle.set()
        if self._hang_reported:
            log.warning("polling is alive again")
            self._hang_reported = False
        if not self.ready and (result is not None or failure is not None):
            # a standby's empty poll is no first poll: its status says what it waits for
            first = result is not None and self._standby() is None
            self._ready(("first poll: " if first else "") + self.status_text())

    def _on_request(self, path: str, outcome: str) -> None:
        self._last_life = self.clock()
        if self.metrics is not None:
            self.metrics.on_request(path, outcome)

    def _on_wait(self, seconds: float) -> None:
        now = self.clock()
        self._last_life = now
        self._alive_until = max(self._alive_until, now + seconds)

    def stalled(self) -> float:
        """Seconds the poll in flight has shown no sign of life (0 when none is in flight, or it is working),
        or, between polls, seconds past the time the next poll should have started."""
        now = self.clock()
        with self._lock:
            if self._poll_started is not None:
                if now < self._alive_until:
                    return 0.0
                return max(0.0, now - max(self._last_life, self._alive_until))
            if not self.polls:
                return 0.0
            late = now - self._poll_ended - self.runtime.config.poll.interval.total_seconds()
            return max(0.0, late)

    def hung(self) -> bool:
        return self.stalled() > self.hang_limit

    # jobs

    def watchdog_job(self) -> None:
        if self.hung():
            self._report_hang()
            return
        self.manager.watchdog()

    def status_job(self) -> None:
        try:
            if self.hung():
                self._report_hang()
            if not self.ready and self._poll_started is not None and self.clock() - self._started >= READY_WITHIN:
                self._ready("first poll still running: " + self.status_text())
                return
            if self.manager.enabled:
                text = self.status_text()
                if text != self._status_sent:
                    self._status_sent = text
                    self.manager.status(text)
        except Exception:
            log.exception("the service status could not be updated")

    def _report_hang(self) -> None:
        if self._hang_reported:
            return
        self._hang_reported = True
        stalled = format_duration(self.stalled())
        what = "the poll in flight has shown no sign of life" if self._poll_started else "no poll has started"
        consequence = (
            "watchdog pings stopped: systemd restarts the service"
            if self.manager.watchdog_timeout is not None
            else "restart the daemon if it stays so"
        )
        log.error("%s for %s; %s", what, stalled, consequence)
        self.manager.status(f"hung: {what} for {stalled}")

    def _standby(self) -> Replica | None:
        """This process's replica while it stands by (another one leads, or none can now), else None."""
        replica = self.runtime.replica
        return replica if replica is not None and not replica.may_poll() else None

    def _ready(self, status: str) -> None:
        self.ready = True
        self._status_sent = status
        self.manager.ready(status)

    def status_text(self) -> str:
        """One line for `systemctl status`: lag per stream, the last poll, the queue, the dead letters."""
        store = self.runtime.store
        now = time.time()
        parts = []
        if self.hung():
            parts.append(f"hung: no sign of life from polling for {format_duration(self.stalled())}")
        result, failure = self._last_result, self._last_failure
        standby = self._standby()
        if standby is not None:
            # a standby's polls are empty on purpose: say whom it waits for, or why it cannot take over
            parts.append(standby.standing_by())
        elif failure is not None:
            parts.append(f"last poll failed: {failure}")
        elif result is not None and result.errors:
            parts.append("last poll failed: " + "; ".join(result.errors))
        elif result is not None:
            parts.append(f"last poll ok, {result.events} new events")
        streams = store.streams()
        if streams:
            parts.append("lag " + ", ".join(f"{s.name} {format_duration(max(0.0, now - s.head))}" for s in streams))
        parts.append(f"queue {store.queue_depth()}, dead letters {store.dead_letter_count()}")
        return "; ".join(parts)

    # reloads

    def reload(self) -> None:
        """Re-read the config file and apply what a reload can (see reload.py); a bad config changes nothing."""
        from . import reload

        self.manager.reloading("reloading the config")
        runtime = self.runtime
        loader = self.load_config or reload.config_loader(runtime.config)
        log.info("reloading the config from %s", runtime.config.source)
        try:
            prepared = reload.prepare(runtime, loader())
        except LangfusePollerError as exc:
            self._reload_failed(str(exc))
            return
        try:
            with self._quiet():
                routing = reload.build(runtime, prepared)
                reload.swap(runtime, prepared, routing)
        except _Interrupted as exc:
            self._reload_failed(str(exc))
            return
        except LangfusePollerError as exc:
            self._reload_failed(str(exc))
            return
        for what in prepared.needs_restart:
            log.warning("reload: %s changed; it applies at the next restart, the running values stay", what)
        config = prepared.config
        handlers = sum(1 for target in runtime.worker.targets if target.startswith("handler:"))
        log.info(
            "config reloaded: %d rules, %d notifiers, %d handlers%s",
            len(config.rules),
            len(config.notifiers),
            handlers,
            f"; restart to apply {', '.join(prepared.needs_restart)}" if prepared.needs_restart else "",
        )
        if self.metrics is not None:
            self.metrics.reloaded(True)
        note = f" (restart to apply {', '.join(prepared.needs_restart)})" if prepared.needs_restart else ""
        self._ready(f"reloaded{note}; {self.status_text()}")

    def _reload_failed(self, why: str) -> None:
        if self.stopping.is_set():
            return
        log.error("reload failed, the running config stays: %s", why)
        if self.metrics is not None:
            self.metrics.reloaded(False)
        self._ready(f"reload failed, running the previous config: {why}")

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """No poll and no delivery in flight inside; everything resumes after, unless the daemon is stopping."""
        runtime = self.runtime
        scheduler = self.scheduler
        paused = [job.id for job in scheduler.get_jobs() if job.id not in SERVICE_JOBS] if scheduler else []
        for job_id in paused:
            scheduler.pause_job(job_id)
        # the poll in flight stops at its next request or wait (its committed pages stay); drains stop after the
        # delivery they are on, and nothing new starts
        runtime.cancel.set()
        try:
            self._wait(self._poll_idle.wait, None, "the poll in flight")
            self._wait(lambda timeout: _idle(runtime, timeout), RELOAD_DRAIN_WAIT, "the deliveries in flight")
            yield
        finally:
            if not self.stopping.is_set():
                runtime.cancel.clear()
                for job_id in paused:
                    scheduler.resume_job(job_id)
                runtime.worker.kick()

    def _wait(self, wait: Callable[[float], bool], limit: float | None, what: str) -> None:
        began = self.clock()
        while not wait(0.1):
            if self.stopping.is_set():
                raise _Interrupted("the daemon is stopping")
            if limit is not None and self.clock() - began > limit:
                raise _Interrupted(f"{what} did not end within {limit:g}s; send SIGHUP again later")


class _Interrupted(Exception):
    """Raised out of a reload's wait: the daemon is stopping, or what was in flight did not end in time."""


def _idle(runtime: Runtime, timeout: float) -> bool:
    try:
        runtime.worker.wait_idle(timeout)
    except TimeoutError:
        return False
    return True


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
