"""Each rule that measures fires and resolves through the real poller against the stand-in, its notifications
reaching a notifier, with the alert state in SQLite and in Redis (the `backend` fixture); and the `test-rule` dry
run replays events through them on its own clock."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from langfuse_poller.alerting.dryrun import dry_run, render
from langfuse_poller.events import Event
from langfuse_poller.testing.fake_langfuse import FakeLangfuse

from .conftest import Clock, make_config
from .test_alerting import notifications, runtime

RULES: list[dict[str, Any]] = [
    {
        "name": "cost-per-model",
        "type": "metric",
        "value": "data.totalCost",
        "aggregate": "sum",
        "window": "10m",
        "group_by": ["data.model"],
        "above": 5.0,
    },
    {
        "name": "error-rate",
        "type": "ratio",
        "share": 'data.level == "ERROR"',
        "window": "10m",
        "group_by": ["data.model"],
        "above": 0.5,
        "min_count": 4,
    },
    {"name": "traffic-spike", "type": "spike", "aggregate": "count", "window": "5m", "factor": 3, "min_count": 2},
    {
        "name": "new-error",
        "type": "new_value",
        "when": 'data.level == "ERROR"',
        "value": "data.statusMessage",
        "fingerprint": True,
        "learn": "0s",
        "remember": "1d",
    },
]


def test_each_kind_fires_and_resolves_through_the_poller(
    tmp_path: Path, fake: FakeLangfuse, backend: dict[str, Any]
) -> None:
    clock = fake.clock
    assert isinstance(clock, Clock)
    config = make_config(
        fake,
        tmp_path,
        **backend,
        poll={"start": "now", "settle": "0s", "interval": "10s"},
        notifiers={"alerts": {"type": "jsonl", "path": str(tmp_path / "alerts.jsonl")}},
        rules=[
            {"events": ["generation.created"], "notify": ["alerts"], "group_wait": "0s", "resolve_after": "2m", **r}
            for r in RULES
        ],
    )
    start = clock.now

    def step(seconds: float) -> None:
        clock.now = start + seconds
        rt.poller.poll_once()
        rt.worker.run_until_idle()
        rt.alerter.tick()
        rt.worker.run_until_idle()

    def generation(n: int, *, cost: float = 0.5, level: str = "DEFAULT", message: str | None = None) -> None:
        fake.add_observation(
            id=f"o{n}",
            trace_id=f"t{n}",
            type="GENERATION",
            name="chat",
            model="gpt-x",
            # the server serves totalCost from the cost details' total
            cost_details={"total": cost},
            level=level,
            status_message=message,
        )

    with runtime(config, clock) as rt:
        rt.poller.start_streams()
        # a quiet first ten minutes, one cheap generation a minute: the reference for the spike, which judges a
        # window only once a whole window before it has been seen
        for minute in range(10):
            clock.now = start + minute * 60 + 1
            generation(minute)
            step(minute * 60 + 10)
        assert notifications(rt) == []
        # then a burst of expensive failures with one new kind of error
        clock.now = start + 630
        for n in range(10, 22):
            generation(n, cost=1.5, level="ERROR", message=f"upstream 503 from /v1/chat/{n} after {n}s")
        for seconds in range(640, 700, 10):
            step(seconds)
        fired = {n["data"]["rule"]: n for n in notifications(rt) if n["event"] == "rule.firing"}
        assert set(fired) == {"cost-per-model", "error-rate", "traffic-spike", "new-error"}
        # the burst with the quiet generations still in the window (about ten minutes' worth)
        cost, rate = fired["cost-per-model"]["data"], fired["error-rate"]["data"]
        quiet = cost["count"] - 12
        assert 8 <= quiet <= 10 and cost["value"] == 12 * 1.5 + quiet * 0.5
        assert rate["value"] == 12 / rate["count"] and rate["matching"] == 12
        spike = fired["traffic-spike"]["data"]
        assert spike["value"] >= 3 * spike["previous"] and spike["threshold"] == 3 * spike["previous"]
        assert 4 <= spike["previous"] <= 5
        assert fired["new-error"]["data"]["fingerprint"] == "upstream <n> from <path> after <n>s"
        # quiet again, a cheap generation a minute: the burst leaves the windows, then resolve_after passes
        for seconds in range(700, 2400, 10):
            if seconds % 60 == 0:
                clock.now = start + seconds - 9
                generation(seconds)
            step(seconds)
        resolved = {n["data"]["rule"]: n for n in notifications(rt) if n["event"] == "rule.resolved"}
        assert set(resolved) == set(fired)
        for rule, notice in resolved.items():
            assert notice["data"]["dedupKey"] == fired[rule]["data"]["dedupKey"]
        assert len(notifications(rt)) == 8


def test_the_dry_run_replays_a_metric_rule(tmp_path: Path, fake: FakeLangfuse) -> None:
    config = make_config(
        fake,
        tmp_path,
        notifiers={"alerts": {"type": "jsonl", "path": str(tmp_path / "alerts.jsonl")}},
        rules=[{"events": ["generation.created"], "notify": ["alerts"], "resolve_after": "5m", **RULES[0]}],
    )
    t0 = 1_800_000_000.0
    events = [
        Event(
            id=f"generation.created:o{n}",
            type="generation.created",
            timestamp=datetime.fromtimestamp(t0 + n * 60, UTC),
            source="poll",
            data={"model": "gpt-x", "totalCost": 1.0 if n < 10 else 3.0, "name": "chat"},
        )
        for n in range(20)
    ]
    run = dry_run(config, config.rules[0], iter(events))
    assert [(n.type, n.data["reason"]) for n in run.notifications] == [
        ("rule.firing", "new"),
        ("rule.resolved", "resolved"),
    ]
    out = io.StringIO()
    render(run, out, source="test")
    assert "would send 2 notifications" in out.getvalue()


def test_a_langfuse_outage_is_not_a_drop(tmp_path: Path, fake: FakeLangfuse, backend: dict[str, Any]) -> None:
    clock = fake.clock
    assert isinstance(clock, Clock)
    low = {
        "name": "traffic-low",
        "type": "metric",
        "events": ["generation.created"],
        "aggregate": "count",
        "window": "5m",
        "below": 3,
        "notify": ["alerts"],
        "group_wait": "0s",
    }
    config = make_config(
        fake,
        tmp_path,
        **backend,
        poll={"start": "now", "settle": "0s", "interval": "10s"},
        notifiers={"alerts": {"type": "jsonl", "path": str(tmp_path / "alerts.jsonl")}},
        rules=[low],
    )
    # whole minutes from a whole minute: where the 10 s buckets of the window fall against the minutely
    # generations must not depend on when the test starts (it failed when started 8-9 s past a bucket's start)
    clock.now -= clock.now % 60
    start = clock.now

    def step(seconds: float) -> None:
        clock.now = start + seconds
        rt.poller.poll_once()
        rt.worker.run_until_idle()
        rt.alerter.tick()
        rt.worker.run_until_idle()

    with runtime(config, clock) as rt:
        rt.reader.backoff_initial = rt.reader.backoff_max = 0.001
        rt.poller.start_streams()
        # a generation a minute for twenty minutes, half of them read while Langfuse answers only errors
        for minute in range(20):
            clock.now = start + minute * 60 + 1
            fake.add_observation(id=f"o{minute}", type="GENERATION", name="chat", model="m")
            if minute == 8:
                fake.fail_next(10_000, status=500)
            if minute == 18:
                fake.clear_faults()
            step(minute * 60 + 30)
        step(20 * 60)
        assert notifications(rt) == []
        # the traffic stops for real: once the poller has read past five quiet minutes, the count is 0
        for seconds in range(20 * 60, 21 * 60 + 31, 30):
            step(seconds)
        assert notifications(rt) == []
        step(24 * 60)
        fired = notifications(rt)
        assert [(n["event"], n["data"]["value"]) for n in fired] == [("rule.firing", 0.0)]
