"""The rules that measure in config.example.toml: each scenario, uncommented where it stands, is a working rule."""

from __future__ import annotations

import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.config import load_config
from langfuse_poller.registry import CompiledRule
from langfuse_poller.rules import Measure
from langfuse_poller.testing import FakeLangfuse, PollHarness

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"

# the six scenarios: each rule's name, kind, window, group_by and what it measures, as the example has them
SCENARIOS: dict[str, tuple[str, timedelta, tuple[str, ...], Measure]] = {
    "cost-per-user": (
        "metric",
        timedelta(days=1),
        ("data.userId",),
        Measure(value="data.totalCost", aggregate="sum", above=5.0, warn_above=3.0),
    ),
    "error-rate-per-model": (
        "ratio",
        timedelta(minutes=15),
        ("data.model",),
        Measure(share='data.level == "ERROR"', aggregate="avg", above=0.05, min_count=50),
    ),
    "p95-latency-per-model": (
        "metric",
        timedelta(minutes=5),
        ("data.model",),
        Measure(value="data.latency", aggregate="p95", above=10.0, min_count=20, hold=timedelta(minutes=10)),
    ),
    "helpfulness": (
        "metric",
        timedelta(hours=1),
        ("data.environment",),
        Measure(value="data.value", aggregate="avg", below=0.6, min_count=20),
    ),
    "cost-spike": (
        "spike",
        timedelta(hours=1),
        (),
        Measure(value="data.totalCost", aggregate="sum", factor=3.0, min_count=20),
    ),
    "new-error": (
        "new_value",
        timedelta(0),
        (),
        Measure(value="data.statusMessage", fingerprint=True, learn=timedelta(days=1), remember=timedelta(days=30)),
    ),
}


def scenario_lines(lines: list[str], name: str) -> tuple[int, int]:
    """Where the commented-out rule `name` stands: from its `# [[rules]]` to the first line that is no part of it."""
    start = lines.index(f'# name = "{name}"') - 1
    assert lines[start] == "# [[rules]]", name
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("# "))
    return start, end


def uncommented(name: str) -> str:
    """The example config with the scenario `name` uncommented where it stands."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start, end = scenario_lines(lines, name)
    lines[start:end] = [line.removeprefix("# ") for line in lines[start:end]]
    return "\n".join(lines) + "\n"


def test_the_example_has_the_six_scenarios_commented_out() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    # as shipped, the example config measures nothing: each scenario is the user's to turn on
    assert not {rule["name"] for rule in tomllib.loads(text)["rules"]} & set(SCENARIOS)
    lines = text.splitlines()
    for name in SCENARIOS:
        start, _ = scenario_lines(lines, name)
        assert lines[start - 1].startswith("# ") and not lines[start - 1].startswith("# name"), (
            f"{name} has no comment that says what it is for"
        )


@pytest.mark.parametrize("name", SCENARIOS)
def test_each_scenario_uncommented_is_a_rule_that_measures(tmp_path: Path, name: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(uncommented(name), encoding="utf-8")
    config = load_config(str(path))
    rule = next(r for r in config.rules if r.name == name)
    kind, window, group_by, measure = SCENARIOS[name]
    assert (rule.kind, rule.window, rule.measure) == (kind, window, measure)
    assert rule.grouping is not None and rule.grouping.by == group_by
    assert set(rule.notify) <= set(config.notifiers)
    # `when`, `value` and `share` compile, as `check` compiles them
    CompiledRule(rule, str(path))


def scenario_table(name: str) -> dict[str, Any]:
    rules = tomllib.loads(uncommented(name))["rules"]
    table: dict[str, Any] = next(rule for rule in rules if rule["name"] == name)
    return table


def test_cost_per_user_fires_for_the_user_over_budget_through_the_poller() -> None:
    rule = {**scenario_table("cost-per-user"), "notify": ["log"]}
    with FakeLangfuse() as langfuse:
        clock = [1_800_000_000.0]
        langfuse.clock = lambda: clock[0]
        with PollHarness(langfuse, rules=[rule], notifiers={"log": {"type": "log"}}) as harness:

            def generation(user: str, cost: float, environment: str = "production") -> None:
                langfuse.add_observation(
                    type="GENERATION",
                    user_id=user,
                    environment=environment,
                    model="gpt-4o",
                    cost_details={"total": cost},  # the server serves totalCost from the total
                )

            for cost in (2.0, 2.5, 1.0):  # $5.50 in a day: over the budget
                generation("user-heavy", cost)
            generation("user-light", 0.4)
            generation("user-staging", 9.0, environment="staging")  # not measured: `when` keeps production
            clock[0] += 1
            harness.poll()
            clock[0] += 31  # group_wait
            harness.poll()
            alerts = harness.alerts()
    assert [(a.type, a.data["group"]) for a in alerts] == [("rule.firing", {"data.userId": "user-heavy"})]
    firing = alerts[0].data
    assert (firing["value"], firing["threshold"], firing["severity"], firing["count"]) == (5.5, 5.0, "critical", 3)
    # the top contributors, the most expensive first
    assert [sample["measured"] for sample in firing["samples"]] == [2.5, 2.0, 1.0]
