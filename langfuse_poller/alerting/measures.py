"""Rules that measure: how a value moves a group's window, and when the group fires. Pure logic, no I/O.

`metric` aggregates a number per key over a sliding window (`windows.py`), `ratio` is the share of a key's
events that meet `share`, `spike` sets a window against the one before it, and `new_value` tells the first
sighting of a value (fingerprinted, when asked) once the rule has learned the values of its first `learn`.

Everything is judged in event time against the poller's progress, like frequency and absence: a catch-up after
an outage fills the windows the records belong to (so it is not a spike), and a Langfuse that cannot be read
stops progress (so it is not a drop). A group's window is judged at the highest progress it has seen: the
alerter holds progress back to the oldest match still waiting in the outbox, and a window must not move back.

A metric, ratio or spike group is `watching` while its condition does not hold (or its window holds fewer than
`min_count` values), `pending` while it holds for less than `for`, then `firing`. A firing group resolves once
the condition has not held for `resolve_after` (event time, so a value that wavers at the line does not flap)
and goes back to watching, keeping its window; a watching group whose window is empty is dropped. A new_value
group opens firing, notifies once (after `group_wait`), and resolves once its value has not been seen for
`resolve_after`. Notifications: `new` when it fires, `update` when its severity rises from warning to critical,
`repeat` every `repeat_interval`, `resolved`; each of a metric, ratio or spike group counts the values its
measure left out since the one before (`late`, `skipped`). The window state is in `Group.measure`, stored with
the group.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..events import Event
from ..rules import Rule
from ..util.durations import format_duration
from .groups import PROGRESS_RECHECK, SILENCE_RECHECK, Group, note_match, notify, sample_of
from .windows import BUCKETS, SUM, add, bucket_width, distinct_key, prune, summarize, window_range
from .windows import aggregate as aggregate_of

# the label value of the group that takes the keys beyond a rule's `max_groups`
OVERFLOW = "__overflow__"
SEVERITY_RANK = {None: 0, "warning": 1, "critical": 2}
MAX_VALUE_CHARS = 300


@dataclass(frozen=True)
class Reading:
    """A group's measure at one progress: what `test-rule` charts and what the group is judged on.

    `value` is None when the window holds fewer than `min_count` values (not judged); `severity` is "critical"
    (the main threshold), "warning" (a `warn_*` one) or None; `held` says the rule's condition holds.
    """

    value: float | None
    count: int
    severity: str | None
    held: bool
    threshold: float | None
    previous: float | None = None  # spike: the window before


def measure(rule: Rule, group: Group, progress: float) -> Reading:
    """The measure of a metric, ratio or spike group at `progress` (event time), without changing it."""
    return _read(rule, group.measure, max(progress, group.measure.get("upto", progress)))


def window_of(rule: Rule) -> float:
    return rule.window.total_seconds()


@dataclass(frozen=True)
class _Plan:
    """What recording a value into a rule's windows needs, worked out once per rule (it runs for every match)."""

    width: float
    keep: int  # buckets kept behind progress: one window, two for a spike
    sketch: bool
    distinct: bool
    numeric: bool
    shape: str  # what the buckets hold: a window kept under another shape is started afresh


# by the rule's id, with the rule: hashing a frozen Rule hashes all of it, which costs more than the plan saves
_PLANS: dict[int, tuple[Rule, _Plan]] = {}


def _plan(rule: Rule) -> _Plan:
    found = _PLANS.get(id(rule))
    if found is not None and found[0] is rule:
        return found[1]
    assert rule.measure is not None
    name = rule.measure.aggregate
    plan = _Plan(
        width=bucket_width(window_of(rule)),
        keep=2 * BUCKETS if rule.kind == "spike" else BUCKETS,
        sketch=rule.measure.percentile is not None,
        distinct=name == "distinct",
        numeric=name not in ("count", "distinct"),
        shape=f"{rule.kind}:{name}:{rule.window.total_seconds():g}",
    )
    _PLANS[id(rule)] = (rule, plan)
    return plan


def record_value(rule: Rule, group: Group, event: Event, value: Any, now: float, *, silenced: bool) -> None:
    """Add what a match measured to its group's window: a number (metric, spike), 1.0 or 0.0 (ratio: whether
    `share` held), or any value (the `distinct` aggregate)."""
    assert rule.grouping is not None
    plan = _plan(rule)
    state = group.measure
    _reshape(plan, group)
    ts = event.timestamp.timestamp()
    index = math.floor(ts / plan.width)
    upto = state.get("upto")
    if upto is not None and index <= math.floor(upto / plan.width) - plan.keep:
        # later than every window that held it: those were judged without it (the next notification says so)
        state["late"] = state.get("late", 0) + 1
        return
    group.last_match_at = now
    if ts < state.get("from", ts + 1):
        state["from"] = ts
    if group.last_ts is None or ts > group.last_ts:
        group.last_ts = ts
    if group.first_ts is None or ts < group.first_ts:
        group.first_ts = ts
    if silenced:
        group.silenced += 1
    number = float(value) if plan.numeric else 0.0
    buckets = state.get("b")
    if buckets is None:
        buckets = state["b"] = []
    add(buckets, index, number, sketch=plan.sketch, distinct=distinct_key(value) if plan.distinct else None)
    limit = rule.grouping.samples
    if not limit:
        return
    if rule.kind == "ratio":
        if number:
            group.samples = [*group.samples, sample_of(event)][-limit:]
        return
    # metric and spike: the largest values of the window, with the bucket each came in
    top: list[list[float]] = state.setdefault("top", [])
    if len(top) >= limit and number <= top[-1][0]:
        return
    position = next((i for i, (v, _) in enumerate(top) if number > v), len(top))
    top.insert(position, [number, index])
    sample = {**sample_of(event), "measured": number}
    group.samples.insert(position, sample)
    del top[limit:], group.samples[limit:]


def _reshape(plan: _Plan, group: Group) -> None:
    """Start the window afresh when the rule's kind, aggregate or window changed since it was kept (a reload):
    buckets of another width or without the sketch the aggregate needs would be judged wrongly."""
    state = group.measure
    if state.get("shape") == plan.shape:
        return
    if "shape" in state or "b" in state:
        for key in ("b", "top", "upto", "since", "clear", "from"):
            state.pop(key, None)
        group.samples = []
    state["shape"] = plan.shape


def _read(rule: Rule, state: dict[str, Any], progress: float) -> Reading:
    assert rule.measure is not None
    m = rule.measure
    width = bucket_width(window_of(rule))
    buckets = state.get("b", [])
    first, last = window_range(progress, width)
    now = summarize(buckets, first, last)
    # a count is its own gate: a window of none is a count of 0, the drop a `below` is there to catch
    counts = rule.kind == "metric" and m.aggregate == "count"
    if now.count < m.min_count and not counts:
        return Reading(None, now.count, None, False, m.above if m.above is not None else m.below)
    # a window that began before the group's first value is not full: what it lacks is no drop, and against
    # it a full window is no spike
    seen = progress - state.get("from", progress)
    if rule.kind == "spike" and seen < 2 * window_of(rule):
        return Reading(aggregate_of(now, m.aggregate), now.count, None, False, None, None)
    if rule.kind == "spike":
        before = summarize(buckets, *window_range(progress, width, back=1))
        current, previous = aggregate_of(now, m.aggregate), aggregate_of(before, m.aggregate)
        assert current is not None
        if before.count < m.min_count or previous is None:
            # nothing to compare with: no spike can be told from the first window
            return Reading(current, now.count, None, False, None, previous)
        up = current >= m.factor * previous and current > previous
        down = current <= previous / m.factor and current < previous
        held = {"up": up, "down": down, "both": up or down}[m.direction]
        threshold = (
            previous / m.factor if m.direction == "down" or (m.direction == "both" and down) else (m.factor * previous)
        )
        return Reading(current, now.count, "critical" if held else None, held, threshold, previous)
    value = now.sum / now.count if rule.kind == "ratio" else aggregate_of(now, m.aggregate)
    if value is None:
        value = 0.0  # an empty window, of a count
    full = seen >= window_of(rule)
    for severity, above, below in (("critical", m.above, m.below), ("warning", m.warn_above, m.warn_below)):
        if above is not None and value > above:
            return Reading(value, now.count, severity, True, above)
        if below is not None and value < below and full:
            return Reading(value, now.count, severity, True, below)
    return Reading(value, now.count, None, False, m.above if m.above is not None else m.below)


def _prune(rule: Rule, group: Group, progress: float) -> None:
    state = group.measure
    width = bucket_width(window_of(rule))
    first, _ = window_range(progress, width, back=1 if rule.kind == "spike" else 0)
    prune(state.get("b", []), first)
    top = state.get("top")
    if top:
        current, _ = window_range(progress, width)
        kept = [i for i, (_, index) in enumerate(top) if index >= current]
        if len(kept) < len(top):
            state["top"] = [top[i] for i in kept]
            group.samples = [group.samples[i] for i in kept if i < len(group.samples)]


def evaluate(rule: Rule, group: Group, now: float, progress: float, *, muted: bool = False) -> list[Event]:
    """The notifications due for a measuring group at `now`, judged at `progress`; moves its state, sets `next_at`."""
    assert rule.grouping is not None and rule.measure is not None
    state = group.measure
    progress = max(progress, state.get("upto", progress))
    state["upto"] = progress
    if rule.kind == "new_value":
        return _evaluate_new_value(rule, group, now, progress, muted)
    _reshape(_plan(rule), group)
    state["upto"] = progress
    _prune(rule, group, progress)
    reading = _read(rule, state, progress)
    grouping = rule.grouping
    notices: list[Event] = []
    if group.state == "watching" and reading.held:
        group.state = "pending"
        state["since"] = progress
    if group.state == "pending":
        if not reading.held:
            group.state = "watching"
            state.pop("since", None)
        elif progress - state["since"] >= rule.measure.hold.total_seconds():
            # a new life: group_wait starts when the condition has held for `for`
            group.state = "firing"
            group.opened_at = now
            group.last_notified_at = None
            group.notified_count = 0
            group.told = []
            state.pop("told", None)
    if group.state == "firing":
        if reading.held:
            state.pop("clear", None)
            state["level"] = reading.severity
        else:
            state.setdefault("clear", progress)
        group.count = reading.count
        if progress - state.get("clear", progress) >= grouping.resolve_after.total_seconds() and "clear" in state:
            if group.notified:
                notices.append(notify(rule, group, now, "resolved", _data(rule, group, reading)))
            group.state = "watching"
            group.last_notified_at = None
            group.told = []
            for key in ("since", "clear", "level", "told"):
                state.pop(key, None)
        elif not muted:
            told = SEVERITY_RANK[state.get("told")]
            if not group.notified and now >= group.opened_at + grouping.wait.total_seconds():
                notices.append(_tell(rule, group, now, "new", reading))
            elif group.notified and SEVERITY_RANK[state.get("level")] > told:
                notices.append(_tell(rule, group, now, "update", reading))
            elif group.notified and now >= (group.last_notified_at or now) + grouping.repeat.total_seconds():
                notices.append(_tell(rule, group, now, "repeat", reading))
    if group.state == "watching" and not state.get("b"):
        group.state = "resolved"  # nothing left to judge: dropped, and made again by the next match
        group.next_at = None
        return notices
    group.next_at = _next_look(rule, group, now, muted)
    # `for` and `resolve_after` run in event time, which moves with the clock once caught up
    if group.state == "pending":
        group.next_at = min(
            group.next_at, now + max(0.0, state["since"] + rule.measure.hold.total_seconds() - progress)
        )
    elif "clear" in state:
        resolves = state["clear"] + grouping.resolve_after.total_seconds() - progress
        group.next_at = min(group.next_at, now + max(0.0, resolves))
    return notices


def _tell(rule: Rule, group: Group, now: float, reason: str, reading: Reading) -> Event:
    group.measure["told"] = group.measure.get("level")
    return notify(rule, group, now, reason, _data(rule, group, reading))


def _evaluate_new_value(rule: Rule, group: Group, now: float, progress: float, muted: bool) -> list[Event]:
    assert rule.grouping is not None
    grouping = rule.grouping
    notices: list[Event] = []
    seen = group.last_ts if group.last_ts is not None else progress
    if progress - seen >= grouping.resolve_after.total_seconds():
        if group.notified:
            notices.append(notify(rule, group, now, "resolved", _data(rule, group, None)))
        group.state = "resolved"
        group.next_at = None
        return notices
    if not muted:
        if not group.notified and now >= group.opened_at + grouping.wait.total_seconds():
            notices.append(notify(rule, group, now, "new", _data(rule, group, None)))
        elif group.notified and now >= (group.last_notified_at or now) + grouping.repeat.total_seconds():
            notices.append(notify(rule, group, now, "repeat", _data(rule, group, None)))
    quiet = seen + grouping.resolve_after.total_seconds() - progress
    group.next_at = min(_next_look(rule, group, now, muted), now + max(0.0, quiet))
    return notices


def _next_look(rule: Rule, group: Group, now: float, muted: bool) -> float:
    """When to look again: progress moves the window (a watching group only matters at a new bucket), and the
    notification timers run on the clock."""
    assert rule.grouping is not None
    if group.state == "watching":
        return now + max(PROGRESS_RECHECK, bucket_width(window_of(rule)))
    wakes = [now + PROGRESS_RECHECK]
    if group.state == "firing":
        if muted:
            wakes.append(now + SILENCE_RECHECK)
        elif group.last_notified_at is None:
            wakes.append(group.opened_at + rule.grouping.wait.total_seconds())
        else:
            wakes.append(group.last_notified_at + rule.grouping.repeat.total_seconds())
    return min(wakes)


def _data(rule: Rule, group: Group, reading: Reading | None) -> dict[str, Any]:
    """What a measuring rule's notification says beyond the group's counts: the value, the threshold, the
    severity, the window, and (in `samples`) the top contributors, the matching events, or the first sighting."""
    assert rule.measure is not None
    m = rule.measure
    state = group.measure
    if rule.kind == "new_value":
        found = {"value": state.get("value"), "severity": "critical"}
        if m.fingerprint:
            found["fingerprint"] = state.get("fingerprint")
        return found
    assert reading is not None
    data: dict[str, Any] = {
        "value": reading.value,
        "threshold": reading.threshold,
        "severity": state.get("told") or state.get("level") or "critical",
        "window": format_duration(window_of(rule)),
        "aggregate": "share" if rule.kind == "ratio" else m.aggregate,
        "minCount": m.min_count,
    }
    if rule.kind == "ratio":
        first, last = window_range(state["upto"], bucket_width(window_of(rule)))
        data["matching"] = round(sum(b[SUM] for b in state.get("b", []) if first <= b[0] <= last))
    elif group.samples:
        # the largest contributor is the one to open
        data["url"] = group.samples[0].get("url")
    if rule.kind == "spike":
        data.update(previous=reading.previous, factor=m.factor, direction=m.direction)
    else:
        bounds = {"above": m.above, "below": m.below, "warnAbove": m.warn_above, "warnBelow": m.warn_below}
        data.update({key: bound for key, bound in bounds.items() if bound is not None})
    # what the measure left out, told once: each notification counts those since the one before
    data["late"] = state.pop("late", 0)
    data["skipped"] = state.pop("skip", 0)
    return data


def record_skipped(group: Group) -> None:
    """A match of the group whose `value` was no number: left out of its window, and counted for the next
    notification to tell."""
    group.measure["skip"] = group.measure.get("skip", 0) + 1


def start_new_value(group: Group, value: str, shown: str) -> None:
    """A new_value group's first sighting: the value it stands for (as read) and its fingerprint."""
    group.measure["value"] = shown[:MAX_VALUE_CHARS]
    group.measure["fingerprint"] = value


def record_sighting(rule: Rule, group: Group, event: Event, now: float, *, silenced: bool) -> None:
    """Count a sighting of a new_value group's value, as `groups.record_match` counts a match, but keeping
    only one sample: the first sighting's (the latest's, with `samples = 1`). It is made only when kept: most
    sightings are of a group that has its sample already."""
    assert rule.grouping is not None
    if not note_match(group, event, now, silenced=silenced):
        return
    limit = rule.grouping.samples
    if limit == 1 or (limit and not group.samples):
        group.samples = [sample_of(event)]


_MASKS = (
    (re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE), "<url>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.IGNORECASE), "<uuid>"),
    (re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`"), '"<str>"'),
    (re.compile(r"(?:\b[A-Za-z]:)?(?:[\\/][\w.@~%+-]+){2,}[\\/]?"), "<path>"),
    (re.compile(r"\b[A-Za-z]+[-_:][A-Za-z0-9]*\d[A-Za-z0-9]*\b"), "<id>"),
    (re.compile(r"\b0x[0-9a-f]+\b|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b", re.IGNORECASE), "<hex>"),
    (re.compile(r"(?<![A-Za-z<])\d+(?:\.\d+)?"), "<n>"),
    (re.compile(r"\s+"), " "),
)


def fingerprint(text: str) -> str:
    """One value per kind of message: numbers, UUIDs, ids, hex, quoted strings, URLs and paths masked.

    "timeout after 30s calling /v1/users/42 (req 7f3a9b2c1d)" and "timeout after 12s calling /v1/users/7 (req
    0a1b2c3d4e)" are one kind: "timeout after <n>s calling <path> (req <hex>)".
    """
    for pattern, mask in _MASKS:
        text = pattern.sub(mask, text)
    return text.strip()[:MAX_VALUE_CHARS]
