"""Rules that measure, on injected time: metric, ratio, spike and new_value fire, warn, resolve (with
`resolve_after` hysteresis), wait for `for` and `min_count`; a late record lands in its own window; a restart in
the middle of a window neither forgets it nor fires twice; `max_groups` sends further keys to one overflow group.

The tests that take `backend` run against each alert state, SQLite and Redis (test_alerting.py's fixture): the
windows travel in `Group.measure`, and new_value's first run and known values in the rule-level state."""

from __future__ import annotations

import json
import logging
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from langfuse_poller.alerting.groups import group_key
from langfuse_poller.alerting.measures import OVERFLOW, fingerprint, measure
from langfuse_poller.config import Config, parse_config
from langfuse_poller.events import Event
from langfuse_poller.notifiers.messages import message_for
from langfuse_poller.notifiers.pagerduty import PagerDutySettings
from langfuse_poller.notifiers.slack import blocks_for
from langfuse_poller.runtime import Runtime
from langfuse_poller.service.metrics import Metrics
from langfuse_poller.util.toml_tables import Secret

from .conftest import Clock
from .test_alerting import T0, alert_config, at, feed, notifications, runtime
from .test_slack_pagerduty import ROUTING_KEY, fields


def measuring(tmp_path: Path, backend: dict[str, Any] | None = None, **rule: Any) -> Config:
    rule = {"events": ["generation.created"], "when": None, "group_wait": "0s", **rule}
    return alert_config(tmp_path, rule, backend=backend)


def apart(backend: dict[str, Any], name: str) -> dict[str, Any]:
    """The same backend for a second, separate deployment in one test (in Redis: its own key prefix)."""
    return {"queue": {**backend["queue"], "name": name}} if backend else {}


def gen(n: int, ts: float, *, user: str = "u1", cost: float | None = 1.0, level: str = "DEFAULT", **data: Any) -> Event:
    return Event(
        id=f"generation.created:o{n}",
        type="generation.created",
        timestamp=datetime.fromtimestamp(ts, UTC),
        source="poll",
        data={
            "traceId": f"t{n}",
            "observationId": f"o{n}",
            "name": "chat",
            "model": "m1",
            "userId": user,
            "totalCost": cost,
            "level": level,
            "url": f"http://langfuse.test/project/p/traces/t{n}",
            **data,
        },
    )


def told(notices: list[dict[str, Any]]) -> list[tuple[str, str, str | None, Any]]:
    return [(n["event"], n["data"]["reason"], n["data"].get("severity"), n["data"].get("value")) for n in notices]


def send(rt: Any, clock: Clock, seconds: float, *events: Event) -> list[dict[str, Any]]:
    """Move to T0 + seconds and deliver these matches; the notifications they made."""
    clock.now = T0 + seconds
    before = len(notifications(rt))
    feed(rt, list(events))
    return notifications(rt)[before:]


COST = {
    "type": "metric",
    "value": "data.totalCost",
    "aggregate": "sum",
    "window": "10m",
    "group_by": ["data.userId"],
    "above": 5.0,
    "warn_above": 3.0,
    "resolve_after": "2m",
}


def test_metric_warns_then_escalates_and_resolves_after_the_condition_cleared_for_resolve_after(
    tmp_path: Path, backend: dict[str, Any]
) -> None:
    clock = Clock(T0)
    with runtime(measuring(tmp_path, backend, **COST), clock) as rt:
        assert send(rt, clock, 0, gen(1, T0, cost=2.0)) == []
        # another user's costs are their own
        assert send(rt, clock, 30, gen(2, T0 + 30, user="u2", cost=2.5)) == []
        warned = send(rt, clock, 60, gen(3, T0 + 60, cost=1.5))
        assert told(warned) == [("rule.firing", "new", "warning", 3.5)]
        data = warned[0]["data"]
        assert data["group"] == {"data.userId": "u1"} and data["threshold"] == 3.0 and data["window"] == "10m"
        assert data["count"] == 2 and data["aggregate"] == "sum" and data["above"] == 5.0
        # the top contributors, largest first
        assert [s["measured"] for s in data["samples"]] == [2.0, 1.5]
        assert data["samples"][0]["traceId"] == "t1"
        critical = send(rt, clock, 120, gen(4, T0 + 120, cost=2.0))
        assert told(critical) == [("rule.firing", "update", "critical", 5.5)]
        assert critical[0]["data"]["dedupKey"] == data["dedupKey"] and critical[0]["data"]["threshold"] == 5.0
        # the first cost leaves the window at 10 minutes: back to a warning, which is not told
        assert at(rt, clock, 600) == []
        # at 11 minutes the condition no longer holds; resolve_after (2 minutes) keeps it firing until 13
        assert at(rt, clock, 660) == []
        assert at(rt, clock, 779) == []
        resolved = at(rt, clock, 780)
        assert [n["event"] for n in resolved] == ["rule.resolved"]
        assert resolved[0]["data"]["dedupKey"] == data["dedupKey"]
        assert at(rt, clock, 3600) == []


def test_hysteresis_keeps_a_group_that_wavers_at_the_line_firing(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    with runtime(measuring(tmp_path, backend, **{**COST, "window": "1m", "resolve_after": "5m"}), clock) as rt:
        assert told(send(rt, clock, 0, gen(1, T0, cost=6.0))) == [("rule.firing", "new", "critical", 6.0)]
        # each minute the cost falls out of the window and comes back: one alert throughout
        for minute in range(1, 5):
            assert at(rt, clock, minute * 60 + 30) == []
            assert send(rt, clock, minute * 60 + 40, gen(10 + minute, T0 + minute * 60 + 40, cost=6.0)) == []
        # the last cost leaves the window at 340 s; the group is looked at then, and resolves 5 minutes later
        assert at(rt, clock, 340) == []
        assert at(rt, clock, 340 + 5 * 60 - 1) == []
        assert [n["event"] for n in at(rt, clock, 340 + 5 * 60)] == ["rule.resolved"]


def test_for_holds_a_condition_before_firing(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    with runtime(measuring(tmp_path, backend, **{**COST, "for": "2m"}), clock) as rt:
        assert send(rt, clock, 0, gen(1, T0, cost=6.0)) == []
        assert at(rt, clock, 119) == []
        assert told(at(rt, clock, 120)) == [("rule.firing", "new", "critical", 6.0)]
    clock = Clock(T0)
    with runtime(
        measuring(tmp_path / "brief", apart(backend, "brief"), **{**COST, "window": "1m", "for": "2m"}), clock
    ) as rt:
        # a condition that holds for less than `for` never fires
        assert send(rt, clock, 0, gen(1, T0, cost=6.0)) == []
        assert at(rt, clock, 70) == []
        assert send(rt, clock, 80, gen(2, T0 + 80, cost=6.0)) == []
        assert at(rt, clock, 600) == []
        assert notifications(rt) == []


def test_ratio_is_judged_from_min_count_on(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    rule = {
        "type": "ratio",
        "share": 'data.level == "ERROR"',
        "window": "15m",
        "group_by": ["data.model"],
        "above": 0.05,
        "min_count": 4,
        "resolve_after": "1m",
    }
    with runtime(measuring(tmp_path, backend, **rule), clock) as rt:
        # three errors of three: a share of 1, but too few to judge
        for n in range(3):
            assert send(rt, clock, n, gen(n, T0 + n, level="ERROR")) == []
        fired = send(rt, clock, 3, gen(3, T0 + 3))
        assert told(fired) == [("rule.firing", "new", "critical", 0.75)]
        data = fired[0]["data"]
        assert data["aggregate"] == "share" and data["matching"] == 3 and data["count"] == 4
        assert data["minCount"] == 4 and [s["traceId"] for s in data["samples"]] == ["t0", "t1", "t2"]
        # errors become rare: 3 of 61 is under 5%
        for n in range(4, 61):
            send(rt, clock, 10, gen(n, T0 + 10))
        assert [n["event"] for n in at(rt, clock, 10 + 60)] == ["rule.resolved"]


def test_spike_against_the_previous_window_and_a_catch_up_is_no_spike(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    rule = {
        "type": "spike",
        "value": "data.totalCost",
        "aggregate": "sum",
        "window": "10m",
        "factor": 3,
        "min_count": 2,
        "resolve_after": "1m",
    }
    with runtime(measuring(tmp_path, backend, **rule), clock) as rt:
        # nothing is judged until two whole windows have been seen since the first value: a window begun
        # before it would be no reference
        assert send(rt, clock, 0, gen(1, T0, cost=1.0), gen(2, T0 + 1, cost=1.0)) == []
        assert send(rt, clock, 600, gen(3, T0 + 600, cost=2.0), gen(4, T0 + 601, cost=2.0)) == []
        assert send(rt, clock, 760, gen(5, T0 + 760, cost=50.0)) == []
        assert at(rt, clock, 1200) == []
        fired = send(rt, clock, 1300, gen(6, T0 + 1300, cost=6.0), gen(7, T0 + 1301, cost=6.0))
        assert told(fired) == [("rule.firing", "new", "critical", 62.0)]
        data = fired[0]["data"]
        assert data["previous"] == 4.0 and data["factor"] == 3.0 and data["threshold"] == 12.0
        assert data["direction"] == "up"
        # the spike leaves the window: the next one has it as its reference, and nothing more comes
        assert at(rt, clock, 1920) == []
        assert [n["event"] for n in at(rt, clock, 1920 + 60)] == ["rule.resolved"]

    clock = Clock(T0 + 7200)
    with runtime(measuring(tmp_path / "catch-up", apart(backend, "catch-up"), **rule), clock) as rt:
        # two hours of steady costs read at once, after an outage: each lands in its own window
        catch_up = [gen(n, T0 + n * 30, cost=1.0) for n in range(240)]
        assert send(rt, clock, 7200, *catch_up) == []
        assert at(rt, clock, 7300) == []


def test_a_late_record_lands_in_its_own_window(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    with runtime(measuring(tmp_path, backend, **{**COST, "group_by": [], "window": "1m"}), clock) as rt:
        assert send(rt, clock, 0, gen(1, T0, cost=2.0)) == []
        # found by a sweep two minutes later: it belongs to the window it happened in, which is over
        assert send(rt, clock, 200, gen(2, T0 + 200, cost=1.0), gen(3, T0 + 10, cost=5.0)) == []
        state = rt.alerter.store.alert_state().groups()
        assert len(state) == 1
        reading = measure(rt.config.rules[0], state[0], T0 + 200)
        assert (reading.value, reading.count, reading.held) == (1.0, 1, False)
        # within the window it belongs to, it counts
        assert told(send(rt, clock, 210, gen(4, T0 + 190, cost=2.5))) == [("rule.firing", "new", "warning", 3.5)]


def test_a_restart_in_the_middle_of_a_window_neither_forgets_it_nor_fires_twice(
    tmp_path: Path, backend: dict[str, Any]
) -> None:
    clock = Clock(T0)
    config = measuring(tmp_path, backend, **COST)
    with runtime(config, clock) as rt:
        assert send(rt, clock, 0, gen(1, T0, cost=2.0)) == []
        assert told(send(rt, clock, 60, gen(2, T0 + 60, cost=1.5))) == [("rule.firing", "new", "warning", 3.5)]
    with runtime(config, clock) as rt:
        # the window still holds both costs: the next one is critical, told as an update of the same alert
        assert at(rt, clock, 90) == []
        assert told(send(rt, clock, 120, gen(3, T0 + 120, cost=2.0))) == [("rule.firing", "update", "critical", 5.5)]
    with runtime(config, clock) as rt:
        assert at(rt, clock, 150) == []
        # the costs of 0 s and 60 s leave the window: under the warning at 660 s, resolved 2 minutes later
        assert at(rt, clock, 660) == []
        assert [n["event"] for n in at(rt, clock, 780)] == ["rule.resolved"]
    assert [n["data"]["reason"] for n in notifications(rt)] == ["new", "update", "resolved"]


def test_percentiles_and_distinct(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    latency = {**COST, "value": "data.latency", "aggregate": "p95", "group_by": ["data.model"], "above": 10.0}
    del latency["warn_above"]
    with runtime(measuring(tmp_path, backend, **latency), clock) as rt:
        fast = [gen(n, T0 + n, latency=1.0 + n / 100) for n in range(90)]
        assert send(rt, clock, 90, *fast) == []
        slow = [gen(n, T0 + n, latency=20.0) for n in range(90, 100)]
        fired = send(rt, clock, 100, *slow)
        assert told(fired) and fired[0]["data"]["aggregate"] == "p95"
        # within the sketch's 1%
        assert abs(fired[0]["data"]["value"] - 20.0) <= 0.2
    users = {**COST, "aggregate": "distinct", "value": "data.userId", "group_by": ["data.model"], "above": 2}
    del users["warn_above"]
    with runtime(measuring(tmp_path / "distinct", apart(backend, "distinct"), **users), clock) as rt:
        clock.now = T0
        assert send(rt, clock, 0, *[gen(n, T0, user=f"u{n % 2}") for n in range(10)]) == []
        assert told(send(rt, clock, 1, gen(11, T0 + 1, user="u9"))) == [("rule.firing", "new", "critical", 3.0)]


def test_a_value_that_is_no_number_is_skipped_and_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(T0)
    with caplog.at_level(logging.WARNING), runtime(measuring(tmp_path, **COST), clock) as rt:
        assert send(rt, clock, 0, gen(1, T0, cost=None), gen(2, T0, cost=None), gen(3, T0, cost=6.0)) != []
        compiled = rt.alerter._measuring["errors"]
        assert compiled.skipped == 2
    said = [r for r in caplog.records if "cannot measure" in r.getMessage()]
    assert len(said) == 1 and "generation.created:o1" in said[0].getMessage()


def test_new_value_learns_then_tells_each_new_kind_once(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    rule = {
        "type": "new_value",
        "events": ["trace.updated"],
        "when": 'data.level == "ERROR"',
        "value": "data.statusMessage",
        "fingerprint": True,
        "learn": "1h",
        "remember": "1d",
        "resolve_after": "10m",
    }

    def err(n: int, ts: float, message: str) -> Event:
        return Event(
            id=f"trace.updated:t{n}:o{n}:1",
            type="trace.updated",
            timestamp=datetime.fromtimestamp(ts, UTC),
            source="poll",
            data={"traceId": f"t{n}", "level": "ERROR", "statusMessage": message, "name": "chat"},
        )

    with runtime(alert_config(tmp_path, {**rule, "group_wait": "0s"}, backend=backend), clock) as rt:
        # learned silently in the first hour
        assert send(rt, clock, 10, err(1, T0 + 10, "timeout after 30s calling /v1/users/42")) == []
        assert send(rt, clock, 3700, err(2, T0 + 3700, "timeout after 12s calling /v1/users/7")) == []
        new = send(rt, clock, 3800, err(3, T0 + 3800, "rate limited (request 'a1b2'), retry in 20s"))
        assert [n["event"] for n in new] == ["rule.firing"]
        data = new[0]["data"]
        assert data["fingerprint"] == 'rate limited (request "<str>"), retry in <n>s'
        assert data["value"] == "rate limited (request 'a1b2'), retry in 20s"
        assert data["group"] == {"value": data["fingerprint"]} and data["samples"][0]["traceId"] == "t3"
        # the same kind again keeps it open, and is not told again
        assert send(rt, clock, 3900, err(4, T0 + 3900, "rate limited (request 'ffff'), retry in 5s")) == []
        assert at(rt, clock, 3900 + 599) == []
        assert [n["event"] for n in at(rt, clock, 3900 + 600)] == ["rule.resolved"]
        # known now: seen again later, nothing
        assert send(rt, clock, 9000, err(5, T0 + 9000, "rate limited (request 'cafe'), retry in 1s")) == []
        # forgotten after `remember` without a sighting: new again
        assert [
            n["event"]
            for n in send(rt, clock, 9000 + 86400 + 1, err(6, T0 + 9000 + 86401, "timeout after 1s calling /a/b"))
        ] == ["rule.firing"]


def test_fingerprint_masks_what_varies() -> None:
    assert fingerprint("User 123e4567-e89b-12d3-a456-426614174000 not found at /var/lib/app/x.db") == (
        "User <uuid> not found at <path>"
    )
    assert fingerprint('KeyError: "user_42" in req-9f8e7d6c, took 0.25s') == 'KeyError: "<str>" in <id>, took <n>s'
    assert fingerprint("hash deadbeef01 at 0x7ffe then https://api.test/v1?q=1 failed") == (
        "hash <hex> at <hex> then <url> failed"
    )


def test_max_groups_sends_further_keys_to_one_overflow_group(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, backend: dict[str, Any]
) -> None:
    clock = Clock(T0)
    capped = {**COST, "max_groups": 3}
    del capped["warn_above"]
    with caplog.at_level(logging.WARNING), runtime(measuring(tmp_path, backend, **capped), clock) as rt:
        send(rt, clock, 0, *[gen(n, T0, user=f"u{n}", cost=1.0) for n in range(5)])
        send(rt, clock, 1, *[gen(n, T0 + 1, user=f"u{n}", cost=1.0) for n in range(5, 8)])
        labels = sorted(g.labels["data.userId"] for g in rt.alerter.store.alert_state().groups())
        assert labels == [OVERFLOW, "u0", "u1", "u2"]
        assert rt.alerter.overflowed == {"errors": 5}
        scraped = generate_latest(Metrics(rt).registry).decode()
        assert 'langfuse_poller_rule_overflow_total{rule="errors"} 5.0' in scraped
        # the overflow group is judged like any: the five keys' costs together
        fired = send(rt, clock, 2, gen(9, T0 + 2, user="u9", cost=1.0))
        assert told(fired) == [("rule.firing", "new", "critical", 6.0)]
        assert fired[0]["data"]["group"] == {"data.userId": OVERFLOW}
    said = [r for r in caplog.records if "max_groups" in r.getMessage()]
    assert len(said) == 1


def test_a_window_kept_under_another_window_or_aggregate_starts_afresh(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    with runtime(measuring(tmp_path, backend, **COST), clock) as rt:
        assert told(send(rt, clock, 0, gen(1, T0, cost=4.0))) == [("rule.firing", "new", "warning", 4.0)]
    # the same window with a p95: the stored bucket holds no sketch for the next cost to go into
    with runtime(measuring(tmp_path, backend, **{**COST, "aggregate": "p95"}), clock) as rt:
        assert at(rt, clock, 1) == []
        assert told(send(rt, clock, 2, gen(2, T0 + 2, cost=6.0))) == [("rule.firing", "update", "critical", 6.0)]
        [group] = rt.alerter.store.alert_state().groups()
        assert [bucket[1] for bucket in group.measure["b"]] == [1]
    # a longer window: buckets of the old width would lie in the future of the new one, never to leave
    with runtime(measuring(tmp_path, backend, **{**COST, "aggregate": "p95", "window": "1h"}), clock) as rt:
        send(rt, clock, 3, gen(3, T0 + 3, cost=1.0))
        [group] = rt.alerter.store.alert_state().groups()
        assert [bucket[0] for bucket in group.measure["b"]] == [int(T0 // 120)]


def test_a_notification_counts_the_values_its_measure_left_out(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    with runtime(measuring(tmp_path, backend, **{**COST, "group_by": [], "window": "1m"}), clock) as rt:
        # no number: left out of the group the batch made
        assert send(rt, clock, 0, gen(1, T0, cost=2.0), gen(2, T0, cost=None)) == []
        assert send(rt, clock, 100, gen(3, T0 + 100, cost=1.0)) == []
        # the windows that held 10 s were judged at 100 s: too late to count
        assert send(rt, clock, 130, gen(4, T0 + 130, cost=1.0), gen(5, T0 + 10, cost=9.0)) == []
        # no number, for the group kept in the state
        warned = send(rt, clock, 140, gen(6, T0 + 140, cost=None), gen(7, T0 + 140, cost=1.5))
        assert told(warned) == [("rule.firing", "new", "warning", 3.5)]
        assert (warned[0]["data"]["late"], warned[0]["data"]["skipped"]) == (1, 2)
        # each notification counts those since the one before
        assert at(rt, clock, 210) == []
        resolved = at(rt, clock, 400)
        assert told(resolved) == [("rule.resolved", "resolved", "warning", None)]
        assert (resolved[0]["data"]["late"], resolved[0]["data"]["skipped"]) == (0, 0)

    event = Event.from_json(json.dumps(warned[0]))
    assert dict(message_for(event).facts)["Left out"] == "1 too late, 2 not a number"
    assert "Left out" not in dict(message_for(Event.from_json(json.dumps(resolved[0]))).facts)
    assert fields(blocks_for(message_for(event), event))["Left out"] == "1 too late, 2 not a number"
    settings = PagerDutySettings(Secret(ROUTING_KEY), "error", "test", "http://127.0.0.1:9/", timedelta(seconds=1))
    assert settings.build("pd").body(event)["payload"]["custom_details"]["Left out"] == "1 too late, 2 not a number"


def test_a_removed_new_value_rule_forgets_what_it_knew(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)

    def config(*names: str) -> Config:
        rules = [
            {"name": name, "type": "new_value", "events": ["generation.created"], "value": "data.model"}
            for name in names
        ]
        notifiers = {"alerts": {"type": "jsonl", "path": str(tmp_path / "alerts.jsonl")}}
        settings = {"langfuse": {"base_url": "http://127.0.0.1:9", "public_key": "pk", "secret_key": "sk"}}
        return parse_config(
            {
                **settings,
                "state": {"path": str(tmp_path / "state.db")},
                "notifiers": notifiers,
                "rules": [{**rule, "notify": ["alerts"]} for rule in rules],
                **backend,
            },
            "test",
        )

    def kept(rt: Runtime, rule: str) -> tuple[float | None, dict[str, float], int]:
        """When the rule first ran and the values it knows, by the contract; and its rows or keys, read raw."""
        state = rt.alerter.store.alert_state()
        known = state.seen_values(rule, [group_key({"value": "m1"}), group_key({"value": "m2"})])
        if not backend:
            with closing(sqlite3.connect(tmp_path / "state.db")) as conn:
                rows = sum(
                    conn.execute(f"SELECT COUNT(*) FROM {table} WHERE rule = ?", (rule,)).fetchone()[0]
                    for table in ("alert_rules", "alert_values")
                )
            return state.rule_started(rule), known, rows
        from langfuse_poller.redis.queue import sync_client
        from langfuse_poller.redis.standby.alert_script import AlertKeys
        from langfuse_poller.redis.standby.keys import PollerKeys

        keys = AlertKeys(PollerKeys.of(rt.config.queue))
        client = sync_client(backend["queue"]["url"], 1.0)
        rows = len(client.keys(keys.values(rule) + "*")) + client.hexists(keys.rules, rule)
        client.close()
        return state.rule_started(rule), known, rows

    with runtime(config("kept", "gone"), clock) as rt:
        assert send(rt, clock, 10, gen(1, T0 + 10), gen(2, T0 + 10, model="m2")) == []
        for rule in ("kept", "gone"):
            started, known, rows = kept(rt, rule)
            assert started is not None and len(known) == 2 and rows > 0
    # a restart without the rule: nothing of it is left; the rule that stays keeps what it learned
    with runtime(config("kept"), clock) as rt:
        assert kept(rt, "gone") == (None, {}, 0)
        started, known, rows = kept(rt, "kept")
        assert started is not None and len(known) == 2 and rows > 0
        # a transaction sees its own forgetting, and one that fails forgets nothing
        with pytest.raises(RuntimeError), rt.alerter.store.write() as tx:
            state = tx.alert_state
            assert state.kept_rules() == ["kept"]
            state.forget_rule("kept")
            assert state.kept_rules() == [] and state.rule_started("kept") is None
            assert state.seen_values("kept", [group_key({"value": "m1"})]) == {}
            raise RuntimeError("rolled back")
        assert kept(rt, "kept") == (started, known, rows)
