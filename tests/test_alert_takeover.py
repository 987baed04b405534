"""Alerts across a takeover: with standby pollers the alert state lives in Redis, under the lease's token.

Real `run` processes killed with -9 while an alert group is open, a loopback PagerDuty stand-in, a real
redis-server; and, in process on an injected clock, a paused leader fenced off, and frequency and absence windows
that go on in the new leader.
"""

# the fixtures `cli`, `langfuse`, `redis`, `alertmanager` and `recorder` come from other test modules, and each
# test names them
# ruff: noqa: F811

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.alerting.groups import open_group
from langfuse_poller.config import DeliveryConfig
from langfuse_poller.events import test_event as make_test_event
from langfuse_poller.redis.queue import sync_client
from langfuse_poller.redis.standby.alert_script import AlertKeys, group_field
from langfuse_poller.redis.standby.alert_state import RedisAlertStore
from langfuse_poller.redis.standby.keys import PollerKeys
from langfuse_poller.redis.standby.lease import Deposed
from langfuse_poller.redis.standby.replica import PollCancel, Replica
from langfuse_poller.rules import Rule
from langfuse_poller.runtime import Runtime
from langfuse_poller.testing.fake_langfuse import FakeLangfuse
from tests.conftest import Clock, make_config, runtime_for
from tests.fake_alerting import FakePagerDuty
from tests.redis_cluster import RedisClusterServer
from tests.test_alertmanager import Alertmanager, Recorder, alertmanager, recorder  # noqa: F401
from tests.test_cli import Cli, cli, langfuse, q, read_jsonl, wait_for  # noqa: F401
from tests.test_queue_redis import QUEUE, RedisServer, redis, redis_server  # noqa: F401
from tests.test_standby import TAKEOVER_BOUND, Proc, keys_for, leads, standby_config, took_over_within

pytest.importorskip("bullmq", reason="the Python bullmq package is not installed (pip install -e '.[redis]')")

pytestmark = pytest.mark.timeout(90)


def paging_rule(pagerduty: FakePagerDuty, **timers: str) -> str:
    """A PagerDuty notifier and an alerting rule on ERROR traces, with these timers."""
    keys = "".join(f"{key} = {q(value)}\n" for key, value in timers.items())
    return (
        f'[notifiers.pd]\ntype = "pagerduty"\nrouting_key = "r"\nevents_url = {q(pagerduty.events_url)}\n\n'
        '[[rules]]\nname = "errors"\nevents = ["trace.updated"]\nwhen = \'data.level == "ERROR"\'\n'
        f'notify = ["pd"]\n{keys}'
    )


def replica(cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, server: RedisServer, name: str, extra: str) -> Proc:
    config = standby_config(tmp_path, langfuse, server, name, extra)
    return Proc(cli, tmp_path, name, "run", "--config", str(config))


def actions(pagerduty: FakePagerDuty) -> list[tuple[str, str]]:
    return [(event["event_action"], event["dedup_key"]) for event in pagerduty.events()]


def groups_in(server: RedisServer) -> dict[str, Any]:
    """The alert groups in Redis: field -> the group as stored."""
    raw = sync_client(server.url, 1.0).hgetall(AlertKeys(keys_for(server)).groups)
    return {field: json.loads(text) for field, text in raw.items()}


def outbox_left(server: RedisServer) -> int:
    """How many alert notifications wait in Redis to be sent."""
    return int(sync_client(server.url, 1.0).hlen(AlertKeys(keys_for(server)).outbox))


@pytest.fixture
def pagerduty() -> Iterator[FakePagerDuty]:
    with FakePagerDuty() as service:
        yield service


@contextmanager
def leader_and_standby(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, server: RedisServer, extra: str
) -> Iterator[tuple[Proc, Proc]]:
    """Replica a leading and b standing by; both stopped afterwards, and neither may have printed a traceback."""
    procs: list[Proc] = []
    try:
        a = replica(cli, tmp_path, langfuse, server, "a", extra)
        procs.append(a)
        assert wait_for(lambda: leads(a), 15), a.text()
        b = replica(cli, tmp_path, langfuse, server, "b", extra)
        procs.append(b)
        assert wait_for(lambda: "standby poller" in b.text(), 15), b.text()
        yield a, b
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.text(), proc.text()


def test_kill_9_after_a_group_fired_the_new_leader_resolves_it_once(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis: RedisServer, pagerduty: FakePagerDuty
) -> None:
    extra = paging_rule(pagerduty, group_wait="0s", resolve_after="12s")
    with leader_and_standby(cli, tmp_path, langfuse, redis, extra) as (a, b):
        langfuse.add_trace(level="ERROR")
        assert wait_for(lambda: actions(pagerduty), 15), a.text()
        [(action, dedup_key)] = actions(pagerduty)
        assert action == "trigger"
        # killed once the leader recorded the trigger as sent: a kill between the send and its record repeats it,
        # which the contract allows (one per kill), and which made this test fail now and then under load
        assert wait_for(lambda: outbox_left(redis) == 0, 5), a.text()
        a.kill9()
        killed_at = time.monotonic()
        took_over_within(b, killed_at, TAKEOVER_BOUND)
        # the dead leader's group is the new leader's now: resolved once its resolve_after ran out
        assert wait_for(lambda: len(actions(pagerduty)) >= 2, 30), b.text()
        time.sleep(1.5)  # a late second firing or resolve would land now
        assert actions(pagerduty) == [("trigger", dedup_key), ("resolve", dedup_key)]
        assert groups_in(redis) == {}


def test_kill_9_within_group_wait_makes_exactly_one_firing(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis: RedisServer, pagerduty: FakePagerDuty
) -> None:
    extra = paging_rule(pagerduty, group_wait="6s", resolve_after="30s")
    with leader_and_standby(cli, tmp_path, langfuse, redis, extra) as (a, b):
        langfuse.add_trace(level="ERROR")
        # the leader recorded the match (group_wait runs), and has not told anyone yet
        assert wait_for(lambda: groups_in(redis), 15), a.text()
        assert actions(pagerduty) == []
        a.kill9()
        took_over_within(b, time.monotonic(), TAKEOVER_BOUND)
        assert wait_for(lambda: actions(pagerduty), 15), b.text()
        time.sleep(1.5)
        [(action, _)] = actions(pagerduty)
        assert action == "trigger"
        [group] = groups_in(redis).values()
        assert group["count"] == 1 and group["notified_count"] == 1 and group["told"] == ["pd"]


def test_a_stopped_leader_that_wakes_past_its_lease_changes_no_alert_state(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis: RedisServer, pagerduty: FakePagerDuty
) -> None:
    extra = paging_rule(pagerduty, group_wait="0s", resolve_after="4s")
    with leader_and_standby(cli, tmp_path, langfuse, redis, extra) as (a, b):
        langfuse.add_trace(level="ERROR")
        assert wait_for(lambda: actions(pagerduty), 15), a.text()
        # stopped between PagerDuty's answer and the record that the trigger was sent, the leader would leave it
        # to be sent again by the next one (at least once, a repeat per crash): stopped once it is recorded
        assert wait_for(lambda: outbox_left(redis) == 0, 5), a.text()
        a.proc.send_signal(signal.SIGSTOP)
        took_over_within(b, time.monotonic(), TAKEOVER_BOUND)
        assert wait_for(lambda: len(actions(pagerduty)) >= 2, 20), b.text()
        a.proc.send_signal(signal.SIGCONT)
        assert wait_for(lambda: "stepping down to standby" in a.text(), 10), a.text()
        time.sleep(2.0)
        [(_, dedup_key)] = {(None, key) for _, key in actions(pagerduty)}
        assert actions(pagerduty) == [("trigger", dedup_key), ("resolve", dedup_key)]
        assert groups_in(redis) == {}


# --- in process, on an injected clock ----------------------------------------------------------------------


def test_a_deposed_leaders_alert_write_is_refused_whole(redis: RedisServer) -> None:
    keys = keys_for(redis)
    rule = Rule("errors", ("trace.updated",), None, ("pd",))
    made = []
    for name in ("a", "b"):
        client = sync_client(redis.url, 1.0)
        replica = Replica(client, keys, name, 30.0, PollCancel(threading.Event()))
        store = RedisAlertStore(
            client, keys, token=replica.token, delivery=DeliveryConfig(), on_deposed=replica.deposed
        )
        made.append((replica, store))
    (a, a_state), (b, b_state) = made
    try:
        a.tick()
        b.tick()
        assert (a.role, b.role) == ("leader", "standby")
        with a_state.write(1000.0) as tx:
            group = open_group(rule, "k", {}, 1000.0)
            group.count = 1
            group.next_at = 1030.0
            tx.alert_state.save(group)
        client = sync_client(redis.url, 1.0)
        alert_keys = AlertKeys(keys)
        before = {key: client.dump(key) for key in (alert_keys.groups, alert_keys.due)}
        # a is paused past its lease: its key expires, b takes over, a still believes it leads
        client.delete(keys.lease)
        b.tick()
        assert b.role == "leader" and a.token() is not None
        with pytest.raises(Deposed), a_state.write(1031.0) as tx:
            late = tx.alert_state.group("errors", "k")
            assert late is not None
            late.count = 99
            tx.alert_state.save(late)
            assert tx.enqueue(make_test_event("rule.firing"), ["notifier:pd"])
        assert {key: client.dump(key) for key in before} == before, "nothing changed in Redis"
        assert client.hlen(alert_keys.outbox) == 0
        assert a.role == "standby" and a_state.alert_term() is None
        # the new leader sees the group as the old one left it, and writes it
        kept = b_state.alert_state().group("errors", "k")
        assert kept is not None and kept.count == 1 and kept.next_at == 1030.0
        with b_state.write(1032.0) as tx:
            assert [g.key for g in tx.alert_state.due(1032.0)] == ["k"]
    finally:
        a.close()
        b.close()


def pair(
    fake: FakeLangfuse,
    tmp_path: Path,
    server: RedisServer,
    clock: Clock,
    rule: dict[str, Any] | list[dict[str, Any]],
    stack: ExitStack,
    notifier: dict[str, Any] | None = None,
) -> tuple[Runtime, Runtime]:
    """Two replicas of one queue in process, a leading, with this rule (or these); their alerts go to one notifier,
    by default a jsonl file."""
    rules = [rule] if isinstance(rule, dict) else rule
    runtimes = []
    for name in ("a", "b"):
        config = make_config(
            fake,
            tmp_path / name,
            queue={"backend": "redis", "url": server.url, "name": QUEUE, "standby": True, "replica": name},
            notifiers={"alerts": notifier or {"type": "jsonl", "path": str(tmp_path / "alerts.jsonl")}},
            delivery={"backoff": "1s", "max_attempts": 5},
            rules=[{"notify": ["alerts"], **each} for each in rules],
        )
        runtimes.append(stack.enter_context(runtime_for(config, clock)))
    a, b = runtimes
    assert a.replica is not None and b.replica is not None
    a.replica.tick()
    b.replica.tick()
    assert (a.replica.role, b.replica.role) == ("leader", "standby")
    a.poller.start_streams()  # what the daemon does at a leader's first poll
    for rt in runtimes:
        rt.alerter.start()
    return a, b


def take_over(dead: Runtime, heir: Runtime, server: RedisServer) -> None:
    """`dead` stops renewing (killed): its lease key expires; `heir` takes the lease at its next tick."""
    assert dead.replica is not None and heir.replica is not None
    dead.replica.lease.forget()
    sync_client(server.url, 1.0).delete(keys_for(server).lease)
    heir.replica.tick()
    assert heir.replica.role == "leader"
    heir.poller.start_streams()


def step(clock: Clock, seconds: float, leader: Runtime, others: list[Runtime], fake: FakeLangfuse, n: int) -> None:
    """`seconds` later, `n` new ERROR traces; the leader polls; everyone ticks (only the leader moves groups)."""
    clock.advance(seconds)
    for _ in range(n):
        fake.add_trace(level="ERROR", start_time=datetime.fromtimestamp(clock.now - 1, UTC))
    assert not leader.poller.poll_once().errors
    for rt in [leader, *others]:
        rt.worker.run_until_idle()
        rt.alerter.tick()


def test_a_frequency_window_keeps_its_count_across_a_takeover(redis: RedisServer, tmp_path: Path) -> None:
    clock = Clock()
    rule = {
        "name": "storm",
        "type": "frequency",
        "events": ["trace.updated"],
        "when": 'data.level == "ERROR"',
        "threshold": 4,
        "window": "5m",
        "group_wait": "0s",
    }
    with FakeLangfuse(clock=clock) as fake, ExitStack() as stack:
        a, b = pair(fake, tmp_path, redis, clock, rule, stack)
        step(clock, 30, a, [b], fake, 3)
        assert read_jsonl(tmp_path / "alerts.jsonl") == []
        take_over(a, b, redis)
        # the fourth match within the window, counted by the new leader on top of the three before
        step(clock, 30, b, [a], fake, 1)
        fired = read_jsonl(tmp_path / "alerts.jsonl")
        assert [(n["event"], n["data"]["count"]) for n in fired] == [("rule.firing", 4)]


def test_an_absence_window_goes_on_across_a_takeover(redis: RedisServer, tmp_path: Path) -> None:
    clock = Clock()
    rule = {"name": "silent-app", "type": "absence", "events": ["trace.created"], "window": "5m"}
    with FakeLangfuse(clock=clock) as fake, ExitStack() as stack:
        a, b = pair(fake, tmp_path, redis, clock, rule, stack)
        for _ in range(4):
            step(clock, 60, a, [b], fake, 1)
        take_over(a, b, redis)
        # the new leader measures from the last trace the old one saw: four quiet minutes are not an absence
        for _ in range(4):
            step(clock, 60, b, [a], fake, 0)
        assert read_jsonl(tmp_path / "alerts.jsonl") == []
        for _ in range(2):
            step(clock, 60, b, [a], fake, 0)
        fired = [n["event"] for n in read_jsonl(tmp_path / "alerts.jsonl")]
        assert fired == ["rule.firing"]
        step(clock, 60, b, [a], fake, 1)
        assert [n["event"] for n in read_jsonl(tmp_path / "alerts.jsonl")] == ["rule.firing", "rule.resolved"]


def test_a_metric_window_and_the_values_a_new_value_rule_knows_go_on_across_a_takeover(
    redis: RedisServer, tmp_path: Path
) -> None:
    clock = Clock()
    errors = {"events": ["trace.updated"], "when": 'data.level == "ERROR"', "group_wait": "0s"}
    rules = [
        {**errors, "name": "busy", "type": "metric", "aggregate": "count", "window": "10m", "above": 3},
        {
            **errors,
            "name": "new-name",
            "type": "new_value",
            "value": "data.name",
            "learn": "0s",
            "remember": "1d",
            "resolve_after": "1m",
        },
    ]

    def traces(seconds: float, leader: Runtime, other: Runtime, *names: str) -> list[tuple[str, str, Any]]:
        before = len(read_jsonl(tmp_path / "alerts.jsonl"))
        clock.advance(seconds)
        for name in names:
            fake.add_trace(name=name, level="ERROR", start_time=datetime.fromtimestamp(clock.now - 1, UTC))
        step(clock, 0, leader, [other], fake, 0)
        told = read_jsonl(tmp_path / "alerts.jsonl")[before:]
        return sorted((n["event"], n["data"]["rule"], n["data"]["value"]) for n in told)

    with FakeLangfuse(clock=clock) as fake, ExitStack() as stack:
        a, b = pair(fake, tmp_path, redis, clock, rules, stack)
        assert traces(30, a, b, "alpha", "alpha", "alpha") == [("rule.firing", "new-name", "alpha")]
        assert traces(90, a, b) == [("rule.resolved", "new-name", "alpha")]
        take_over(a, b, redis)
        # the window holds the three errors the old leader counted: with two more, five of them; and "alpha",
        # resolved but known, is not new to the new leader
        assert traces(30, b, a, "alpha", "beta") == [
            ("rule.firing", "busy", 5.0),
            ("rule.firing", "new-name", "beta"),
        ]
    if isinstance(redis, RedisClusterServer):
        # APPLY names the token key alone and builds the rest from the prefix: on a cluster, all in one slot
        from redis.crc import key_slot

        keys, prefix = redis.keys(), AlertKeys(keys_for(redis)).prefix
        for name in ("groups", "states", "due", "keys:busy", "rules", "values:new-name", "values:new-name:by-time"):
            assert f"{prefix}:alert-{name}" in keys, sorted(keys)
        slot = key_slot(keys_for(redis).namespace.encode())
        assert {key for key, at in keys.items() if at != slot} == set()


def test_status_and_metrics_show_the_alert_state_and_what_a_standby_would_take_over(
    redis: RedisServer, tmp_path: Path
) -> None:
    from langfuse_poller.service.metrics import StateCollector
    from langfuse_poller.service.status import collect_status, render_status

    clock = Clock()
    rule = {"name": "errors", "events": ["trace.updated"], "when": 'data.level == "ERROR"', "group_wait": "10m"}
    with FakeLangfuse(clock=clock) as fake, ExitStack() as stack:
        a, b = pair(fake, tmp_path, redis, clock, rule, stack)
        step(clock, 30, a, [b], fake, 2)

        def gauges(rt: Runtime) -> dict[str, float]:
            found = {}
            for metric in StateCollector(rt).collect():
                for sample in metric.samples:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    found[f"{sample.name}{{{labels}}}"] = sample.value
            return found

        on_a, on_b = gauges(a), gauges(b)
        assert on_b["langfuse_poller_alert_groups_to_take_over{}"] == 1
        assert on_a["langfuse_poller_alert_groups_to_take_over{}"] == 0
        for found in (on_a, on_b):
            assert found["langfuse_poller_alert_state_backend{backend=redis}"] == 1
            assert found["langfuse_poller_alert_groups{rule=errors,state=firing}"] == 1
        report = collect_status(b.config, now=clock.now)
        assert report["alert_state"]["backend"] == "redis" and report["alert_state"]["error"] is None
        [group] = report["alerts"]
        assert (group["rule"], group["state"], group["matches"]) == ("errors", "firing", 2)
        text = render_status(report)
        assert (
            f"alert state in Redis at {redis.url.split(',')[0]}" in text
            and "1 open groups, which a standby takes over" in text
        )


def test_a_resolve_waits_for_the_firing_that_is_retried_before_it(
    redis: RedisServer, tmp_path: Path, pagerduty: FakePagerDuty
) -> None:
    clock = Clock()
    rule = {
        "name": "errors",
        "events": ["trace.updated"],
        "when": 'data.level == "ERROR"',
        "group_wait": "0s",
        "resolve_after": "20s",
    }
    notifier = {"type": "pagerduty", "routing_key": "r", "events_url": pagerduty.events_url}
    with FakeLangfuse(clock=clock) as fake, ExitStack() as stack:
        a, b = pair(fake, tmp_path, redis, clock, rule, stack, notifier)
        pagerduty.fail_next(500, count=3)
        step(clock, 5, a, [b], fake, 1)  # the trigger fails: again after the backoff, 1 s, then 2 s
        assert actions(pagerduty) == []
        # the group resolves while its trigger still waits to be retried: PagerDuty must get the trigger first
        step(clock, 20, a, [b], fake, 0)
        assert actions(pagerduty) == []
        for _ in range(4):
            step(clock, 2, a, [b], fake, 0)
        assert [action for action, _ in actions(pagerduty)] == ["trigger", "resolve"]


def test_groups_kept_in_sqlite_before_are_handed_over_to_redis(redis: RedisServer, tmp_path: Path) -> None:
    from tests.test_alerting import T0, alert_config, at, error, feed, runtime, summary

    clock = Clock(T0)
    rule = {"group_wait": "10s", "resolve_after": "5m"}
    with runtime(alert_config(tmp_path, rule), clock) as rt:
        feed(rt, [error(1, clock)])
        fired = at(rt, clock, 10)
        assert summary(fired) == [("rule.firing", "new", 1)]
    # the same replica, now a standby poller: its open group moves to Redis, and is neither told again nor left open
    backend = {"queue": {"backend": "redis", "url": redis.url, "name": QUEUE, "standby": True, "lease": "10m"}}
    with runtime(alert_config(tmp_path, rule, backend=backend), clock) as rt:
        assert rt.store.alert_state().groups() == []
        assert at(rt, clock, 20) == []
        resolved = at(rt, clock, 300)
        assert summary(resolved) == [("rule.resolved", "resolved", 1)]
        assert resolved[0]["data"]["dedupKey"] == fired[0]["data"]["dedupKey"]


def test_status_and_metrics_read_no_window_of_a_group_that_is_not_open(tmp_path: Path) -> None:
    from contextlib import contextmanager

    # a p95 group's window is tens of kB of JSON: a scrape or a `status` that parsed every group would take
    # a second at a hundred of them. Counting reads a small index; only the open groups are read whole
    with contextmanager(redis_server)(tmp_path, durable=False) as server:
        client = sync_client(server.url, 1.0)
        keys = PollerKeys(QUEUE)
        leader = Replica(client, keys, "a", 30.0, PollCancel(threading.Event()))
        store = RedisAlertStore(client, keys, token=leader.token, delivery=DeliveryConfig())
        rule = Rule("lat", ("generation.created",), None, ("pd",))
        try:
            leader.tick()
            with store.write(1000.0) as tx:
                for n, state in enumerate(["firing", "pending", "watching", "watching"]):
                    group = open_group(rule, f"k{n}", {}, 1000.0)
                    group.state, group.next_at = state, 1100.0 + n
                    group.measure = {"b": [[n, 1, 1.0, 1.0, 1.0, {str(b): 1 for b in range(2000)}, None]]}
                    tx.alert_state.save(group)
                # the transaction's own writes count before they are kept
                assert tx.alert_state.firing_count() == 1
            assert store.alert_state().counts() == [("lat", "firing", 1), ("lat", "pending", 1), ("lat", "watching", 2)]
            with store.write(1001.0) as tx:
                tx.alert_state.delete("lat", "k0")
                assert tx.alert_state.counts() == [("lat", "pending", 1), ("lat", "watching", 2)]
            size = len(client.hget(AlertKeys(keys).groups, group_field("lat", "k1")))
            before = client.info("stats")["total_net_output_bytes"]
            state = store.alert_state()
            assert state.counts() == [("lat", "pending", 1), ("lat", "watching", 2)]
            assert (state.firing_count(), state.next_due_after(1101.5)) == (0, 1102.0)
            assert [group.key for group in state.open_groups()] == ["k1"]
            # what Redis sent: the one open group whole, and little else (the three groups are four times that)
            sent = client.info("stats")["total_net_output_bytes"] - before
            assert size < sent < 1.5 * size, (size, sent)
        finally:
            leader.close()


def test_a_new_leader_re_sends_to_alertmanager_the_open_groups_the_old_one_told(
    redis: RedisServer, tmp_path: Path, alertmanager: Alertmanager, recorder: Recorder
) -> None:
    from langfuse_poller.alerting.resend import Resender
    from langfuse_poller.service.daemon import Daemon

    # in the past: Alertmanager refuses an alert that starts after the end it gives it (now + resolve_timeout)
    clock = Clock(time.time() - 300)
    rule = {
        "name": "errors",
        "events": ["trace.updated"],
        "when": 'data.level == "ERROR"',
        "group_wait": "0s",
        "resolve_after": "1h",
    }
    # an HA list: the real Alertmanager keeps the alert, the recorder shows every request
    notifier = {"type": "alertmanager", "url": [alertmanager.url, recorder.url], "resend_interval": "30s"}
    with FakeLangfuse(clock=clock) as fake, ExitStack() as stack:
        a, b = pair(fake, tmp_path, redis, clock, rule, stack, notifier)
        daemons = [Daemon(rt) for rt in (a, b)]
        for daemon in daemons:
            daemon.resender = Resender(clock=clock)

        def resend() -> None:
            for daemon in daemons:
                daemon.resend_job()

        step(clock, 5, a, [b], fake, 1)
        [(_, _, [told])] = recorder.requests
        clock.advance(30)
        resend()
        # the leader re-sends the group it told; the standby tells nobody
        assert len(recorder.requests) == 2
        take_over(a, b, redis)
        clock.advance(30)
        resend()
        # the new leader re-sends what the old one told, as the same alert; the deposed one sends nothing
        assert len(recorder.requests) == 3
        [again] = recorder.requests[-1][2]
        assert again["labels"] == told["labels"] and again["startsAt"] == told["startsAt"]
        [active] = alertmanager.active()
        assert active["labels"] == told["labels"]
