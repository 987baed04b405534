"""`test-rule`: replays real events through one rule and says what it would have sent, sending nothing.

Events come from Langfuse (read-only, the state is not touched) or from a jsonl file of envelopes. They are
replayed in time order through the rule's real alert groups, kept in a throwaway state, on a clock that
follows the events' timestamps: group_wait, group_interval, repeat and resolve play out as they would have.
For a metric, ratio or spike rule the replay also reads every group at fixed steps of event time, and `render`
charts each key's value against the threshold (`chart.py`) instead of listing the notifications.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TextIO

from ..config import Config
from ..errors import ConfigError
from ..events import Event, EventFactory, ExtraFields
from ..registry import CompiledRule, matches
from ..rules import Rule
from ..store import Store
from . import alerter as alerter_module
from .alerter import Alerter
from .chart import Glyphs, Recorder, Timeline, dump_series, glyphs_for, render_charts
from .measures import measure
from .silences import Silences, SqliteSilenceBook
from .windows import bucket_width

# forwarded matches are listed up to this many; the rest are counted
LIST_LIMIT = 20
MAX_TICKS = 100_000
ABSENCE_STEP = 60.0
# the kinds whose value `test-rule` charts per key (a new_value rule has no value to chart: it lists its finds)
CHARTED_KINDS = ("metric", "ratio", "spike")
# keys charted unless `--keys` says otherwise
CHARTED_KEYS = 10


@dataclass
class DryRun:
    """What a rule would have done with a set of events."""

    rule: Rule
    read: int = 0
    matched: int = 0
    forwarded: list[Event] = field(default_factory=list)
    notifications: list[Event] = field(default_factory=list)
    skipped_lines: int = 0
    still_open: int = 0  # groups firing when the replay ended
    charted: Recorder | None = None  # metric, ratio, spike: each key's value over the replay


def find_rule(config: Config, name: str) -> Rule:
    for rule in config.rules:
        if rule.name == name:
            return rule
    known = ", ".join(rule.name for rule in config.rules) or "no rules configured"
    raise ConfigError(config.source, "rule", name, f"the name of a [[rules]] entry ({known})")


def events_from_langfuse(config: Config, rule: Rule, since: datetime, until: datetime) -> Iterator[Event]:
    """Every event the poller would make from the records of [since, until), as if seen for the first time."""
    from ..langfuse.reader import LangfuseReader

    factory = EventFactory(
        config.langfuse.base_url, lambda: matches(rule.events, "observation.created"), ExtraFields.of(config.poll)
    )
    reader = LangfuseReader(
        config.langfuse,
        extra_fields=config.poll.fields,
        expand_metadata=config.poll.expand_metadata,
        environments=config.poll.environments,
    )
    try:
        if any(matches(rule.events, t) for t in ("trace.created", "trace.updated", "generation.created")) or matches(
            rule.events, "observation.created"
        ):
            for page in reader.observations(since, until):
                for record in page.records:
                    yield from _events_of(factory, "observations", record)
        if matches(rule.events, "score.created") or matches(rule.events, "score.updated"):
            for page in reader.scores(since, until):
                for record in page.records:
                    yield from _events_of(factory, "scores", record)
    finally:
        reader.close()


def _events_of(factory: EventFactory, stream: str, record: object) -> tuple[Event, ...]:
    try:
        return factory.from_record(stream, record, None).events
    except (TypeError, ValueError, KeyError, AttributeError):
        return ()


def events_from_file(path: Path, run: DryRun) -> Iterator[Event]:
    """Envelopes, one per line (what the jsonl notifier writes); lines that are not one are counted and skipped."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("command line", "--events", str(path), f"a readable jsonl file ({exc.strerror})") from None
    with handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                yield Event.from_json(line)
            except (ValueError, KeyError, TypeError):
                run.skipped_lines += 1


def dry_run(
    config: Config,
    rule: Rule,
    events: Iterator[Event],
    run: DryRun | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> DryRun:
    """Replay `events` through `rule` on a clock that follows their timestamps.

    With `since` and `until` (the range read from Langfuse) the clock runs over the whole range, so that an
    absence rule sees the quiet stretches; without them, from the first event until the groups would resolve.
    """
    run = run or DryRun(rule)
    compiled = CompiledRule(rule, config.source)
    # the alerter logs each notification it enqueues; here nothing is sent, and `render` says what would be
    quiet = logging.getLogger(alerter_module.__name__)
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return _replay(rule, compiled, events, run, since, until)
    finally:
        quiet.setLevel(level)


def _replay(
    rule: Rule,
    compiled: CompiledRule,
    events: Iterator[Event],
    run: DryRun,
    since: datetime | None,
    until: datetime | None,
) -> DryRun:
    ordered = sorted(events, key=lambda e: e.timestamp)
    run.read = len(ordered)
    if since is None and not ordered:
        return run
    with tempfile.TemporaryDirectory(prefix="langfuse-poller-test-rule-") as tmp:
        now = [since.timestamp() if since is not None else ordered[0].timestamp.timestamp()]
        end = until.timestamp() if until is not None else ordered[-1].timestamp.timestamp() + _horizon(rule)
        if rule.kind in CHARTED_KINDS:
            run.charted = Recorder(rule, Timeline.over(now[0], end, bucket_width(rule.window.total_seconds())))
        store = Store(Path(tmp) / "state.db", clock=lambda: now[0])
        try:
            clock = lambda: now[0]  # noqa: E731
            alerter = Alerter(
                store,
                [compiled],
                Silences(SqliteSilenceBook(store), clock=clock),
                clock=clock,
                progress=lambda _rule: now[0],
            )
            alerter.start(now[0])
            for event in ordered:
                _tick_until(alerter, rule, event.timestamp.timestamp(), now, run.charted)
                if not matches(rule.events, event.type) or not compiled.matches(event, event.envelope()):
                    continue
                run.matched += 1
                if rule.grouping is None:
                    run.forwarded.append(event)
                    continue
                with store.write(now[0]) as tx:
                    alerter.record(tx, rule, [event])
            _tick_until(alerter, rule, max(end, now[0]), now, run.charted)
            run.still_open = store.alert_state().firing_count()
            run.notifications = store.alert_notifications()
            if run.charted is not None:
                run.charted.attach(run.notifications)
        finally:
            store.close()
    return run


def _horizon(rule: Rule) -> float:
    """How long after the last event the replay goes on: until its groups would have resolved."""
    if rule.grouping is None:
        return 0.0
    if rule.measure is not None:
        # a measuring group clears once its values leave the window (two windows: a spike), and resolves after
        # `resolve_after` more
        windows = 2 if rule.kind == "spike" else 1
        return (windows * rule.window + rule.grouping.resolve_after + rule.grouping.wait).total_seconds() + 1
    return max(rule.grouping.wait, rule.grouping.resolve_after, rule.window).total_seconds() + 1


def _tick_until(alerter: Alerter, rule: Rule, until: float, now: list[float], recorder: Recorder | None) -> None:
    """Run the alert ticks that fall due up to `until`, each at its own time, and take the samples due."""
    groups = alerter.store.alert_state()
    for _ in range(MAX_TICKS):
        if groups.any_due(now[0]):
            alerter.tick(now[0])
        if recorder is not None:
            _sample(alerter, rule, recorder, now[0])
        if now[0] >= until:
            return
        future = groups.next_due_after(now[0])
        step = until if future is None else min(until, future)
        sample_at = recorder.next_at if recorder is not None else None
        if sample_at is not None:
            step = min(step, sample_at)
        if rule.kind == "absence":
            # absence depends on progress, not on a known time: step through the quiet stretch
            step = min(step, now[0] + ABSENCE_STEP)
        now[0] = step


def _sample(alerter: Alerter, rule: Rule, recorder: Recorder, now: float) -> None:
    """Read every group of the rule at each sample time that has come: what it would be judged on then."""
    while (at := recorder.next_at) is not None and at <= now:
        readings = [
            (group.key, group.labels, measure(rule, group, at))
            for group in alerter.store.alert_state().groups()
            if group.rule == rule.name and group.state != "resolved"
        ]
        recorder.take(readings)


def render(run: DryRun, out: TextIO, *, source: str, keys: int = CHARTED_KEYS, glyphs: Glyphs | None = None) -> None:
    """What the rule would have sent, for people; a metric, ratio or spike rule's keys charted (at most `keys`)."""
    from ..notifiers.messages import message_for

    rule = run.rule
    notifiers = ", ".join(rule.notify) or "no notifier"
    out.write(f"rule {rule.name}: {run.read} events read from {source}, {run.matched} matched\n")
    if run.skipped_lines:
        out.write(f"  ({run.skipped_lines} lines were not event envelopes and were skipped)\n")
    if rule.grouping is None:
        for event in run.forwarded[:LIST_LIMIT]:
            out.write(f"  would send {event.type} {event.id} to {notifiers}: {message_for(event).text}\n")
        if len(run.forwarded) > LIST_LIMIT:
            out.write(f"  ... and {len(run.forwarded) - LIST_LIMIT} more\n")
        out.write(f"would send {len(run.forwarded)} events to {notifiers}; nothing was sent\n")
        return
    if run.charted is not None:
        render_charts(run.charted, out, keys=keys, glyphs=glyphs or glyphs_for(out))
    for notice in run.notifications if run.charted is None else ():
        when = notice.envelope()["timestamp"]
        out.write(f"  {when}  {notice.type} ({notice.data.get('reason')}) -> {notifiers}\n")
        out.write(f"      {message_for(notice).text}\n")
    still_open = f"; {run.still_open} groups still open at the end" if run.still_open else ""
    out.write(
        f"would send {len(run.notifications)} notifications to {notifiers} for {run.matched} matches"
        f"{still_open}; nothing was sent\n"
    )


def dump(run: DryRun, out: TextIO) -> None:
    """The notifications as envelopes, one per line; for a metric, ratio or spike rule, each key's series."""
    if run.charted is not None:
        dump_series(run.charted, out)
        return
    for event in run.notifications or run.forwarded:
        out.write(json.dumps(event.envelope(), ensure_ascii=False, default=str) + "\n")
