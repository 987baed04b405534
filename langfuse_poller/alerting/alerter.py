"""The alerter: records the matches of grouping rules into durable alert groups, and sends their notifications.

A match is recorded into its group by the transaction that stores its event, just before it commits
(`Database.apply_at_once`): a crash neither loses nor double-counts it. When the rule fails on it, or older
matches still wait, it reaches the alerter like any delivery instead, to the target `rule:<name>`, recorded in
the transaction that marks the delivery done. A notification is enqueued, as a `rule.firing` or
`rule.resolved` event for each of the rule's notifiers, in the same transaction that saves the group's new
state: a restart neither re-sends nor forgets an open group, and the notifiers get it with the retries and dead
letters of every delivery.

The alerter is typed against the alert state's contract (`state.py`), not against one backend: with standby
pollers the groups and the notifications live in Redis instead (`redis/standby/alert_state.py`), the matches wait
there for the leader's `tick`, and a replica that stands by ticks nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from ..events import STREAM_OF_EVENT, Event
from ..notifiers.base import Notifier
from ..registry import CompiledRule
from ..rules import MEASURING_KINDS, Rule
from ..store import Store, Transaction
from . import measures
from .groups import Group, alert_event, evaluate, group_key, labels_of, open_group, record_match, resolve
from .silences import Silences
from .state import AlertStore, AlertTransaction

log = logging.getLogger(__name__)

# `start` has not run: a tick then reconciles nothing by itself (the dry run and some callers never start)
NOT_STARTED = object()


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
    """The target `rule:<name>`: records matches into the rule's groups, in the transaction it is given (the one
    that stores them, or the one that marks their deliveries done)."""

    def __init__(self, alerter: Alerter, rule: Rule) -> None:
        self.alerter = alerter
        self.rule = rule

    def apply(self, tx: Transaction, events: Sequence[Event]) -> None:
        if not self.alerter.store.keep_matches(self.rule.target, events):
            self.alerter.record(tx, self.rule, events)

    def send(self, event: Event) -> None:
        # the Notifier protocol's entry; the delivery worker calls `apply` inside its own transaction
        if not self.alerter.store.keep_matches(self.rule.target, [event]):
            with self.alerter.store.write() as tx:
                self.alerter.record(tx, self.rule, [event])

    def close(self) -> None:
        pass


class Alerter:
    """Alert groups of the grouping rules: recording matches, and a `tick` that sends what is due.

    `streams` are the polled streams; `progress`, when given, replaces how far the poller has read (the dry
    run replays events on its own clock).
    """

    def __init__(
        self,
        store: AlertStore,
        rules: Sequence[CompiledRule],
        silences: Silences,
        *,
        streams: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        progress: Callable[[Rule], float] | None = None,
    ) -> None:
        self.store = store
        self.rules: Mapping[str, Rule] = {c.rule.name: c.rule for c in rules if c.rule.grouping is not None}
        # the compiled `resolve_when` conditions, by rule name
        self._resolvers = {c.rule.name: c for c in rules if c.rule.grouping is not None and c.resolve_program}
        # the rules that measure, with their compiled `value` and `share`
        self._measuring = {c.rule.name: c for c in rules if c.rule.kind in MEASURING_KINDS}
        # matches that went to a rule's overflow group since the start (`max_groups` reached), by rule
        self.overflowed: Counter[str] = Counter()
        self.silences = silences
        self.streams = tuple(streams)
        self.clock = clock
        self._progress = progress
        # the term `start` last reconciled the groups in: a replica that takes the lease reconciles at its first tick
        self._started_term: object = NOT_STARTED

    def targets(self) -> dict[str, RuleTarget]:
        return {rule.target: RuleTarget(self, rule) for rule in self.rules.values()}

    def progress(self, tx: AlertTransaction, rule: Rule) -> float:
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
        heads = [head for (name, head) in tx.heads() if name in streams]
        progress = min(heads) if heads else self.clock()
        waiting = tx.oldest_pending_ts(rule.target)
        return progress if waiting is None else min(progress, waiting - 0.001)

    def record(self, tx: AlertTransaction, rule: Rule, events: Sequence[Event]) -> None:
        """Count matches into their groups; notifications that this makes due are enqueued at once."""
        if rule.kind in MEASURING_KINDS:
            self._measure(tx, rule, events)
            return
        now = tx.now
        groups: dict[str, Group] = {}
        resolver = self._resolvers.get(rule.name)
        for event in events:
            envelope = event.envelope()
            labels = labels_of(rule, envelope)
            key = group_key(labels)
            if resolver is not None and resolver.resolves(event, envelope):
                self._resolve(tx, rule, groups, key, event)
                continue
            group = groups.get(key)
            if group is None:
                found = tx.alert_state.group(rule.name, key)
                group = found if found is not None else open_group(rule, key, labels, now)
                groups[key] = group
            if group.state == "resolved":
                group = groups[key] = open_group(rule, key, labels, now, seq=group.seq)
            silenced = self.silences.match(rule.name, envelope, now) is not None
            record_match(rule, group, event, now, silenced=silenced)
        progress = self.progress(tx, rule) if rule.kind != "event" else now
        for group in groups.values():
            if group.state == "resolved":
                tx.alert_state.save(group)  # resolved by `resolve_when` above, and told already
            else:
                self._settle(tx, rule, group, now, progress)

    def _resolve(self, tx: AlertTransaction, rule: Rule, groups: dict[str, Group], key: str, event: Event) -> None:
        """An event met `resolve_when`: resolve its open group, telling the notifiers; no group, nothing to do."""
        group = groups.get(key) or tx.alert_state.group(rule.name, key)
        if group is None or group.state == "resolved":
            log.info("alert %s: %s resolves no open group", rule.name, event.id)
            return
        groups[key] = group
        muted = self.silences.covers(rule.name, group_envelope(group), tx.now)
        self._enqueue(tx, rule.name, resolve(rule, group, tx.now, muted=muted), [f"notifier:{n}" for n in rule.notify])

    def _measure(self, tx: AlertTransaction, rule: Rule, events: Sequence[Event]) -> None:
        """Add what matches measure to their groups' windows, then judge the groups they moved."""
        assert rule.measure is not None
        compiled = self._measuring[rule.name]
        now = tx.now
        if rule.kind == "new_value":
            groups = self._new_values(tx, rule, compiled, events)
        else:
            groups = {}
            cap = _Cap(self, tx, rule)
            # a silence's condition may read anything; the rule itself reads its timestamp rarely (an
            # envelope's costs most in writing the timestamp out), and this runs for every match
            whole = self.silences.mutes(rule.name, now) or _reads_timestamp(rule)
            for event in events:
                envelope = event.envelope() if whole else _light_envelope(event)
                value = compiled.measured(event, envelope)
                labels = labels_of(rule, envelope)
                if value is None:
                    # left out; the group of its key, when there is one, counts it for its next notification
                    left = cap.existing(groups, labels)
                    if left is not None:
                        measures.record_skipped(left)
                    continue
                group = cap.group(groups, labels, now)
                silenced = whole and self.silences.match(rule.name, envelope, now) is not None
                measures.record_value(rule, group, event, value, now, silenced=silenced)
        # these matches are counted now, though their events (or deliveries) commit only after this: they hold the
        # rule's progress back to the oldest of them. The batch is the rule's oldest waiting matches (new events
        # queue behind older waiting deliveries: `Transaction.apply_waiting`), so the window may reach the latest
        latest = max((event.timestamp.timestamp() for event in events), default=0.0)
        progress = max(self.progress(tx, rule), latest)
        for group in groups.values():
            self._settle(tx, rule, group, now, progress)

    def _new_values(
        self, tx: AlertTransaction, rule: Rule, compiled: CompiledRule, events: Sequence[Event]
    ) -> dict[str, Group]:
        """A new_value rule's matches: a value unseen (or forgotten) after the rule's first `learn` opens a group;
        every sighting is remembered. The groups the matches reached, by key."""
        assert rule.measure is not None
        measure = rule.measure
        state = tx.alert_state
        found = []
        # a batch's errors are mostly a few kinds: each one's key is made once
        keys: dict[tuple[str, ...], str] = {}
        for event in events:
            envelope = event.envelope()
            raw = compiled.measured(event, envelope)
            if raw is None:
                continue
            shown = raw if isinstance(raw, str) else json.dumps(raw)
            value = measures.fingerprint(shown) if measure.fingerprint else shown[: measures.MAX_VALUE_CHARS]
            labels = {**labels_of(rule, envelope), "value": value}
            found.append((event, envelope, labels, _cached_key(keys, labels), shown))
        groups: dict[str, Group] = {}
        if not found:
            return groups
        started = state.rule_started(rule.name)
        if started is None:
            started = min(event.timestamp.timestamp() for event, *_ in found)
            state.start_rule(rule.name, started)
        known = state.seen_values(rule.name, list({key for *_, key, _ in found}))
        cap = _Cap(self, tx, rule)
        now = tx.now
        for event, envelope, labels, key, shown in found:
            ts = event.timestamp.timestamp()
            last = known.get(key)
            new = last is None or ts - last > measure.remember.total_seconds()
            known[key] = ts if last is None else max(last, ts)
            group = groups.get(key) or state.group(rule.name, key)
            if group is None or group.state == "resolved":
                if not new or ts < started + measure.learn.total_seconds():
                    continue  # known, or learned silently in the rule's first `learn`
                group = cap.group(groups, labels, now)
                if not group.measure:
                    measures.start_new_value(group, labels["value"], shown)
            groups[group.key] = group
            silenced = self.silences.match(rule.name, envelope, now) is not None
            measures.record_sighting(rule, group, event, now, silenced=silenced)
        state.see_values(rule.name, {key: known[key] for *_, key, _ in found})
        state.forget_values(rule.name, self.progress(tx, rule) - measure.remember.total_seconds())
        return groups

    def _settle(self, tx: AlertTransaction, rule: Rule, group: Group, now: float, progress: float) -> int:
        muted = self.silences.covers(rule.name, group_envelope(group), now)
        judge = measures.evaluate if rule.kind in MEASURING_KINDS else evaluate
        notices = judge(rule, group, now, progress, muted=muted)
        self._enqueue(tx, rule.name, notices, [f"notifier:{name}" for name in rule.notify])
        tx.alert_state.save(group)
        return len(notices)

    def _enqueue(self, tx: AlertTransaction, rule: str, notices: Sequence[Event], targets: Sequence[str]) -> None:
        for notice in notices:
            if not tx.enqueue(notice, targets):
                log.warning("alert %s: %s was already queued; not sent twice", rule, notice.id)
                continue
            log.info("alert %s: %s %s (%d matches)", rule, notice.type, notice.data["reason"], notice.data["count"])

    def start(self, now: float | None = None) -> None:
        """Reconcile the stored groups with the rules, and open the watching group of ungrouped absence rules.

        A group whose rule is gone, no longer groups, or groups by other fields is resolved (its notifiers
        told, so no PagerDuty incident stays open forever) and dropped; a rule that is gone, or is no longer a
        new_value rule, forgets its first run and the values it knew.
        """
        now = self.clock() if now is None else now
        term = self.store.alert_term()
        if term is None:
            # a standby: the leader's groups are not this replica's to reconcile; it does so when it takes over
            self._started_term = None
            return
        with self.store.write(now) as tx:
            for group in tx.alert_state.groups():
                rule = self.rules.get(group.rule)
                if rule is not None and rule.grouping is not None and set(group.labels) == set(_label_paths(rule)):
                    continue
                if group.notified and group.told and group.state == "firing":
                    gone = rule or Rule(name=group.rule, events=(), when=None, notify=tuple(group.told))
                    notice = alert_event(gone, group, now, status="resolved", reason="resolved", new=0)
                    self._enqueue(tx, group.rule, [notice], [f"notifier:{name}" for name in group.told])
                tx.alert_state.delete(group.rule, group.key)
            # what a new_value rule knows is of no use once it is gone, and would otherwise stay for good
            learning = {rule.name for rule in self.rules.values() if rule.kind == "new_value"}
            for name in tx.alert_state.kept_rules():
                if name not in learning:
                    tx.alert_state.forget_rule(name)
            for rule in self.rules.values():
                if rule.kind == "new_value":
                    # the rule's first `learn` starts at its first run, as far as the poller has read
                    tx.alert_state.start_rule(rule.name, self.progress(tx, rule))
                if rule.kind != "absence" or (rule.grouping and rule.grouping.by):
                    continue
                key = group_key({})
                if tx.alert_state.group(rule.name, key) is None:
                    group = open_group(rule, key, {}, now)
                    # silence before the rule started watching does not count
                    group.last_ts = self.progress(tx, rule)
                    group.next_at = now
                    tx.alert_state.save(group)
        self._started_term = term

    def tick(self, now: float | None = None) -> int:
        """Send what is due: first notifications, updates, repeats, resolves. Returns how many were enqueued."""
        now = self.clock() if now is None else now
        self.silences.flush_counts()
        term = self.store.alert_term()
        if term is None:
            return 0  # a standby: only the leader moves the groups
        if self._started_term is not NOT_STARTED and term != self._started_term:
            self.start(now)
        sent = self.store.send_notices(now)
        if not self.rules:
            return sent
        by_target = {rule.target: rule for rule in self.rules.values()}
        with self.store.write(now) as tx:
            # matches that wait in the state itself (Redis) first, in the transaction that takes them
            for target, events in tx.matches():
                rule = by_target.get(target)
                if rule is None:
                    log.info("alert: %d matches for %s, no longer an alerting rule, dropped", len(events), target)
                    continue
                self.record(tx, rule, events)
            progress: dict[str, float] = {}
            for group in tx.alert_state.due(now):
                rule = self.rules.get(group.rule)
                if rule is None:
                    continue
                if rule.name not in progress:
                    progress[rule.name] = self.progress(tx, rule) if rule.kind != "event" else now
                sent += self._settle(tx, rule, group, now, progress[rule.name])
        return sent + self.store.send_notices(now)


def _reads_timestamp(rule: Rule) -> bool:
    """Whether a measuring rule's keys read the envelope's `timestamp` (group_by, value, share)."""
    assert rule.grouping is not None and rule.measure is not None
    texts = (*rule.grouping.by, rule.measure.value or "", rule.measure.share or "")
    return any("timestamp" in text for text in texts)


def _light_envelope(event: Event) -> dict[str, Any]:
    """The envelope without its timestamp, for the rules that do not read it."""
    return {"id": event.id, "event": event.type, "source": event.source, "data": event.data}


def _label_paths(rule: Rule) -> tuple[str, ...]:
    """The labels of a rule's groups: its `group_by`, and for a new_value rule the value."""
    assert rule.grouping is not None
    return (*rule.grouping.by, "value") if rule.kind == "new_value" else rule.grouping.by


class _Cap:
    """A measuring rule's `max_groups`, over one batch of matches: a key beyond it goes to the overflow group."""

    def __init__(self, alerter: Alerter, tx: AlertTransaction, rule: Rule) -> None:
        self.alerter = alerter
        self.tx = tx
        self.rule = rule
        self.count: int | None = None
        # the batch's group keys (`_cached_key`)
        self._keys: dict[tuple[str, ...], str] = {}

    def group(self, groups: dict[str, Group], labels: dict[str, str], now: float) -> Group:
        """The group of these labels, from this batch, the state, or opened; the overflow group when the rule
        has `max_groups` groups already."""
        rule = self.rule
        assert rule.measure is not None
        group = self.existing(groups, labels)
        if group is not None:
            return group
        if self.count is None:
            self.count = self.tx.alert_state.group_count(rule.name)
        if self.count >= rule.measure.max_groups:
            labels = dict.fromkeys(labels, measures.OVERFLOW)
            self.alerter.overflowed[rule.name] += 1
            if self.alerter.overflowed[rule.name] == 1:
                log.warning(
                    "rule %s has %d groups, its max_groups: matches of further keys go to the group labelled %r",
                    rule.name,
                    rule.measure.max_groups,
                    measures.OVERFLOW,
                )
            group = self.existing(groups, labels)
            if group is not None:
                return group
        key = _cached_key(self._keys, labels)
        group = groups[key] = open_group(rule, key, labels, now)
        self.count += 1
        return group

    def existing(self, groups: dict[str, Group], labels: dict[str, str]) -> Group | None:
        """The group of these labels, from this batch or the state; None when there is none (none is opened)."""
        key = _cached_key(self._keys, labels)
        group = groups.get(key) or self.tx.alert_state.group(self.rule.name, key)
        if group is not None:
            groups[key] = group
        return group


def _cached_key(keys: dict[tuple[str, ...], str], labels: dict[str, str]) -> str:
    """`group_key` of these labels, made once per batch: a batch's matches mostly share a few keys, and a key
    costs a JSON dump and a SHA-256. `keys` holds the batch's keys by the labels' values."""
    values = tuple(labels.values())
    return keys.get(values) or keys.setdefault(values, group_key(labels))


if TYPE_CHECKING:
    # mypy proves here that the SQLite store is an alert state, as the Redis one is (redis/standby/alert_state.py)
    _store: type[AlertStore] = Store
    _transaction: type[AlertTransaction] = Transaction
