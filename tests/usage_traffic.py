"""Demo-like traffic for the usage metrics' tests: several models and environments, errors, and numeric,
boolean and categorical scores, with the sums the metrics must show, computed from the stand-in's records."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from langfuse_poller.testing.fake_langfuse import FakeLangfuse

MODELS = ("gpt-4o", "claude-sonnet-4", "gemini-2.5-flash")
ENVIRONMENTS = ("production", "staging")

# (sample name, sorted labels) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """A scrape's text, as samples."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, metric: str, /, **labels: str) -> float:
    """The sum of the samples of `metric` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, key), value in samples.items() if sample == metric and wanted <= set(key))


@dataclass
class Expected:
    """What the stand-in was given, summed as the usage metrics must sum it."""

    generations: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (model, environment, level)
    tokens: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, type)
    cost: dict[str, float] = field(default_factory=dict)  # model -> USD
    traces: Counter[tuple[str, str]] = field(default_factory=Counter)  # (name, environment)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (name, level)
    numeric_scores: int = 0
    labelled_scores: Counter[tuple[str, str]] = field(default_factory=Counter)  # (name, value)

    def add_generation(self, record: Mapping[str, Any]) -> None:
        model = record["model"]
        self.generations[model, record["environment"], record["level"]] += 1
        for key, value in record["usageDetails"].items():
            self.tokens[model, key] += value
        self.cost[model] = self.cost.get(model, 0.0) + record["costDetails"]["total"]


def add_traffic(
    fake: FakeLangfuse, at: Callable[[int], datetime], count: int, expected: Expected, *, start: int = 0
) -> None:
    """`count` traces, each a root, a generation (a model and an environment in turn, every fifth at ERROR, every
    seventh with cached and reasoning tokens) and a score (numeric, boolean, categorical in turn). `at(i)` is the
    time of the i-th trace."""
    for i in range(start, start + count):
        model, environment = MODELS[i % len(MODELS)], ENVIRONMENTS[i % len(ENVIRONMENTS)]
        when = at(i)
        name = f"chat-{i % 2}"
        root = fake.add_observation(
            start_time=when, name=name, is_root=True, environment=environment, trace_name=name, user_id=f"user-{i}"
        )
        expected.traces[name, environment] += 1
        level = "ERROR" if i % 5 == 0 else "DEFAULT"
        tokens = {"input": 100 + i, "output": 20 + i % 30, "total": 120 + i + i % 30}
        if i % 7 == 0:
            tokens |= {"input_cached_tokens": 64, "output_reasoning_tokens": 12}
        generation = fake.add_observation(
            trace_id=root["traceId"],
            parent_observation_id=root["id"],
            start_time=when,
            type="GENERATION",
            name="llm-call",
            level=level,
            environment=environment,
            trace_name=name,
            model=model,
            usage_details=tokens,
            cost_details={"input": 0.001 * (i % 4), "output": 0.0005, "total": 0.001 * (i % 4) + 0.0005},
            total_cost=0.001 * (i % 4) + 0.0005,
            latency=0.3 + (i % 40),
            time_to_first_token=0.08 * (1 + i % 9),
        )
        expected.add_generation(generation)
        if level == "ERROR":
            expected.errors["llm-call", "ERROR"] += 1
        kind = ("NUMERIC", "BOOLEAN", "CATEGORICAL")[i % 3]
        value: float | bool | str = {"NUMERIC": (i % 10) / 10, "BOOLEAN": i % 2 == 0, "CATEGORICAL": "good"}[kind]
        fake.add_score(
            trace_id=root["traceId"], name=f"judge-{kind.lower()}", value=value, data_type=kind, timestamp=when
        )
        if kind == "NUMERIC":
            expected.numeric_scores += 1
        else:
            shown = str(value).lower() if kind == "BOOLEAN" else str(value)
            expected.labelled_scores[f"judge-{kind.lower()}", shown] += 1


def assert_counts(samples: Samples, expected: Expected) -> None:
    """The usage series of a scrape equal what `expected` summed."""
    for (model, environment, level), count in expected.generations.items():
        found = total(samples, "langfuse_generations_total", model=model, environment=environment, level=level)
        assert found == count, (model, environment, level, found, count)
    for (model, kind), count in expected.tokens.items():
        assert total(samples, "langfuse_tokens_total", model=model, type=kind) == count, (model, kind)
    for model, cost in expected.cost.items():
        assert abs(total(samples, "langfuse_cost_usd_total", model=model) - cost) < 1e-9, model
    for (name, environment), count in expected.traces.items():
        assert total(samples, "langfuse_traces_total", name=name, environment=environment) == count
    for (name, level), count in expected.errors.items():
        assert total(samples, "langfuse_observation_errors_total", name=name, level=level) == count
    assert total(samples, "langfuse_observation_errors_total") == sum(expected.errors.values())
    assert total(samples, "langfuse_score_value_count") == expected.numeric_scores
    for (name, value), count in expected.labelled_scores.items():
        assert total(samples, "langfuse_scores_total", name=name, value=value) == count
    generations = sum(expected.generations.values())
    assert total(samples, "langfuse_generation_latency_seconds_count") == generations
    assert total(samples, "langfuse_generation_time_to_first_token_seconds_count") == generations


def times(origin: datetime, step: Any) -> Callable[[int], datetime]:
    """The time of the i-th trace: `origin` + i * `step`."""
    return lambda i: origin + i * step
