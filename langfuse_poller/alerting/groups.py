"""Alert groups: the state of one group, and how matches and time move it. Pure logic, no I/O.

Two clocks. Notification timers (`group_wait`, `group_interval`, `repeat_interval`, `resolve_after`) run on
the processing clock, as in Alertmanager. Frequency windows and absence run in event time, judged against
`progress`: how far the poller has read and the alerter has counted (the alerter computes it). So a backlog
of sparse errors read after an outage is not a burst, and an unreachable Langfuse is not a silent application.

A group's life:
- event rules: open at the first match (`firing`), notify after `group_wait`, then at most every
  `group_interval` while new matches arrive, repeat an unchanged group every `repeat_interval`, and resolve
  once no match came for `resolve_after`, or at once on an event that meets `resolve_when` (`resolve`).
- frequency rules: `pending` until `threshold` matches lie within `window` (by their timestamps), then as
  above; resolved once the window that ends at `progress` holds fewer than `threshold`.
- absence rules: `watching` while matches keep coming; `firing` once none came for `window` before
  `progress`; resolved by the next match.
- rules that measure (metric, ratio, spike, new_value): judged in `measures.py` over windows in `Group.measure`.
Silences act twice. A match that a silence covers is counted in `silenced` instead of `count` (it still keeps
the group open and counts toward frequency and absence: the problem is real, only the telling is muted). And
while a silence covers the group itself (`muted`), its firing notifications wait; a `resolved` still goes to
whoever was told it fired. Matches that arrived after the last notification are always reported, in a last
`firing` before the `resolved`, unless muted.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..events import Event
from ..rules import Rule
from ..util.durations import format_duration, format_time

# frequency and absence groups follow the poller's progress: they are looked at this often
PROGRESS_RECHECK = 5.0
# a notification held back by a silence is looked at again this often
SILENCE_RECHECK = 30.0
STATUS_MESSAGE_CHARS = 300
SHORTENED_FIELDS = frozenset({"name", "traceName", "statusMessage"})
SAMPLE_FIELDS = (
    "traceId",
    "traceName",
    "observationId",
    "scoreId",
    "name",
    "level",
    "statusMessage",
    "value",
    "model",
    "promptName",
    "promptVersion",
    "environment",
    "url",
)


@dataclass
class Group:
    """One alert group of one rule, as stored in `alert_groups`."""

    rule: str
    key: str
    labels: dict[str, str]
    # "pending" (frequency: below threshold; measuring: held for less than `for`), "firing", "watching" (absence,
    # measuring: all well), "resolved"
    state: str
    opened_at: float
    last_match_at: float | None = None
    first_ts: float | None = None
    last_ts: float | None = None
    count: int = 0
    silenced: int = 0
    notified_count: int = 0
    last_notified_at: float | None = None
    seq: int = 0
    told: list[str] = field(default_factory=list)  # the notifiers told that the group fires: they get the resolve
    samples: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # frequency: the latest match timestamps, sorted
    next_at: float | None = None
    # rules that measure: the window and the judging state, as JSON (alerting/measures.py, alerting/windows.py)
    measure: dict[str, Any] = field(default_factory=dict)

    @property
    def notified(self) -> bool:
        return self.last_notified_at is not None


def lookup(envelope: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path of the envelope ("data.environment"), or None."""
    value: Any = envelope
    for part in _parts(path):
        # event data is made of JSON objects: dicts, checked first since this runs for every match and label
        if type(value) is not dict and not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


@functools.lru_cache(maxsize=1024)
def _parts(path: str) -> tuple[str, ...]:
    # the paths are a rule's `group_by`: few, and each split for every match
    return tuple(path.split("."))


def labels_of(rule: Rule, envelope: Mapping[str, Any]) -> dict[str, str]:
    """The group labels of a match: the value of each `group_by` path, as text ("" when absent)."""
    assert rule.grouping is not None
    labels = {}
    for path in rule.grouping.by:
        value = lookup(envelope, path)
        labels[path] = "" if value is None else value if isinstance(value, str) else json.dumps(value)
    return labels


def group_key(labels: Mapping[str, str]) -> str:
    """A short stable key for a set of labels."""
    text = json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_group(rule: Rule, key: str, labels: dict[str, str], now: float, seq: int = 0) -> Group:
    state = {"event": "firing", "frequency": "pending", "absence": "watching", "new_value": "firing"}.get(
        rule.kind, "watching"
    )
    return Group(rule=rule.name, key=key, labels=labels, state=state, opened_at=now, seq=seq)


def note_match(group: Group, event: Event, now: float, *, silenced: bool, counts: bool = True) -> bool:
    """What every kind records of a match: when it came, and one more silenced match or (when it `counts`) one
    more in the count. Whether it was counted: the caller then keeps a sample of it."""
    ts = event.timestamp.timestamp()
    group.last_match_at = now
    group.last_ts = ts if group.last_ts is None else max(group.last_ts, ts)
    if silenced:
        group.silenced += 1
        return False
    if counts:
        group.count += 1
        group.first_ts = ts if group.first_ts is None else min(group.first_ts, ts)
    return counts


def record_match(rule: Rule, group: Group, event: Event, now: float, *, silenced: bool) -> None:
    """Count one match into its group (opened with `open_group` when new or resolved)."""
    assert rule.grouping is not None
    # an absence rule's group counts nothing: a match only ends the silence
    if note_match(group, event, now, silenced=silenced, counts=rule.kind != "absence") and rule.grouping.samples:
        group.samples = [*group.samples, sample_of(event)][-rule.grouping.samples :]
    if rule.kind == "frequency":
        ts = event.timestamp.timestamp()
        bisect.insort(group.arrivals, ts)
        del group.arrivals[: -rule.threshold]
        window = rule.window.total_seconds()
        burst = len(group.arrivals) >= rule.threshold and group.arrivals[-1] - group.arrivals[0] <= window
        if group.state == "pending" and burst:
            # the group's story starts with the burst; group_wait starts when the condition starts to hold
            group.state = "firing"
            group.opened_at = now
            group.first_ts = group.arrivals[0]
            group.count = len(group.arrivals)
            group.silenced = 0


def sample_of(event: Event) -> dict[str, Any]:
    """What a notification shows of one match: its id, type, time, and the facts that identify it."""
    sample: dict[str, Any] = {"id": event.id, "event": event.type, "timestamp": format_time(event.timestamp)}
    for name in SAMPLE_FIELDS:
        value = event.data.get(name)
        if value is not None and value != "":
            # long free text is cut; links and ids never are
            sample[name] = (
                value[:STATUS_MESSAGE_CHARS] if name in SHORTENED_FIELDS and isinstance(value, str) else value
            )
    return sample


def evaluate(rule: Rule, group: Group, now: float, progress: float, *, muted: bool = False) -> list[Event]:
    """The notifications due for a group at `now`; moves its state and sets `next_at`.

    `progress` is how far matches have been read and counted, in event time (frequency and absence use it);
    `muted` says a silence covers the group now.
    """
    assert rule.grouping is not None
    if rule.kind == "absence":
        return _evaluate_absence(rule, group, now, progress, muted)
    grouping = rule.grouping
    window = rule.window.total_seconds()
    if group.state == "pending":
        group.arrivals = [ts for ts in group.arrivals if ts > progress - window]
        if group.arrivals:
            group.next_at = now + PROGRESS_RECHECK
        else:
            group.state = "resolved"
            group.next_at = None
        return []
    notices: list[Event] = []
    fresh = group.count > group.notified_count
    if not muted:
        if fresh and not group.notified and now >= group.opened_at + grouping.wait.total_seconds():
            notices.append(_notify(rule, group, now, "new"))
        elif fresh and group.notified and now >= _last(group) + grouping.interval.total_seconds():
            notices.append(_notify(rule, group, now, "update"))
        elif group.notified and now >= _last(group) + grouping.repeat.total_seconds():
            notices.append(_notify(rule, group, now, "repeat"))
    if rule.kind == "frequency":
        clear = sum(1 for ts in group.arrivals if ts > progress - window) < rule.threshold
        # the window moves with progress, not with a time known in advance
        clears_at = now + PROGRESS_RECHECK
    else:
        clears_at = (group.last_match_at or group.opened_at) + grouping.resolve_after.total_seconds()
        clear = now >= clears_at
    if clear:
        return notices + resolve(rule, group, now, muted=muted)
    wakes = [clears_at]
    if muted:
        # what waits for the silence to end is looked at again now and then, not at every tick
        wakes.append(now + SILENCE_RECHECK)
    else:
        if group.count > group.notified_count:
            wakes.append(
                _last(group) + grouping.interval.total_seconds()
                if group.notified
                else group.opened_at + grouping.wait.total_seconds()
            )
        if group.notified:
            wakes.append(_last(group) + grouping.repeat.total_seconds())
    group.next_at = min(wakes)
    return notices


def resolve(rule: Rule, group: Group, now: float, *, muted: bool = False) -> list[Event]:
    """Resolve an open group at once (an event met the rule's `resolve_when`); the notifications it takes.

    As when `resolve_after` runs out: matches nobody was told about are reported first (unless muted), so a
    monitor that fired and recovered within `group_wait` still reaches PagerDuty as a trigger and a resolve.
    """
    if group.state == "resolved":
        return []
    notices: list[Event] = []
    if group.count > group.notified_count and not muted:
        # never resolve over matches nobody was told about
        notices.append(_notify(rule, group, now, "update" if group.notified else "new"))
    if group.notified:
        notices.append(_notify(rule, group, now, "resolved"))
    group.state = "resolved"
    group.next_at = None
    return notices


def _evaluate_absence(rule: Rule, group: Group, now: float, progress: float, muted: bool) -> list[Event]:
    assert rule.grouping is not None
    window = rule.window.total_seconds()
    quiet = progress - (group.last_ts if group.last_ts is not None else group.opened_at) >= window
    notices: list[Event] = []
    if group.state == "watching" and quiet:
        group.state = "firing"
        group.opened_at = now
        group.notified_count = 0
        group.last_notified_at = None
    elif group.state == "firing" and not quiet:
        if group.notified:
            notices.append(_notify(rule, group, now, "resolved"))
        group.state = "watching"
        group.last_notified_at = None
        group.told = []
    if group.state == "firing" and not muted:
        if not group.notified and now >= group.opened_at + rule.grouping.wait.total_seconds():
            notices.append(_notify(rule, group, now, "new"))
        elif group.notified and now >= _last(group) + rule.grouping.repeat.total_seconds():
            notices.append(_notify(rule, group, now, "repeat"))
    # absence depends on progress, not on a time known in advance
    group.next_at = now + PROGRESS_RECHECK
    return notices


def _last(group: Group) -> float:
    assert group.last_notified_at is not None
    return group.last_notified_at


def notify(rule: Rule, group: Group, now: float, reason: str, extra: Mapping[str, Any]) -> Event:
    """Build one notification with `extra` in its data (what a measuring rule measured), and record it as sent."""
    return _notify(rule, group, now, reason, extra)


def _notify(rule: Rule, group: Group, now: float, reason: str, extra: Mapping[str, Any] | None = None) -> Event:
    """Build one notification and record it as sent (the caller stores both in one transaction)."""
    new = group.count - group.notified_count
    group.seq += 1
    status = "resolved" if reason == "resolved" else "firing"
    event = alert_event(rule, group, now, status=status, reason=reason, new=new, extra=extra)
    group.notified_count = group.count
    group.last_notified_at = now
    if status == "firing":
        group.told = sorted({*group.told, *rule.notify})
    return event


def dedup_key(rule: Rule, group: Group) -> str:
    """Stable for one life of a group: PagerDuty folds its notifications into one incident, and a group that
    resolves and opens again is a new incident, which a late replay of the old one's notifications cannot touch."""
    return f"langfuse-poller/{rule.name}/{group.key}/{int(group.opened_at * 1000)}"


def alert_event(
    rule: Rule,
    group: Group,
    now: float,
    *,
    status: str,
    reason: str,
    new: int,
    extra: Mapping[str, Any] | None = None,
) -> Event:
    """The notification of a group, in the event envelope: `rule.firing` or `rule.resolved`."""
    opened = int(group.opened_at * 1000)
    data: dict[str, Any] = {
        "rule": rule.name,
        "kind": rule.kind,
        "status": status,
        "reason": reason,
        "group": dict(group.labels),
        "groupKey": group.key,
        "dedupKey": dedup_key(rule, group),
        "count": group.count,
        "new": new,
        "silenced": group.silenced,
        "firstAt": _iso(group.first_ts),
        "lastAt": _iso(group.last_ts),
        "openedAt": _iso(group.opened_at),
        "events": list(rule.events),
        "condition": rule.when,
        "samples": list(group.samples),
        "url": group.samples[-1].get("url") if group.samples else None,
    }
    if rule.kind == "frequency":
        data.update(threshold=rule.threshold, window=format_duration(rule.window.total_seconds()))
    elif rule.kind == "absence":
        data.update(window=format_duration(rule.window.total_seconds()), lastSeenAt=_iso(group.last_ts))
    if extra:
        data.update(extra)
    event_type = f"rule.{status}"
    return Event(
        id=f"{event_type}:{rule.name}:{group.key}:{opened}:{group.seq}",
        type=event_type,
        timestamp=datetime.fromtimestamp(now, UTC),
        source="rule",
        data=data,
    )


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else format_time(datetime.fromtimestamp(seconds, UTC))
