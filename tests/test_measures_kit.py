"""The rules that measure with the tools users test their setup with: `send-test-event` reaches a measuring rule's
notifiers as it does an alerting rule's (no group opened), and `PollHarness` drives a metric rule to firing on an
injected clock, as the README's example does; and the README's examples of each kind are valid config."""

# the fixture `cli` comes from test_cli, and each test names it as a parameter
# ruff: noqa: F811

from __future__ import annotations

import tomllib
from pathlib import Path

from langfuse_poller.config import parse_config
from langfuse_poller.registry import CompiledRule
from langfuse_poller.store import Store
from langfuse_poller.testing import FakeLangfuse, PollHarness

from .test_cli import NOWHERE, Cli, cli, jsonl, read_jsonl, write_config  # noqa: F401

MEASURING = """
[[rules]]
name = "cost"
type = "metric"
events = ["generation.created"]
value = "data.totalCost"
aggregate = "p95"
window = "1h"
group_by = ["data.model"]
above = 5.0
notify = ["cost"]

[[rules]]
name = "error-rate"
type = "ratio"
events = ["generation.created"]
share = 'data.level == "ERROR"'
window = "15m"
above = 0.05
min_count = 50
notify = ["rate"]

[[rules]]
name = "cost-spike"
type = "spike"
events = ["generation.created"]
value = "data.totalCost"
aggregate = "sum"
window = "1h"
factor = 3
notify = ["spike"]

[[rules]]
name = "new-error"
type = "new_value"
events = ["trace.updated"]
when = 'data.level == "ERROR"'
value = "data.statusMessage"
fingerprint = true
notify = ["new"]
"""


def test_a_test_event_reaches_each_measuring_rules_notifiers(cli: Cli, tmp_path: Path) -> None:
    files = {name: tmp_path / f"{name}.jsonl" for name in ("cost", "rate", "spike", "new")}
    notifiers = "".join(jsonl(name, path) for name, path in files.items())
    path = write_config(tmp_path / "config.toml", NOWHERE, notifiers + MEASURING)
    generation, trace = cli.many(
        ["send-test-event", "--event", "generation.created", "--config", path],
        ["send-test-event", "--event", "trace.updated", "--config", path],
    )
    assert generation.returncode == 0, str(generation)
    assert trace.returncode == 0, str(trace)
    sent = {name: [e["event"] for e in read_jsonl(file)] for name, file in files.items()}
    assert sent == {
        "cost": ["generation.created"],
        "rate": ["generation.created"],
        "spike": ["generation.created"],
        "new": ["trace.updated"],
    }
    reached = [line.split()[-1] for line in generation.stdout.splitlines() + trace.stdout.splitlines()]
    assert reached == ["notifier:cost", "notifier:rate", "notifier:spike", "notifier:new"]
    # straight to the notifiers: a test event measures nothing and opens no group
    store = Store(tmp_path / "config.db")
    try:
        assert store.alert_state().groups() == []
    finally:
        store.close()


def test_the_harness_drives_a_metric_rule_to_firing() -> None:
    """The README's example of a metric rule tested with PollHarness, on a clock the test moves; here with a
    second key that stays below the threshold."""
    now = [1_800_000_000.0]
    rules = [
        {
            "name": "cost-per-model",
            "type": "metric",
            "events": ["generation.created"],
            "value": "data.totalCost",
            "aggregate": "sum",
            "window": "1h",
            "group_by": ["data.model"],
            "above": 5.0,
            "group_wait": "0s",
            "notify": ["log"],
        }
    ]
    with (
        FakeLangfuse(clock=lambda: now[0]) as langfuse,
        PollHarness(langfuse, rules=rules, notifiers={"log": {"type": "log"}}) as harness,
    ):
        for _ in range(3):
            langfuse.add_observation(type="GENERATION", model="gpt-4o", cost_details={"total": 2.0})
            now[0] += 60
            harness.poll()
        langfuse.add_observation(type="GENERATION", model="gpt-4o-mini", cost_details={"total": 0.1})
        now[0] += 60
        harness.poll()
        [alert] = harness.alerts()
    assert alert.type == "rule.firing" and alert.data["group"] == {"data.model": "gpt-4o"}
    assert alert.data["value"] == 6.0 and alert.data["threshold"] == 5.0 and alert.data["count"] == 3


def test_the_readme_examples_of_rules_that_measure_are_valid_config() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.partition("### Rules that measure")[2].partition("\n### ")[0]
    blocks = [block.partition("\n")[2] for block in section.split("```toml")[1:]]
    rules = [tomllib.loads(block.partition("```")[0])["rules"][0] for block in blocks]
    config = parse_config(
        {
            "langfuse": {"base_url": NOWHERE, "public_key": "pk", "secret_key": "sk"},
            "notifiers": {
                "slack": {"type": "slack", "webhook_url": "https://hooks.slack.com/services/T/B/x"},
                "pagerduty": {"type": "pagerduty", "routing_key": "r" * 32},
            },
            "rules": rules,
        },
        "README.md",
    )
    assert [rule.kind for rule in config.rules] == ["metric", "ratio", "spike", "new_value"]
    # every CEL expression compiles, as `check` compiles them
    for rule in config.rules:
        CompiledRule(rule, "README.md")
