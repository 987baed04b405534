"""The alerter: records the matches of grouping rules into durable alert groups, and sends their notifications.

A match reaches the alerter like any delivery, to the target `rule:<name>`, and is recorded into its group in
the same transaction that marks the delivery done: a crash neither loses nor double-counts it. A notification
is enqueued, as a `rule.firing` or `rule.resolved` event for each of the rule's notifiers, in the same
transaction that saves the group's new state: a restart neither re-sends nor forgets an open group, and the
notifiers get it with the retries and dead letters of every delivery.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from ..events import STREAM_OF_EVENT, Event
from ..notifiers.base import Notifier
from ..registry import CompiledRule
from ..rules import Rule
from ..store import Store, Transaction
from .groups import Group, alert_event, evaluate, group_key, labels_of, open_group, record_match
from .silences import Silences

log = logging.getLogger(__name__)

COLUMNS = (
    "rule",
    "key",
    "labels",
    "state",
    "opened_at",
    "last_match_at",
    "first_ts",
    "last_ts",
    "count",
    "silenced",
    "notified_count",
    "last_notified_at",
    "seq",
    "told",
    "samples",
    "arrivals",
    "next_at",
)
JSON_COLUMNS = frozenset({"labels", "told", "samples", "arrivals"})


def load_groups(conn: sqlite3.Connection, where: str = "", params: Iterable[Any] = ()) -> list[Group]:
    """Alert groups from the state, optionally filtered by an SQL condition."""
    query = f"SELECT {', '.join(COLUMNS)} FROM alert_groups" + (f" WHERE {where}" if where else "")
    groups = []
    for row in conn.execute(query + " ORDER BY rule, key", tuple(params)):
        values = dict(zip(COLUMNS, row, strict=True))
        groups.append(Group(**{name: json.loads(v) if name in JSON_COLUMNS else v for name, v in values.items()}))
    return groups


def _save(tx: Transaction, group: Group) -> None:
    if group.state == "resolved":
        tx.conn.execute("DELETE FROM alert_groups WHERE rule = ? AND key = ?", (group.rule, group.key))
        return
    values = [
        json.dumps(getattr(group, name), ensure_ascii=False, default=str)
        if name in JSON_COLUMNS
        else getattr(group, name)
        for name in COLUMNS
    ]
    tx.conn.execute(
        f"INSERT OR REPLACE INTO alert_groups ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
        values,
    )


def group_envelope(group: Group) -> dict[str, Any]:
    """What a silence's condition is judged on for a whole group: its latest match, else its labels."""
    if group.samples:
        latest = group.samples[-1]
        return {"id": latest.get("id"), "event": latest.get("event"), "source": "poll", "data": dict(latest)}
    envelope: dict[str, Any] = {}
    for path, value in group.labels.items():
        node = envelope
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return envelope


class RuleTarget(Notifier):
    """The delivery target `rule:<name>`: records matches into the rule's groups, in the delivery's transaction."""

    def __init__(self, alerter: Alerter, rule: Rule) -> None:
        self.alerter = alerter
        self.rule = rule

    def apply(self, tx: Transaction, events: Sequence[Event]) -> None:
        self.alerter.record(tx, self.rule, events)

    def send(self, event: Event) -> None:
        # the Notifier protocol's entry; the delivery worker calls `apply` inside its own transaction
        with self.alerter.store.write() as tx:
            self.apply(tx, [event])

    def close(self) -> None:
        pass


class Alerter:
    """Alert groups of the grouping rules: recording matches, and a `tick` that sends what is due.

    `streams` are the polled streams; `progress`, when given, replaces how far the poller has read (the dry
    run replays events on its own clock).
    """

    def __init__(
        self,
        store: Store,
        rules: Sequence[CompiledRule],
        silences: Silences,
        *,
        streams: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        progress: Callable[[Rule], float] | None = None,
    ) -> None:
        self.store = store
        self.rules: Mapping[str, Rule] = {c.rule.name: c.rule for c in rules if c.rule.grouping is not None}
        self.silences = silences
        self.streams = tuple(streams)
        self.clock = clock
        self._progress = progress

    def targets(self) -> dict[str, RuleTarget]:
        return {rule.target: RuleTarget(self, rule) for rule in self.rules.values()}

    def progress(self, conn: sqlite3.Connection, rule: Rule) -> float:
        """How far this rule's matches have been read and counted, in event time.

        The lowest head watermark of the polled streams that make the rule's events, held back to the oldest
        match still waiting in the outbox for this rule: a page and its watermark commit together, but its
        matches reach the group a moment later. Events no stream makes (received by webhook) follow the clock.
        """
        if self._progress is not None:
            return self._progress(rule)
        streams = {
            stream
            for event_type, stream in STREAM_OF_EVENT.items()
            if stream in self.streams and any(fnmatchcase(event_type, pattern) for pattern in rule.events)
        }
        heads = [head for (name, head) in conn.execute("SELECT name, head FROM streams").fetchall() if name in streams]
        progress = min(heads) if heads else self.clock()
        (waiting,) = conn.execute(
            "SELECT MIN(ts) FROM deliveries WHERE state = 'pending' AND target = ?", (rule.target,)
        ).fetchone()
        return progress if waiting is None else min(progress, waiting - 0.001)

    def record(self, tx: Transaction, rule: Rule, events: Sequence[Event]) -> None:
        """Count matches into their groups; notifications that this makes due are enqueued at once."""
        now = tx.now
        groups: dict[str, Group] = {}
        for event in events:
            envelope = event.envelope()
            labels = labels_of(rule, envelope)
            key = group_key(labels)
            group = groups.get(key)
            if group is None:
                found = load_groups(tx.conn, "rule = ? AND key = ?", (rule.name, key))
                group = found[0] if found else open_group(rule, key, labels, now)
                groups[key] = group
            if group.state == "resolved":
                group = groups[key] = open_group(rule, key, labels, now, seq=group.seq)
            silenced = self.silences.match(rule.name, envelope, now) is not None
            record_match(rule, group, event, now, silenced=silenced)
        progress = self.progress(tx.conn, rule) if rule.kind != "event" else now
        for group in groups.values():
            self._settle(tx, rule, group, now, progress)

    def _settle(self, tx: Transaction, rule: Rule, group: Group, now: float, progress: float) -> int:
        muted = self.silences.covers(rule.name, group_envelope(group), now)
        notices = evaluate(rule, group, now, progress, muted=muted)
        self._enqueue(tx, rule.name, notices, [f"notifier:{name}" for name in rule.notify])
        _save(tx, group)
        return len(notices)

    def _enqueue(self, tx: Transaction, rule: str, notices: Sequence[Event], targets: Sequence[str]) -> None:
        for notice in notices:
            if not tx.enqueue(notice, targets):
                log.warning("alert %s: %s was already queued; not sent twice", rule, notice.id)
                continue
            log.info("alert %s: %s %s (%d matches)", rule, notice.type, notice.data["reason"], notice.data["count"])

    def start(self, now: float | None = None) -> None:
        """Reconcile the stored groups with the rules, and open the watching group of ungrouped absence rules.

        A group whose rule is gone, no longer groups, or groups by other fields is resolved (its notifiers
        told, so no PagerDuty incident stays open forever) and dropped.
        """
        now = self.clock() if now is None else now
        with self.store.write(now) as tx:
            for group in load_groups(tx.conn):
                rule = self.rules.get(group.rule)
                if rule is not None and rule.grouping is not None and set(group.labels) == set(rule.grouping.by):
                    continue
                if group.notified and group.told and group.state == "firing":
                    gone = rule or Rule(name=group.rule, events=(), when=None, notify=tuple(group.told))
                    notice = alert_event(gone, group, now, status="resolved", reason="resolved", new=0)
                    self._enqueue(tx, group.rule, [notice], [f"notifier:{name}" for name in group.told])
                tx.conn.execute("DELETE FROM alert_groups WHERE rule = ? AND key = ?", (group.rule, group.key))
            for rule in self.rules.values():
                if rule.kind != "absence" or (rule.grouping and rule.grouping.by):
                    continue
                key = group_key({})
                if not load_groups(tx.conn, "rule = ? AND key = ?", (rule.name, key)):
                    group = open_group(rule, key, {}, now)
                    # silence before the rule started watching does not count
                    group.last_ts = self.progress(tx.conn, rule)
                    group.next_at = now
                    _save(tx, group)

    def tick(self, now: float | None = None) -> int:
        """Send what is due: first notifications, updates, repeats, resolves. Returns how many were enqueued."""
        now = self.clock() if now is None else now
        self.silences.flush_counts()
        if not self.rules:
            return 0
        sent = 0
        with self.store.write(now) as tx:
            progress: dict[str, float] = {}
            for group in load_groups(tx.conn, "next_at IS NOT NULL AND next_at <= ?", (now,)):
                rule = self.rules.get(group.rule)
                if rule is None:
                    continue
                if rule.name not in progress:
                    progress[rule.name] = self.progress(tx.conn, rule) if rule.kind != "event" else now
                sent += self._settle(tx, rule, group, now, progress[rule.name])
        return sent
