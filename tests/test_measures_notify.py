"""What Slack and PagerDuty show of a measuring rule's alert: the value against its threshold, the window, the top
contributors; PagerDuty's severity follows warn_* against the main threshold, and the resolve closes the incident.
With the alert state in SQLite and in Redis (the `backend` fixture)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from langfuse_poller.config import parse_config

from .conftest import Clock
from .fake_alerting import FakePagerDuty, FakeSlack, block_kit_error
from .test_alerting import T0, runtime
from .test_measures import COST, gen
from .test_slack_pagerduty import ROUTING_KEY, fields, header, pagerduty, slack_webhook


def test_slack_and_pagerduty_show_the_measure_and_page_by_severity(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    with FakeSlack() as slack, FakePagerDuty(routing_keys=[ROUTING_KEY]) as pd:
        rule: dict[str, Any] = {
            **COST,
            "name": "cost-per-user",
            "events": ["generation.created"],
            "notify": ["slack", "pagerduty"],
            "group_wait": "0s",
        }
        config = parse_config(
            {
                "langfuse": {"base_url": "http://127.0.0.1:9", "public_key": "pk", "secret_key": "sk"},
                "state": {"path": str(tmp_path / "state.db")},
                "notifiers": {"slack": slack_webhook(slack), "pagerduty": pagerduty(pd, severity="error")},
                "rules": [rule],
                **backend,
            },
            "test",
        )
        with runtime(config, clock) as rt:

            def send(seconds: float, *events: Any) -> None:
                clock.now = T0 + seconds
                with rt.store.write() as tx:
                    for event in events:
                        tx.enqueue(event, rt.router.targets(event))
                rt.worker.run_until_idle()
                if rt.replica is not None:
                    # the matches wait in Redis for the leader's next tick
                    rt.alerter.tick()

            send(0, gen(1, T0, cost=2.0), gen(2, T0 + 1, cost=1.5))
            send(60, gen(3, T0 + 60, cost=2.0))
            # the costs leave the window by 11 minutes; resolve_after (2 minutes) later, resolved
            for seconds in (700, 900):
                clock.now = T0 + seconds
                rt.alerter.tick()
                rt.worker.run_until_idle()

    posts = slack.webhook_posts()
    assert len(posts) == 3
    for post in posts:
        assert block_kit_error(post.body["blocks"]) is None
    warned, escalated, resolved = (post.body["blocks"] for post in posts)
    assert header(warned) == "🟠 cost-per-user [userId=u1]: sum 3.5 > 3"
    facts = fields(warned)
    assert (facts["Value"], facts["Threshold"], facts["Severity"], facts["Values"]) == (
        "3.5 (sum over 10m)",
        "3",
        "warning",
        "2",
    )
    assert header(escalated) == "🔥 cost-per-user [userId=u1]: sum 5.5 > 5"
    assert fields(escalated)["Severity"] == "critical"
    # the top contributors, largest first, with what each measured
    assert "chat 2 at" in str(escalated) and "chat 1.5 at" in str(escalated)
    # the costs left the window: nothing to judge, said so rather than as a dash against the threshold
    assert header(resolved) == "✅ Resolved: cost-per-user [userId=u1]: no values in the last 10m"
    assert fields(resolved)["Value"] == "no values in the last 10m"

    events = pd.events()
    assert [(e["event_action"], e.get("payload", {}).get("severity")) for e in events] == [
        ("trigger", "warning"),
        ("trigger", "error"),
        ("resolve", None),
    ]
    assert len({e["dedup_key"] for e in events}) == 1
    assert events[0]["payload"]["custom_details"]["Value"] == "3.5 (sum over 10m)"
    assert events[1]["links"][0]["href"] == "http://langfuse.test/project/p/traces/t1"


def test_a_window_that_emptied_says_so_in_slack_pagerduty_and_the_payload(tmp_path: Path) -> None:
    clock = Clock(T0)
    with FakeSlack() as slack, FakePagerDuty(routing_keys=[ROUTING_KEY]) as pd:
        rule: dict[str, Any] = {
            **{key: value for key, value in COST.items() if key != "warn_above"},
            "name": "cost",
            "events": ["generation.created"],
            "group_by": [],
            "window": "1m",
            "above": 1.0,
            "min_count": 2,
            "notify": ["slack", "pagerduty", "archive"],
            "group_wait": "0s",
            "repeat_interval": "30s",
            "resolve_after": "5m",
        }
        config = parse_config(
            {
                "langfuse": {"base_url": "http://127.0.0.1:9", "public_key": "pk", "secret_key": "sk"},
                "state": {"path": str(tmp_path / "state.db")},
                "notifiers": {
                    "slack": slack_webhook(slack),
                    "pagerduty": pagerduty(pd),
                    "archive": {"type": "jsonl", "path": str(tmp_path / "alerts.jsonl")},
                },
                "rules": [rule],
            },
            "test",
        )
        with runtime(config, clock) as rt:
            for seconds, event in ((0, gen(1, T0, cost=2.0)), (50, gen(2, T0 + 50, cost=1.0))):
                clock.now = T0 + seconds
                with rt.store.write() as tx:
                    tx.enqueue(event, rt.router.targets(event))
                rt.worker.run_until_idle()
            # fired at 50 s; one cost left in the window (min_count 2) from 61 s, none from 110 s; it fires on,
            # repeated every 30 s, until resolve_after ran out
            for seconds in (61, 80, 111, 400):
                clock.now = T0 + seconds
                rt.alerter.tick()
                rt.worker.run_until_idle()

    posts = [post.body["blocks"] for post in slack.webhook_posts()]
    assert [header(blocks) for blocks in posts] == [
        "🔥 cost: sum 3 > 1",
        "🔥 cost: only 1 value in the last 60s (min_count 2)",
        "🔥 cost: no values in the last 60s",
        "✅ Resolved: cost: no values in the last 60s",
    ]
    assert all(block_kit_error(blocks) is None for blocks in posts)
    assert fields(posts[2])["Value"] == "no values in the last 60s"
    assert fields(posts[2])["Threshold"] == "1"
    # PagerDuty's resolve carries the dedup key alone: its triggers are what it shows
    triggers = [e["payload"] for e in pd.events() if e["event_action"] == "trigger"]
    assert [p["summary"].split(" (")[0] for p in triggers] == [
        "🔥 cost: sum 3 > 1",
        "🔥 cost: only 1 value in the last 60s",
        "🔥 cost: no values in the last 60s",
    ]
    assert triggers[2]["custom_details"]["Value"] == "no values in the last 60s"
    # the payload keeps the value null; `count` says how many values the window held
    payloads = [json.loads(line)["data"] for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(d["value"], d["count"], d["minCount"]) for d in payloads] == [
        (3.0, 2, 2),
        (None, 1, 2),
        (None, 0, 2),
        (None, 0, 2),
    ]
