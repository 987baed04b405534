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
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..events import Event
from ..registry import CompiledRule
from ..rules import Rule
from ..store import Store, Transaction
from .groups import Group, evaluate, group_key, labels_of, open_group, record_match
from .silences import Silences

log = logging.getLogger(__name__)

COLUMNS = (
    "rule, key, labels, state, opened_at, last_match_at, first_ts, last_ts, count, silenced, notified_count, "
    "last_notified_at, seq, muted, samples, arrivals, next_at"
)


def _load(row: Sequence[Any]) -> Group:
    values = list(row)
    values[2] = json.loads(values[2])
    values[13] = bool(values[13])
    values[14] = json.loads(values[14])
    values[15] = json.loads(values[15])
    return Group(*values)


def _save(tx: Transaction, group: Group) -> None:
    if group.state == "resolved":
        tx.conn.execute("DELETE FROM alert_groups WHERE rule = ? AND key = ?", (group.rule, group.key))
        return
    tx.conn.execute(
        f"INSERT OR REPLACE INTO alert_groups ({COLUMNS}) VALUES ({','.join('?' * 17)})",
        (
            group.rule,
            group.key,
            json.dumps(group.labels, ensure_ascii=False),
            group.state,
            group.opened_at,
            group.last_match_at,
            group.first_ts,
            group.last_ts,
            group.count,
            group.silenced,
            group.notified_count,
            group.last_notified_at,
            group.seq,
            int(group.muted),
            json.dumps(group.samples, ensure_ascii=False, default=str),
            json.dumps(group.arrivals),
            group.next_at,
        ),
    )


def load_groups(conn: Any, where: str = "", params: Iterable[Any] = ()) -> list[Group]:
    """Alert groups from the state, optionally filtered by an SQL condition."""
    query = f"SELECT {COLUMNS} FROM alert_groups" + (f" WHERE {where}" if where else "") + " ORDER BY rule, key"
    return [_load(row) for row in conn.execute(query, tuple(params))]


class RuleTarget:
    """The delivery target `rule:<name>`: records matches into the rule's groups, in the delivery's transaction."""

    def __init__(self, alerter: Alerter, rule: CompiledRule) -> None:
        self.alerter = alerter
        self.rule = rule

    def apply(self, tx: Transaction, events: Sequence[Event]) -> None:
        self.alerter.record(tx, self.rule.rule, events)

    def send(self, event: Event) -> None:
        with self.alerter.store.write() as tx:
            self.apply(tx, [event])

    def close(self) -> None:
        pass


class Alerter:
    """Alert groups of the grouping rules: recording matches, and a `tick` that sends what is due."""

    def __init__(
        self,
        store: Store,
        rules: Sequence[CompiledRule],
        silences: Silences,
        *,
        clock: Callable[[], float] = time.time,
        progress: Callable[[], float] | None = None,
    ) -> None:
        self.store = store
        self.rules = {compiled.rule.name: compiled.rule for compiled in rules if compiled.rule.grouping is not None}
        self.compiled = {compiled.rule.name: compiled for compiled in rules if compiled.rule.grouping is not None}
        self.silences = silences
        self.clock = clock
        self.progress = progress or self._stream_progress

    def targets(self) -> dict[str, RuleTarget]:
        return {rule.target: RuleTarget(self, self.compiled[name]) for name, rule in self.rules.items()}

    def _stream_progress(self) -> float:
        """How far the poller has read, in event time: the lowest head watermark of its streams."""
        heads = [stream.head for stream in self.store.streams()]
        return min(heads) if heads else self.clock()

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
        progress = self.progress() if rule.kind == "absence" else now
        for group in groups.values():
            self._settle(tx, rule, group, now, progress)

    def _settle(self, tx: Transaction, rule: Rule, group: Group, now: float, progress: float) -> int:
        notices = evaluate(rule, group, now, progress)
        targets = [f"notifier:{name}" for name in rule.notify]
        for notice in notices:
            tx.enqueue(notice, targets)
            log.info("alert %s: %s %s (%d matches)", rule.name, notice.type, notice.data["reason"], group.count)
        _save(tx, group)
        return len(notices)

    def start(self, now: float | None = None) -> None:
        """Open the watching group of each absence rule without `group_by`: silence from the start counts."""
        now = self.clock() if now is None else now
        progress = self.progress()
        with self.store.write(now) as tx:
            for rule in self.rules.values():
                if rule.kind != "absence" or (rule.grouping and rule.grouping.by):
                    continue
                key = group_key({})
                if not load_groups(tx.conn, "rule = ? AND key = ?", (rule.name, key)):
                    group = open_group(rule, key, {}, now)
                    group.last_ts = progress
                    group.next_at = now
                    _save(tx, group)
            # groups of rules no longer configured would never be looked at again
            names = list(self.rules)
            marks = ",".join("?" * len(names))
            tx.conn.execute(f"DELETE FROM alert_groups WHERE rule NOT IN ({marks})", names)

    def tick(self, now: float | None = None) -> int:
        """Send what is due: first notifications, updates, repeats, resolves. Returns how many were enqueued."""
        now = self.clock() if now is None else now
        self.silences.flush_counts()
        if not self.rules:
            return 0
        progress = self.progress()
        sent = 0
        with self.store.write(now) as tx:
            for group in load_groups(tx.conn, "next_at IS NOT NULL AND next_at <= ?", (now,)):
                rule = self.rules.get(group.rule)
                if rule is not None:
                    sent += self._settle(tx, rule, group, now, progress)
        return sent
