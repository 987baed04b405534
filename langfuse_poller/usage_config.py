"""`[metrics] usage`: the settings of the usage metrics, and which event fields may become their labels.

The usage metrics (service/usage.py) count what the polled events carry: `generation.created` feeds the token,
cost, latency and generation series, `trace.created` the traces, `trace.updated` the errors, `score.created`
the scores. An extra label (`usage_labels`) is a data field of those events; it goes on the metrics whose
event carries it, and a field that none of them carries is refused here, where the config is read.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from .util.toml_tables import Table

# the event types each family of usage metrics is made from
GENERATION_METRICS = (
    "generations_total",
    "tokens_total",
    "cost_usd_total",
    "generation_latency_seconds",
    "generation_time_to_first_token_seconds",
)
METRICS_OF_EVENT: Mapping[str, tuple[str, ...]] = {
    "generation.created": GENERATION_METRICS,
    "trace.created": ("traces_total",),
    "trace.updated": ("observation_errors_total",),
    "score.created": ("score_value", "scores_total"),
}
# the data fields that may become labels, by the events that carry them (events.py, and contract.md's event
# table). Ids of single records (traceId, observationId, scoreId) are left out: one series per record is a leak,
# not a metric. The prompt fields come only with "prompt" in [poll] fields
LABEL_FIELDS: Mapping[str, tuple[str, ...]] = {
    "userId": ("trace.created", "trace.updated"),
    "sessionId": ("trace.created", "trace.updated", "score.created"),
    "traceName": ("generation.created", "trace.updated"),
    "release": ("trace.created",),
    "promptName": ("generation.created",),
    "promptVersion": ("generation.created",),
    "promptId": ("generation.created",),
    "configId": ("score.created",),
}
PROMPT_FIELDS = ("promptName", "promptVersion", "promptId")
DEFAULT_MAX_SERIES = 1000
# numeric scores are mostly 0-1 judgements: a bucket for exactly 0, then tenths
DEFAULT_SCORE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LABELS_FORM = "a list of data fields from " + ", ".join(LABEL_FIELDS)
BUCKETS_FORM = "a list of finite numbers in increasing order, such as [0, 0.25, 0.5, 0.75, 1]"


def label_name(data_field: str) -> str:
    """The Prometheus label of a data field: snake case, as Prometheus names labels (userId -> user_id)."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in data_field)


@dataclass(frozen=True)
class UsageConfig:
    """`[metrics] usage = true`: usage, cost and quality series counted from the polled events."""

    # data fields added as labels to the metrics whose events carry them
    labels: tuple[str, ...] = ()
    # distinct values of each extra label per metric; more become "other"
    max_series: int = DEFAULT_MAX_SERIES
    # upper bounds of the numeric scores' histogram buckets
    score_buckets: tuple[float, ...] = DEFAULT_SCORE_BUCKETS

    def labels_of(self, metric: str) -> tuple[str, ...]:
        """The extra data fields that go on `metric`, in config order."""
        events = [event for event, metrics in METRICS_OF_EVENT.items() if metric in metrics]
        return tuple(f for f in self.labels if any(event in LABEL_FIELDS[f] for event in events))


def parse_usage(table: Table, poll_fields: tuple[str, ...]) -> UsageConfig | None:
    """The usage keys of `[metrics]` (None when `usage` is off); ConfigError naming the key when one is wrong.
    `poll_fields` are the field groups `[poll] fields` reads, which decide what the events carry."""
    enabled = table.boolean("usage", False)
    labels = table.str_list("usage_labels")
    max_series = table.integer("usage_max_series", DEFAULT_MAX_SERIES, minimum=1, maximum=100_000)
    buckets = _buckets(table, "usage_score_buckets")
    # checked even while `usage` is off: switching it on later must not be what reveals a wrong label
    for index, data_field in enumerate(labels):
        if data_field not in LABEL_FIELDS:
            raise table.error("usage_labels", data_field, LABELS_FORM)
        if data_field in labels[:index]:
            raise table.error("usage_labels", data_field, "each data field once")
        if data_field in PROMPT_FIELDS and "prompt" not in poll_fields:
            raise table.error(
                "usage_labels",
                data_field,
                f'a field the events carry: {data_field} comes with "prompt" in [poll] fields',
            )
    if not enabled:
        return None
    return UsageConfig(labels=labels, max_series=max_series, score_buckets=buckets)


def _buckets(table: Table, name: str) -> tuple[float, ...]:
    value = table.raw(name)
    if value is None:
        return DEFAULT_SCORE_BUCKETS
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        or any(b <= a for a, b in itertools.pairwise(value))
    ):
        raise table.error(name, value, BUCKETS_FORM)
    return tuple(float(v) for v in value)
