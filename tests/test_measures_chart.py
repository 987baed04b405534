"""`test-rule` on the rules that measure: per key, the measured value over time charted against the threshold
(unicode blocks, plain ASCII where stdout cannot show them), keys sorted by their peak, `--keys` of them shown and
the rest counted; `--json` gives each key's series. Through the real entry point, and the library for the chart."""

# the fixture `cli` comes from test_cli, and each test names it as a parameter
# ruff: noqa: F811

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.alerting.chart import ASCII, MAX_POINTS, UNICODE, Timeline, glyphs_for
from langfuse_poller.alerting.dryrun import dry_run, render
from langfuse_poller.config import parse_config
from langfuse_poller.events import Event

from .test_cli import Cli, cli, jsonl, write_config  # noqa: F401

T0 = 1_800_000_000.0  # a multiple of the buckets' widths below: windows start on the minute
BLOCKS = set("▁▂▃▄▅▆▇█")


def generation(n: int, at: float, model: str, cost: float, level: str = "DEFAULT") -> dict[str, Any]:
    return {
        "id": f"generation.created:{model}-{n}",
        "event": "generation.created",
        "timestamp": datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z"),
        "source": "poll",
        "data": {"model": model, "totalCost": cost, "level": level, "name": "chat", "traceId": f"t-{model}-{n}"},
    }


def traffic() -> list[dict[str, Any]]:
    """Half an hour of one generation a minute per model; gpt-a has a burst of six costly ones at minute 15."""
    lines = []
    for minute in range(30):
        for model, cost in (("gpt-a", 0.1), ("gpt-b", 0.4), ("gpt-c", 0.05)):
            lines.append(generation(minute, T0 + minute * 60 + 5, model, cost))
    lines += [generation(100 + n, T0 + 15 * 60 + 10 + n, "gpt-a", 1.0) for n in range(6)]
    return lines


METRIC = (
    '[[rules]]\nname = "cost"\ntype = "metric"\nevents = ["generation.created"]\nvalue = "data.totalCost"\n'
    'aggregate = "sum"\nwindow = "10m"\ngroup_by = ["data.model"]\nabove = 5.0\nwarn_above = 3.0\n'
    'group_wait = "0s"\nresolve_after = "5m"\nnotify = ["alerts"]\n'
)


def metric_config(tmp_path: Path) -> tuple[Path, Path]:
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(line) for line in traffic()) + "\n", encoding="utf-8")
    path = write_config(tmp_path / "config.toml", "http://127.0.0.1:9", jsonl("alerts", tmp_path / "a.jsonl") + METRIC)
    return path, events


def test_test_rule_charts_each_key_against_the_threshold(cli: Cli, tmp_path: Path) -> None:
    path, events = metric_config(tmp_path)
    utf8 = {"PYTHONIOENCODING": "utf-8"}
    result = cli("test-rule", "cost", "--events", events, "--keys", "2", "--config", path, env=utf8)
    assert result.returncode == 0, str(result)
    out = result.stdout
    assert "96 events read" in out and "96 matched" in out, out
    assert "sum of data.totalCost over 10m per data.model" in out, out
    # the peaks: gpt-a's burst (six at 1.0 and ten at 0.1), then gpt-b's ten at 0.4; gpt-c is counted, not shown
    a, b = out.index("data.model=gpt-a"), out.index("data.model=gpt-b")
    assert a < b and "data.model=gpt-c" not in out, out
    assert "peak 7 " in out and "peak 4 " in out, out
    assert "1 more key not shown (peaks up to 0.5)" in out, out
    assert "┄ above 5" in out and "┈ warn above 3" in out, out
    chart_a = out[a:b]
    assert BLOCKS & set(chart_a) and "▲" in chart_a and "▼" in chart_a, chart_a
    assert "fired 1 time\n" in chart_a and "fired 1 time\n" in out[b:], out
    # gpt-a passes the warning line within its burst, then the main one; gpt-b's 4 only ever warns
    assert "new sum 4 (warning)" in chart_a and "update sum 6 (critical)" in chart_a, chart_a
    assert "new sum 3.2 (warning)" in out[b:] and "critical" not in out[b:], out
    # the old summary stays: what would be sent, and that nothing was
    assert "would send 5 notifications to alerts for 96 matches; nothing was sent" in out, out
    assert not (tmp_path / "a.jsonl").exists()


def test_test_rule_charts_in_ascii_where_stdout_cannot_show_blocks(cli: Cli, tmp_path: Path) -> None:
    path, events = metric_config(tmp_path)
    result = cli("test-rule", "cost", "--events", events, "--config", path, env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, str(result)
    out = result.stdout
    out.encode("ascii")
    assert "data.model=gpt-c" in out, "ten keys are shown by default"
    assert "#" in out and "^" in out and "- above 5" in out, out
    none = cli("test-rule", "cost", "--events", events, "--keys", "0", "--config", path)
    assert none.returncode == 2 and "--keys: expected an integer >= 1, found 0" in none.stderr, str(none)


def test_a_key_the_ascii_stdout_cannot_show_is_charted_with_a_stand_in(cli: Cli, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    lines = [generation(n, T0 + n * 60, "mistral-médium", 1.0) for n in range(10)]
    events.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    path = write_config(tmp_path / "config.toml", "http://127.0.0.1:9", jsonl("alerts", tmp_path / "a.jsonl") + METRIC)
    result = cli("test-rule", "cost", "--events", events, "--config", path, env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, str(result)
    assert "data.model=mistral-m?dium: peak 10 " in result.stdout, result.stdout


def test_test_rule_json_gives_each_keys_series(cli: Cli, tmp_path: Path) -> None:
    path, events = metric_config(tmp_path)
    result = cli("test-rule", "cost", "--events", events, "--json", "--config", path)
    assert result.returncode == 0, str(result)
    keys = [json.loads(line) for line in result.stdout.splitlines()]
    assert [k["group"] for k in keys] == [{"data.model": m} for m in ("gpt-a", "gpt-b", "gpt-c")]
    a = keys[0]
    assert a["rule"] == "cost" and a["peak"] == pytest.approx(7.0)
    assert a["thresholds"] == {"above": 5.0, "warnAbove": 3.0}
    values = [p["value"] for p in a["points"] if p["value"] is not None]
    assert max(values) == pytest.approx(7.0)
    # every point is a window in event time: its count is what the window holds
    assert {p["count"] for p in keys[2]["points"] if p["value"] is not None} >= {10}
    assert [n["data"]["reason"] for n in a["notifications"]] == ["new", "update", "resolved"]
    assert all(n["data"]["groupKey"] == a["groupKey"] for n in a["notifications"])
    assert keys[2]["notifications"] == [] and keys[2]["peak"] == pytest.approx(0.5)
    stamps = [p["at"] for p in a["points"]]
    assert stamps == sorted(stamps) and stamps[0].endswith("Z")


def library_run(rule: dict[str, Any], events: list[dict[str, Any]], out: io.StringIO, **options: Any) -> None:
    config = parse_config(
        {
            "langfuse": {"base_url": "http://127.0.0.1:9", "public_key": "pk", "secret_key": "sk"},
            "notifiers": {"alerts": {"type": "log"}},
            "rules": [{"events": ["generation.created"], "notify": ["alerts"], "group_wait": "0s", **rule}],
        },
        "test",
    )
    run = dry_run(config, config.rules[0], iter(Event.from_json(json.dumps(e)) for e in events))
    render(run, out, source="test", **options)


def test_a_below_rule_sorts_its_keys_by_their_lowest_value() -> None:
    out = io.StringIO()
    rule = {
        "name": "quiet",
        "type": "metric",
        "aggregate": "count",
        "window": "10m",
        "group_by": ["data.model"],
        "below": 5,
    }
    library_run(rule, traffic(), out, glyphs=UNICODE)
    text = out.getvalue()
    # a count falls to 0 once the traffic stops; gpt-a's burst makes its lowest no lower than the others'
    assert "count over 10m per data.model" in text and "┄ below 5" in text, text
    assert text.count("lowest 0 ") == 3, text


def test_a_spike_chart_draws_the_moving_threshold_and_a_ratio_is_in_percent() -> None:
    burst = [generation(200 + n, T0 + 25 * 60 + n, "gpt-a", 0.1, level="ERROR") for n in range(40)]
    spike = {"name": "spike", "type": "spike", "aggregate": "count", "window": "5m", "factor": 3, "min_count": 2}
    out = io.StringIO()
    library_run(spike, traffic() + burst, out, glyphs=ASCII)
    text = out.getvalue()
    assert "count over 5m, against 3x the window before" in text, text
    assert "- 3x the window before" in text and "^" in text, text
    ratio = {
        "name": "errors",
        "type": "ratio",
        "share": 'data.level == "ERROR"',
        "window": "10m",
        "group_by": ["data.model"],
        "above": 0.2,
        "min_count": 5,
    }
    out = io.StringIO()
    library_run(ratio, traffic() + burst, out, glyphs=UNICODE)
    text = out.getvalue()
    assert 'share of data.level == "ERROR" over 10m per data.model' in text, text
    assert "┄ above 20%" in text and "peak 100%" not in text, text


def test_stdout_that_cannot_encode_blocks_gets_ascii() -> None:
    assert glyphs_for(io.TextIOWrapper(io.BytesIO(), encoding="ascii")) is ASCII
    assert glyphs_for(io.TextIOWrapper(io.BytesIO(), encoding="latin-1")) is ASCII
    assert glyphs_for(io.TextIOWrapper(io.BytesIO(), encoding="utf-8")) is UNICODE


@pytest.mark.parametrize(("span", "bucket"), [(600.0, 20.0), (7 * 86400.0, 120.0), (3600.0, 7.0), (50.0, 120.0)])
def test_the_samples_cover_the_replay_and_none_lies_past_its_end(span: float, bucket: float) -> None:
    timeline = Timeline.over(T0, T0 + span, bucket)
    assert 1 <= timeline.size <= MAX_POINTS
    assert timeline.at(0) > T0 and timeline.step >= min(bucket, span)
    last = timeline.at(timeline.size - 1)
    assert last <= T0 + span + 1e-6 and T0 + span - last < timeline.step


def test_a_replay_shorter_than_a_bucket_is_charted() -> None:
    out = io.StringIO()
    rule = {"name": "cost", "type": "metric", "value": "data.totalCost", "aggregate": "sum", "window": "1h"}
    config = parse_config(
        {
            "langfuse": {"base_url": "http://127.0.0.1:9", "public_key": "pk", "secret_key": "sk"},
            "notifiers": {"alerts": {"type": "log"}},
            "rules": [{"events": ["generation.created"], "notify": ["alerts"], "above": 5.0, **rule}],
        },
        "test",
    )
    events = [Event.from_json(json.dumps(generation(0, T0 + 5, "gpt-a", 1.0)))]
    start, end = datetime.fromtimestamp(T0, UTC), datetime.fromtimestamp(T0 + 30, UTC)
    run = dry_run(config, config.rules[0], iter(events), since=start, until=end)
    render(run, out, source="test", glyphs=UNICODE)
    assert "(all matches): peak 1 " in out.getvalue(), out.getvalue()
