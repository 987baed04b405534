"""The keys of the rules that measure: each mistake is a ConfigError that names the rule's key, what was found and
what is expected; `check` compiles `value` and `share` as it compiles `when`."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.errors import ConfigError
from langfuse_poller.rules import DEFAULT_MAX_GROUPS, Measure
from langfuse_poller.service.check import run_check

from .test_alerting import alert_config

METRIC = {"type": "metric", "value": "data.totalCost", "aggregate": "sum", "window": "1h", "above": 5.0}
RATIO = {"type": "ratio", "share": 'data.level == "ERROR"', "window": "15m", "above": 0.05}
SPIKE = {"type": "spike", "value": "data.totalCost", "aggregate": "sum", "window": "1h", "factor": 3}
NEW = {"type": "new_value", "value": "data.statusMessage"}


def without(rule: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in rule.items() if k != key}


@pytest.mark.parametrize(
    ("rule", "key", "expected"),
    [
        ({**METRIC, "aggregate": "median"}, "rules[0].aggregate", "one of sum, avg"),
        (without(METRIC, "aggregate"), "rules[0].aggregate", "one of sum, avg"),
        (without(METRIC, "above"), "rules[0].above", "above = ... or below = ..."),
        (without(METRIC, "value"), "rules[0].value", "a CEL expression for the number to sum"),
        (without(METRIC, "window"), "rules[0].window", "how long the rule looks"),
        ({**METRIC, "warn_above": 6.0}, "rules[0].warn_above", "a number below above (5.0)"),
        ({**METRIC, "below": 1.0, "warn_below": 0.5}, "rules[0].warn_below", "a number above below (1.0)"),
        ({**METRIC, "below": 9.0}, "rules[0].below", "a number below above"),
        ({**METRIC, "above": "5"}, "rules[0].above", "a number"),
        ({**METRIC, "above": True}, "rules[0].above", "a number"),
        ({**METRIC, "min_count": 0}, "rules[0].min_count", "an integer >= 1"),
        ({**METRIC, "for": "soon"}, "rules[0].for", "duration"),
        ({**METRIC, "max_groups": 0}, "rules[0].max_groups", "an integer >= 1"),
        ({**METRIC, "aggregate": "count", "min_count": 5}, "rules[0].min_count", "no min_count on a count"),
        ({**METRIC, "factor": 3}, "rules[0].factor", "no factor on a metric rule"),
        ({**METRIC, "share": "true"}, "rules[0].share", "no share on a metric rule"),
        ({**METRIC, "learn": "1d"}, "rules[0].learn", "no learn on a metric rule"),
        ({**METRIC, "group_interval": "1m"}, "rules[0].group_interval", "no group_interval on a metric rule"),
        ({**METRIC, "threshold": 3}, "rules[0].threshold", "a known key"),
        ({**RATIO, "above": 5}, "rules[0].above", "a share between 0 and 1"),
        (without(RATIO, "share"), "rules[0].share", "a CEL condition"),
        ({**RATIO, "value": "data.x"}, "rules[0].value", "no value on a ratio rule"),
        ({**RATIO, "aggregate": "avg"}, "rules[0].aggregate", "no aggregate on a ratio rule"),
        (without(SPIKE, "factor"), "rules[0].factor", "a number greater than 1"),
        ({**SPIKE, "factor": 1}, "rules[0].factor", "a number greater than 1"),
        ({**SPIKE, "direction": "sideways"}, "rules[0].direction", "one of up, down, both"),
        ({**SPIKE, "above": 1.0}, "rules[0].above", "no above on a spike rule"),
        (without(NEW, "value"), "rules[0].value", "a CEL expression for the value"),
        ({**NEW, "window": "1h"}, "rules[0].window", "a known key"),
        ({**NEW, "learn": "30d", "remember": "7d"}, "rules[0].remember", "a duration longer than learn"),
        ({**NEW, "min_count": 3}, "rules[0].min_count", "no min_count on a new_value rule"),
        ({**NEW, "fingerprint": "yes"}, "rules[0].fingerprint", "true or false"),
        ({**NEW, "resolve_when": "true"}, "rules[0].resolve_when", "no resolve_when on a new_value rule"),
        ({"value": "data.x"}, "rules[0].value", "no value on an event rule"),
    ],
)
def test_each_mistake_names_the_rule_and_the_key(tmp_path: Path, rule: dict[str, Any], key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        alert_config(tmp_path, rule)
    assert caught.value.key == key, str(caught.value)
    assert expected in caught.value.expected, str(caught.value)


def test_the_issues_rules_read_as_written(tmp_path: Path) -> None:
    rules = [
        {**METRIC, "group_by": ["data.userId"], "warn_above": 3.0, "min_count": 1, "for": "0s"},
        {**RATIO, "group_by": ["data.model"], "min_count": 50},
        {**SPIKE, "min_count": 20, "direction": "down"},
        {**NEW, "fingerprint": True, "learn": "1d", "remember": "30d", "max_groups": 100},
    ]
    measures = [alert_config(tmp_path, rule).rules[0].measure for rule in rules]
    assert measures == [
        Measure(value="data.totalCost", aggregate="sum", above=5.0, warn_above=3.0),
        Measure(share='data.level == "ERROR"', aggregate="avg", above=0.05, min_count=50),
        Measure(value="data.totalCost", aggregate="sum", factor=3.0, direction="down", min_count=20),
        Measure(value="data.statusMessage", fingerprint=True, max_groups=100),
    ]
    assert measures[0] is not None and measures[0].max_groups == DEFAULT_MAX_GROUPS
    assert measures[3] is not None and measures[3].remember == timedelta(days=30)
    p95 = alert_config(tmp_path, {**METRIC, "aggregate": "p95"}).rules[0].measure
    assert p95 is not None and p95.percentile == 0.95
    # a rule that measures always groups
    assert alert_config(tmp_path, RATIO).rules[0].grouping is not None


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({**METRIC, "value": "data.totalCost *"}, "rules[0].value"),
        ({**RATIO, "share": "data.level =="}, "rules[0].share"),
    ],
)
def test_check_compiles_value_and_share(tmp_path: Path, rule: dict[str, Any], key: str) -> None:
    config = alert_config(tmp_path, rule)
    with pytest.raises(ConfigError) as caught:
        run_check(config, out=io.StringIO())
    assert caught.value.key == key and "a CEL expression" in caught.value.expected


@pytest.mark.parametrize(
    "expression",
    [
        "data.totalCost",
        "data.usage.total",
        'data.level == "ERROR"',
        'data.level == "ERROR" && event == "generation.created"',
        "has(data.latency) ? data.latency : 0.0",
        'data["level"] == "ERROR"',
        "size(data) > 3",
        "data.missing",
        # what `when` conditions write: a macro or a method on `data` itself reads all of it
        'data.exists(k, k == "level")',
        "data.size() > 3",
        'data.metadata.env == "prod"',
        'has(data.metadata) && data.metadata.env == "prod"',
        'timestamp(timestamp) > timestamp("2027-01-01T00:00:00Z")',
        'source == "poll" && data.totalCost > 0.1',
        # a field against a string is judged without CEL when the field holds a string, by CEL otherwise
        'data.level == "ERROR"',
        "data.level == 'DEFAULT'",
        'data.model == "m" ',
        'data.totalCost == "0.25"',
        'data.usage == "30"',
        'data.missing == "x"',
    ],
)
def test_value_and_share_read_what_cel_reads_of_the_whole_envelope(expression: str) -> None:
    import cel

    from langfuse_poller.registry import Reads

    envelope = {
        "id": "generation.created:o1",
        "event": "generation.created",
        "timestamp": "2027-01-15T08:00:00.000Z",
        "source": "poll",
        "data": {
            "level": "ERROR",
            "totalCost": 0.25,
            "latency": 1.5,
            "usage": {"total": 30},
            "model": "m",
            "metadata": {"env": "prod"},
        },
    }
    reads = Reads.of(expression)
    program = cel.compile(expression)

    def run(activation: dict[str, Any]) -> Any:
        try:
            return program.execute(activation)
        except Exception as exc:
            return type(exc)

    assert run(reads.activation(envelope)) == run(envelope)
    plainly = reads.plainly(envelope)
    assert plainly is None or plainly == run(envelope)
    assert (plainly is not None) == (
        expression in ('data.level == "ERROR"', "data.level == 'DEFAULT'", 'data.model == "m" ')
    )
    # a rule's `when` is judged on the same narrowed activation, with the same outcome as on the whole envelope
    from langfuse_poller.events import Event
    from langfuse_poller.registry import CompiledRule
    from langfuse_poller.rules import Rule

    when = CompiledRule(Rule(name="r", events=("generation.created",), when=expression, notify=()))
    assert when.matches(Event.from_envelope(envelope), envelope) == (run(envelope) is True)
    # a plain path is read without CEL; what CEL cannot see plainly gets the whole of `data`
    assert (reads.path is not None) == (expression in ("data.totalCost", "data.usage.total", "data.missing"))
    assert (reads.data is None) == (
        expression in ('data["level"] == "ERROR"', "size(data) > 3", 'data.exists(k, k == "level")', "data.size() > 3")
    )
