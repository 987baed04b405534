"""The poll algorithm against the loopback Langfuse stand-in: late records, costs, catch-up, faults."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.langfuse.reader import Page
from langfuse_poller.poller import prefetched
from langfuse_poller.testing.fake_langfuse import FakeLangfuse

from .conftest import Clock, at, delivered, make_config, poll, runtime_for


def test_events_in_the_contract_shape(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    config = make_config(fake, tmp_path)
    with runtime_for(config, clock) as runtime:
        clock.advance(1)
        records = fake.add_trace(name="checkout", start_time=at(clock, 0.5), observations=2, level="ERROR")
        score = fake.add_score(trace_id=records[0]["traceId"], name="helpfulness", value=0.25, timestamp=at(clock, 0.5))
        clock.advance(1)
        poll(runtime)
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    by_type = {line["event"]: line for line in lines}
    trace_id = records[0]["traceId"]
    assert by_type["trace.created"]["id"] == f"trace.created:{trace_id}"
    assert by_type["trace.created"]["source"] == "poll"
    assert by_type["trace.created"]["data"]["name"] == "checkout"
    assert by_type["trace.created"]["data"]["url"] == f"{fake.url}/project/proj-test/traces/{trace_id}"
    assert by_type["trace.updated"]["data"]["level"] == "ERROR"
    generation = by_type["generation.created"]["data"]
    assert generation["model"] and generation["usage"]["totalTokens"] is not None
    assert by_type["score.created"]["id"] == f"score.created:{score['id']}"
    assert by_type["score.created"]["data"]["value"] == 0.25
    assert by_type["score.created"]["data"]["traceId"] == trace_id
    assert by_type["score.created"]["timestamp"].endswith("Z")


def test_observation_created_only_when_subscribed(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    rules = [{"name": "traces", "events": ["trace.*", "generation.*"], "notify": ["file"]}]
    config = make_config(fake, tmp_path, rules=rules)
    with runtime_for(config, clock) as runtime:
        clock.advance(1)
        fake.add_trace(start_time=at(clock, 0.5), observations=3)
        clock.advance(1)
        poll(runtime)
    types = Counter(event_id.split(":")[0] for event_id in delivered(tmp_path))
    assert types == {"trace.created": 1, "generation.created": 1}


def test_records_visible_late_within_lookback_yield_events_exactly_once(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path
) -> None:
    lookback = 300.0
    config = make_config(
        fake,
        tmp_path,
        poll={
            "interval": "10s",
            "lookback": "5m",
            "reread": ["1m"],
            "sweep_interval": "30s",
            "settle": "1s",
            "start": "-1m",
        },
    )
    rng = random.Random(7)
    expected: set[str] = set()
    with runtime_for(config, clock) as runtime:
        for _ in range(60):  # ten minutes of polls every 10 s
            clock.advance(10)
            for _ in range(rng.randint(0, 4)):
                # started up to 20 s ago, visible up to the rest of the lookback later
                age = rng.uniform(0, 20)
                delay = rng.uniform(0, lookback - age - 40)
                records = fake.add_trace(start_time=at(clock, age), observations=1, visible_after=delay)
                expected.add(f"trace.created:{records[0]['traceId']}")
                expected.add(f"generation.created:{records[1]['id']}")
                score = fake.add_score(trace_id=records[0]["traceId"], timestamp=at(clock, age), visible_after=delay)
                expected.add(f"score.created:{score['id']}")
            poll(runtime)
        for _ in range(40):  # let every sweep pass the last records
            clock.advance(10)
            poll(runtime)
    seen = delivered(tmp_path)
    assert set(seen) == expected
    assert max(seen.values()) == 1


def test_idle_poll_costs_one_request_per_stream(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    config = make_config(fake, tmp_path, poll={"interval": "10s", "sweep_interval": "5m"})
    with runtime_for(config, clock) as runtime:
        clock.advance(10)
        poll(runtime)  # the first poll also starts the sweep clocks
        fake.reset_requests()
        for _ in range(29):
            clock.advance(10)
            poll(runtime)
    # 29 polls of 2 streams; sweeps every 5 minutes: at most one run of each of the 2 tiers per stream
    assert fake.count("/v2/observations") + fake.count("/v3/scores") <= 29 * 2 + 2 * 2


def test_quiet_stream_reads_its_due_sweeps_with_the_head(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    config = make_config(fake, tmp_path, poll={"interval": "10s", "sweep_interval": "2m", "settle": "2s"})
    with runtime_for(config, clock) as runtime:
        for _ in range(72):  # twelve minutes: head reads known back to every sweep watermark
            clock.advance(10)
            poll(runtime)
        fake.reset_requests()
        expected = set()
        for index in range(60):
            clock.advance(10)
            if index % 15 == 0:
                # a trace that becomes readable 5 minutes after it started: only a sweep can find it
                records = fake.add_trace(start_time=at(clock, 1), observations=1, visible_after=300)
                expected |= {f"trace.created:{records[0]['traceId']}", f"generation.created:{records[1]['id']}"}
            poll(runtime)
        requests = fake.count("/v2/observations") + fake.count("/v3/scores")
        for _ in range(72):  # until the lookback tier has passed the last of them
            clock.advance(10)
            poll(runtime)
    # one request per stream per poll: the head's read starts at the due sweeps' watermarks
    assert requests == 60 * 2
    seen = delivered(tmp_path)
    assert set(seen) == expected and max(seen.values()) == 1


def test_busy_stream_keeps_its_sweeps_apart(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    config = make_config(fake, tmp_path, poll={"interval": "10s", "sweep_interval": "2m", "settle": "0s"})
    with runtime_for(config, clock) as runtime:
        for _ in range(90):
            clock.advance(10)
            for _ in range(2):
                fake.add_trace(start_time=at(clock, 5), observations=1)
            poll(runtime)
        fake.reset_requests()
        for _ in range(12):
            clock.advance(10)
            for _ in range(2):
                fake.add_trace(start_time=at(clock, 5), observations=1)
            poll(runtime)
    # 288 observations a tier's window would merge with the head's: read apart, each tier once in 12 polls
    assert fake.count("/v2/observations") == 12 + 2
    assert max(delivered(tmp_path).values()) == 1


def test_catch_up_from_seven_days_in_bounded_slices(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    config = make_config(fake, tmp_path, poll={"start": "-7d"})
    with runtime_for(config, clock) as runtime:
        base = clock.now - 7 * 86400 + 60
        for index in range(2000):
            start = datetime.fromtimestamp(base + index * 300, UTC)
            fake.add_observation(start_time=start, type="GENERATION", name=f"g{index}", is_root=True)
        for index in range(500):
            fake.add_score(timestamp=datetime.fromtimestamp(base + index * 1200, UTC))
        clock.advance(1)
        poll(runtime, force_sweeps=True)
        observation_requests = fake.count("/v2/observations")
        score_requests = fake.count("/v3/scores")
        state = runtime.store.stream("observations")
        assert state is not None and state.head >= clock.now - 2
        # the sweeps saw the whole catch-up read long after its end: nothing for them to re-read
        assert all(wm >= clock.now - age - 2 for age, wm in state.sweeps.items())
    seen = delivered(tmp_path)
    assert sum(1 for k in seen if k.startswith("generation.created")) == 2000
    assert sum(1 for k in seen if k.startswith("score.created")) == 500
    assert max(seen.values()) == 1
    # the minimum is 2 requests for observations and 5 for scores; slices that double from 1h cost more,
    # but boundedly: about log2(7d/1h) extra slices, plus the forced sweeps of an up-to-date stream
    assert observation_requests <= 2 + 12 + 2
    assert score_requests <= 5 + 12 + 2


def add_root_generations(fake: FakeLangfuse, clock: Clock, count: int) -> None:
    """`count` one-observation traces, a second apart, ending 3000 - count seconds ago."""
    for index in range(count):
        fake.add_observation(start_time=at(clock, 3000 - index), type="GENERATION", is_root=True)


def test_crash_mid_window_rereads_without_duplicates(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    config = make_config(fake, tmp_path, poll={"start": "-1h", "catchup_slice": "2h"})
    with runtime_for(config, clock) as runtime:
        add_root_generations(fake, clock, 2500)
        clock.advance(1)
        # pages 1 and 2 commit, then the server keeps failing: the window's watermark must not move
        fake_requests_before = fake.count("/v2/observations")
        fake.fail_next(50, status=503)
        runtime.reader.backoff_initial = 0.001
        result = runtime.poller.poll_once()
        assert any("observations" in error for error in result.errors)
        assert fake.count("/v2/observations") > fake_requests_before
        state = runtime.store.stream("observations")
        assert state is not None and state.head < clock.now - 3000
        # the slice is older than every re-read age: no sweep reads it again, so its records got no dedup keys
        assert runtime.store._conn().execute("SELECT COUNT(*) FROM seen").fetchone()[0] == 0
        fake.clear_faults()
        poll(runtime)
    seen = delivered(tmp_path)
    assert len(seen) == 2500 * 2  # trace.created + generation.created for each root generation
    assert max(seen.values()) == 1


def test_partial_window_progress_is_kept_and_deduplicated(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    config = make_config(fake, tmp_path, poll={"start": "-1h", "catchup_slice": "2h"})
    with runtime_for(config, clock) as runtime:
        add_root_generations(fake, clock, 2500)
        clock.advance(1)
        pages = runtime.reader.observations(at(clock, 3700), at(clock, 0))
        first = next(pages)
        assert len(first.records) == 1000 and first.cursor
        # the first page's events are committed (as a killed process would leave them), the watermark is not
        with runtime.store.write() as tx:
            made = runtime.poller._commit_page(
                tx, "observations", runtime.poller._prepare_page("observations", first), clock.now
            )
        assert made == 2000
        poll(runtime)
    seen = delivered(tmp_path)
    assert len(seen) == 5000
    assert max(seen.values()) == 1


def test_malformed_record_is_a_dead_letter_and_the_watermark_moves(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path
) -> None:
    config = make_config(fake, tmp_path)
    with runtime_for(config, clock) as runtime:
        clock.advance(1)
        bad = {"id": "bad-1", "type": "SPAN", "startTime": at(clock, 0.5).isoformat(), "projectId": "proj-test"}
        fake.add_raw_observation(bad, start_time=at(clock, 0.5))
        # valid ISO 8601, but before year 1 in UTC
        early = {**bad, "id": "bad-2", "traceId": "t-2", "startTime": "0001-01-01T00:00:00+01:00"}
        fake.add_raw_observation(early, start_time=at(clock, 0.45))
        fake.add_trace(start_time=at(clock, 0.4), observations=0)
        clock.advance(1)
        poll(runtime, force_sweeps=True)
        clock.advance(120)
        poll(runtime, force_sweeps=True)  # re-read by every sweep: still one dead letter
        letters = runtime.store.dead_letters()
        state = runtime.store.stream("observations")
    assert len(letters) == 2
    by_id = {json.loads(letter.raw or "{}")["id"]: letter for letter in letters}
    assert {letter.kind for letter in letters} == {"record"} and {letter.stream for letter in letters} == {
        "observations"
    }
    assert "traceId" in by_id["bad-1"].error
    assert "startTime" in by_id["bad-2"].error
    assert state is not None and state.head >= clock.now - 1
    assert sum(1 for k in delivered(tmp_path) if k.startswith("trace.created")) == 1


@pytest.mark.parametrize(
    "fault",
    [
        lambda fake: fake.fail_next(3, status=503),
        lambda fake: fake.fail_next(2, status=502),
        lambda fake: fake.malformed_next(2),
        lambda fake: fake.rate_limit_next(2, retry_after=0),
    ],
    ids=["503", "502", "malformed-json", "429"],
)
def test_api_faults_are_retried_and_nothing_is_lost(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path, fault: Any
) -> None:
    config = make_config(fake, tmp_path)
    with runtime_for(config, clock) as runtime:
        clock.advance(1)
        for _ in range(5):
            fake.add_trace(start_time=at(clock, 0.5), observations=1)
            fake.add_score(timestamp=at(clock, 0.5))
        clock.advance(1)
        fault(fake)
        poll(runtime)
    assert len(delivered(tmp_path)) == 15


def test_429_retry_after_is_honoured(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    config = make_config(fake, tmp_path)
    with runtime_for(config, clock) as runtime:
        waits: list[float] = []
        runtime.reader._sleep = waits.append  # type: ignore[method-assign]
        clock.advance(1)
        fake.add_trace(start_time=at(clock, 0.5))
        clock.advance(1)
        fake.rate_limit_next(1, retry_after=7)
        poll(runtime)
    assert waits and waits[0] == 7
    assert len(delivered(tmp_path)) >= 1


def test_a_score_seen_again_with_a_newer_version_is_score_updated(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path
) -> None:
    config = make_config(fake, tmp_path, poll={"sweep_interval": "10s", "reread": []})
    with runtime_for(config, clock) as runtime:
        clock.advance(1)
        score = fake.add_score(timestamp=at(clock, 0.5), value=0.9)
        clock.advance(1)
        poll(runtime)
        clock.advance(5)
        fake.update_score(score["id"], value=0.1)
        for _ in range(70):
            clock.advance(10)
            poll(runtime)
    seen = delivered(tmp_path)
    assert seen[f"score.created:{score['id']}"] == 1
    updates = [k for k in seen if k.startswith("score.updated:")]
    assert len(updates) == 1 and seen[updates[0]] == 1


def test_wrong_keys_say_which_host_rejected_which_key(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    config = make_config(fake, tmp_path, langfuse={"public_key": "pk-lf-wrong", "secret_key": "sk-lf-wrong"})
    with runtime_for(config, clock) as runtime:
        clock.advance(1)
        result = runtime.poller.poll_once()
        state = runtime.store.stream("observations")
    assert result.errors
    message = result.errors[0]
    assert "127.0.0.1" in message and "pk-lf-wrong" in message and "rejected" in message
    assert "sk-lf-wrong" not in message
    assert state is not None and state.last_error and "rejected" in state.last_error


def test_prefetched_tells_the_consumer_before_it_waits_for_a_page() -> None:
    # the consumer commits its open transaction then, instead of holding the write lock through a slow answer
    waited = threading.Event()

    def pages() -> Iterator[Page]:
        yield Page([{"id": "a"}], "next")
        # the second page is not there until the consumer was told it waits for it
        assert waited.wait(timeout=10)
        yield Page([{"id": "b"}], None)

    got = [page.records[0]["id"] for page in prefetched(pages(), on_wait=waited.set)]
    assert got == ["a", "b"]


def test_a_page_read_without_dedup_keys_makes_the_same_events_and_dead_letters(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path
) -> None:
    config = make_config(fake, tmp_path)
    with runtime_for(config, clock) as runtime:
        records: list[Any] = []
        for n in range(20):
            records.extend(
                fake.add_trace(start_time=at(clock, 100 - n), observations=3, level="ERROR" if n % 3 else "DEFAULT")
            )
        records += [{"id": "no-trace", "type": "SPAN"}, {"id": 7}, "not an object", {**records[1], "startTime": "x"}]
        page = Page(records, None)
        kept = runtime.poller._prepare_page("observations", page)
        not_kept = runtime.poller._prepare_page("observations", page, keep_keys=False, look_up=False)
        assert [(e.to_json(), list(t)) for e, t in not_kept.routed] == [(e.to_json(), list(t)) for e, t in kept.routed]
        assert [(r, repr(x)) for r, x in not_kept.bad] == [(r, repr(x)) for r, x in kept.bad]
        assert len(kept.bad) == 4 and len(kept.changed) == len(records) - 4 and not_kept.changed == []
        assert len(kept.routed) >= 20 + 13  # a trace.created per trace, a trace.updated per error
