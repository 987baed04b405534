"""Rules: which events go where, and, for alerting rules, how matches are grouped into alerts.

A rule either forwards each matching event to its notifiers, or groups its matches into alerts with
Alertmanager's semantics (`group_by`, `group_wait`, `group_interval`, `repeat_interval`, `resolve_after`).
A rule groups when it sets any grouping key, when it is a `frequency` or `absence` rule, or when it notifies
Slack, PagerDuty or Alertmanager (unless `group = false`): people are paged by alerts, not by each of ten
thousand events.
An event rule's `resolve_when` resolves a group on an event that says the problem is over (a Langfuse monitor's
`alert.ok`), rather than after `resolve_after` of quiet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .notifiers.base import NotifierConfig
    from .util.toml_tables import Table

KINDS = ("event", "frequency", "absence")
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
    if kind in ("frequency", "absence"):
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
