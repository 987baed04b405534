"""Langfuse monitor alerts forwarded to PagerDuty: a firing opens an incident, the monitor's recovery resolves it.

What Langfuse sends (`packages/shared/src/features/monitors/processor/applyStateMachine.ts`): a `monitor-alert`
webhook whose `payload.severity` is one of PAUSED, UNKNOWN, NO_DATA, OK, WARNING, ALERT; a recovery to OK is
sent; `monitorId` is the only id shared by the firing and the recovery (the payload `id` is new each time). The
rule groups by `data.monitorId` and resolves on `alert.ok` (`resolve_when`). Real HTTP on loopback: the signed
webhooks go into the receiver, the PagerDuty stand-in answers as the Events API v2 does.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.config import Config, parse_config
from langfuse_poller.errors import ConfigError
from langfuse_poller.registry import Router
from langfuse_poller.runtime import Runtime
from langfuse_poller.webhooks.payloads import MONITOR_SEVERITIES, event_from_webhook

from .conftest import Clock
from .fake_alerting import FakePagerDuty
from .test_webhooks import RECEIVED_AT, SECRET, encode, langfuse_headers

pytestmark = pytest.mark.timeout(60)

ROUTING_KEY = "R0UT1NGKEY0000000000000000000000"
README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
MONITOR_RULE = {
    "name": "langfuse-monitors",
    "events": ["alert.*"],
    "group_by": ["data.monitorId"],
    "resolve_when": 'event == "alert.ok"',
    "notify": ["pagerduty"],
}


def monitor_alert(delivery: str, severity: str, monitor: str = "mon-1") -> dict[str, Any]:
    """A monitor-alert webhook as Langfuse builds it (`packages/shared/src/server/notifications/types.ts`)."""
    firing = severity in ("WARNING", "ALERT")
    return {
        "id": delivery,
        "timestamp": "2026-12-01T08:00:00.000Z",
        "type": "monitor-alert",
        "apiVersion": "v1",
        "payload": {
            "monitorId": monitor,
            "projectId": "proj-test",
            "permalink": f"https://cloud.langfuse.com/project/proj-test/monitors/{monitor}",
            **({"dataPermalink": "https://cloud.langfuse.com/project/proj-test/traces"} if firing else {}),
            "message": {"title": f"Error rate {severity}", "body": "share of traces with level ERROR"},
            "severity": severity,
            "timestamp": "2026-12-01T08:00:00.000Z",
            "fromTimestamp": "2026-12-01T07:55:00.000Z",
            "toTimestamp": "2026-12-01T08:00:00.000Z",
        },
    }


def config(tmp_path: Path, pd: FakePagerDuty, **rule: Any) -> Config:
    data = {
        "langfuse": {"base_url": "http://127.0.0.1:9", "public_key": "pk-lf-test", "secret_key": "sk-lf-test"},
        "poll": {"streams": []},
        "state": {"path": str(tmp_path / "state.db")},
        "webhook": {"enabled": True, "listen": "127.0.0.1:0", "secret": SECRET},
        "notifiers": {
            "pagerduty": {"type": "pagerduty", "routing_key": ROUTING_KEY, "events_url": pd.events_url},
        },
        "rules": [{**MONITOR_RULE, **rule}],
    }
    return parse_config(data, "test-config")


@pytest.fixture
def pd() -> Iterator[FakePagerDuty]:
    with FakePagerDuty(routing_keys=[ROUTING_KEY]) as service:
        yield service


def send(runtime: Runtime, payload: dict[str, Any], clock: Clock) -> None:
    """Sign (at the test's clock, which the receiver checks against), post, and deliver what it stored."""
    import httpx

    assert runtime.receiver is not None
    body = encode(payload)
    headers = langfuse_headers(body, timestamp=int(clock.now))
    answer = httpx.post(runtime.receiver.url, content=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    runtime.worker.run_until_idle()


def actions(pd: FakePagerDuty) -> list[tuple[str, str]]:
    return [(event["event_action"], event["dedup_key"]) for event in pd.events()]


def test_a_monitor_alert_and_its_recovery_trigger_and_resolve_one_pagerduty_incident(
    tmp_path: Path, pd: FakePagerDuty
) -> None:
    clock = Clock()
    runtime = Runtime.build(config(tmp_path, pd), clock=clock)
    try:
        runtime.start_receiver()
        runtime.alerter.start()
        send(runtime, monitor_alert("delivery-1", "ALERT"), clock)
        clock.advance(31)  # past group_wait
        runtime.alerter.tick()
        runtime.worker.run_until_idle()
        [(action, dedup_key)] = actions(pd)
        assert action == "trigger"
        # the recovery of another monitor, and the same monitor's recovery sent again, touch nothing else
        send(runtime, monitor_alert("delivery-2", "OK", monitor="mon-2"), clock)
        assert actions(pd) == [("trigger", dedup_key)]
        send(runtime, monitor_alert("delivery-3", "OK"), clock)
        assert actions(pd) == [("trigger", dedup_key), ("resolve", dedup_key)]
        send(runtime, monitor_alert("delivery-4", "OK"), clock)
        clock.advance(3600)
        runtime.alerter.tick()
        runtime.worker.run_until_idle()
        assert actions(pd) == [("trigger", dedup_key), ("resolve", dedup_key)]
        # the monitor fires again: a new incident
        send(runtime, monitor_alert("delivery-5", "WARNING"), clock)
        clock.advance(31)
        runtime.alerter.tick()
        runtime.worker.run_until_idle()
        assert [action for action, _ in actions(pd)] == ["trigger", "resolve", "trigger"]
        assert actions(pd)[2][1] != dedup_key
    finally:
        runtime.close()


def test_a_recovery_within_group_wait_still_reaches_pagerduty_as_a_trigger_and_a_resolve(
    tmp_path: Path, pd: FakePagerDuty
) -> None:
    clock = Clock()
    runtime = Runtime.build(config(tmp_path, pd), clock=clock)
    try:
        runtime.start_receiver()
        send(runtime, monitor_alert("delivery-1", "ALERT"), clock)
        assert actions(pd) == []  # group_wait has not passed
        send(runtime, monitor_alert("delivery-2", "OK"), clock)
        [(first, key), (second, same)] = actions(pd)
        assert (first, second) == ("trigger", "resolve") and key == same
    finally:
        runtime.close()


def test_resolve_when_is_checked_like_when_and_only_where_it_can_apply(tmp_path: Path) -> None:
    with FakePagerDuty() as service:
        bad = config(tmp_path, service, resolve_when='event == "alert.ok" &&')
        with pytest.raises(ConfigError) as info:
            Router(bad.rules, source=bad.source)
        assert info.value.key == "rules[0].resolve_when" and "a CEL expression" in str(info.value)
        for kind, extra in (("frequency", {"threshold": 3, "window": "5m"}), ("absence", {"window": "5m"})):
            with pytest.raises(ConfigError) as info:
                config(tmp_path, service, type=kind, **extra)
            assert info.value.key == "rules[0].resolve_when", kind
            assert "resolves when its condition clears" in str(info.value)
        # resolve_when alone makes the rule group (into alerts), as group_by does
        grouped = config(tmp_path, service, group_by=[], notify=[])
        assert grouped.rules[0].grouping is not None and grouped.rules[0].resolve_when == 'event == "alert.ok"'


@pytest.mark.parametrize("severity", MONITOR_SEVERITIES)
def test_every_monitor_severity_has_its_documented_event(severity: str) -> None:
    event = event_from_webhook(monitor_alert("d", severity), received_at=RECEIVED_AT)
    assert event.type == f"alert.{severity.lower()}" and event.data["monitorId"] == "mon-1"
    row = next(line for line in README.read_text(encoding="utf-8").splitlines() if "`monitor-alert`" in line)
    assert f"`alert.{severity.lower()}`" in row, row


def test_the_docs_name_no_severity_langfuse_never_sends() -> None:
    assert MONITOR_SEVERITIES == ("PAUSED", "UNKNOWN", "NO_DATA", "OK", "WARNING", "ALERT")
    for path in (README, EXAMPLE):
        assert "alert.high" not in path.read_text(encoding="utf-8"), path


def test_the_monitor_recipe_in_the_example_config_resolves_like_the_one_tested_here(tmp_path: Path) -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start = lines.index('# name = "langfuse-monitors"') - 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("# "))
    recipe = tomllib.loads("\n".join(line.removeprefix("# ") for line in lines[start:end]))["rules"][0]
    assert recipe["group_by"] == MONITOR_RULE["group_by"] and recipe["resolve_when"] == MONITOR_RULE["resolve_when"]
    with FakePagerDuty() as service:
        rule = config(tmp_path, service, **recipe).rules[0]
    router = Router([rule])
    for severity, routed in (("ALERT", True), ("WARNING", True), ("OK", True), ("NO_DATA", False)):
        event = event_from_webhook(monitor_alert("d", severity), received_at=RECEIVED_AT)
        assert (router.targets(event) == [rule.target]) is routed, severity
