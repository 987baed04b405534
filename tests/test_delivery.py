"""Durable delivery: retries, isolation of failing targets, dead letters and replay, signed webhooks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from langfuse_poller.config import DeliveryConfig, parse_config
from langfuse_poller.delivery import DeliveryWorker
from langfuse_poller.events import Event
from langfuse_poller.registry import Registry
from langfuse_poller.runtime import Runtime
from langfuse_poller.store import Store, Transaction
from langfuse_poller.webhooks.signing import verify

from .receivers import receiver


def event(n: int, event_type: str = "trace.created") -> Event:
    return Event(
        id=f"{event_type}:t{n}",
        type=event_type,
        timestamp=datetime.fromtimestamp(1_800_000_000 + n, UTC),
        source="test",
        data={"traceId": f"t{n}", "level": "ERROR" if n % 2 else "DEFAULT"},
    )


def config_for(tmp_path: Path, notifiers: dict[str, Any], **delivery: Any) -> Any:
    return parse_config(
        {
            "langfuse": {"base_url": "http://127.0.0.1:9", "public_key": "pk", "secret_key": "sk"},
            "state": {"path": str(tmp_path / "state.db")},
            "delivery": {"backoff": "10ms", "max_backoff": "50ms", **delivery},
            "notifiers": notifiers,
            "rules": [{"name": "all", "events": ["*"], "notify": list(notifiers)}],
        },
        "test",
    )


@contextmanager
def runtime(config: Any, handlers: Registry | None = None) -> Iterator[Runtime]:
    rt = Runtime.build(config, handlers=handlers or Registry())
    try:
        yield rt
    finally:
        rt.close()


def enqueue(rt: Runtime, events: list[Event]) -> None:
    with rt.store.write() as tx:
        for e in events:
            tx.enqueue(e, rt.router.targets(e))


def drain_until(rt: Runtime, done: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done():
        rt.worker.run_until_idle()
        time.sleep(0.02)


def test_signed_webhook_like_langfuse(tmp_path: Path) -> None:
    with receiver() as hook:
        config = config_for(tmp_path, {"hook": {"type": "webhook", "url": hook.url, "secret": "lf-whsec_abc"}})
        with runtime(config) as rt:
            enqueue(rt, [event(1)])
            rt.worker.run_until_idle()
    [request] = hook.received
    assert request.headers["webhook-id"] == "trace.created:t1"
    assert request.headers["content-type"] == "application/json"
    assert verify(["lf-whsec_abc"], request.headers["x-langfuse-signature"], request.body, tolerance=60)
    assert not verify(["other"], request.headers["x-langfuse-signature"], request.body, tolerance=60)
    assert request.json["event"] == "trace.created" and request.json["data"]["traceId"] == "t1"


def test_retries_until_the_endpoint_recovers_in_timestamp_order(tmp_path: Path) -> None:
    with receiver(lambda n: 503 if n < 3 else 200) as hook:
        config = config_for(tmp_path, {"hook": {"type": "webhook", "url": hook.url}})
        with runtime(config) as rt:
            enqueue(rt, [event(n) for n in (3, 1, 2)])
            drain_until(rt, lambda: len(hook.received) == 3)
            assert rt.store.queue_depth() == 0
    assert hook.ids() == ["trace.created:t1", "trace.created:t2", "trace.created:t3"]


def test_a_failing_target_never_delays_the_others(tmp_path: Path) -> None:
    with receiver(lambda n: 500) as down, receiver(delay=0) as up, receiver(delay=1.0) as slow:
        config = config_for(
            tmp_path,
            {
                "down": {"type": "webhook", "url": down.url},
                "up": {"type": "webhook", "url": up.url},
                "slow": {"type": "webhook", "url": slow.url},
            },
            max_attempts=1000,
        )
        with runtime(config) as rt:
            enqueue(rt, [event(n) for n in range(20)])
            started = time.monotonic()
            rt.worker.kick()
            while len(up.received) < 20 and time.monotonic() - started < 5:
                time.sleep(0.01)
            elapsed = time.monotonic() - started
            assert len(up.received) == 20
            # the slow target has not even finished its second request when the fast one is done
            assert elapsed < 2.0 and len(slow.received) <= 2
            pending = rt.store.pending_by_target()
            assert pending["notifier:down"] == 20
            rt.cancel.set()


def test_refused_events_become_dead_letters_and_replay(tmp_path: Path) -> None:
    answers = {"status": 400}
    with receiver(lambda n: answers["status"]) as hook:
        config = config_for(tmp_path, {"hook": {"type": "webhook", "url": hook.url}})
        with runtime(config) as rt:
            enqueue(rt, [event(1), event(2)])
            rt.worker.run_until_idle()
            letters = rt.store.dead_letters()
            assert [letter.event_id for letter in letters] == ["trace.created:t1", "trace.created:t2"]
            assert "HTTP 400" in letters[0].error and letters[0].target == "notifier:hook"
            answers["status"] = 200
            from langfuse_poller.service.replay import replay_dead_letters

            assert replay_dead_letters(rt, [letters[0].id]) == (1, 0)
            rt.worker.run_until_idle()
            assert hook.ids() == ["trace.created:t1"]
            assert len(rt.store.dead_letters()) == 1
            assert rt.store.delete_dead_letters(None) == 1
            assert rt.store.dead_letters() == []


def test_what_keeps_failing_ends_as_a_dead_letter(tmp_path: Path) -> None:
    with receiver(lambda n: 503) as hook:
        config = config_for(tmp_path, {"hook": {"type": "webhook", "url": hook.url}}, max_attempts=3)
        with runtime(config) as rt:
            enqueue(rt, [event(1)])
            drain_until(rt, lambda: rt.store.dead_letter_count() == 1)
            [letter] = rt.store.dead_letters()
    assert letter.attempts == 3 and "gave up after 3 attempts" in letter.error
    assert len(hook.statuses) == 3


def test_handlers_from_the_registry_are_isolated_and_retried(tmp_path: Path) -> None:
    handlers = Registry()
    calls: dict[str, list[str]] = {"good": [], "flaky": []}

    @handlers.on("trace.*")
    def good(e: Event) -> None:
        calls["good"].append(e.id)

    @handlers.on("trace.created", name="flaky")
    def flaky(e: Event) -> None:
        calls["flaky"].append(e.id)
        if len(calls["flaky"]) <= 2:
            raise RuntimeError("downstream hiccup")

    config = config_for(tmp_path, {})
    with runtime(config, handlers) as rt:
        enqueue(rt, [event(1), event(2)])
        drain_until(rt, lambda: rt.store.queue_depth() == 0)
    assert calls["good"] == ["trace.created:t1", "trace.created:t2"]
    assert sorted(set(calls["flaky"])) == ["trace.created:t1", "trace.created:t2"]
    assert len(calls["flaky"]) == 4


def test_jsonl_repeats_nothing_after_a_crash_between_write_and_record(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    config = config_for(tmp_path, {"file": {"type": "jsonl", "path": str(path)}})
    with runtime(config) as rt:
        enqueue(rt, [event(n) for n in range(5)])
        # the process wrote the lines, then died before recording the deliveries (and tore the next line)
        path.write_text("".join(event(n).to_json() + "\n" for n in range(3)) + '{"id": "torn')
    with runtime(config) as rt:
        rt.worker.run_until_idle()
        assert rt.store.queue_depth() == 0
    lines = path.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines if line.startswith('{"id":"')]
    assert ids == [f"trace.created:t{n}" for n in range(5)]


def test_the_same_event_id_is_stored_once(tmp_path: Path) -> None:
    config = config_for(tmp_path, {"log": {"type": "log"}})
    with runtime(config) as rt, rt.store.write() as tx:
        assert tx.enqueue(event(1), ["notifier:log"])
        assert not tx.enqueue(event(1), ["notifier:log"])


def test_rules_with_cel_conditions_route_events(tmp_path: Path) -> None:
    config = parse_config(
        {
            "langfuse": {"public_key": "pk", "secret_key": "sk"},
            "state": {"path": str(tmp_path / "s.db")},
            "notifiers": {"a": {"type": "log"}, "b": {"type": "log"}},
            "rules": [
                {"name": "errors", "events": ["trace.*"], "when": 'data.level == "ERROR"', "notify": ["a"]},
                {"name": "low", "events": ["score.created"], "when": "data.value < 0.5", "notify": ["b"]},
            ],
        },
        "test",
    )
    from langfuse_poller.registry import Router

    router = Router(config.rules, Registry())
    assert router.targets(event(1)) == ["notifier:a"]
    assert router.targets(event(2)) == []
    low = Event("score.created:s", "score.created", datetime.now(UTC), "poll", {"value": 0.2})
    text = Event("score.created:s2", "score.created", datetime.now(UTC), "poll", {"value": None, "stringValue": "x"})
    assert router.targets(low) == ["notifier:b"]
    assert router.targets(text) == []  # a categorical score does not match a numeric condition, nor crash
    assert not router.subscribes("observation.created")


def test_run_until_idle_waits_for_retries_due_soon(tmp_path: Path) -> None:
    # what `once` relies on: a flaky endpoint is retried within the run, not left for the next one
    with receiver(lambda n: 500 if n % 2 == 0 else 200) as hook:
        config = config_for(tmp_path, {"hook": {"type": "webhook", "url": hook.url}}, max_attempts=50)
        with runtime(config) as rt:
            enqueue(rt, [event(n) for n in range(10)])
            rt.worker.run_until_idle()
            assert rt.store.queue_depth() == 0
    assert sorted(hook.ids()) == sorted(f"trace.created:t{n}" for n in range(10))


class Counting:
    """An in-process target that keeps what it was given, and fails while `fail` is set."""

    concurrent = False
    retries_forever = False

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[Transaction, list[Event]]] = []

    def apply(self, tx: Transaction, events: Any) -> None:
        if self.fail:
            raise RuntimeError("not now")
        self.calls.append((tx, list(events)))

    def send(self, event: Event) -> None:
        raise AssertionError("an in-process target is applied, not sent to")

    def close(self) -> None:
        pass


def test_in_process_targets_share_one_transaction_and_one_parse_of_each_event(tmp_path: Path) -> None:
    # every alerting rule is an in-process target of the same events: one write turn and one parse serve them all
    store = Store(tmp_path / "state.db")
    first, second = Counting(), Counting()
    worker = DeliveryWorker(store, {"rule:a": first, "rule:b": second}, DeliveryConfig())
    with store.write() as tx:
        tx.enqueue_many([(event(n), ["rule:a", "rule:b"]) for n in range(5)])
    worker.run_until_idle()
    worker.close()
    assert len(first.calls) == len(second.calls) == 1
    (tx_a, got_a), (tx_b, got_b) = first.calls[0], second.calls[0]
    assert tx_a is tx_b
    assert [e.id for e in got_a] == [event(n).id for n in range(5)]
    assert all(a is b for a, b in zip(got_a, got_b, strict=True))
    assert store.queue_depth() == 0
    assert worker.stats.delivered == {"rule:a": 5, "rule:b": 5}


def test_an_in_process_target_that_fails_does_not_hold_back_the_others(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    good, bad = Counting(), Counting(fail=True)
    now = [1_900_000_000.0]
    worker = DeliveryWorker(store, {"rule:good": good, "rule:bad": bad}, DeliveryConfig(), clock=lambda: now[0])
    with store.write(now[0]) as tx:
        tx.enqueue_many([(event(n), ["rule:good", "rule:bad"]) for n in range(3)])
    worker.kick()
    worker.wait_idle()
    # the failing target's work rolled back alone: the other's is recorded once, its own waits for a retry
    assert [len(events) for _, events in good.calls] == [3]
    assert store.pending_by_target() == {"rule:bad": 3}
    assert worker.stats.delivered == {"rule:good": 3}
    assert worker.stats.failed == {"rule:bad": 3}
    recover(worker, bad, now)
    assert store.queue_depth() == 0
    assert [len(events) for _, events in bad.calls] == [3]


def recover(worker: DeliveryWorker, target: Counting, now: list[float]) -> None:
    """The failing target works again: its retries, due within the hour, are delivered; the worker stops."""
    target.fail = False
    now[0] += 3600
    worker.kick()
    worker.wait_idle()
    worker.close()


class Notifying(Counting):
    """An in-process target that queues a notice of its own, then fails while `fail` is set."""

    def apply(self, tx: Transaction, events: Any) -> None:
        tx.enqueue(event(1000 + len(self.calls), "rule.firing"), ["notifier:pager"])
        super().apply(tx, events)


def test_a_failed_part_is_not_told_to_the_observers_of_stored_events(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    told: list[Any] = []
    store.on_stored = told.extend
    worker = DeliveryWorker(store, {"rule:good": Counting(), "rule:bad": Notifying(fail=True)}, DeliveryConfig())
    with store.write() as tx:
        tx.enqueue_many([(event(n), ["rule:good", "rule:bad"]) for n in range(3)])
    told.clear()
    worker.kick()
    worker.wait_idle()
    worker.close()
    # the notice the failing target queued was rolled back with its part: usage metrics must not count it
    assert told == []
    assert store.pending_by_target() == {"rule:bad": 3}


def test_in_process_targets_are_applied_in_the_transaction_that_stores_the_events(tmp_path: Path) -> None:
    # what a poll page stores is recorded into the alerting rules at once: no delivery row per rule and event
    store = Store(tmp_path / "state.db")
    rule, told = Counting(), []
    store.apply_at_once({"rule:a": rule}, on_applied=lambda applied, failed: told.append(applied))
    with store.write() as tx:
        # an id the page holds twice is applied once; the notifier keeps its delivery
        assert tx.enqueue_many([(event(n), ["rule:a", "notifier:file"]) for n in (1, 2)]) == 2
        assert tx.enqueue_many([(event(n), ["rule:a", "notifier:file"]) for n in (2, 3, 3)]) == 1
        # the transaction's pages are applied together, as it commits
        assert rule.calls == []
    assert [e.id for e in rule.calls[0][1]] == [event(1).id, event(2).id, event(3).id]
    assert rule.calls[0][0] is tx
    assert told == [{"rule:a": 3}]
    assert store.pending_by_target() == {"notifier:file": 3}
    # a re-read of the same records stores nothing new, so nothing is applied twice
    with store.write() as tx:
        assert tx.enqueue_many([(event(n), ["rule:a", "notifier:file"]) for n in (1, 2)]) == 0
    assert len(rule.calls) == 1
    assert store.pending_by_target() == {"notifier:file": 3}
    # a transaction that rolls back undoes the application with the events, and tells nothing
    try:
        with store.write() as tx:
            tx.enqueue_many([(event(4), ["rule:a"])])
            raise RuntimeError("the page failed")
    except RuntimeError:
        pass
    assert len(rule.calls) == 1
    assert told == [{"rule:a": 3}]
    assert store.event(event(4).id) is None


def test_an_in_process_target_that_fails_at_once_gets_the_deliveries_instead(tmp_path: Path) -> None:
    # a failing rule must not fail the page: the page commits, the rule's writes are undone, and its events wait
    # for it as deliveries, with the retries and dead letters of any other
    store = Store(tmp_path / "state.db")
    told: list[Any] = []
    store.on_stored = told.extend
    bad, good = Notifying(fail=True), Counting()
    counted: list[Any] = []
    store.apply_at_once({"rule:bad": bad, "rule:good": good}, on_applied=lambda *counts: counted.append(counts))
    now = [1_900_000_000.0]
    with store.write(now[0]) as tx:
        tx.enqueue_many([(event(n), ["rule:bad", "rule:good"]) for n in range(3)])
    assert store.pending_by_target() == {"rule:bad": 3}
    assert counted == [({"rule:good": 3}, {"rule:bad": 3})]
    assert [len(events) for _, events in good.calls] == [3]
    # the notice the failing rule queued was rolled back with its writes
    assert sorted(e.type for e in told) == ["trace.created"] * 3
    assert store.alert_notifications() == []
    worker = DeliveryWorker(store, {"rule:bad": bad, "rule:good": good}, DeliveryConfig(), clock=lambda: now[0])
    worker.kick()
    worker.wait_idle()
    assert worker.stats.failed == {"rule:bad": 3}
    recover(worker, bad, now)
    assert [len(events) for _, events in bad.calls] == [3]
    # what is left is the notice the rule queued once it worked
    assert store.pending_by_target() == {"notifier:pager": 1}


def test_at_once_applies_oldest_first_and_queues_behind_what_still_waits(tmp_path: Path) -> None:
    # a page comes newest first; a rule judges in event time: a burst or a resolve must be seen in order
    store = Store(tmp_path / "state.db")
    rule = Counting()
    store.apply_at_once({"rule:a": rule})
    with store.write() as tx:
        tx.enqueue_many([(event(n), ["rule:a"]) for n in (3, 2, 1)])
    assert [e.id for e in rule.calls[0][1]] == [event(n).id for n in (1, 2, 3)]
    # older matches still waiting as deliveries (the rule failed on them, or a release before this one queued
    # them): newer ones wait behind them, or the rule would slide its windows past them and drop them as late
    store.apply_at_once({})
    with store.write() as tx:
        tx.enqueue_many([(event(4), ["rule:a"])])
    store.apply_at_once({"rule:a": rule})
    with store.write() as tx:
        tx.enqueue_many([(event(n), ["rule:a"]) for n in (6, 5)])
    assert len(rule.calls) == 1
    assert store.pending_by_target() == {"rule:a": 3}
    worker = DeliveryWorker(store, {"rule:a": rule}, DeliveryConfig())
    worker.run_until_idle()
    worker.close()
    assert [e.id for e in rule.calls[1][1]] == [event(n).id for n in (4, 5, 6)]
    # caught up: the next events are applied at once again
    with store.write() as tx:
        tx.enqueue_many([(event(7), ["rule:a"])])
    assert [e.id for e in rule.calls[2][1]] == [event(7).id]
    assert store.queue_depth() == 0
