"""Rules: which events go where, and, for alerting rules, how matches are grouped into alerts.

A rule either forwards each matching event to its notifiers, or groups its matches into alerts with
Alertmanager's semantics (`group_by`, `group_wait`, `group_interval`, `repeat_interval`, `resolve_after`).
A rule groups when it sets any grouping key, when it is a `frequency` or `absence` rule, or when it notifies
Slack, PagerDuty or Alertmanager (unless `group = false`): people are paged by alerts, not by each of ten
thousand events.
An event rule's `resolve_when` resolves a group on an event that says the problem is over (a Langfuse monitor's
`alert.ok`), rather than after `resolve_after` of quiet.

Rules that measure (`metric`, `ratio`, `spike`, `new_value`) read a number or a value from each match (`value`,
`share`: CEL) into per-key windows in event time; their keys are read into a `Measure`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .notifiers.base import NotifierConfig
    from .util.toml_tables import Table

MEASURING_KINDS = ("metric", "ratio", "spike", "new_value")
KINDS = ("event", "frequency", "absence", *MEASURING_KINDS)
AGGREGATES = ("sum", "avg", "min", "max", "count", "distinct", "p50", "p90", "p95", "p99")
DIRECTIONS = ("up", "down", "both")
DEFAULT_MAX_GROUPS = 10_000
MAX_MAX_GROUPS = 1_000_000
# the keys only measuring rules read, and which kinds read each; another kind that sets one is refused
MEASURE_KEYS: dict[str, tuple[str, ...]] = {
    "value": ("metric", "spike", "new_value"),
    "aggregate": ("metric", "spike"),
    "share": ("ratio",),
    "above": ("metric", "ratio"),
    "below": ("metric", "ratio"),
    "warn_above": ("metric", "ratio"),
    "warn_below": ("metric", "ratio"),
    "min_count": ("metric", "ratio", "spike"),
    "for": ("metric", "ratio", "spike"),
    "factor": ("spike",),
    "direction": ("spike",),
    "fingerprint": ("new_value",),
    "learn": ("new_value",),
    "remember": ("new_value",),
    "max_groups": MEASURING_KINDS,
}
GROUPING_KEYS = (
    "group_by",
    "group_wait",
    "group_interval",
    "repeat_interval",
    "resolve_after",
    "samples",
    "resolve_when",
)
# notifier types that people read: a rule sending to them groups unless it says `group = false`
ALERT_NOTIFIER_TYPES = frozenset({"slack", "pagerduty", "alertmanager"})
# the top-level keys of the event envelope, where group_by paths start
ENVELOPE_KEYS = frozenset({"id", "event", "timestamp", "source", "data"})
MAX_NAME = 100  # rule names go into PagerDuty's dedup_key, which holds 255 characters
MAX_THRESHOLD = 10_000  # a frequency group keeps its last `threshold` match times
FIELD_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_-]+)*$")


@dataclass(frozen=True)
class Grouping:
    """How an alerting rule turns matches into notifications (Alertmanager's semantics and defaults).

    `resolve_after` defaults to 15 minutes, longer than the default `lookback` (10 minutes): a record that
    becomes visible late must join the group it belongs to, not reopen a group that just resolved.
    """

    by: tuple[str, ...] = ()
    wait: timedelta = timedelta(seconds=30)
    interval: timedelta = timedelta(minutes=5)
    repeat: timedelta = timedelta(hours=4)
    resolve_after: timedelta = timedelta(minutes=15)
    samples: int = 5


@dataclass(frozen=True)
class Measure:
    """What a measuring rule (`metric`, `ratio`, `spike`, `new_value`) reads from each match, and its condition.

    `value` and `share` are CEL expressions over the event envelope (compiled by `registry.CompiledRule`).
    Thresholds compare strictly (`above = 5` holds at 5.01, not at 5); `warn_above`/`warn_below` hold a lower
    severity. `hold` is the `for` key: how long, in event time, the condition must hold before the group fires.
    """

    value: str | None = None
    share: str | None = None
    aggregate: str = "count"
    above: float | None = None
    below: float | None = None
    warn_above: float | None = None
    warn_below: float | None = None
    min_count: int = 1
    hold: timedelta = timedelta(0)
    factor: float = 0.0
    direction: str = "up"
    fingerprint: bool = False
    learn: timedelta = timedelta(days=1)
    remember: timedelta = timedelta(days=30)
    max_groups: int = DEFAULT_MAX_GROUPS

    @property
    def percentile(self) -> float | None:
        """The quantile of a `p95`-like aggregate (0.95), None for the others."""
        return int(self.aggregate[1:]) / 100 if self.aggregate.startswith("p") else None


@dataclass(frozen=True)
class Rule:
    """A config rule: which events (globs, optional CEL condition) go to which notifiers, and how."""

    name: str
    events: tuple[str, ...]
    when: str | None
    notify: tuple[str, ...]
    key: str = ""  # where the rule sits in the file, e.g. "rules[2]", for errors found later
    kind: str = "event"
    grouping: Grouping | None = None
    threshold: int = 1  # frequency: at least this many matches...
    window: timedelta = timedelta(0)  # ...within this long; absence: no match for this long
    # event rules: an event of `events` that meets this CEL condition resolves its group (Langfuse's monitor
    # recovery, `alert.ok`) instead of counting as a match; `when` does not apply to it
    resolve_when: str | None = None
    measure: Measure | None = None  # the rules that measure: what and how (None for the other kinds)

    @property
    def target(self) -> str:
        """The delivery target that records this rule's matches into its alert groups."""
        return f"rule:{self.name}"


def parse_rules(top: Table, notifiers: Mapping[str, NotifierConfig]) -> tuple[Rule, ...]:
    """Read `[[rules]]`: each rule's name is unique, its notifiers exist, its grouping keys are well formed."""
    from .util.toml_tables import Table

    raw = top.raw("rules")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise top.error("rules", raw, "an array of tables: [[rules]]")
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        key = f"rules[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(top.source, key, entry, "a table with name, events and notify")
        table = Table(top.source, key, entry)
        name = table.required_str("name", expected="a name for the rule, unique in the file")
        if len(name) > MAX_NAME:
            raise table.error("name", name, f"a name of at most {MAX_NAME} characters")
        if name in seen:
            raise table.error("name", name, "a name not used by another rule")
        seen.add(name)
        rules.append(_parse_rule(table, name, notifiers))
        table.finish()
    return tuple(rules)


def _parse_rule(table: Table, name: str, notifiers: Mapping[str, NotifierConfig]) -> Rule:
    events = table.str_list("events")
    if not events:
        raise table.error("events", table.raw("events"), 'a non-empty list of event types or globs, e.g. ["trace.*"]')
    notify = table.str_list("notify")
    for target in notify:
        if target not in notifiers:
            known = ", ".join(sorted(notifiers)) or "none configured"
            raise table.error("notify", target, f"the name of a [notifiers.NAME] table (configured: {known})")
    kind = table.string("type", "event") or "event"
    if kind not in KINDS:
        raise table.error("type", kind, "one of " + ", ".join(repr(k) for k in KINDS))
    threshold = 1
    window = timedelta(0)
    if kind == "frequency":
        threshold = table.integer("threshold", 0, minimum=1, maximum=MAX_THRESHOLD)
        if not table.has("threshold"):
            raise table.error("threshold", None, "the number of matches that fires the alert, e.g. 20")
    if kind in ("frequency", "absence", "metric", "ratio", "spike"):
        if not table.has("window"):
            raise table.error("window", None, 'how long the rule looks, e.g. "5m"')
        window = table.positive_duration("window", 0)

    group_flag = table.raw("group")
    if group_flag is not None and not isinstance(group_flag, bool):
        raise table.error("group", group_flag, "true or false")
    sets_grouping = any(table.has(k) for k in GROUPING_KEYS)
    if group_flag is False and (sets_grouping or kind != "event"):
        raise table.error("group", False, f"true, or no grouping keys ({kind} rules and grouping keys need groups)")
    wants_alerts = any(notifiers[n].type in ALERT_NOTIFIER_TYPES for n in notify)
    grouped = kind != "event" or sets_grouping or group_flag is True or (wants_alerts and group_flag is None)
    grouping = _parse_grouping(table, kind) if grouped else None
    measure = parse_measure(table, kind)
    return Rule(
        name=name,
        events=events,
        when=table.string("when"),
        notify=notify,
        key=table.prefix,
        kind=kind,
        grouping=grouping,
        threshold=threshold,
        window=window,
        resolve_when=table.string("resolve_when"),
        measure=measure,
    )


def _parse_grouping(table: Table, kind: str) -> Grouping:
    by = table.str_list("group_by")
    for path in by:
        if not FIELD_PATH.match(path) or path.split(".")[0] not in ENVELOPE_KEYS:
            raise table.error(
                "group_by", path, 'dotted paths into the event envelope, e.g. ["data.name", "data.environment"]'
            )
    # keys a kind of rule has no use for are refused rather than ignored: frequency and absence rules resolve
    # when their condition clears, and an absence alert has no new matches to tell at intervals
    unused = {
        "frequency": ("resolve_after", "resolve_when"),
        "absence": ("resolve_after", "resolve_when", "group_interval", "samples"),
        # a measuring group notifies when it fires, when its severity rises, at repeat_interval, and when it
        # resolves: there are no new matches to tell at intervals
        **{measuring: ("resolve_when", "group_interval") for measuring in MEASURING_KINDS},
    }
    for key in unused.get(kind, ()):
        if table.has(key):
            raise table.error(
                key, table.raw(key), f"no {key} on a {kind} rule, which resolves when its condition clears"
            )
    defaults = Grouping()
    grouping = Grouping(
        by=by,
        # an absence alert has waited its whole window already
        wait=table.duration("group_wait", 0 if kind == "absence" else defaults.wait.total_seconds()),
        interval=table.positive_duration("group_interval", defaults.interval.total_seconds()),
        repeat=table.positive_duration("repeat_interval", defaults.repeat.total_seconds()),
        resolve_after=table.positive_duration("resolve_after", defaults.resolve_after.total_seconds()),
        samples=table.integer("samples", defaults.samples, minimum=0, maximum=50),
    )
    if kind == "event" and grouping.resolve_after <= grouping.wait:
        raise table.error(
            "resolve_after", table.raw("resolve_after"), f"a duration longer than group_wait ({grouping.wait})"
        )
    return grouping


def parse_measure(table: Table, kind: str) -> Measure | None:
    """The measuring keys of a rule (None for the kinds that count), each checked against what its kind needs."""
    for key, kinds in MEASURE_KEYS.items():
        if table.has(key) and kind not in kinds:
            article = "an" if kind[0] in "aeiou" else "a"
            raise table.error(
                key, table.raw(key), f"no {key} on {article} {kind} rule (it is read by {', '.join(kinds)} rules)"
            )
    if kind not in MEASURING_KINDS:
        return None
    if kind == "new_value":
        value = table.required_str("value", expected='a CEL expression for the value that may be new, e.g. "data.name"')
        learn = table.duration("learn", "1d")
        remember = table.positive_duration("remember", "30d")
        if remember <= learn:
            raise table.error("remember", table.raw("remember"), f"a duration longer than learn ({learn})")
        return Measure(
            value=value,
            fingerprint=table.boolean("fingerprint", False),
            learn=learn,
            remember=remember,
            max_groups=_max_groups(table),
        )
    if kind == "ratio":
        share = table.required_str("share", expected="a CEL condition: the share of the rule's events it holds for")
        measure = Measure(share=share, aggregate="avg")
    else:
        aggregate = table.string("aggregate")
        if aggregate is None or aggregate not in AGGREGATES:
            raise table.error("aggregate", aggregate, "one of " + ", ".join(AGGREGATES))
        number = table.string("value")
        if number is None and aggregate != "count":
            raise table.error("value", None, f'a CEL expression for the number to {aggregate}, e.g. "data.totalCost"')
        measure = Measure(value=number, aggregate=aggregate)
    hold = table.duration("for", 0)
    if kind == "metric" and measure.aggregate == "count" and table.has("min_count"):
        raise table.error("min_count", table.raw("min_count"), "no min_count on a count: the count is the value")
    min_count = table.integer("min_count", 1, minimum=1)
    if kind == "spike":
        factor = _number(table, "factor")
        if factor is None or factor <= 1:
            raise table.error("factor", table.raw("factor"), "a number greater than 1: this window against the last")
        direction = table.string("direction", "up") or "up"
        if direction not in DIRECTIONS:
            raise table.error("direction", direction, "one of " + ", ".join(DIRECTIONS))
        return replace(
            measure, factor=factor, direction=direction, hold=hold, min_count=min_count, max_groups=_max_groups(table)
        )
    limits = (0.0, 1.0) if kind == "ratio" else None
    above, below = _number(table, "above", limits), _number(table, "below", limits)
    warn_above, warn_below = _number(table, "warn_above", limits), _number(table, "warn_below", limits)
    if above is None and below is None:
        raise table.error("above", None, "a threshold: above = ... or below = ... (or both)")
    if above is not None and below is not None and below >= above:
        raise table.error("below", below, f"a number below above ({above}), or no below")
    if warn_above is not None and (above is None or warn_above >= above):
        raise table.error("warn_above", warn_above, f"a number below above ({above}): the lower severity comes first")
    if warn_below is not None and (below is None or warn_below <= below):
        raise table.error("warn_below", warn_below, f"a number above below ({below}): the lower severity comes first")
    return replace(
        measure,
        above=above,
        below=below,
        warn_above=warn_above,
        warn_below=warn_below,
        hold=hold,
        min_count=min_count,
        max_groups=_max_groups(table),
    )


def _number(table: Table, key: str, limits: tuple[float, float] | None = None) -> float | None:
    value = table.raw(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise table.error(key, value, "a number")
    if limits is not None and not limits[0] <= value <= limits[1]:
        raise table.error(key, value, f"a share between {limits[0]:g} and {limits[1]:g} (0.05 is 5%)")
    return float(value)


def _max_groups(table: Table) -> int:
    return table.integer("max_groups", DEFAULT_MAX_GROUPS, minimum=1, maximum=MAX_MAX_GROUPS)
