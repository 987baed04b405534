"""Usage, cost and quality as Prometheus series (`[metrics] usage = true`), counted from the polled events.

Each record counts once. The poller tells `UsageMetrics.tally` of every event a page made, routed or not (so the
series need no rule subscribed to the events), with what the poll state remembered of the record before; what
`tally` returns is applied only after the commit that makes a re-read yield those events no more (the dedup keys,
or for a slice that keeps none, its watermark). A re-read of the lookback, a restart or a standby's takeover
therefore finds the records already remembered and makes nothing to count, and a poll that fails counts nothing.

Counters start at zero with the process and are not kept in the state. Prometheus reads a reset as one
(`rate`, `increase`), and with standby replicas each record is counted by the one replica that committed it:
`sum` over the replicas is the total. Counts restored from a shared state would be counted again by every
replica that restored them.

Series are kept in plain dicts and turned into metric families only at scrape time: a catch-up counts tens of
thousands of records a second, and a prometheus_client child per series would cost a lock and a lookup each.
"""

from __future__ import annotations

import gzip
import logging
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted, make_wsgi_app

from ..events import ERROR_LEVELS, Event, Seen
from ..usage_config import UsageConfig, label_name

log = logging.getLogger(__name__)

OTHER = "other"
EOF = b"# EOF\n"
# generations take from a fraction of a second (a small model, a cached answer) to minutes (reasoning, long
# outputs); the first token comes within 50 ms (cached) to tens of seconds (a reasoning model thinking first)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# name, help, base labels; the histograms' buckets come from BUCKETS or the config
COUNTERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("generations_total", "Generations seen, by model, environment and level.", ("model", "environment", "level")),
    (
        "tokens_total",
        "Tokens of the generations, one type per usageDetails key as Langfuse names it (input, output, total, "
        "input_cached_tokens, output_reasoning_tokens, ...).",
        ("model", "environment", "type"),
    ),
    (
        "cost_usd_total",
        "Cost of the generations in USD (costDetails.total, else totalCost).",
        ("model", "environment"),
    ),
    ("traces_total", "Traces seen (their root observations), by name and environment.", ("name", "environment")),
    (
        "observation_errors_total",
        "Observations first seen at level ERROR or WARNING, by observation name, environment and level.",
        ("name", "environment", "level"),
    ),
    (
        "scores_total",
        "Boolean and categorical scores, by name, source, environment and value.",
        ("name", "source", "environment", "value"),
    ),
)
HISTOGRAMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "generation_latency_seconds",
        "Generation latency (start to end) in seconds.",
        ("model", "environment"),
    ),
    (
        "generation_time_to_first_token_seconds",
        "Time to the first token of a generation in seconds (streamed generations).",
        ("model", "environment"),
    ),
    ("score_value", "Numeric scores, by name, source and environment.", ("name", "source", "environment")),
)
BUCKETS = {"generation_latency_seconds": LATENCY_BUCKETS, "generation_time_to_first_token_seconds": TTFT_BUCKETS}

# what a page's tally holds until its commit: counter increments and histogram observations by series, each with
# the number of records behind it (what a fold counts)
Labels = tuple[str, ...]
CounterDelta = dict[tuple[str, Labels], list[float]]  # (metric, labels) -> [value, records]
HistogramDelta = dict[tuple[str, Labels, int], list[float]]  # (metric, labels, bucket) -> [records, sum]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class UsageMetrics:
    """The usage series: `tally` turns a page's events into increments, the callable it returns applies them,
    and `render` writes them out at scrape time."""

    def __init__(self, config: UsageConfig, prefix: str = "langfuse") -> None:
        self.config = config
        self.prefix = prefix
        # the extra data fields each metric carries, in config order, after its base labels
        self.extras = {name: config.labels_of(name) for name, _, _ in (*COUNTERS, *HISTOGRAMS)}
        self.buckets = {**BUCKETS, "score_value": config.score_buckets}
        self.bounds = {name: [*(repr(float(b)) for b in bounds), "+Inf"] for name, bounds in self.buckets.items()}
        self.label_names = {
            name: (*base, *map(label_name, self.extras[name])) for name, _, base in (*COUNTERS, *HISTOGRAMS)
        }
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = {name: {} for name, _, _ in COUNTERS}
        # series -> counts per bucket (the last is +Inf), then the sum
        self._histograms: dict[str, dict[Labels, list[float]]] = {name: {} for name, _, _ in HISTOGRAMS}
        self._values: dict[tuple[str, int], set[str]] = {}
        self.folded: dict[tuple[str, str], float] = {}
        self._warned: set[str] = set()
        # the label text of each series, by its values; bounded as the series are (max_series per extra label)
        self._bodies: dict[str, dict[Labels, str]] = {}
        # the text of each histogram series as the last scrape wrote it, dropped when the series changes
        self._texts: dict[tuple[str, Labels], str] = {}

    # counting

    def tally(self, made: Sequence[tuple[Event, Seen | None]], told: set[str]) -> Callable[[], None]:
        """What a page's events add, as a callable that adds it; `told` holds the keys already tallied in this
        slice (a record served twice in one read is counted once) and gets this page's."""
        counters: CounterDelta = {}
        histograms: HistogramDelta = {}
        for event, previous in made:
            kind = event.type
            data = event.data
            if kind == "generation.created":
                if event.id in told:
                    continue
                told.add(event.id)
                self._generation(data, counters, histograms)
            elif kind == "trace.created":
                if event.id in told:
                    continue
                told.add(event.id)
                extra = self._extra("traces_total", data)
                _add(counters, "traces_total", (_text(data.get("name")), _text(data.get("environment")), *extra), 1)
            elif kind == "trace.updated":
                level = data.get("level")
                # a root seen again at the same level makes another trace.updated: the error was counted already
                if level not in ERROR_LEVELS or (previous is not None and previous.level == level):
                    continue
                key = f"error:{data.get('observationId')}:{level}"
                if key in told:
                    continue
                told.add(key)
                extra = self._extra("observation_errors_total", data)
                labels = (_text(data.get("name")), _text(data.get("environment")), str(level), *extra)
                _add(counters, "observation_errors_total", labels, 1)
            elif kind == "score.created":
                if event.id in told:
                    continue
                told.add(event.id)
                self._score(data, counters, histograms)
        return lambda: self._apply(counters, histograms)

    def _extra(self, metric: str, data: Mapping[str, Any]) -> Labels:
        fields = self.extras[metric]
        return tuple(_text(data.get(f)) for f in fields) if fields else ()

    def _generation(self, data: Mapping[str, Any], counters: CounterDelta, histograms: HistogramDelta) -> None:
        # the hot path of a catch-up with usage on (most events are generations): one tuple of labels, built once,
        # and no helper call per series
        model, environment = data.get("model"), data.get("environment")
        labels = ("" if model is None else str(model), "" if environment is None else str(environment))
        fields = self.extras["generations_total"]  # every generation series carries the same extra labels
        extra = tuple(_text(data.get(f)) for f in fields) if fields else ()
        series = (*labels, *extra) if extra else labels
        _add(counters, "generations_total", (*labels, _text(data.get("level")), *extra), 1)
        details = data.get("usageDetails")
        if details and isinstance(details, Mapping):
            # the keys as the server stores them: input, output, total, and the detail keys its ingestion makes
            # (input_cached_tokens, output_reasoning_tokens, input_cache_read, ...; see
            # packages/shared/src/server/otel/OtelIngestionProcessor.ts and
            # packages/shared/src/server/ingestion/types.ts). input and output are net of those
            for key, value in details.items():
                if type(value) is int or type(value) is float:
                    typed = ("tokens_total", (*labels, str(key), *extra))
                    slot = counters.get(typed)
                    if slot is None:
                        counters[typed] = [float(value), 1.0]
                    else:
                        slot[0] += value
                        slot[1] += 1
        costs = data.get("costDetails")
        cost = _number(costs.get("total")) if isinstance(costs, Mapping) else None
        if cost is None:
            cost = _number(data.get("totalCost"))
        if cost is not None:
            _add(counters, "cost_usd_total", series, cost)
        latency, first_token = data.get("latency"), data.get("timeToFirstToken")
        if (type(latency) is float or type(latency) is int) and latency >= 0:
            self._observe(histograms, "generation_latency_seconds", series, latency)
        if (type(first_token) is float or type(first_token) is int) and first_token >= 0:
            self._observe(histograms, "generation_time_to_first_token_seconds", series, first_token)

    def _score(self, data: Mapping[str, Any], counters: CounterDelta, histograms: HistogramDelta) -> None:
        name, source, environment = _text(data.get("name")), _text(data.get("source")), _text(data.get("environment"))
        data_type = data.get("dataType") or "NUMERIC"
        if data_type == "NUMERIC":
            value = _number(data.get("value"))
            if value is not None:
                self._observe(
                    histograms, "score_value", (name, source, environment, *self._extra("score_value", data)), value
                )
        elif data_type == "BOOLEAN":
            value = _number(data.get("value"))
            truth = bool(value) if value is not None else _text(data.get("stringValue")).lower() in ("true", "1")
            labels = (name, source, environment, "true" if truth else "false", *self._extra("scores_total", data))
            _add(counters, "scores_total", labels, 1)
        elif data_type == "CATEGORICAL":
            labels = (name, source, environment, _text(data.get("stringValue")), *self._extra("scores_total", data))
            _add(counters, "scores_total", labels, 1)
        # TEXT and CORRECTION scores are free text: no series

    def _observe(self, histograms: HistogramDelta, metric: str, labels: Labels, value: float) -> None:
        slot = histograms.setdefault((metric, labels, bisect_left(self.buckets[metric], value)), [0.0, 0.0])
        slot[0] += 1
        slot[1] += value

    def _apply(self, counters: CounterDelta, histograms: HistogramDelta) -> None:
        """Add a committed page's tally to the series."""
        with self._lock:
            for (metric, labels), (value, records) in counters.items():
                totals = self._counters[metric]
                key = self._fold(metric, labels, records)
                totals[key] = totals.get(key, 0.0) + value
            for (metric, labels, bucket), (records, total) in histograms.items():
                series = self._histograms[metric]
                key = self._fold(metric, labels, records)
                counts = series.get(key)
                if counts is None:
                    counts = series[key] = [0.0] * (len(self.buckets[metric]) + 2)
                counts[bucket] += records
                counts[-1] += total
                self._texts.pop((metric, key), None)

    def _fold(self, metric: str, labels: Labels, records: float) -> Labels:
        """`labels` with each extra value beyond the metric's `max_series` distinct ones turned into "other"."""
        fields = self.extras[metric]
        if not fields:
            return labels
        base = len(labels) - len(fields)
        folded = list(labels)
        for index, data_field in enumerate(fields):
            value = labels[base + index]
            known = self._values.setdefault((metric, index), set())
            if value in known:
                continue
            if len(known) < self.config.max_series:
                known.add(value)
                continue
            folded[base + index] = OTHER
            label = label_name(data_field)
            fold = (f"{self.prefix}_{metric}", label)
            self.folded[fold] = self.folded.get(fold, 0.0) + records
            if label not in self._warned:
                self._warned.add(label)
                log.warning(
                    "usage label %s reached %d distinct values on %s_%s: further values count as %r "
                    "([metrics] usage_max_series)",
                    label,
                    self.config.max_series,
                    self.prefix,
                    metric,
                    OTHER,
                )
        return tuple(folded)

    # serving

    def series(self, metric: str) -> int:
        """How many series `metric` (a name without the `langfuse_` prefix) has."""
        with self._lock:
            return len(self._counters.get(metric) or self._histograms.get(metric) or ())

    def render(self, openmetrics: bool = False) -> str:
        """The series in the Prometheus text format (0.0.4), or in OpenMetrics' (without its `# EOF`).

        Written here rather than by prometheus_client's exposition, which checks and escapes every label of every
        sample: with 1,000 series per metric it took ~0.5 s a scrape, this takes a tenth of that or less.
        """
        with self._lock:
            counters = {name: dict(series) for name, series in self._counters.items()}
            folded = dict(self.folded)
            # a histogram series is a dozen lines: each is written again only when it changed since the last scrape,
            # under the lock, so that no change can slip between the counts read and the text kept
            histograms = {
                name: [self._histogram_text(name, key) for key in series] for name, series in self._histograms.items()
            }
        out: list[str] = []
        for name, documentation, _ in COUNTERS:
            full = f"{self.prefix}_{name}"
            _header(out, full, documentation, "counter", openmetrics)
            names = self.label_names[name]
            out.extend(f"{full}{{{self._body(name, names, key)}}} {value!r}\n" for key, value in counters[name].items())
        for name, documentation, _ in HISTOGRAMS:
            _header(out, f"{self.prefix}_{name}", documentation, "histogram", openmetrics)
            out.extend(histograms[name])
        full = "langfuse_poller_usage_labels_folded_total"
        _header(
            out,
            full,
            "Records whose value of an extra usage label went to 'other' (usage_max_series).",
            "counter",
            openmetrics,
        )
        for (metric, label), value in folded.items():
            out.append(f'{full}{{metric="{metric}",label="{label}"}} {value!r}\n')
        return "".join(out)

    def _histogram_text(self, metric: str, key: Labels) -> str:
        """The lines of one histogram series, kept until `_apply` changes it; called with the lock held."""
        text = self._texts.get((metric, key))
        if text is not None:
            return text
        full = f"{self.prefix}_{metric}"
        counts = self._histograms[metric][key]
        body = self._body(metric, self.label_names[metric], key)
        cumulative = list(accumulate(counts[:-1]))
        lines = [
            f'{full}_bucket{{{body},le="{bound}"}} {count!r}\n'
            for bound, count in zip(self.bounds[metric], cumulative, strict=True)
        ]
        lines.append(f"{full}_count{{{body}}} {cumulative[-1]!r}\n{full}_sum{{{body}}} {counts[-1]!r}\n")
        text = self._texts[metric, key] = "".join(lines)
        return text

    def _body(self, metric: str, names: Sequence[str], values: Labels) -> str:
        """The inside of a series' braces, made once per series and kept: a scrape reuses it."""
        bodies = self._bodies.setdefault(metric, {})
        body = bodies.get(values)
        if body is None:
            body = bodies[values] = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
        return body


def wsgi_app(registry: CollectorRegistry, usage: UsageMetrics) -> Callable[..., Iterable[bytes]]:
    """The `/metrics` app with the usage series after the registry's own: prometheus_client's app, whose answer to
    a GET gets the usage text added in the format it chose (the text format, or OpenMetrics, before `# EOF`)."""
    plain = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "GET" or environ.get("PATH_INFO") == "/favicon.ico":
            return plain(environ, start_response)  # type: ignore[no-any-return]
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT") or "")
        openmetrics = content_type.startswith("application/openmetrics-text")
        output = encoder(registry)
        added = usage.render(openmetrics).encode()
        output = output.removesuffix(EOF) + added + EOF if openmetrics else output + added
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or ""):
            # the fastest level: a scrape with thousands of series compresses ~8x at a fraction of level 9's time
            output = gzip.compress(output, compresslevel=1)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [output]

    return app


def _header(out: list[str], name: str, documentation: str, kind: str, openmetrics: bool) -> None:
    # OpenMetrics names a counter's family without the `_total` of its sample
    family = name.removesuffix("_total") if openmetrics and kind == "counter" else name
    out.append(f"# HELP {family} {documentation}\n# TYPE {family} {kind}\n")


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _add(counters: CounterDelta, metric: str, labels: Labels, value: float) -> None:
    slot = counters.get((metric, labels))
    if slot is None:
        counters[(metric, labels)] = [value, 1.0]
    else:
        slot[0] += value
        slot[1] += 1
