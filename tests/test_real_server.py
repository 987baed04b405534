"""What the real Langfuse server does that a lenient stand-in would hide: the stand-in refuses what the server
refuses, and the reader reads what the server sends (query forms, rate-limit headers, duplicate rows, score
subjects, ties inside one millisecond, single-trace lookups, unexpected bodies)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from langfuse_poller.config import parse_config
from langfuse_poller.events import EventFactory
from langfuse_poller.langfuse.reader import LangfuseReader
from langfuse_poller.testing.fake_langfuse import FakeLangfuse

from .conftest import Clock, at, delivered, make_config, poll, runtime_for

V2_OBSERVATIONS = "/api/public/v2/observations"
V3_SCORES = "/api/public/v3/scores"
V2_SCORES = "/api/public/v2/scores"
V1_OBSERVATIONS = "/api/public/observations"
TRACES = "/api/public/traces"

pytestmark = pytest.mark.timeout(60)


def reader_for(fake: FakeLangfuse, clock: Clock, api: str = "auto", **reader: Any) -> LangfuseReader:
    section = {"base_url": fake.url, "public_key": "pk-lf-test", "secret_key": "sk-lf-test", "api": api}
    config = parse_config({"langfuse": section}, "test-config")
    return LangfuseReader(config.langfuse, clock=clock, backoff_initial=0.001, backoff_max=0.01, **reader)


def get(fake: FakeLangfuse, path: str, params: Any) -> httpx.Response:
    return httpx.get(fake.url + path, params=params, auth=(fake.public_key, fake.secret_key))


def window(clock: Clock) -> dict[str, str]:
    return {
        "fromTimestamp": at(clock, 3600).isoformat(),
        "toTimestamp": at(clock, -1).isoformat(),
    }


# --- 1. scores follow [poll] environments --------------------------------------------------------------------


def test_v3_scores_has_a_strict_query_and_takes_environment_as_one_comma_separated_value(
    fake: FakeLangfuse, clock: Clock
) -> None:
    prod = fake.add_score(environment="production", timestamp=at(clock, 10))
    stage = fake.add_score(environment="staging", timestamp=at(clock, 9))
    fake.add_score(environment="dev", timestamp=at(clock, 8))

    both = get(fake, V3_SCORES, {**window(clock), "environment": "production,staging"})
    assert both.status_code == 200
    assert {s["id"] for s in both.json()["data"]} == {prod["id"], stage["id"]}

    repeated = get(fake, V3_SCORES, {**window(clock), "environment": ["production", "staging"]})
    assert repeated.status_code == 400
    assert repeated.json()["message"] == "Invalid request data"
    assert repeated.json()["error"][0]["path"] == ["environment"]

    unknown = get(fake, V3_SCORES, {**window(clock), "page": "1"})
    assert unknown.status_code == 400
    assert unknown.json()["error"][0]["code"] == "unrecognized_keys"
    assert unknown.json()["error"][0]["keys"] == ["page"]

    # the legacy list takes either form
    fake.serve = "both"
    for form in ("production,staging", ["production", "staging"]):
        legacy = get(fake, V2_SCORES, {**window(clock), "environment": form})
        assert legacy.status_code == 200
        assert {s["id"] for s in legacy.json()["data"]} == {prod["id"], stage["id"]}


@pytest.mark.parametrize("api", ["v2", "legacy"])
def test_scores_follow_poll_environments_on_either_read_path(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path, api: str
) -> None:
    fake.serve = "both"
    config = make_config(
        fake, tmp_path, langfuse={"api": api}, poll={"environments": ["production", "staging"], "start": "-10m"}
    )
    kept = [
        fake.add_score(environment="production", timestamp=at(clock, 30)),
        fake.add_score(environment="staging", timestamp=at(clock, 20)),
    ]
    fake.add_score(environment="dev", timestamp=at(clock, 10))
    with runtime_for(config, clock) as runtime:
        poll(runtime)
    assert set(delivered(tmp_path)) == {f"score.created:{s['id']}" for s in kept}
    assert not fake.errors


# --- 2. rate-limit headers as the server sends them ----------------------------------------------------------


def test_only_a_429_carries_rate_limit_headers_and_its_reset_is_a_javascript_date(
    fake: FakeLangfuse, clock: Clock
) -> None:
    clock.now = 1_787_386_960.0  # Sat Aug 22 2026 08:22:40 UTC
    fake.set_rate_limit(1)
    ok = get(fake, V3_SCORES, window(clock))
    assert ok.status_code == 200
    assert not [name for name in ok.headers if name.lower().startswith(("x-ratelimit", "retry-after"))]
    refused = get(fake, V3_SCORES, window(clock))
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "20"
    assert refused.headers["X-RateLimit-Limit"] == "1"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert refused.headers["X-RateLimit-Reset"] == "Sat Aug 22 2026 08:23:00 GMT+0000 (Coordinated Universal Time)"
    assert refused.json() == {
        "message": "Rate limit exceeded",
        "code": "rate_limited",
        "details": {"retryAfterSeconds": 20, "limit": 1, "remaining": 0, "resetAt": "2026-08-22T08:23:00.000Z"},
    }


def test_a_429_without_retry_after_waits_until_its_javascript_reset_date(fake: FakeLangfuse, clock: Clock) -> None:
    reader = reader_for(fake, clock, "v2")
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.advance(seconds)

    reader._sleep = sleep  # type: ignore[method-assign]
    fake.rate_limit_next(1, retry_after=42, retry_after_header=False)
    try:
        assert list(reader.observations(at(clock, 60), at(clock, 0)))
    finally:
        reader.close()
    assert waits == [pytest.approx(42, abs=1)]
    assert [r.status for r in fake.requests] == [429, 200]


# --- 3. one id twice in a page of /v2/observations -------------------------------------------------------------


def test_the_stand_in_can_serve_an_older_row_beside_the_newer_one(fake: FakeLangfuse, clock: Clock) -> None:
    root = fake.add_trace(start_time=at(clock, 30))[0]
    clock.advance(1)
    newer = fake.update_observation(root["id"], tags=["checked"])
    params = {
        "fromStartTime": at(clock, 60).isoformat(),
        "toStartTime": at(clock, 0).isoformat(),
        "fields": "core,time",
    }
    assert [r["id"] for r in get(fake, V2_OBSERVATIONS, params).json()["data"]] == [root["id"]]
    fake.duplicate_rows = True
    rows = get(fake, V2_OBSERVATIONS, params).json()["data"]
    assert [r["id"] for r in rows] == [root["id"], root["id"]]
    assert sorted(r["updatedAt"] for r in rows) == sorted([root["updatedAt"], newer["updatedAt"]])


def test_a_row_served_twice_in_a_page_makes_no_extra_trace_updated(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path
) -> None:
    config = make_config(fake, tmp_path, langfuse={"api": "v2"}, poll={"start": "-10m"})
    root = fake.add_trace(start_time=at(clock, 30))[0]
    clock.advance(1)
    fake.update_observation(root["id"], tags=["checked"])
    fake.duplicate_rows = True
    with runtime_for(config, clock) as runtime:
        poll(runtime)
        clock.advance(120)
        poll(runtime, force_sweeps=True)
    assert dict(delivered(tmp_path)) == {f"trace.created:{root['traceId']}": 1}


def test_a_time_that_cannot_be_read_fails_its_row_not_the_page() -> None:
    from langfuse_poller.langfuse.answers import newest_rows

    good = {"id": "o1", "updatedAt": "2026-12-01T10:00:00.000Z", "n": "good"}
    broken = {"id": "o1", "updatedAt": "not a time", "n": "broken"}
    newer = {"id": "o1", "updatedAt": "2026-12-01T10:00:05.000Z", "n": "newer"}
    other = {"id": "o2", "updatedAt": "2026-12-01T10:00:00.000Z"}
    # the readable row is the record, whichever comes first; the newest readable one wins
    assert newest_rows([broken, other, good]) == [good, other]
    assert newest_rows([good, broken, newer]) == [newer]
    # two unreadable rows: the first stays, to become a dead letter when its events are made
    assert newest_rows([broken, {**broken, "n": "again"}]) == [broken]


# --- 4. one score, one event, on either read path ------------------------------------------------------------


def test_a_score_makes_the_same_event_on_either_read_path(fake: FakeLangfuse, clock: Clock) -> None:
    fake.serve = "both"
    trace_id = fake.add_trace(start_time=at(clock, 60), observations=1)[1]["traceId"]
    child = fake.add_trace(start_time=at(clock, 60), observations=1)[1]
    scores = [
        fake.add_score(trace_id=trace_id, timestamp=at(clock, 50)),
        fake.add_score(trace_id=child["traceId"], observation_id=child["id"], timestamp=at(clock, 40)),
        fake.add_score(trace_id=trace_id, session_id="session-1", timestamp=at(clock, 30)),
        fake.add_score(trace_id=trace_id, dataset_run_id="run-1", timestamp=at(clock, 20)),
        fake.add_score(session_id="session-2", timestamp=at(clock, 10)),
    ]
    factory = EventFactory("https://langfuse.example")
    events: dict[str, dict[str, Any]] = {}
    for api in ("v2", "legacy"):
        reader = reader_for(fake, clock, api)
        try:
            records = [r for page in reader.scores(at(clock, 120), at(clock, 0)) for r in page.records]
        finally:
            reader.close()
        made = [e for r in records for e in factory.from_record("scores", r, None).events]
        events[api] = {e.id: e.envelope() for e in made}
    assert len(events["v2"]) == len(scores)
    assert events["v2"] == events["legacy"]
    # /v3/scores picks experiment, observation, session, trace; only an observation subject names its trace
    by_score = {e["data"]["scoreId"]: e["data"] for e in events["v2"].values()}
    assert [(by_score[s["id"]]["traceId"], by_score[s["id"]]["sessionId"]) for s in scores] == [
        (trace_id, None),
        (child["traceId"], None),
        (None, "session-1"),
        (None, None),
        (None, "session-2"),
    ]


# --- 6. one trace by id: its core alone ----------------------------------------------------------------------


def test_a_single_trace_is_read_with_its_core_fields_alone(fake: FakeLangfuse, clock: Clock) -> None:
    fake.serve = "legacy"
    # a child in the window whose trace (its root) started before it: the reader looks the trace up by id
    records = fake.add_trace(start_time=at(clock, 600), observations=1, name="checkout", tags=["shop"])
    child = fake.update_observation(records[1]["id"], start_time=at(clock, 30), level="ERROR")
    trace_id = child["traceId"]

    full = get(fake, f"{TRACES}/{trace_id}", {}).json()
    assert any(o["input"] for o in full["observations"]) and full["latency"] >= 0
    core = get(fake, f"{TRACES}/{trace_id}", {"fields": "core"}).json()
    assert (core["observations"], core["scores"], core["latency"], core["totalCost"]) == ([], [], -1, -1)
    assert (core["name"], core["tags"]) == ("checkout", ["shop"])

    reader = reader_for(fake, clock, "legacy")
    try:
        [observation] = [r for page in reader.observations(at(clock, 60), at(clock, 0)) for r in page.records]
    finally:
        reader.close()
    assert (observation["traceName"], observation["tags"]) == ("checkout", ["shop"])
    lookups = [r for r in fake.requests if r.path == f"{TRACES}/{trace_id}"][2:]
    assert [r.query for r in lookups] == [{"fields": ["core"]}]


# --- 7. /v2/observations: lenient field groups, totalCost 0 ----------------------------------------------------


def test_v2_observations_drops_unknown_field_groups_and_serves_no_cost_as_zero(
    fake: FakeLangfuse, clock: Clock
) -> None:
    root = fake.add_observation(start_time=at(clock, 30), name="root")
    free = fake.add_observation(start_time=at(clock, 20), trace_id=root["traceId"], type="GENERATION", model="local")
    params = {"fromStartTime": at(clock, 60).isoformat(), "toStartTime": at(clock, 0).isoformat()}

    def keys(fields: Any) -> set[str]:
        answer = get(fake, V2_OBSERVATIONS, {**params, "fields": fields})
        assert answer.status_code == 200, answer.text
        return set(answer.json()["data"][0])

    core = {"id", "traceId", "startTime", "endTime", "projectId", "parentObservationId", "type"}
    assert keys("core,usage,bogus") == core | {"usageDetails", "costDetails", "totalCost", "usagePricingTierName"}
    assert keys("bogus") == core  # nothing valid left: core alone, not the default core,basic
    assert (
        keys("")
        == keys(None)
        == core
        | {"name", "level", "statusMessage", "version", "environment"}
        | {
            "bookmarked",
            "public",
            "userId",
            "sessionId",
            "isRootObservation",
        }
    )
    assert get(fake, V2_OBSERVATIONS, {**params, "fields": ["core", "bogus"]}).status_code == 400
    usage = get(fake, V2_OBSERVATIONS, {**params, "fields": "usage"}).json()["data"]
    assert {r["id"]: r["totalCost"] for r in usage} == {root["id"]: 0, free["id"]: 0}


def test_a_generation_without_cost_makes_the_same_event_on_either_read_path(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path
) -> None:
    fake.serve = "both"
    root = fake.add_observation(start_time=at(clock, 30), name="root", trace_name="root")
    child = {"trace_id": root["traceId"], "parent_observation_id": root["id"], "trace_name": "root"}
    fake.add_observation(start_time=at(clock, 20), type="GENERATION", model="local", **child)
    fake.add_observation(
        start_time=at(clock, 10),
        **child,
        type="GENERATION",
        model="gpt-4o",
        cost_details={"input": 0.25, "output": 0.5, "total": 0.75},
        total_cost=0.75,
    )
    outputs = []
    for api in ("v2", "legacy"):
        directory = tmp_path / api
        directory.mkdir()
        config = make_config(fake, directory, langfuse={"api": api}, poll={"start": "-10m"})
        with runtime_for(config, clock) as runtime:
            poll(runtime)
        outputs.append(sorted((directory / "events.jsonl").read_text().splitlines()))
    assert outputs[0] == outputs[1]
    costs = sorted(json.loads(line)["data"].get("totalCost", -1) for line in outputs[0])
    assert costs == [-1, 0, 0.75]  # the trace.created has none; a generation without cost costs 0, as on v2


# --- 5. legacy lists: more than a page inside one millisecond, in an order that changes -------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_crowded_millisecond_whose_tie_order_shuffles_is_read_whole_once(
    fake: FakeLangfuse, clock: Clock, seed: int
) -> None:
    fake.serve = "legacy"
    fake.shuffle_ties(seed)
    start, end = at(clock, 1000), at(clock, 700)
    crowd = start + timedelta(seconds=100)
    starts = [start + timedelta(seconds=i) for i in range(50)] + [crowd] * 230
    starts += [crowd + timedelta(seconds=1 + i) for i in range(60)]
    roots = [fake.add_trace(start_time=t)[0]["id"] for t in starts]
    scores = [fake.add_score(timestamp=t)["id"] for t in [crowd] * 150 + [crowd + timedelta(seconds=1)] * 20]
    reader = reader_for(fake, clock, "legacy")
    try:
        observations = [r for page in reader.observations(start, end) for r in page.records]
        read_scores = [r["id"] for page in reader.scores(start, end) for r in page.records]
    finally:
        reader.close()
    assert Counter(r["id"] for r in observations) == Counter(roots)
    assert Counter(read_scores) == Counter(scores)
    # every root found its trace in the traces list, read the same way
    assert all(r["traceName"] == "trace" for r in observations)
    assert fake.errors == []


def test_the_stand_in_orders_ties_differently_on_each_request_repeatably(fake: FakeLangfuse, clock: Clock) -> None:
    fake.serve = "legacy"
    moment = at(clock, 30)
    for _ in range(20):
        fake.add_trace(start_time=moment)
    params = {"fromStartTime": at(clock, 60).isoformat(), "toStartTime": at(clock, 0).isoformat()}

    def orders(seed: int | None) -> list[list[str]]:
        fake.shuffle_ties(seed)
        return [[r["id"] for r in get(fake, V1_OBSERVATIONS, params).json()["data"]] for _ in range(3)]

    stable = orders(None)
    assert stable[0] == stable[1] == stable[2]
    shuffled = orders(5)
    assert len({tuple(o) for o in shuffled}) == 3 and all(sorted(o) == sorted(stable[0]) for o in shuffled)
    assert orders(5) == shuffled


# --- 8. never a traceback from what a server sends -------------------------------------------------------------


def test_the_key_check_does_not_depend_on_a_projects_organization(fake: FakeLangfuse, clock: Clock) -> None:
    fake.projects_organization = False
    assert "organization" not in get(fake, "/api/public/projects", {}).json()["data"][0]
    reader = reader_for(fake, clock)
    try:
        result = reader.check()
    finally:
        reader.close()
    assert result.projects == (("proj-test", "test-project"),)


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ("list", "a JSON list, not an object with a 'data' list"),
        ("no-data", "no 'data' list"),
        ("data-not-list", "no 'data' list"),
        ("cursor", "meta.cursor that is not a string"),
        ("html", "text/html, not JSON"),
        ("empty", "an empty body"),
    ],
)
def test_an_unexpected_answer_is_one_error_naming_the_endpoint_and_the_next_poll_reads_again(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path, body: str, said: str
) -> None:
    config = make_config(fake, tmp_path, langfuse={"api": "v2"}, poll={"start": "-10m"})
    root = fake.add_trace(start_time=at(clock, 30))[0]
    with runtime_for(config, clock) as runtime:
        fake.unexpected_next(2, body)
        result = runtime.poller.poll_once()
        assert [error.split(":", 1)[0] for error in result.errors] == ["observations", "scores"], result.errors
        for error, path in zip(result.errors, (V2_OBSERVATIONS, V3_SCORES), strict=True):
            assert f"GET {path}" in error and said in error, error
        assert [r.status for r in fake.requests] == [200, 200]  # no retry: the answer will not change in seconds
        poll(runtime)
    assert set(delivered(tmp_path)) == {f"trace.created:{root['traceId']}"}
