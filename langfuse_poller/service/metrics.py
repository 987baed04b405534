"""Prometheus metrics (`[metrics] listen = "127.0.0.1:9464"`, off by default), served at `/metrics`.

Two kinds, each where it is cheapest and truest:

* read from the state at scrape time (a custom collector): lag, last poll and last success per stream, the
  queue by target, dead letters, open alert groups, and the deliveries by target and outcome that the
  delivery worker counted. Nothing to keep in step: a scrape says what the state says.
* counted where things happen, through the hooks the lower layers offer (`Store.on_stored`,
  `LangfuseReader.on_request`): events stored by type and source, API requests by endpoint and status, alert
  notifications by rule. Counters start at zero with the process, as Prometheus expects (`rate`, `increase`).

The server is one thread serving one scrape at a time: it reuses its SQLite connection, and a scrape every
few seconds needs no more.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector

from ..errors import LangfusePollerError
from ..langfuse.legacy import TRACES_PATH
from ..store import StoredEvent
from ..util.listening import format_listen
from .usage import UsageMetrics
from .usage import wsgi_app as usage_app

if TYPE_CHECKING:
    from ..redis.standby.report import QueueReport
    from ..runtime import Runtime

log = logging.getLogger(__name__)

PREFIX = "langfuse_poller"
# the events polling makes; their counters exist from the start, so that `increase()` sees the first one
POLL_EVENT_TYPES = ("trace.created", "trace.updated", "generation.created", "score.created", "score.updated")
OUTCOMES = ("delivered", "failed", "dead")
SCRAPE_TIMEOUT = 10.0  # seconds a scraper may take to send its request: a stuck one must not block the next


def endpoint_label(path: str) -> str:
    """The endpoint of a request path, with ids taken out: a label value per trace would never end."""
    if path.startswith(TRACES_PATH + "/"):
        return TRACES_PATH + "/{traceId}"
    return path


class StateCollector(Collector):
    """The gauges and counters that the state and the delivery worker already hold, read at scrape time."""

    def __init__(self, runtime: Runtime, stalled: Callable[[], float] | None = None) -> None:
        self.runtime = runtime
        self.stalled = stalled

    def collect(self) -> Iterable[Metric]:
        from .. import __version__

        runtime = self.runtime
        store = runtime.store
        now = time.time()
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "The running version of langfuse-poller.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        lag = GaugeMetricFamily(
            f"{PREFIX}_lag_seconds", "How far behind now the stream's head watermark is.", labels=["stream"]
        )
        last_poll = GaugeMetricFamily(
            f"{PREFIX}_last_poll_timestamp_seconds", "When the stream was last polled (unix time).", labels=["stream"]
        )
        last_success = GaugeMetricFamily(
            f"{PREFIX}_last_success_timestamp_seconds",
            "When a poll of the stream last succeeded (unix time).",
            labels=["stream"],
        )
        failing = GaugeMetricFamily(
            f"{PREFIX}_poll_failing", "1 when the stream's last poll failed, else 0.", labels=["stream"]
        )
        report = None
        if runtime.config.queue.backend == "redis":
            from ..redis.standby.report import read_report

            report = read_report(runtime.config.queue, now=now)
        # standby replicas share their watermarks in Redis; their SQLite holds none
        streams = report.streams if report is not None and runtime.replica is not None else store.streams()
        for stream in streams:
            lag.add_metric([stream.name], max(0.0, now - stream.head))
            if stream.last_poll_at is not None:
                last_poll.add_metric([stream.name], stream.last_poll_at)
            if stream.last_success_at is not None:
                last_success.add_metric([stream.name], stream.last_success_at)
            failing.add_metric([stream.name], 1 if stream.last_error else 0)
        yield from (lag, last_poll, last_success, failing)

        targets = sorted(runtime.worker.targets)
        queue = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Deliveries waiting (due or backing off), by target.", labels=["target"]
        )
        pending = store.pending_by_target()
        for target in sorted({*targets, *pending}):
            queue.add_metric([target], pending.get(target, 0))
        yield queue

        dead = GaugeMetricFamily(
            f"{PREFIX}_dead_letters", "Dead letters in the state: deliveries and records that failed for good."
        )
        dead.add_metric([], store.dead_letter_count())
        yield dead

        stats = runtime.worker.stats
        deliveries = CounterMetricFamily(
            f"{PREFIX}_deliveries",
            "Delivery attempts since the start, by target and outcome (a dead one also counts as failed).",
            labels=["target", "outcome"],
        )
        # dict() copies in one step: the delivery threads add to these meanwhile
        buckets = {"delivered": dict(stats.delivered), "failed": dict(stats.failed), "dead": dict(stats.dead)}
        for target in sorted({*targets, *(t for bucket in buckets.values() for t in bucket)}):
            for outcome in OUTCOMES:
                deliveries.add_metric([target, outcome], buckets[outcome].get(target, 0))
        yield deliveries

        groups = GaugeMetricFamily(
            f"{PREFIX}_alert_groups",
            "Open alert groups, by rule and state (pending, firing).",
            labels=["rule", "state"],
        )
        alert_state = runtime.alerter.store.alert_state()
        try:
            counts = alert_state.counts()
        except LangfusePollerError as exc:  # Redis away: the other metrics still stand
            log.warning("the alert groups could not be read for the metrics: %s", exc)
            counts = []
        for rule, state, count in counts:
            groups.add_metric([rule, state], count)
        yield groups
        backend = GaugeMetricFamily(
            f"{PREFIX}_alert_state_backend",
            "Where the alert groups live: sqlite (this process's state) or redis (shared by standby replicas).",
            labels=["backend"],
        )
        backend.add_metric(["redis" if runtime.config.queue.standby else "sqlite"], 1)
        yield backend
        if runtime.replica is not None:
            takeover = GaugeMetricFamily(
                f"{PREFIX}_alert_groups_to_take_over",
                "On a standby: the open alert groups (firing, pending) it would take over from the leader; 0 when "
                "this replica leads.",
            )
            leading = runtime.replica.role == "leader"
            takeover.add_metric([], 0 if leading else sum(n for _, state, n in counts if state != "watching"))
            yield takeover

        overflow = CounterMetricFamily(
            f"{PREFIX}_rule_overflow",
            "Matches of a measuring rule that went to its overflow group: the rule had max_groups keys already.",
            labels=["rule"],
        )
        for rule, count in sorted(dict(runtime.alerter.overflowed).items()):
            overflow.add_metric([rule], count)
        yield overflow

        if report is not None:
            yield from _redis_metrics(report, runtime)

        if self.stalled is not None:
            stalled = GaugeMetricFamily(
                f"{PREFIX}_poll_stalled_seconds",
                "How long the poll in flight has shown no sign of life (0: none in flight, or it is working).",
            )
            stalled.add_metric([], self.stalled())
            yield stalled


def _redis_metrics(report: QueueReport, runtime: Runtime) -> Iterable[Metric]:
    """The Redis queue (job counts, workers) and, with standby pollers, the lease and this replica's role."""
    up = GaugeMetricFamily(f"{PREFIX}_redis_up", "1 when Redis answered this scrape's questions, else 0.")
    up.add_metric([], 0 if report.error else 1)
    yield up
    if report.error:
        return
    jobs = GaugeMetricFamily(
        f"{PREFIX}_redis_jobs",
        "BullMQ jobs of the queue by state (waiting, active, delayed, prioritized; failed: its dead letters).",
        labels=["state"],
    )
    for state, count in report.jobs.items():
        jobs.add_metric([state], count)
    yield jobs
    workers = GaugeMetricFamily(f"{PREFIX}_redis_workers", "BullMQ workers connected to the queue.")
    workers.add_metric([], len(report.workers))
    yield workers
    if report.cluster_nodes is not None:
        nodes = GaugeMetricFamily(f"{PREFIX}_redis_cluster_nodes", "Primaries of the Redis Cluster (only on one).")
        nodes.add_metric([], report.cluster_nodes)
        yield nodes
    replica = runtime.replica
    if replica is None:
        return
    holder = report.holder
    lease = GaugeMetricFamily(
        f"{PREFIX}_lease_holder",
        "1 for the replica that holds the poller lease, with its fencing token (no series: nobody holds it).",
        labels=["replica", "token"],
    )
    left = GaugeMetricFamily(f"{PREFIX}_lease_expires_in_seconds", "Time left on the poller lease (0: not held).")
    if holder is not None:
        lease.add_metric([holder.replica, str(holder.token)], 1)
    left.add_metric([], 0 if holder is None else holder.expires_in)
    yield from (lease, left)
    leader = GaugeMetricFamily(
        f"{PREFIX}_leader", "1 while this replica holds the lease and polls, 0 while it stands by.", labels=["replica"]
    )
    leader.add_metric([replica.name], 1 if replica.may_poll() else 0)
    yield leader
    takeovers = CounterMetricFamily(
        f"{PREFIX}_lease_acquired", "Times this replica took the poller lease since it started.", labels=["replica"]
    )
    takeovers.add_metric([replica.name], replica.takeovers)
    yield takeovers
    replicas = GaugeMetricFamily(
        f"{PREFIX}_replicas", "Replicas that reported within three leases, by role.", labels=["role"]
    )
    roles = Tally(seen.role for seen in report.replicas if not seen.gone)
    for role in ("leader", "standby"):
        replicas.add_metric([role], roles.get(role, 0))
    yield replicas


class Metrics:
    """The daemon's metrics: counters fed by hooks, the state collector, and the `/metrics` server."""

    def __init__(self, runtime: Runtime, *, stalled: Callable[[], float] | None = None) -> None:
        # the `_created` series of every counter would double what a scrape carries, for nothing a rule uses
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.events = Counter(
            f"{PREFIX}_events",
            "Events stored for delivery, by type and source.",
            ["type", "source"],
            registry=self.registry,
        )
        for event_type in POLL_EVENT_TYPES:
            self.events.labels(event_type, "poll")
        self.api_requests = Counter(
            f"{PREFIX}_api_requests",
            'Requests to the Langfuse API, by endpoint and status ("timeout", "error": no answer).',
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.alert_notifications = Counter(
            f"{PREFIX}_alert_notifications",
            "Alert notifications made (each is then delivered to the rule's notifiers), by rule and status.",
            ["rule", "status"],
            registry=self.registry,
        )
        self.reloads = Counter(
            f"{PREFIX}_config_reloads", "Config reloads (SIGHUP), by outcome.", ["outcome"], registry=self.registry
        )
        for outcome in ("ok", "failed"):
            self.reloads.labels(outcome)
        self.last_reload_ok = Gauge(
            f"{PREFIX}_config_last_reload_successful",
            "1 when the last config reload succeeded (or none was tried), else 0.",
            registry=self.registry,
        )
        self.last_reload_ok.set(1)
        self.registry.register(StateCollector(runtime, stalled))
        # the usage series (`[metrics] usage`), counted from the events the poller makes (service/usage.py)
        self.usage: UsageMetrics | None = None
        if runtime.config.metrics.usage is not None:
            self.usage = UsageMetrics(runtime.config.metrics.usage)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # hooks

    def on_request(self, path: str, outcome: str) -> None:
        self.api_requests.labels(endpoint_label(path), outcome).inc()

    def on_stored(self, events: Sequence[StoredEvent]) -> None:
        for event in events:
            self.events.labels(event.type, event.source).inc()
            if event.rule is not None:
                self.alert_notifications.labels(event.rule, event.type.removeprefix("rule.")).inc()

    def reloaded(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()
        self.last_reload_ok.set(1 if ok else 0)

    # the server

    def serve(self, host: str, port: int) -> None:
        """Listen on host:port and serve `/metrics` from a background thread; LangfusePollerError if it cannot."""
        app = make_wsgi_app(self.registry) if self.usage is None else usage_app(self.registry, self.usage)
        server_class = _Server6 if ":" in host else _Server
        try:
            server = server_class((host, port), _QuietHandler)
        except OSError as exc:
            raise LangfusePollerError(
                f"cannot listen on {format_listen(host, port)} for [metrics] listen: {exc.strerror}; "
                "choose another port (see `langfuse-poller check`)"
            ) from None
        server.set_app(app)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics at http://%s/metrics", format_listen(host, server.server_port))

    @property
    def port(self) -> int | None:
        return None if self._server is None else self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Server(WSGIServer):
    allow_reuse_address = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn), which can stall on some resolvers
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass
