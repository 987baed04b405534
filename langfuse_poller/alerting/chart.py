"""What `test-rule` shows of a metric, ratio or spike rule: per key, the measured value over the replay, charted
against the threshold(s), so that a threshold can be picked before the rule is enabled. Pure logic, no I/O but
the stream it writes to.

The dry run samples every group of the rule at fixed steps of event time (`Timeline`) and hands each reading to a
`Recorder`; a key's `Series` is what its group would have been judged on at each step (NaN: not judged, fewer
than `min_count` values, or no group). A chart squeezes the samples into at most `WIDTH` columns, each showing
the sample of its span that is nearest to firing (the highest, or for a rule that fires below a line the lowest),
so a short burst is never averaged away. Keys are sorted by that extreme, the most alarming first.
"""

from __future__ import annotations

import json
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from ..events import Event
from ..rules import Rule
from ..util.durations import format_duration, format_time
from .measures import Reading

WIDTH = 60
HEIGHT = 4
# samples kept per key: the JSON's resolution, a few per column of the chart
MAX_POINTS = 240
NAN = math.nan


@dataclass(frozen=True)
class Glyphs:
    """The characters a chart is drawn with: eighths of a cell, the threshold lines, the markers."""

    blocks: str  # nine: empty, one eighth ... full
    line: str
    warn_line: str
    fired: str
    resolved: str
    axis: str


UNICODE = Glyphs(" ▁▂▃▄▅▆▇█", "┄", "┈", "▲", "▼", "│")
ASCII = Glyphs(" __..oo##", "-", "~", "^", "v", "|")


def glyphs_for(out: TextIO) -> Glyphs:
    """Unicode blocks when `out`'s encoding can write them (a StringIO can), else plain ASCII."""
    encoding = getattr(out, "encoding", None) or "utf-8"
    sample = "".join((UNICODE.blocks, UNICODE.line, UNICODE.warn_line, UNICODE.fired, UNICODE.resolved, UNICODE.axis))
    try:
        sample.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return ASCII
    return UNICODE


@dataclass(frozen=True)
class Timeline:
    """The sample times of a replay: `size` steps of `step` seconds after `start` (event time)."""

    start: float
    step: float
    size: int

    @classmethod
    def over(cls, start: float, end: float, bucket: float) -> Timeline:
        """Samples after `start` up to `end`, one per bucket of the rule's window, at most MAX_POINTS of them; a
        replay shorter than a bucket gets one, at its end. None lies past `end`: the replay stops there."""
        span = end - start
        if span <= 0:
            return cls(start, bucket, 0)
        step = min(span, max(bucket, span / MAX_POINTS))
        # the float division may land a hair below a whole number of steps
        return cls(start, step, max(1, math.floor(span / step + 1e-9)))

    def at(self, index: int) -> float:
        """The event time of sample `index`."""
        return self.start + (index + 1) * self.step


@dataclass
class Series:
    """One key's readings at each sample of the timeline, and the notifications its group would have sent."""

    key: str
    labels: dict[str, str]
    values: array[float] = field(default_factory=lambda: array("d"))
    counts: array[float] = field(default_factory=lambda: array("d"))
    thresholds: array[float] = field(default_factory=lambda: array("d"))  # a spike's, which moves
    notifications: list[Event] = field(default_factory=list)


class Recorder:
    """Collects the readings of a rule's groups, sample by sample, into one `Series` per key."""

    def __init__(self, rule: Rule, timeline: Timeline) -> None:
        assert rule.measure is not None
        self.rule = rule
        self.timeline = timeline
        self.series: dict[str, Series] = {}
        self.taken = 0
        # a count's group is dropped once its window is empty: its value then is 0, not unknown
        self._absent = 0.0 if rule.kind == "metric" and rule.measure.aggregate == "count" else NAN

    @property
    def next_at(self) -> float | None:
        """The event time of the next sample, None once all are taken."""
        return self.timeline.at(self.taken) if self.taken < self.timeline.size else None

    def take(self, readings: Sequence[tuple[str, dict[str, str], Reading]]) -> None:
        """The readings of every group (key, labels, reading) at the next sample; keys not among them get none."""
        index = self.taken
        for key, labels, reading in readings:
            series = self.series.get(key)
            if series is None:
                series = self.series[key] = Series(key, labels)
                _pad(series, index, NAN)
            series.values.append(NAN if reading.value is None else reading.value)
            series.counts.append(float(reading.count))
            series.thresholds.append(NAN if reading.threshold is None else reading.threshold)
        for series in self.series.values():
            _pad(series, index + 1, self._absent)
        self.taken += 1

    def attach(self, notifications: Sequence[Event]) -> None:
        """Give each key the notifications its group would have sent."""
        for notice in notifications:
            series = self.series.get(str(notice.data.get("groupKey")))
            if series is not None:
                series.notifications.append(notice)

    def ordered(self) -> list[Series]:
        """The keys, the most alarming first: by their highest value, or their lowest for a rule that fires below."""
        low = _fires_low(self.rule)

        def order(series: Series) -> tuple[bool, float]:
            peak = _extreme(series.values, low)
            return (peak is None, 0.0 if peak is None else peak if low else -peak)

        return sorted(self.series.values(), key=order)


def _pad(series: Series, size: int, value: float) -> None:
    while len(series.values) < size:
        series.values.append(value)
        series.counts.append(0.0)
        series.thresholds.append(NAN)


def _fires_low(rule: Rule) -> bool:
    """Whether the rule fires when its value is low: `below` alone, or a spike with direction "down"."""
    assert rule.measure is not None
    if rule.kind == "spike":
        return rule.measure.direction == "down"
    return rule.measure.above is None and rule.measure.below is not None


def _extreme(values: Sequence[float], low: bool) -> float | None:
    known = [v for v in values if not math.isnan(v)]
    if not known:
        return None
    return min(known) if low else max(known)


def describe(rule: Rule) -> str:
    """What the rule measures, in a line: "sum of data.totalCost over 1h per data.userId"."""
    m = rule.measure
    assert m is not None and rule.grouping is not None
    window = format_duration(rule.window.total_seconds())
    if rule.kind == "ratio":
        what = f"share of {m.share}"
    elif m.value is None:
        what = m.aggregate
    else:
        what = f"{m.aggregate} of {m.value}"
    text = f"{what} over {window}"
    if rule.grouping.by:
        text += " per " + ", ".join(rule.grouping.by)
    if rule.kind == "spike":
        against = {
            "up": f"{m.factor:g}x the window before",
            "down": f"the window before / {m.factor:g}",
            "both": f"{m.factor:g}x or 1/{m.factor:g} of the window before",
        }[m.direction]
        text += f", against {against}"
    return text


def _thresholds(rule: Rule) -> list[tuple[str, str, float | None]]:
    """(glyph role, legend, value) of each line: the main threshold, the warning one; a spike's moves (None)."""
    m = rule.measure
    assert m is not None
    if rule.kind == "spike":
        return [("line", describe(rule).rsplit("against ", 1)[1], None)]
    lines: list[tuple[str, str, float | None]] = []
    for role, name, value in (
        ("line", "above", m.above),
        ("line", "below", m.below),
        ("warn_line", "warn above", m.warn_above),
        ("warn_line", "warn below", m.warn_below),
    ):
        if value is not None:
            lines.append((role, f"{name} {_number(rule, value)}", value))
    return lines


def _number(rule: Rule, value: float) -> str:
    """A measured value as people read it: a share in percent, other numbers to four digits."""
    if rule.kind == "ratio":
        return f"{value * 100:.3g}%"
    return f"{value:.4g}"


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


class _Shown:
    """`out`, with what its encoding cannot hold written as "?": a key's labels are the user's own text, and an
    ASCII stdout must not end the chart with a UnicodeEncodeError."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.encoding = getattr(out, "encoding", None)

    def write(self, text: str) -> None:
        if self.encoding:
            text = text.encode(self.encoding, "replace").decode(self.encoding)
        self.out.write(text)


def render_charts(recorder: Recorder, stream: TextIO, *, keys: int, glyphs: Glyphs) -> None:
    """Chart at most `keys` keys, the most alarming first, and count the others."""
    out = _Shown(stream)
    rule = recorder.rule
    timeline = recorder.timeline
    ordered = recorder.ordered()
    shown, rest = ordered[:keys], ordered[keys:]
    columns = max(1, min(WIDTH, timeline.size))
    span = timeline.size * timeline.step / columns
    out.write(f"  {describe(rule)}\n")
    out.write(
        f"  from {_when(timeline.start)} to {_when(timeline.at(timeline.size - 1))} UTC, one column = "
        f"{format_duration(span)}; {len(ordered)} key{'' if len(ordered) == 1 else 's'}\n"
    )
    legend = [f"{getattr(glyphs, role)} {text}" for role, text, _ in _thresholds(rule)]
    out.write("  " + "   ".join([*legend, f"{glyphs.fired} fired", f"{glyphs.resolved} resolved"]) + "\n")
    for series in shown:
        out.write("\n")
        for line in _key_chart(rule, timeline, series, columns, glyphs):
            out.write(line + "\n")
    if rest:
        low = _fires_low(rule)
        extremes = [e for e in (_extreme(s.values, low) for s in rest) if e is not None]
        bound = (min(extremes) if low else max(extremes)) if extremes else None
        more = f"{len(rest)} more key{'s' if len(rest) > 1 else ''} not shown"
        if bound is not None:
            more += f" ({'lowest down to' if low else 'peaks up to'} {_number(rule, bound)})"
        out.write(f"\n  ... {more}; --keys N shows more\n")


def _key_chart(rule: Rule, timeline: Timeline, series: Series, columns: int, glyphs: Glyphs) -> list[str]:
    low = _fires_low(rule)
    values, thresholds = _squeeze(series, columns, low)
    name = ", ".join(f"{path}={value or '(none)'}" for path, value in series.labels.items()) or "(all matches)"
    known = [(v, i) for i, v in enumerate(series.values) if not math.isnan(v)]
    # a group's lives: a rise from warning to critical within one is told, but is not another firing
    fired = [n for n in series.notifications if n.data.get("reason") == "new"]
    if not known:
        return [f"  {name}: never judged (fewer than min_count values in every window)"]
    top, top_at = max(known)
    bottom, bottom_at = min(known)
    peak = f"peak {_number(rule, top)} ({_when(timeline.at(top_at))})"
    lowest = f"lowest {_number(rule, bottom)} ({_when(timeline.at(bottom_at))})"
    first, second = (lowest, f"peak {_number(rule, top)}") if low else (peak, f"lowest {_number(rule, bottom)}")
    times = "never fired" if not fired else f"fired {len(fired)} time{'s' if len(fired) > 1 else ''}"
    lines = [f"  {name}: {first}, {second}, {times}"]
    lines += _rows(rule, values, thresholds, glyphs)
    lines.append(" " * 12 + glyphs.axis + _marks(timeline, series, columns, glyphs))
    for notice in series.notifications:
        data = notice.data
        value = data.get("value")
        shown = _number(rule, value) if isinstance(value, int | float) else "-"
        aggregate = "share" if rule.kind == "ratio" else data.get("aggregate")
        severity = f" ({data['severity']})" if data.get("severity") and notice.type == "rule.firing" else ""
        lines.append(f"      {format_time(notice.timestamp)}  {data.get('reason')} {aggregate} {shown}{severity}")
    return lines


def _squeeze(series: Series, columns: int, low: bool) -> tuple[list[float], list[float]]:
    """Each column's sample nearest to firing, and the (spike) threshold at that sample."""
    size = len(series.values)
    values, thresholds = [], []
    for column in range(columns):
        begin, end = column * size // columns, (column + 1) * size // columns
        best = None
        for i in range(begin, max(end, begin + 1)):
            v = series.values[i]
            if not math.isnan(v) and (best is None or (v < series.values[best] if low else v > series.values[best])):
                best = i
        values.append(NAN if best is None else series.values[best])
        thresholds.append(NAN if best is None else series.thresholds[best])
    return values, thresholds


def _rows(rule: Rule, values: list[float], spike: list[float], glyphs: Glyphs) -> list[str]:
    """HEIGHT rows of blocks, 8 levels a row, scaled from 0 (or the lowest value) to the highest value or line.

    A spike's line is left out of the scale: after a burst it is `factor` times the burst, far above anything
    else, and where it matters (where the value reaches it) the value's own height shows it.
    """
    lines = _thresholds(rule)
    fixed = [(role, value) for role, _, value in lines if value is not None]
    drawn = [v for v in values if not math.isnan(v)]
    levels = [*drawn, *(v for _, v in fixed)]
    lo, hi = min(0.0, *levels), max(levels)
    if hi <= lo:
        hi = lo + 1.0
    scale = HEIGHT * 8 / (hi - lo)

    def eighths(v: float) -> int:
        # a known value shows at least as a floor: a blank column is a window that was not judged
        return max(round((v - lo) * scale), 1)

    def row_of(v: float) -> int:
        return min(HEIGHT - 1, int((v - lo) * scale // 8))

    # the line a cell shows when no block fills it: a fixed threshold's row, or a spike's moving one
    line_rows: dict[int, str] = {}
    for role, value in reversed(fixed):  # the main threshold wins a row it shares with a warning
        line_rows[row_of(value)] = getattr(glyphs, role)
    labels = {HEIGHT - 1: _number(rule, hi), 0: _number(rule, lo)}
    for _, value in fixed:
        labels[row_of(value)] = _number(rule, value)
    rows = []
    for row in reversed(range(HEIGHT)):
        cells = []
        for column, v in enumerate(values):
            fill = 0 if math.isnan(v) else min(8, max(0, eighths(v) - row * 8))
            line = line_rows.get(row)
            if not math.isnan(spike[column]) and spike[column] <= hi and row_of(spike[column]) == row:
                line = glyphs.line
            cells.append(glyphs.blocks[fill] if fill or line is None else line)
        rows.append(f"{labels.get(row, ''):>11} {glyphs.axis}{''.join(cells)}".rstrip())
    return rows


def _marks(timeline: Timeline, series: Series, columns: int, glyphs: Glyphs) -> str:
    """Where the group fired (new, or a rise to critical) and where it resolved, under the chart's columns."""
    cells = [" "] * columns
    span = timeline.size * timeline.step
    for notice in series.notifications:
        reason = notice.data.get("reason")
        if reason not in ("new", "update", "resolved"):
            continue
        column = int((notice.timestamp.timestamp() - timeline.start) / span * columns)
        column = min(columns - 1, max(0, column))
        if reason == "resolved":
            cells[column] = glyphs.resolved if cells[column] == " " else cells[column]
        else:
            cells[column] = glyphs.fired
    return "".join(cells).rstrip()


def dump_series(recorder: Recorder, out: TextIO) -> None:
    """Each key's series as one JSON object a line, the most alarming key first, with its notifications."""
    rule = recorder.rule
    timeline = recorder.timeline
    bounds = {
        name: value
        for name, value in (
            ("above", rule.measure.above if rule.measure else None),
            ("below", rule.measure.below if rule.measure else None),
            ("warnAbove", rule.measure.warn_above if rule.measure else None),
            ("warnBelow", rule.measure.warn_below if rule.measure else None),
        )
        if value is not None
    }
    low = _fires_low(rule)
    for series in recorder.ordered():
        points: list[dict[str, Any]] = []
        for i, value in enumerate(series.values):
            point: dict[str, Any] = {
                "at": format_time(datetime.fromtimestamp(timeline.at(i), UTC)),
                "value": None if math.isnan(value) else value,
                "count": int(series.counts[i]),
            }
            if rule.kind == "spike":
                threshold = series.thresholds[i]
                point["threshold"] = None if math.isnan(threshold) else threshold
            points.append(point)
        line = {
            "rule": rule.name,
            "group": series.labels,
            "groupKey": series.key,
            "measures": describe(rule),
            "thresholds": bounds,
            "peak": _extreme(series.values, low),
            "points": points,
            "notifications": [n.envelope() for n in series.notifications],
        }
        out.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
