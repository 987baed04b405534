"""Re-sending open alert groups to Alertmanager while they stay open.

Alertmanager resolves an alert that nobody re-sends within its `resolve_timeout` (5 minutes by default), so,
as Prometheus re-sends its firing alerts, the daemon re-sends every firing group to each `alertmanager`
notifier it told about the group, every `resend_interval` of that notifier, until the group resolves.

A re-send is best effort and goes around the outbox: it is no new notification, the next one tries again, a
failure is logged and counted (`langfuse_poller_alert_resends_total`), never a dead letter. It reads the open
groups through the alert state, and never sends a group that resolved: a resolved group is gone from the
state, and the notifier itself drops one it resolved while the re-send was being built
(`AlertmanagerNotifier.resend`). A group held back by a silence is re-sent all the same: it was told, and is
still open; Alertmanager's own silences mute it there.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from ..errors import DeliveryError
from ..notifiers.alertmanager import AlertmanagerNotifier
from ..rules import Rule
from .groups import Group, alert_event

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from ..notifiers.base import Notifier

log = logging.getLogger(__name__)

# how often the job looks whether a notifier's re-send is due; each notifier keeps its own interval
RESEND_TICK = 1.0
OUTCOMES = ("sent", "failed")


class OpenGroups(Protocol):
    """The part of the alert state a re-send reads."""

    def open_groups(self) -> list[Group]:
        """The groups that are firing or pending; raises when the state cannot be read."""
        ...


class Resender:
    """Re-sends the firing groups to the `alertmanager` notifiers that were told about them, each on its own
    `resend_interval`; counts the alerts sent and failed per notifier."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._next: dict[str, float] = {}
        self.counts: Counter[tuple[str, str]] = Counter()

    def run(
        self,
        state: OpenGroups,
        rules: Mapping[str, Rule],
        targets: Mapping[str, Notifier],
        now: float | None = None,
    ) -> int:
        """Re-send to every notifier whose interval has come; how many alerts went. Never raises for a notifier
        that failed: the next interval tries again."""
        now = self.clock() if now is None else now
        due = {
            key.removeprefix("notifier:"): target
            for key, target in targets.items()
            if key.startswith("notifier:")
            and isinstance(target, AlertmanagerNotifier)
            and now >= self._next.get(key.removeprefix("notifier:"), 0.0)
        }
        if not due:
            return 0
        groups = [group for group in state.open_groups() if group.state == "firing" and group.told]
        sent = 0
        for name, notifier in due.items():
            self._next[name] = now + notifier.resend_interval
            for outcome in OUTCOMES:
                # the series exist from the first look, so that `increase()` sees the first re-send
                self.counts[name, outcome] += 0
            events = [
                alert_event(rules[group.rule], group, now, status="firing", reason="resend", new=0)
                for group in groups
                if name in group.told and group.rule in rules
            ]
            if not events:
                continue
            try:
                went = notifier.resend(events)
            except DeliveryError as exc:
                self.counts[name, "failed"] += len(events)
                log.warning(
                    "notifier %s: re-sending %d open alerts failed: %s; the next re-send tries again",
                    name,
                    len(events),
                    exc,
                )
                continue
            self.counts[name, "sent"] += went
            sent += went
            log.debug("notifier %s: re-sent %d open alerts", name, went)
        return sent

    def collector(self) -> Collector:
        """A Prometheus collector of the re-send counts, read at scrape time."""
        from prometheus_client.core import CounterMetricFamily, Metric
        from prometheus_client.registry import Collector

        resender = self

        class ResendCollector(Collector):
            def collect(self) -> Iterable[Metric]:
                family = CounterMetricFamily(
                    "langfuse_poller_alert_resends",
                    "Open alerts re-sent to Alertmanager notifiers since the start, by notifier and outcome.",
                    labels=["notifier", "outcome"],
                )
                counts = dict(resender.counts)
                for notifier in sorted({name for name, _ in counts}):
                    for outcome in OUTCOMES:
                        family.add_metric([notifier, outcome], counts.get((notifier, outcome), 0))
                yield family

        return ResendCollector()
