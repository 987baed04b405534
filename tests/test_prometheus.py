"""The usage metrics and the contrib files against the real servers: `langfuse-poller run` with `[metrics] usage`
polls a loopback FakeLangfuse; promtool checks its scrape and the shipped rules, a real Prometheus scrapes it,
and every query of the shipped Grafana dashboard names metrics the daemon serves.

Each test is skipped, saying why, when promtool or prometheus is not installed (`.ci/run` installs both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from langfuse_poller.testing.fake_langfuse import FakeLangfuse

from .conftest import free_port
from .usage_traffic import Expected, add_traffic, assert_counts, parse, times, total

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "langfuse-poller.json"
TRACES = 90


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install prometheus; .ci/run installs it)")
    return path


def wait_for(condition: Callable[[], Any], timeout: float, step: float = 0.2) -> Any:
    """Poll `condition` until it returns something true, for at most `timeout` seconds; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


@dataclass
class Daemon:
    """A `langfuse-poller run` with the usage metrics on, and what the stand-in it polls was given."""

    port: int
    expected: Expected
    log: Path

    def scrape(self) -> str:
        response = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10)
        assert response.status_code == 200
        return response.text


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("usage-daemon")
    port = free_port()
    with FakeLangfuse() as fake:
        expected = Expected()
        add_traffic(fake, times(datetime.now(UTC) - timedelta(minutes=40), timedelta(seconds=20)), TRACES, expected)
        config = tmp / "config.toml"
        config.write_text(
            f"""
[langfuse]
base_url = "{fake.url}"
public_key = "{fake.public_key}"
secret_key = "{fake.secret_key}"
[poll]
interval = "250ms"
start = "-1h"
[state]
path = "{tmp / "state.db"}"
[metrics]
listen = "127.0.0.1:{port}"
usage = true
[notifiers.file]
type = "jsonl"
path = "{tmp / "errors.jsonl"}"
[[rules]]
name = "errors"
events = ["trace.updated"]
notify = ["file"]
""",
            encoding="utf-8",
        )
        log = tmp / "run.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "NOTIFY_", "WATCHDOG_"))}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "langfuse_poller", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        running = Daemon(port, expected, log)
        try:

            def counted() -> bool:
                try:
                    samples = parse(running.scrape())
                except httpx.HTTPError:
                    return False
                return total(samples, "langfuse_score_value_count") == expected.numeric_scores and total(
                    samples, "langfuse_generations_total"
                ) == sum(expected.generations.values())

            assert wait_for(counted, 30), log.read_text()
            yield running
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def test_the_scrape_counts_the_records_and_passes_promtool_check_metrics(daemon: Daemon) -> None:
    promtool = binary("promtool")
    text = daemon.scrape()
    assert_counts(parse(text), daemon.expected)
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), (
        checked.stdout + checked.stderr
    )


def test_promtool_checks_the_rules_and_their_unit_tests_fire_them(tmp_path: Path) -> None:
    promtool = binary("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout
    # a model that costs 0.5 USD a minute (30 USD an hour) and fails one generation in five; another that is
    # cheap and healthy
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'langfuse_cost_usd_total{model="gpt-4o", environment="production"}',
                        "values": "0+0.5x120",
                    },
                    {
                        "series": 'langfuse_cost_usd_total{model="gpt-4o-mini", environment="production"}',
                        "values": "0+0.001x120",
                    },
                    {
                        "series": 'langfuse_generations_total{model="gpt-4o", environment="production", level="ERROR"}',
                        "values": "0+2x120",
                    },
                    {
                        "series": 'langfuse_generations_total{model="gpt-4o", environment="production", '
                        'level="DEFAULT"}',
                        "values": "0+8x120",
                    },
                    {
                        "series": 'langfuse_generations_total{model="gpt-4o-mini", environment="production", '
                        'level="DEFAULT"}',
                        "values": "0+10x120",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "90m",
                        "alertname": "LangfuseCostBurnRateHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "model": "gpt-4o", "environment": "production"},
                                "exp_annotations": {
                                    "summary": "gpt-4o (production) costs 30.00 USD per hour",
                                    "description": "The LLM cost of the model over the last hour, as Langfuse "
                                    "priced its generations.",
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "60m",
                        "alertname": "LangfuseGenerationErrorRateHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "model": "gpt-4o", "environment": "production"},
                                "exp_annotations": {
                                    "summary": "gpt-4o (production): 20% of generations fail",
                                    "description": "More than 5% of the model's generations were at level ERROR "
                                    "over the last 15 minutes.",
                                },
                            }
                        ],
                    },
                    # within `for`, nothing fires yet
                    {"eval_time": "5m", "alertname": "LangfuseGenerationErrorRateHigh", "exp_alerts": []},
                ],
            }
        ],
    }
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(json.dumps(tests), encoding="utf-8")  # JSON is YAML
    tested = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard["panels"])
    walk(dashboard["templating"])
    found.extend(var["query"]["query"] for var in dashboard["templating"]["list"] if isinstance(var.get("query"), dict))
    return found


def test_the_dashboard_parses_and_queries_only_metrics_the_daemon_serves(daemon: Daemon) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    # the data source is picked when the dashboard is imported, never a uid of someone's Grafana
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"] if "datasource" in panel)
    served = {name for name, _ in parse(daemon.scrape())}
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    named: set[str] = set()
    for expr in expressions:
        names = set(re.findall(r"\b(langfuse_[a-z0-9_]+)", expr))
        assert names, expr
        named |= names
        missing = names - served
        assert not missing, f"{expr} names {missing}, which the daemon does not serve"
    for metric in ("langfuse_cost_usd_total", "langfuse_tokens_total", "langfuse_generation_latency_seconds_bucket"):
        assert metric in named
    assert any(name.startswith("langfuse_poller_") for name in named), "the daemon's health is on the dashboard"


@pytest.fixture
def prometheus(tmp_path: Path, daemon: Daemon) -> Iterator[str]:
    """A real Prometheus on loopback scraping the daemon every second; its base URL."""
    server = binary("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "langfuse-poller", "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}]}
                ],
            }
        ),
        encoding="utf-8",
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                server,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(ready, 30), log.read_text()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def query(url: str, promql: str) -> dict[str, float]:
    """An instant query through Prometheus' HTTP API: the value by the first label of each series."""
    response = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    body = response.json()
    assert body["status"] == "success", body
    return {next(iter(item["metric"].values()), ""): float(item["value"][1]) for item in body["data"]["result"]}


def test_a_real_prometheus_sums_cost_and_tokens_as_the_records_do(daemon: Daemon, prometheus: str) -> None:
    expected = daemon.expected
    cost = wait_for(lambda: query(prometheus, "sum by (model) (langfuse_cost_usd_total)"), 30)
    assert cost.keys() == expected.cost.keys(), cost
    for model, usd in expected.cost.items():
        assert abs(cost[model] - usd) < 1e-9, (model, cost[model], usd)
    tokens = query(prometheus, "sum by (type) (langfuse_tokens_total)")
    by_type: dict[str, float] = {}
    for (_, kind), count in expected.tokens.items():
        by_type[kind] = by_type.get(kind, 0) + count
    assert tokens == by_type
    gpt = query(prometheus, 'sum by (type) (langfuse_tokens_total{model="gpt-4o"})')
    assert gpt == {kind: count for (model, kind), count in expected.tokens.items() if model == "gpt-4o"}
    errors = query(prometheus, 'sum by (model) (langfuse_generations_total{level="ERROR"})')
    assert errors == {
        model: float(n) for (model, _, level), n in _by_model(expected.generations).items() if level == "ERROR"
    }


def _by_model(generations: Any) -> dict[tuple[str, str, str], int]:
    summed: dict[tuple[str, str, str], int] = {}
    for (model, _, level), count in generations.items():
        summed[model, "", level] = summed.get((model, "", level), 0) + count
    return summed


def test_openmetrics_and_gzip_answers_carry_the_same_usage_series(daemon: Daemon) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

    response = httpx.get(
        f"http://127.0.0.1:{daemon.port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"},
        timeout=10,
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.headers["content-encoding"] == "gzip"
    assert response.text.endswith("# EOF\n")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in openmetrics_families(response.text)
        for sample in family.samples
    }
    assert_counts(samples, daemon.expected)
