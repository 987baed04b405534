"""Alert groups on injected time: group_wait, group_interval, repeat, resolve; storms, restarts, silences,
frequency and absence rules; the `test-rule` dry run.

The tests that take `backend` run against each alert state: SQLite, and Redis as standby pollers keep it (a
real redis-server, the runtime's replica holding the lease)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.alerting.groups import PROGRESS_RECHECK
from langfuse_poller.alerting.silence_book import SilenceBook
from langfuse_poller.alerting.silences import REFRESH, Silences, SqliteSilenceBook, add_silence, silence_book
from langfuse_poller.config import Config, parse_config
from langfuse_poller.errors import ConfigError
from langfuse_poller.events import Event
from langfuse_poller.registry import Registry, Router
from langfuse_poller.rules import Rule
from langfuse_poller.runtime import Runtime
from langfuse_poller.store import Store
from langfuse_poller.testing.fake_langfuse import FakeLangfuse

from .conftest import Clock, make_config

T0 = 1_800_000_000.0


def book(rt: Runtime) -> SilenceBook:
    """The silences the runtime's alerter reads: in SQLite, or in Redis with the Redis backend."""
    return silence_book(rt.config, rt.store)


def alert_config(
    tmp_path: Path, rule: dict[str, Any], *, forward: bool = False, backend: dict[str, Any] | None = None
) -> Config:
    rules = [{"name": "errors", "events": ["trace.updated"], "when": 'data.level == "ERROR"', "notify": ["alerts"]}]
    rules[0].update(rule)
    if forward:
        rules.append({"name": "archive", "events": ["trace.*"], "notify": ["archive"]})
    return parse_config(
        {
            "langfuse": {"base_url": "http://127.0.0.1:9", "public_key": "pk", "secret_key": "sk"},
            "state": {"path": str(tmp_path / "state.db")},
            "notifiers": {
                "alerts": {"type": "jsonl", "path": str(tmp_path / "alerts.jsonl")},
                "archive": {"type": "jsonl", "path": str(tmp_path / "archive.jsonl")},
            },
            "rules": rules,
            **(backend or {}),
        },
        "test",
    )


@contextmanager
def runtime(config: Config, clock: Clock) -> Iterator[Runtime]:
    rt = Runtime.build(config, handlers=Registry(), clock=clock)
    if rt.replica is not None:
        # with standby pollers only the leader moves the alert groups
        assert rt.replica.try_lead()
    rt.alerter.start()
    try:
        yield rt
    finally:
        rt.close()


def error(n: int, clock: Clock, *, env: str = "production", level: str = "ERROR") -> Event:
    return Event(
        id=f"trace.updated:t{n}:o{n}:1",
        type="trace.updated",
        timestamp=datetime.fromtimestamp(clock.now, UTC),
        source="poll",
        data={
            "traceId": f"t{n}",
            "observationId": f"o{n}",
            "name": f"trace-{n}",
            "level": level,
            "statusMessage": "upstream timeout",
            "environment": env,
            "url": f"http://langfuse.test/project/p/traces/t{n}",
        },
    )


def feed(rt: Runtime, events: list[Event]) -> None:
    """Store events as a poll stores a page: together, in one transaction, which records the alerting rules'
    matches into their groups as it stores them."""
    with rt.store.write() as tx:
        tx.enqueue_many([(event, rt.router.targets(event)) for event in events])
    rt.worker.run_until_idle()
    if rt.replica is not None:
        # the matches wait in Redis for the leader's next tick, which comes within a second
        rt.alerter.tick()


def at(rt: Runtime, clock: Clock, seconds: float) -> list[dict[str, Any]]:
    """Move to T0 + seconds, tick, deliver; the notifications sent by this tick."""
    clock.now = T0 + seconds
    before = len(notifications(rt))
    rt.alerter.tick()
    rt.worker.run_until_idle()
    return notifications(rt)[before:]


def notifications(rt: Runtime) -> list[dict[str, Any]]:
    path = rt.config.notifiers["alerts"].settings.path
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary(notices: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(n["event"], n["data"]["reason"], n["data"]["count"]) for n in notices]


def test_group_wait_interval_repeat_and_resolve(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    rule = {"group_wait": "30s", "group_interval": "5m", "repeat_interval": "20m", "resolve_after": "30m"}
    with runtime(alert_config(tmp_path, rule, backend=backend), clock) as rt:
        feed(rt, [error(n, clock) for n in range(3)])
        assert at(rt, clock, 29) == []
        first = at(rt, clock, 30)
        assert summary(first) == [("rule.firing", "new", 3)]
        data = first[0]["data"]
        assert data["new"] == 3 and data["group"] == {} and len(data["samples"]) == 3
        assert data["url"] == "http://langfuse.test/project/p/traces/t2"
        assert data["firstAt"] == data["lastAt"] == "2027-01-15T08:00:00.000Z"

        clock.now = T0 + 60
        feed(rt, [error(n, clock) for n in range(3, 5)])
        # new matches wait for group_interval after the last notification
        assert at(rt, clock, 329) == []
        update = at(rt, clock, 330)
        assert summary(update) == [("rule.firing", "update", 5)]
        assert update[0]["data"]["new"] == 2 and update[0]["data"]["lastAt"] == "2027-01-15T08:01:00.000Z"
        # an unchanged group is repeated after repeat_interval
        assert at(rt, clock, 330 + 20 * 60 - 1) == []
        assert summary(at(rt, clock, 330 + 20 * 60)) == [("rule.firing", "repeat", 5)]
        # no match for resolve_after (30m after the last, at 60 s): resolved, once
        assert at(rt, clock, 60 + 30 * 60 - 1) == []
        resolved = at(rt, clock, 60 + 30 * 60)
        assert summary(resolved) == [("rule.resolved", "resolved", 5)]
        assert resolved[0]["data"]["dedupKey"] == first[0]["data"]["dedupKey"]
        assert at(rt, clock, 5 * 3600) == []
        # the next match opens a new group: a new incarnation with its own notification ids
        clock.now = T0 + 5 * 3600
        feed(rt, [error(9, clock)])
        again = at(rt, clock, 5 * 3600 + 30)
        assert summary(again) == [("rule.firing", "new", 1)]
        ids = [n["id"] for n in notifications(rt)]
        assert len(ids) == len(set(ids))


def test_group_by_keeps_groups_apart(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    rule = {"group_by": ["data.environment"], "group_wait": "10s"}
    with runtime(alert_config(tmp_path, rule, backend=backend), clock) as rt:
        feed(rt, [error(1, clock, env="production"), error(2, clock, env="staging"), error(3, clock, env="production")])
        # a non-matching event (level WARNING) counts nowhere
        feed(rt, [error(4, clock, env="production", level="WARNING")])
        sent = at(rt, clock, 10)
        by_env = {n["data"]["group"]["data.environment"]: n["data"]["count"] for n in sent}
        assert by_env == {"production": 2, "staging": 1}
        assert len({n["data"]["dedupKey"] for n in sent}) == 2


def test_resolve_reports_matches_nobody_was_told_about(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    rule = {"group_wait": "10s", "group_interval": "1h", "resolve_after": "5m"}
    with runtime(alert_config(tmp_path, rule, backend=backend), clock) as rt:
        feed(rt, [error(1, clock)])
        assert summary(at(rt, clock, 10)) == [("rule.firing", "new", 1)]
        clock.now = T0 + 20
        feed(rt, [error(2, clock)])
        # group_interval (1h) has not passed when the group resolves: the match is told, then the resolve
        assert summary(at(rt, clock, 20 + 300)) == [("rule.firing", "update", 2), ("rule.resolved", "resolved", 2)]


def test_storm_of_ten_thousand_becomes_a_handful_that_counts_all(
    tmp_path: Path, fake: FakeLangfuse, backend: dict[str, Any]
) -> None:
    clock = fake.clock
    assert isinstance(clock, Clock)
    config = make_config(
        fake,
        tmp_path,
        **backend,
        poll={"start": "-1s", "settle": "0s", "interval": "10s"},
        notifiers={"alerts": {"type": "jsonl", "path": str(tmp_path / "alerts.jsonl")}},
        rules=[
            {
                "name": "errors",
                "events": ["trace.updated"],
                "when": 'data.level == "ERROR"',
                "group_by": ["data.environment"],
                "notify": ["alerts"],
            }
        ],
    )
    start = clock.now
    sent: list[dict[str, Any]] = []
    with runtime(config, clock) as rt:
        rt.poller.start_streams()
        for second in range(0, 20 * 60):
            clock.now = start + second
            if second < 60:
                # 10,000 errors within one minute, in two environments
                for n in range(second * 10_000 // 60, (second + 1) * 10_000 // 60):
                    env = "production" if n % 10 else "staging"
                    fake.add_trace(trace_id=f"t{n}", name="chat", environment=env, level="ERROR")
            if second % 10 == 0:
                rt.poller.poll_once()
                rt.worker.run_until_idle()
            rt.alerter.tick()
            rt.worker.run_until_idle()
        sent = notifications(rt)
    assert len(sent) <= 8, summary(sent)
    final: dict[str, int] = {}
    for notice in sent:
        if notice["event"] == "rule.resolved":
            final[notice["data"]["group"]["data.environment"]] = notice["data"]["count"]
    assert final == {"production": 9000, "staging": 1000}


def test_restart_neither_resends_nor_forgets_an_open_group(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    config = alert_config(
        tmp_path, {"group_wait": "30s", "group_interval": "1m", "resolve_after": "10m"}, backend=backend
    )
    with runtime(config, clock) as rt:
        feed(rt, [error(n, clock) for n in range(2)])
        assert summary(at(rt, clock, 30)) == [("rule.firing", "new", 2)]
        clock.now = T0 + 40
        feed(rt, [error(2, clock)])
    # a new process on the same state: nothing is sent again, the open group goes on
    with runtime(config, clock) as rt:
        assert at(rt, clock, 41) == []
        assert summary(at(rt, clock, 90)) == [("rule.firing", "update", 3)]
    with runtime(config, clock) as rt:
        assert at(rt, clock, 91) == []
        assert summary(at(rt, clock, 40 + 600)) == [("rule.resolved", "resolved", 3)]
        assert len(notifications(rt)) == 3


def test_a_match_is_counted_once_even_when_its_delivery_is_replayed(tmp_path: Path) -> None:
    clock = Clock(T0)
    with runtime(alert_config(tmp_path, {"group_wait": "10s"}), clock) as rt:
        feed(rt, [error(1, clock)])
        # the same event again (a re-read after a crash): the outbox dedupes it by id
        feed(rt, [error(1, clock)])
        assert summary(at(rt, clock, 10)) == [("rule.firing", "new", 1)]


def test_silence_counts_matches_without_sending_them(tmp_path: Path) -> None:
    clock = Clock(T0)
    config = alert_config(tmp_path, {"group_wait": "10s", "group_interval": "1m"}, forward=True)
    with runtime(config, clock) as rt:
        silence = add_silence(
            SqliteSilenceBook(rt.store), "errors", duration=3600, condition='data.environment == "staging"', now=T0
        )
        archive_silence = add_silence(SqliteSilenceBook(rt.store), "archive", duration=3600, now=T0)
        feed(rt, [error(1, clock, env="staging"), error(2, clock, env="staging")])
        assert at(rt, clock, 10) == []
        # a match outside the silence's condition alerts, and the notification counts the silenced ones
        # group_wait has passed since the group opened: the match is told as soon as it is recorded
        feed(rt, [error(3, clock, env="production")])
        sent = notifications(rt)
        assert summary(sent) == [("rule.firing", "new", 1)]
        assert sent[0]["data"]["silenced"] == 2
        # the forwarding rule's silence holds its events back too
        archive = rt.config.notifiers["archive"].settings.path
        assert not archive.exists() or archive.read_text() == ""
        assert SqliteSilenceBook(rt.store).expire(silence.id, T0 + 30)
        assert SqliteSilenceBook(rt.store).expire(archive_silence.id, T0 + 30)
        assert not SqliteSilenceBook(rt.store).expire(silence.id, T0 + 31)
        clock.now = T0 + 40
        feed(rt, [error(4, clock, env="staging")])
        assert summary(at(rt, clock, 80)) == [("rule.firing", "update", 2)]
        assert [json.loads(line)["id"] for line in archive.read_text().splitlines()] == ["trace.updated:t4:o4:1"]
        matched = rt.store._conn().execute("SELECT id, matched FROM silences ORDER BY id").fetchall()
        assert matched == [(silence.id, 2), (archive_silence.id, 3)]


def test_frequency_fires_at_the_threshold_and_resolves_when_it_clears(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    rule = {"type": "frequency", "threshold": 5, "window": "1m", "group_wait": "0s"}
    with runtime(alert_config(tmp_path, rule, backend=backend), clock) as rt:
        # four matches within a minute, then a gap: below the threshold, nothing
        for n in range(4):
            clock.now = T0 + n * 10
            feed(rt, [error(n, clock)])
        assert at(rt, clock, 40) == []
        assert at(rt, clock, 200) == []
        # five within a minute fire
        for n in range(5):
            clock.now = T0 + 300 + n * 5
            feed(rt, [error(10 + n, clock)])
        # group_wait is 0: the fifth match is told as soon as it is recorded
        fired = notifications(rt)
        assert summary(fired) == [("rule.firing", "new", 5)]
        assert at(rt, clock, 321) == []
        assert fired[0]["data"]["threshold"] == 5 and fired[0]["data"]["window"] == "60s"
        # the window (by the matches' timestamps) holds fewer than five once the first of them is a minute old;
        # groups that follow the poller's progress are looked at every few seconds
        assert at(rt, clock, 359) == []
        assert summary(at(rt, clock, 360 + PROGRESS_RECHECK)) == [("rule.resolved", "resolved", 5)]


def test_a_burst_in_a_page_that_comes_newest_first_still_fires(tmp_path: Path, backend: dict[str, Any]) -> None:
    # the API serves a page newest first; the rule must count its matches in event time, oldest first, or it
    # sees only the latest three (10 s, 20 s, 900 s: more than a minute apart) and misses the burst
    clock = Clock(T0)
    rule = {"type": "frequency", "threshold": 3, "window": "1m", "group_wait": "0s"}
    with runtime(alert_config(tmp_path, rule, backend=backend), clock) as rt:
        page = []
        for n, offset in enumerate((900, 20, 10, 0)):
            clock.now = T0 + offset
            page.append(error(n, clock))
        feed(rt, page)
        assert summary(notifications(rt)) == [("rule.firing", "new", 4)]


def test_absence_fires_when_nothing_arrives_and_resolves_on_the_next(
    tmp_path: Path, fake: FakeLangfuse, backend: dict[str, Any]
) -> None:
    clock = fake.clock
    assert isinstance(clock, Clock)
    config = make_config(
        fake,
        tmp_path,
        **backend,
        poll={"start": "now", "settle": "0s"},
        notifiers={"alerts": {"type": "jsonl", "path": str(tmp_path / "alerts.jsonl")}},
        rules=[
            {
                "name": "silent-app",
                "type": "absence",
                "events": ["trace.created"],
                "when": 'data.environment == "production"',
                "window": "15m",
                "repeat_interval": "1h",
                "notify": ["alerts"],
            }
        ],
    )
    start = clock.now

    def step(minutes: float) -> list[dict[str, Any]]:
        clock.now = start + minutes * 60
        before = len(notifications(rt))
        rt.poller.poll_once()
        rt.worker.run_until_idle()
        rt.alerter.tick()
        rt.worker.run_until_idle()
        return notifications(rt)[before:]

    with runtime(config, clock) as rt:
        rt.reader.backoff_initial = rt.reader.backoff_max = 0.001
        rt.poller.start_streams()
        fake.add_trace(trace_id="t1", name="chat", environment="production")
        assert step(1) == []
        # staging traffic does not count
        clock.now = start + 10 * 60
        fake.add_trace(trace_id="t2", name="chat", environment="staging")
        assert step(15) == []
        fired = step(16.5)
        assert [n["event"] for n in fired] == ["rule.firing"]
        assert fired[0]["data"]["kind"] == "absence" and fired[0]["data"]["window"] == "15m"
        assert step(30) == []
        # Langfuse unreachable: the poller's progress stops, and absence claims nothing new meanwhile
        fake.add_trace(trace_id="t3", name="chat", environment="production")
        fake.fail_next(1000, status=500)
        assert step(40) == []
        fake.clear_faults()
        resolved = step(41)
        assert [n["event"] for n in resolved] == ["rule.resolved"]
        assert resolved[0]["data"]["dedupKey"] == fired[0]["data"]["dedupKey"]


def test_rule_config_errors_name_the_key(tmp_path: Path) -> None:
    cases = [
        ({"type": "frequency", "window": "1m"}, "rules[0].threshold"),
        ({"type": "frequency", "threshold": 3}, "rules[0].window"),
        ({"type": "sometimes"}, "rules[0].type"),
        ({"group": False, "group_by": ["data.name"]}, "rules[0].group"),
        ({"group_by": ["data..name"]}, "rules[0].group_by"),
        ({"group_wait": "soon"}, "rules[0].group_wait"),
        ({"resolve_after": "0s"}, "rules[0].resolve_after"),
        ({"grup_by": ["data.name"]}, "rules[0].grup_by"),
    ]
    for rule, key in cases:
        with pytest.raises(ConfigError) as caught:
            alert_config(tmp_path, rule)
        assert caught.value.key == key, (rule, str(caught.value))


def test_which_rules_group(tmp_path: Path) -> None:
    def grouped(rule: dict[str, Any], notifier: dict[str, Any]) -> bool:
        config = parse_config(
            {
                "langfuse": {"base_url": "http://127.0.0.1:9", "public_key": "pk", "secret_key": "sk"},
                "notifiers": {"n": notifier},
                "rules": [{"name": "r", "events": ["*"], "notify": ["n"], **rule}],
            },
            "test",
        )
        return config.rules[0].grouping is not None

    jsonl = {"type": "jsonl", "path": str(tmp_path / "x.jsonl")}
    slack = {"type": "slack", "webhook_url": "https://hooks.slack.test/services/T/B/X"}
    assert not grouped({}, jsonl)
    assert grouped({"group_wait": "1m"}, jsonl)
    assert grouped({"type": "absence", "window": "5m"}, jsonl)
    assert grouped({}, slack)
    assert not grouped({"group": False}, slack)


def poll_config(
    fake: FakeLangfuse, tmp_path: Path, rule: dict[str, Any], start: str = "now", backend: dict[str, Any] | None = None
) -> Config:
    return make_config(
        fake,
        tmp_path,
        **(backend or {}),
        poll={"start": start, "settle": "0s"},
        notifiers={"alerts": {"type": "jsonl", "path": str(tmp_path / "alerts.jsonl")}},
        rules=[{"name": "r", "notify": ["alerts"], **rule}],
    )


def test_a_catch_up_is_not_a_silence_nor_a_burst(tmp_path: Path, fake: FakeLangfuse, backend: dict[str, Any]) -> None:
    clock = fake.clock
    assert isinstance(clock, Clock)
    # an hour of traffic, one error every two minutes, read in one catch-up
    for minute in range(0, 60, 2):
        fake.add_trace(level="ERROR", start_time=datetime.fromtimestamp(clock.now - 3600 + minute * 60, UTC))
    absence = {"type": "absence", "events": ["trace.created"], "window": "15m"}
    storm = {"type": "frequency", "events": ["trace.updated"], "threshold": 10, "window": "5m", "group_wait": "0s"}
    for rule in (absence, storm):
        # each rule polls from the start again: with Redis, under a queue (and poll state) of its own
        own = {"queue": {**backend["queue"], "name": f"q-{rule['type']}"}} if backend else {}
        with runtime(poll_config(fake, tmp_path / rule["type"], rule, start="-70m", backend=own), clock) as rt:
            rt.poller.start_streams()
            rt.alerter.start()
            rt.poller.poll_once()
            # the pages and their watermark are committed; their matches still wait in the outbox
            rt.alerter.tick()
            rt.worker.run_until_idle()
            rt.alerter.tick()
            clock.advance(30)
            rt.alerter.tick()
            rt.worker.run_until_idle()
            assert notifications(rt) == [], rule["type"]


def test_a_silenced_storm_stays_open_and_is_told_after(tmp_path: Path, backend: dict[str, Any]) -> None:
    clock = Clock(T0)
    rule = {"type": "frequency", "threshold": 3, "window": "1m", "group_wait": "0s", "group_interval": "1m"}
    with runtime(alert_config(tmp_path, rule, backend=backend), clock) as rt:
        feed(rt, [error(n, clock) for n in range(3)])
        assert summary(notifications(rt)) == [("rule.firing", "new", 3)]
        silence = add_silence(book(rt), "errors", duration=600, now=T0 + 10)
        # the storm goes on under the silence: no update, no resolve
        for second in range(10, 300, 10):
            clock.now = T0 + second
            feed(rt, [error(100 + second, clock)])
            rt.alerter.tick()
            rt.worker.run_until_idle()
        assert len(notifications(rt)) == 1
        book(rt).expire(silence.id, T0 + 300)
        clock.now = T0 + 300
        # the next match after the silence is told at once (group_interval passed long ago), with the silenced
        feed(rt, [error(999, clock)])
        sent = notifications(rt)[1:]
        assert [(n["data"]["reason"], n["data"]["count"], n["data"]["silenced"]) for n in sent] == [("update", 4, 29)]


def test_absence_is_silenced_and_resolved_groups_of_removed_rules_are_told(
    tmp_path: Path, backend: dict[str, Any]
) -> None:
    clock = Clock(T0)
    config = alert_config(tmp_path, {"type": "absence", "events": ["trace.created"], "window": "5m"}, backend=backend)
    with runtime(config, clock) as rt:
        silence = add_silence(book(rt), "errors", duration=600, now=T0)
        assert at(rt, clock, 400) == []
        book(rt).expire(silence.id, T0 + 401)
        fired = at(rt, clock, 410)
        assert [n["event"] for n in fired] == ["rule.firing"]
    # the rule is removed from the config: its open incident is resolved, not left open forever
    without = parse_config(
        {
            "langfuse": {"base_url": "http://127.0.0.1:9", "public_key": "pk", "secret_key": "sk"},
            "state": {"path": str(tmp_path / "state.db")},
            "notifiers": {"alerts": {"type": "jsonl", "path": str(tmp_path / "alerts.jsonl")}},
            **backend,
        },
        "test",
    )
    with runtime(without, clock) as rt:
        rt.worker.run_until_idle()
        rt.alerter.store.send_notices(clock.now)  # what the Redis backend sends itself (SQLite: nothing)
        resolved = notifications(rt)[-1]
        assert resolved["event"] == "rule.resolved"
        assert resolved["data"]["dedupKey"] == fired[0]["data"]["dedupKey"]
        assert rt.alerter.store.alert_state().groups() == []


def test_more_rule_config_errors(tmp_path: Path) -> None:
    cases = [
        ({"type": "frequency", "threshold": 1_000_000, "window": "1m"}, "rules[0].threshold"),
        ({"type": "absence", "window": "5m", "resolve_after": "1m"}, "rules[0].resolve_after"),
        ({"type": "frequency", "threshold": 2, "window": "5m", "resolve_after": "1m"}, "rules[0].resolve_after"),
        ({"group_wait": "10m", "resolve_after": "5m"}, "rules[0].resolve_after"),
        ({"group_by": ["environment"]}, "rules[0].group_by"),
        ({"name": "x" * 101, "group_wait": "1s"}, "rules[0].name"),
    ]
    for rule, key in cases:
        with pytest.raises(ConfigError) as caught:
            alert_config(tmp_path, rule)
        assert caught.value.key == key, (rule, str(caught.value))


def test_messages_name_the_trace_and_the_observation(tmp_path: Path) -> None:
    from langfuse_poller.notifiers.messages import message_for

    clock = Clock(T0)
    event = error(1, clock)
    event = Event(
        event.id, event.type, event.timestamp, "poll", {**event.data, "name": "retrieve-docs", "traceName": "chat"}
    )
    message = message_for(event)
    assert message.title == "🔴 Error in trace chat"
    facts = dict(message.facts)
    assert facts["Trace"] == "chat" and facts["Observation"] == "retrieve-docs"
    assert facts["Status message"] == "upstream timeout"
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "langfuse": {"base_url": "http://127.0.0.1:9", "public_key": "pk", "secret_key": "sk"},
                "notifiers": {
                    "slack": {
                        "type": "slack",
                        "webhook_url": "https://hooks.slack.test/services/T/B/X",
                        "channel": "#a",
                    }
                },
            },
            "test",
        )
    assert caught.value.key == "notifiers.slack.channel"


def test_a_silence_added_after_events_of_its_rule_were_routed_mutes_the_next_ones(tmp_path: Path) -> None:
    clock = Clock(T0)
    store = Store(tmp_path / "state.db")
    rules = [Rule("archive", ("trace.*",), None, ("archive",)), Rule("copy", ("trace.updated",), None, ("copy",))]
    router = Router(rules, Registry(), silences=Silences(SqliteSilenceBook(store), clock=clock))
    assert router.targets(error(1, clock)) == ["notifier:archive", "notifier:copy"]
    # what a caller gets is its own: changing it changes no later route
    router.targets(error(2, clock)).append("notifier:other")
    assert router.direct_targets(error(2, clock)) == ["notifier:archive", "notifier:copy"]
    add_silence(SqliteSilenceBook(store), "copy", duration=60, now=T0)
    clock.now = T0 + REFRESH  # silences are read again at most every REFRESH seconds
    assert router.targets(error(3, clock)) == ["notifier:archive"]
    clock.now = T0 + 60  # the silence ended
    assert router.targets(error(4, clock)) == ["notifier:archive", "notifier:copy"]
    store.close()


def test_a_group_round_trips_through_json_field_by_field() -> None:
    from dataclasses import fields

    from langfuse_poller.alerting.groups import Group
    from langfuse_poller.alerting.state import group_from_json, group_to_json

    group = Group("errors", "k", {"data.environment": "production"}, "firing", T0, count=3, told=["alerts"])
    group.arrivals = [T0 - 1, T0]
    group.samples = [{"id": "trace.updated:t1:o1:1"}]
    group.next_at = T0 + 30
    assert group_from_json(group_to_json(group)) == group
    # every field is written, with no list to keep up to date; one the text lacks (written before it existed)
    # gets its default
    stored = json.loads(group_to_json(group))
    assert set(stored) == {f.name for f in fields(Group)}
    del stored["arrivals"]
    assert group_from_json(json.dumps(stored)).arrivals == []
