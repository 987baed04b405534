"""The legacy read path (self-hosted Langfuse v3): the stand-in's legacy lists, the same events as on the v2 path,
read-path detection, an upgrade from v3 to v4, paging over data that changes, and the rate-limit buckets."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from langfuse_poller.config import parse_config
from langfuse_poller.errors import ConfigError
from langfuse_poller.events import Event, EventFactory, Seen, record_version
from langfuse_poller.langfuse.reader import LangfuseReader
from langfuse_poller.service.check import run_check
from langfuse_poller.service.status import collect_status, render_status
from langfuse_poller.testing.fake_langfuse import FakeLangfuse, parse_iso_us

from .conftest import Clock, at, delivered, make_config, poll, runtime_for

V1_OBSERVATIONS = "/api/public/observations"
V2_SCORES = "/api/public/v2/scores"
TRACES = "/api/public/traces"
V2_OBSERVATIONS = "/api/public/v2/observations"
V3_SCORES = "/api/public/v3/scores"

pytestmark = pytest.mark.timeout(60)


# --- helpers -----------------------------------------------------------------------------------------------------


def reader_for(fake: FakeLangfuse, clock: Clock, api: str, **langfuse: Any) -> LangfuseReader:
    section = {"base_url": fake.url, "public_key": "pk-lf-test", "secret_key": "sk-lf-test", "api": api, **langfuse}
    config = parse_config({"langfuse": section}, "test-config")
    return LangfuseReader(config.langfuse, clock=clock, backoff_initial=0.001, backoff_max=0.01)


def read_all(pages: Iterator[Any]) -> list[Any]:
    """Every record of a pass; the pass must end with exactly one last page."""
    records: list[Any] = []
    lasts = 0
    for page in pages:
        records.extend(page.records)
        lasts += page.cursor is None
    assert lasts == 1
    return records


def events_of(factory: EventFactory, stream: str, records: list[Any], previous: Seen | None) -> list[dict[str, Any]]:
    events: list[Event] = []
    for record in records:
        events.extend(factory.from_record(stream, record, previous).events)
    return sorted((event.envelope() for event in events), key=lambda e: str(e["id"]))


def trace_created(root: dict[str, Any]) -> str:
    return f"trace.created:{root['traceId']}"


def trace_updated(record: dict[str, Any]) -> str:
    return f"trace.updated:{record['id']}:{record_version(record)}"


# --- the stand-in's legacy endpoints -------------------------------------------------------------------------------


def test_the_stand_in_serves_the_legacy_lists_page_based_in_their_own_shapes(fake: FakeLangfuse, clock: Clock) -> None:
    t0 = at(clock, 600)
    for i in range(7):
        fake.add_trace(start_time=t0 + timedelta(seconds=i), observations=1, name=f"t{i}", user_id="u", tags=["x"])
        fake.add_score(timestamp=t0 + timedelta(seconds=i), value=i % 2 == 0, data_type="BOOLEAN", trace_id=f"s{i}")
    with httpx.Client(base_url=fake.url, auth=(fake.public_key, fake.secret_key), timeout=5) as http:
        assert http.get(V1_OBSERVATIONS).status_code == 404  # serve = "v2" by default: Langfuse Cloud today
        fake.serve = "legacy"
        assert http.get(V2_OBSERVATIONS).status_code == 404 and http.get(V3_SCORES).status_code == 404
        for path in (V1_OBSERVATIONS, V2_SCORES, TRACES):
            assert http.get(path, params={"limit": 101}).status_code == 400
            assert http.get(path, params={"page": 0}).status_code == 400
            assert http.get(path, params={"limit": 100}).status_code == 200

        first = http.get(V1_OBSERVATIONS, params={"limit": 5}).json()
        third = http.get(V1_OBSERVATIONS, params={"limit": 5, "page": 3}).json()
        assert first["meta"] == {"page": 1, "limit": 5, "totalItems": 14, "totalPages": 3}
        assert len(first["data"]) == 5 and len(third["data"]) == 4
        starts = [r["startTime"] for r in first["data"] + third["data"]]
        assert starts == sorted(starts, reverse=True)  # newest first, the only order there is
        record = first["data"][0]
        # a v1 observation has no trace context and no root flag; cost and model id under their v1 names
        assert not {"isRootObservation", "traceName", "userId", "sessionId", "tags", "release"} & set(record)
        assert {"calculatedTotalCost", "modelId", "usageDetails", "updatedAt", "environment"} <= set(record)

        traces = http.get(TRACES, params={"orderBy": "timestamp.asc", "fields": "core", "limit": 3}).json()
        assert traces["meta"] == {"page": 1, "limit": 3, "totalItems": 7, "totalPages": 3}
        assert [t["name"] for t in traces["data"]] == ["t0", "t1", "t2"]
        assert traces["data"][0]["userId"] == "u" and traces["data"][0]["tags"] == ["x"]
        assert "observations" not in traces["data"][0]
        newest = http.get(TRACES, params={"limit": 1}).json()["data"][0]
        assert newest["name"] == "t6" and len(newest["observations"]) == 2
        one = http.get(f"{TRACES}/{newest['id']}").json()
        assert one["name"] == "t6" and len(one["observations"]) == 2
        assert http.get(f"{TRACES}/no-such-trace").status_code == 404

        scores = http.get(V2_SCORES, params={"limit": 100, "fields": "score"}).json()
        assert scores["meta"]["totalItems"] == 7
        assert [s["timestamp"] for s in scores["data"]] == sorted(
            (s["timestamp"] for s in scores["data"]), reverse=True
        )
        assert {(s["value"], s["stringValue"]) for s in scores["data"]} == {(1.0, "True"), (0.0, "False")}
        assert "trace" not in scores["data"][0] and "subject" not in scores["data"][0]

        fake.serve = "both"
        assert http.get(V2_OBSERVATIONS).status_code == 200 and http.get(V1_OBSERVATIONS).status_code == 200
    with pytest.raises(ValueError):
        fake.serve = "v3"


# --- the same events on both paths ------------------------------------------------------------------------------


def test_events_from_legacy_records_equal_those_from_v2_records(fake: FakeLangfuse, clock: Clock) -> None:
    fake.serve = "both"
    start, end = at(clock, 300), at(clock, 0)
    checkout = fake.add_trace(start_time=at(clock, 250), observations=3, name="n", user_id="u1", tags=["a"])
    fake.add_trace(start_time=at(clock, 240), observations=1, level="ERROR", environment="production")
    fake.add_trace(start_time=at(clock, 230), observations=0, level="WARNING")
    # a trace that started before the window, whose children (a generation, an error) start inside it
    context = {"trace_name": "early", "user_id": "u2", "session_id": "s2", "tags": ["b", "c"], "release": "r7"}
    root = fake.add_observation(start_time=at(clock, 400), is_root=True, name="early", **context)
    for kind, level in (("GENERATION", "DEFAULT"), ("SPAN", "ERROR")):
        fake.add_observation(
            start_time=at(clock, 200),
            trace_id=root["traceId"],
            parent_observation_id=root["id"],
            type=kind,
            level=level,
            model="gpt-4o-mini" if kind == "GENERATION" else None,
            usage_details={"input": 10, "output": 5},
            cost_details={"total": 0.01},
            total_cost=0.01,
            **context,
        )
    trace_id = root["traceId"]
    fake.add_score(trace_id=trace_id, value=0.25, timestamp=at(clock, 100), comment="meh", config_id="cfg-1")
    fake.add_score(observation_id="o-1", trace_id=trace_id, value=False, data_type="BOOLEAN", timestamp=at(clock, 90))
    fake.add_score(session_id="s1", value="good", data_type="CATEGORICAL", timestamp=at(clock, 80))
    fake.add_score(trace_id=trace_id, value="fine", data_type="TEXT", source="ANNOTATION", timestamp=at(clock, 70))
    fake.add_score(trace_id=trace_id, value="a better answer", data_type="CORRECTION", timestamp=at(clock, 60))
    # changed later: versions (updatedAt) that differ from createdAt must come out the same on both paths
    changing = fake.add_score(trace_id=trace_id, value=0.5, timestamp=at(clock, 50))
    clock.advance(5)
    fake.update_observation(checkout[0]["id"], status_message="changed")
    fake.update_score(changing["id"], value=0.75)
    clock.advance(5)

    factory = EventFactory(fake.url, observation_created=lambda: True)
    v2, legacy = reader_for(fake, clock, "v2"), reader_for(fake, clock, "legacy")
    try:
        for stream, read in (("observations", "observations"), ("scores", "scores")):
            new = read_all(getattr(v2, read)(start, end))
            old = read_all(getattr(legacy, read)(start, end))
            assert len(new) == len(old) > 4
            for previous in (None, Seen("0", "DEFAULT")):  # first seen; seen again with an older version
                made = events_of(factory, stream, new, previous)
                assert made, stream
                assert events_of(factory, stream, old, previous) == made
    finally:
        v2.close()
        legacy.close()
    assert fake.count(f"{TRACES}/{trace_id}") == 1  # the early trace, by id: it is not in the window's list


def test_the_same_polls_on_either_path_deliver_the_same_events(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path
) -> None:
    fake.serve = "both"
    for i in range(150):  # more than a legacy page of each
        records = fake.add_trace(start_time=at(clock, 500 - i), observations=1, level=("DEFAULT", "ERROR")[i % 5 == 0])
        fake.add_score(trace_id=records[0]["traceId"], value=i / 150, timestamp=at(clock, 500 - i))
    outputs = []
    for api in ("v2", "legacy"):
        directory = tmp_path / api
        directory.mkdir()
        config = make_config(fake, directory, langfuse={"api": api}, poll={"start": "-10m"})
        with runtime_for(config, clock) as runtime:
            poll(runtime, force_sweeps=True)
        outputs.append(sorted((directory / "events.jsonl").read_text().splitlines()))
    assert len(outputs[0]) == 150 * 3 + 30
    assert outputs[0] == outputs[1]


# --- finding the read path ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("serve", "path"), [("legacy", "legacy"), ("both", "v2"), ("v2", "v2")], ids=["v3-server", "v4-opt-in", "cloud"]
)
def test_auto_finds_the_newest_read_path_and_status_and_check_show_it(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path, serve: str, path: str
) -> None:
    fake.serve = serve
    config = make_config(fake, tmp_path)
    with runtime_for(config, clock) as runtime:
        clock.advance(1)
        fake.add_trace(start_time=at(clock, 0.5), observations=1)
        fake.add_score(timestamp=at(clock, 0.5))
        clock.advance(1)
        poll(runtime)
        assert runtime.reader.read_paths == {"observations": path, "scores": path}
        fake.reset_requests()
        clock.advance(10)
        poll(runtime)
    # found once: later polls go straight to the path's endpoints
    assert {r.path for r in fake.requests} == (
        {V1_OBSERVATIONS, V2_SCORES} if path == "legacy" else {V2_OBSERVATIONS, V3_SCORES}
    )
    assert len(delivered(tmp_path)) == 3

    report = collect_status(config, now=clock.now)
    assert report["api"] == "auto"
    assert [(s["name"], s["read_path"]) for s in report["streams"]] == [("observations", path), ("scores", path)]
    assert all(s["read_path_since"] for s in report["streams"])
    json.dumps(report)  # what status --json prints
    text = render_status(report)
    assert text.count(f"; {path} read path since ") == 2, text

    out = io.StringIO()
    assert run_check(config, out=out) == 0, out.getvalue()
    endpoints = "/api/public/observations" if path == "legacy" else V2_OBSERVATIONS
    assert f'ok   read path {path} (api = "auto"): observations from {endpoints}, scores from ' in out.getvalue()


def test_a_404_later_finds_the_read_path_again_without_losing_the_poll(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path
) -> None:
    fake.serve = "both"
    config = make_config(fake, tmp_path)
    with runtime_for(config, clock) as runtime:
        clock.advance(1)
        first = fake.add_trace(start_time=at(clock, 0.5))
        clock.advance(1)
        poll(runtime)
        assert runtime.reader.read_paths == {"observations": "v2", "scores": "v2"}
        # v4's opt-in turned off: /v2/observations and /v3/scores answer 404 from now on
        fake.serve = "legacy"
        clock.advance(1)
        second = fake.add_trace(start_time=at(clock, 0.5))
        score = fake.add_score(timestamp=at(clock, 0.5))
        clock.advance(1)
        poll(runtime)  # no error: the same poll finds the legacy path and reads on
        assert runtime.reader.read_paths == {"observations": "legacy", "scores": "legacy"}
        assert runtime.store.read_paths()["scores"][0] == "legacy"
    assert set(delivered(tmp_path)) == {
        trace_created(first[0]),
        trace_created(second[0]),
        f"score.created:{score['id']}",
    }


def test_on_the_legacy_path_the_v2_endpoint_is_looked_for_hourly(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path
) -> None:
    fake.serve = "legacy"
    config = make_config(fake, tmp_path)
    with runtime_for(config, clock) as runtime:
        clock.advance(10)
        poll(runtime)
        fake.serve = "both"  # upgraded to v4 with the opt-in: both paths work, the legacy one is no longer best
        for _ in range(5):
            clock.advance(600)
            poll(runtime)
        assert runtime.reader.read_paths == {"observations": "legacy", "scores": "legacy"}
        assert fake.count(V2_OBSERVATIONS) == 1  # the first read only
        clock.advance(600)
        poll(runtime)
        assert runtime.reader.read_paths == {"observations": "v2", "scores": "v2"}


@pytest.mark.parametrize(
    ("api", "serve", "words"),
    [
        ("v2", "legacy", "has no /api/public/v2/observations (404): a self-hosted Langfuse v3 server"),
        ("legacy", "v2", "has no /api/public/observations (404): a server without the legacy endpoints"),
        ("auto", "v2", "has neither /api/public/v2/observations nor /api/public/observations"),
    ],
)
def test_a_forced_read_path_the_server_lacks_says_what_to_set(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path, api: str, serve: str, words: str
) -> None:
    fake.serve = serve
    if api == "auto":
        fake.fail_next(2, status=404)  # no server has neither: a 404 from something else at base_url
    config = make_config(fake, tmp_path, langfuse={"api": api}, poll={"streams": ["observations"]})
    with runtime_for(config, clock) as runtime:
        clock.advance(1)
        result = runtime.poller.poll_once()
    assert len(result.errors) == 1 and words in result.errors[0], result.errors
    assert api == "auto" or 'set [langfuse] api = "auto"' in result.errors[0]
    if api != "auto":
        out = io.StringIO()
        assert run_check(config, out=out) == 1
        assert f"FAIL 127.0.0.1:{fake.url.rsplit(':', 1)[1]} {words}" in out.getvalue(), out.getvalue()


def test_the_api_key_takes_three_values_and_the_legacy_budget_defaults_to_the_other() -> None:
    base = {"public_key": "pk-lf-1", "secret_key": "sk-lf-1"}
    config = parse_config({"langfuse": {**base, "max_requests_per_minute": 30}}, "test")
    assert config.langfuse.api == "auto" and config.langfuse.legacy_max_requests_per_minute == 30
    config = parse_config({"langfuse": {**base, "api": "legacy", "legacy_max_requests_per_minute": 15}}, "test")
    assert config.langfuse.api == "legacy" and config.langfuse.legacy_max_requests_per_minute == 15
    with pytest.raises(ConfigError) as error:
        parse_config({"langfuse": {**base, "api": "v3"}}, "test")
    assert "langfuse.api: expected one of 'auto', 'v2', 'legacy', found 'v3'" in str(error.value)


# --- an upgrade from v3 to v4 -----------------------------------------------------------------------------------


def test_an_upgrade_from_v3_to_v4_costs_no_duplicate_and_no_gap(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path
) -> None:
    fake.serve = "legacy"
    poll_config = {"interval": "10s", "lookback": "5m", "reread": ["1m"], "sweep_interval": "30s", "settle": "1s"}
    config = make_config(fake, tmp_path, poll={**poll_config, "start": "-1m"})
    rng = random.Random(3)
    expected: set[str] = set()
    scores: list[dict[str, Any]] = []
    with runtime_for(config, clock) as runtime:
        for step in range(60):  # ten minutes of polls every 10 s; the server is upgraded after five
            if step == 30:
                fake.serve = "v2"
            clock.advance(10)
            for _ in range(rng.randint(0, 3)):
                age, delay = rng.uniform(0, 20), rng.uniform(0, 200)  # visible up to 200 s late
                level = rng.choice(("DEFAULT", "DEFAULT", "ERROR"))
                records = fake.add_trace(start_time=at(clock, age), observations=1, visible_after=delay, level=level)
                root, generation = records
                expected |= {trace_created(root), f"generation.created:{generation['id']}"}
                if level == "ERROR":
                    expected.add(trace_updated(root))
                score = fake.add_score(trace_id=root["traceId"], timestamp=at(clock, age), visible_after=delay)
                expected.add(f"score.created:{score['id']}")
            if step in (20, 32):  # a score read on one side of the upgrade, changed on the same or the other
                score = fake.add_score(timestamp=at(clock, 1), value=0.9)
                expected.add(f"score.created:{score['id']}")
                scores.append(score)
            if step in (25, 35):
                changed = fake.update_score(scores[-1]["id"], value=0.5)
                expected.add(f"score.updated:{changed['id']}:{record_version(changed)}")
            poll(runtime)
        for _ in range(40):  # let every sweep pass the last records
            clock.advance(10)
            poll(runtime)
        assert runtime.reader.read_paths == {"observations": "v2", "scores": "v2"}
    assert fake.count(V1_OBSERVATIONS) > 0 and fake.count(V2_OBSERVATIONS) > 0
    seen = delivered(tmp_path)
    assert set(seen) == expected
    assert max(seen.values()) == 1


# --- paging over data that changes ------------------------------------------------------------------------------


def add_roots(fake: FakeLangfuse, starts: list[datetime]) -> list[str]:
    return [fake.add_trace(start_time=start, observations=0)[0]["id"] for start in starts]


def on_page(fake: FakeLangfuse, number: int, change: Callable[[], None], path: str = V1_OBSERVATIONS) -> None:
    """Run `change` once, just before the server answers the `number`-th request to `path`."""
    count = 0

    def hook(request_path: str, _query: dict[str, list[str]]) -> None:
        nonlocal count
        if request_path == path:
            count += 1
            if count == number:
                change()

    fake.on_data_request = hook


def test_records_that_move_while_paging_are_neither_lost_nor_repeated(fake: FakeLangfuse, clock: Clock) -> None:
    fake.serve = "legacy"
    start, end = at(clock, 1000), at(clock, 700)
    before = add_roots(fake, [start + timedelta(seconds=i) for i in range(250)])  # three pages, newest first
    added: dict[str, str] = {}

    def change() -> None:
        # after page 1 (the newest 100: start + 150 s and later): each of these would shift page-numbered pages
        added["read part"] = add_roots(fake, [start + timedelta(seconds=200.5)])[0]  # inside, already read
        added["unread part"] = add_roots(fake, [start + timedelta(seconds=10.5)])[0]  # inside, not read yet
        added["above the bound"] = add_roots(fake, [end + timedelta(seconds=i) for i in range(5)])[0]
        for index in (180, 181):  # two leave the read part, one joins it: page-numbered pages would skip one
            fake.update_observation(before[index], start_time=end + timedelta(seconds=50 + index))

    on_page(fake, 2, change)
    reader = reader_for(fake, clock, "legacy")
    try:
        ids = Counter(record["id"] for record in read_all(reader.observations(start, end)))
    finally:
        reader.close()
    assert max(ids.values()) == 1  # nothing served twice, overlap or not
    assert set(before) <= set(ids)  # nothing skipped when a record left the part already read
    assert added["unread part"] in ids  # below the bound: this pass reads it
    assert added["read part"] not in ids  # above it: the next sweep will
    assert added["above the bound"] not in ids  # after the window: the next head will
    assert fake.errors == []


def test_a_millisecond_holding_more_than_a_page_is_paged_by_number(fake: FakeLangfuse, clock: Clock) -> None:
    fake.serve = "legacy"
    start, end = at(clock, 1000), at(clock, 700)
    crowd = start + timedelta(seconds=100)
    starts = [start + timedelta(seconds=i) for i in range(50)] + [crowd] * 230
    starts += [crowd + timedelta(seconds=1 + i) for i in range(60)]
    ids = add_roots(fake, starts)
    reader = reader_for(fake, clock, "legacy")
    try:
        observations = read_all(reader.observations(start, end))
    finally:
        reader.close()
    assert Counter(record["id"] for record in observations) == Counter(ids)
    # the roots' traces come from the traces list (oldest first, the crowded millisecond paged the same way),
    # none by id: every record has its trace's context
    assert all(record["traceName"] == "trace" for record in observations)
    assert not [r for r in fake.requests if r.path.startswith(TRACES + "/")]
    # 1 page above the crowd, 1 that finds it, its 3 pages by number, 1 below it; the same for the traces
    assert fake.count(V1_OBSERVATIONS) == 6 and fake.count(TRACES) == 6


def test_a_record_inserted_mid_paging_is_read_by_this_pass_or_the_next_sweep(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path
) -> None:
    fake.serve = "legacy"
    config = make_config(fake, tmp_path, langfuse={"api": "legacy"}, poll={"start": "-20m", "reread": ["1m"]})
    roots = [fake.add_trace(start_time=at(clock, 10 + i))[0] for i in range(300)]
    late: dict[str, dict[str, Any]] = {}

    def change() -> None:
        # page 1 held the newest 100 (10 to 109 s old)
        late["read part"] = fake.add_trace(start_time=at(clock, 50.5))[0]
        late["unread part"] = fake.add_trace(start_time=at(clock, 250.5))[0]
        late["after the window"] = fake.add_trace(start_time=at(clock, -0.5))[0]

    with runtime_for(config, clock) as runtime:
        on_page(fake, 2, change)
        poll(runtime)
        fake.on_data_request = None
        after_head = set(delivered(tmp_path))
        assert {trace_created(root) for root in roots} <= after_head
        assert trace_created(late["unread part"]) in after_head
        assert trace_created(late["read part"]) not in after_head
        assert trace_created(late["after the window"]) not in after_head
        for _ in range(3):  # the next head reads what came after the window, the 1 m sweep the read part
            clock.advance(30)
            poll(runtime)
    seen = delivered(tmp_path)
    assert set(seen) == {trace_created(record) for record in [*roots, *late.values()]}
    assert max(seen.values()) == 1


# --- rate-limit buckets ------------------------------------------------------------------------------------------


def test_each_rate_limit_bucket_is_paced_and_paused_apart(fake: FakeLangfuse, clock: Clock) -> None:
    fake.serve = "legacy"
    reader = reader_for(fake, clock, "legacy", max_requests_per_minute=60, legacy_max_requests_per_minute=6)
    waits: list[tuple[str, float]] = []
    current: list[str] = []

    def sleep(seconds: float) -> None:
        waits.append((current[-1], seconds))
        clock.advance(seconds)

    reader._sleep = sleep  # type: ignore[method-assign]

    def get(path: str) -> None:
        current.append(path)
        reader.get(path, {"page": 1, "limit": 1})

    try:
        # v1 observations count in the legacy bucket (6 a minute: 10 s apart); v2 scores in the current one
        for path in (V1_OBSERVATIONS, V2_SCORES, V1_OBSERVATIONS, V2_SCORES, V2_SCORES):
            get(path)
        assert waits == [(V1_OBSERVATIONS, pytest.approx(10.0)), (V2_SCORES, pytest.approx(1.0))]
        # the server says the legacy bucket is spent (a 429, the only answer with rate-limit headers): the request
        # waits for the server's window to end, and the bucket is paused to then; the current one is not
        waits.clear()
        clock.now = (clock.now // 60 + 2) * 60 + 5.0  # 5 s into a one-minute window of the server
        fake.set_legacy_rate_limit(1)
        get(V1_OBSERVATIONS)
        assert reader.buckets["legacy"].not_before <= clock.now  # a 200 says nothing of the bucket
        get(TRACES)  # 10 s later by the client's budget, then refused until the window ends, 45 s later
        assert waits == [(TRACES, pytest.approx(10.0)), (TRACES, pytest.approx(45.0, abs=1.0))]
        assert reader.buckets["legacy"].not_before == pytest.approx(clock.now, abs=1.0)
        assert reader.buckets["current"].not_before == 0.0
        get(V2_SCORES)
        assert len(waits) == 2
    finally:
        reader.close()
    assert [r.status for r in fake.requests].count(429) == 1
    assert all(r.status in (200, 429) for r in fake.requests)


def test_legacy_records_are_mapped_to_the_v2_shape(fake: FakeLangfuse, clock: Clock) -> None:
    fake.serve = "legacy"
    records = fake.add_trace(start_time=at(clock, 30), observations=1, name="n", user_id="u", tags=["t"])
    reader = reader_for(fake, clock, "legacy")
    try:
        observations = read_all(reader.observations(at(clock, 60), at(clock, 0)))
    finally:
        reader.close()
    by_id = {record["id"]: record for record in observations}
    root, generation = by_id[records[0]["id"]], by_id[records[1]["id"]]
    assert root["isRootObservation"] is True and generation["isRootObservation"] is False
    assert root["traceName"] == generation["traceName"] == "n"
    assert root["userId"] == "u" and root["tags"] == ["t"]
    assert generation["totalCost"] == records[1]["totalCost"] and generation["internalModelId"] == "model-gpt-4o"
    assert parse_iso_us(root["updatedAt"]) == parse_iso_us(records[0]["updatedAt"])
