"""FakeLangfuse against the real SDK and plain httpx, over loopback HTTP."""

from __future__ import annotations

import base64
import json
import socket
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from langfuse.api import LangfuseAPI
from langfuse.api.core.api_error import ApiError

from langfuse_poller.testing.fake_langfuse import (
    OBSERVATION_FIELD_GROUPS,
    SCORE_FIELD_GROUPS,
    FakeLangfuse,
    RequestRecord,
    format_ms,
    parse_iso_us,
)
from langfuse_poller.testing.fake_langfuse.gate import javascript_date

OBS = "/api/public/v2/observations"
SCORES = "/api/public/v3/scores"
T0 = datetime(2026, 11, 27, 7, 37, 16, 522000, tzinfo=UTC)
NO_RETRY: Any = {"max_retries": 0}


class FakeClock:
    """A settable clock for visibility delays and rate-limit windows."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0.timestamp() + 3600)


@pytest.fixture
def fake(clock: FakeClock) -> Iterator[FakeLangfuse]:
    with FakeLangfuse(clock=clock) as f:
        yield f
    assert f.errors == []


@pytest.fixture
def http(fake: FakeLangfuse) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, auth=(fake.public_key, fake.secret_key), timeout=5) as client:
        yield client


@pytest.fixture
def api(fake: FakeLangfuse) -> LangfuseAPI:
    return LangfuseAPI(base_url=fake.url, username=fake.public_key, password=fake.secret_key, timeout=5)


def get_all(http: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every record, following meta.cursor."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        resp = http.get(path, params=query)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        out.extend(body["data"])
        cursor = body["meta"].get("cursor")
        if cursor is None:
            return out


def order_key(rec: dict[str, Any]) -> tuple[int, int, str]:
    return (parse_iso_us(rec["startTime"]), zlib.crc32(rec["traceId"].encode()), rec["id"])


# --- SDK ------------------------------------------------------------------------------------------------


def test_sdk_health_projects_and_bad_keys(fake: FakeLangfuse, api: LangfuseAPI) -> None:
    health = api.health.health()
    assert (health.status, health.version) == ("OK", "3.130.0")
    projects = api.projects.get()
    assert [p.id for p in projects.data] == ["proj-test"]
    assert projects.data[0].organization.name == "test-org"

    bad = LangfuseAPI(base_url=fake.url, username=fake.public_key, password="sk-wrong", timeout=5)
    assert bad.health.health().status == "OK"  # health does not check keys
    with pytest.raises(ApiError) as err:
        bad.projects.get(request_options=NO_RETRY)
    assert err.value.status_code == 401
    assert err.value.body == {"message": "Invalid credentials. Confirm that you've configured the correct host."}
    with pytest.raises(ApiError) as err:
        bad.observations.get_many(request_options=NO_RETRY)
    assert err.value.status_code == 401


def test_sdk_pages_observations(fake: FakeLangfuse, api: LangfuseAPI) -> None:
    traces = [
        fake.add_trace(
            start_time=T0 + timedelta(seconds=i),
            observations=2,
            name=f"t{i}",
            user_id="u1",
            session_id="s1",
            tags=["a", "b"],
            environment="production",
        )
        for i in range(4)
    ]
    fake.add_observation(start_time=T0 - timedelta(days=1))  # outside the window
    fields = "core,basic,time,model,usage,metrics,trace_context"
    seen = []
    cursor = None
    pages = 0
    while True:
        page = api.observations.get_many(
            limit=5,
            fields=fields,
            cursor=cursor,
            from_start_time=T0,
            to_start_time=T0 + timedelta(seconds=4),
        )
        pages += 1
        seen.extend(page.data)
        cursor = page.meta.cursor
        if cursor is None:
            break
    assert pages == 3
    by_id = {o.id: o for o in seen}
    assert len(seen) == len(by_id) == 12
    assert [o.start_time for o in seen] == sorted((o.start_time for o in seen), reverse=True)
    for i, records in enumerate(traces):
        root, gen, span = (by_id[r["id"]] for r in records)
        assert root.is_root_observation is True and root.parent_observation_id is None
        assert root.type == "SPAN" and root.name == f"t{i}"
        assert root.start_time == T0 + timedelta(seconds=i)
        assert gen.type == "GENERATION" and gen.parent_observation_id == root.id
        assert gen.is_root_observation is False
        assert gen.model == "gpt-4o"
        usage, cost = gen.usage_details, gen.cost_details
        assert usage is not None and cost is not None
        assert usage["total"] == usage["input"] + usage["output"] > 0
        assert cost["total"] == pytest.approx(cost["input"] + cost["output"])
        assert gen.total_cost == cost["total"]
        assert gen.latency is not None and gen.latency > 0
        assert gen.end_time == gen.start_time + timedelta(seconds=gen.latency)
        assert span.type == "SPAN" and span.model is None
        for o in (root, gen, span):
            assert o.trace_id == records[0]["traceId"]
            assert o.trace_name == f"t{i}" and o.tags == ["a", "b"]
            assert (o.user_id, o.session_id, o.environment) == ("u1", "s1", "production")
            assert o.project_id == "proj-test" and o.created_at is not None and o.updated_at == o.created_at


def test_sdk_pages_scores(fake: FakeLangfuse, api: LangfuseAPI) -> None:
    fake.add_score(id="s-num", trace_id="t1", value=0.5, timestamp=T0, comment="ok")
    fake.add_score(id="s-bool", observation_id="o1", trace_id="t1", value=True, data_type="BOOLEAN", timestamp=T0)
    fake.add_score(
        id="s-cat",
        session_id="sess",
        value="good",
        data_type="CATEGORICAL",
        timestamp=T0 + timedelta(seconds=1),
    )
    fake.add_score(id="s-text", trace_id="t2", value="fine", data_type="TEXT", source="ANNOTATION", timestamp=T0)
    seen = []
    cursor = None
    while True:
        page = api.scores.get_many(limit=2, fields="details,subject", cursor=cursor, from_timestamp=T0)
        assert page.meta.limit == 2
        seen.extend(page.data)
        cursor = page.meta.cursor
        if cursor is None:
            break
    # timestamp DESC, then id DESC
    assert [s.id for s in seen] == ["s-cat", "s-text", "s-num", "s-bool"]
    by_id = {s.id: s for s in seen}
    num, boolean, cat, text = by_id["s-num"], by_id["s-bool"], by_id["s-cat"], by_id["s-text"]
    assert num.data_type == "NUMERIC" and num.value == 0.5 and num.comment == "ok"
    assert boolean.data_type == "BOOLEAN" and boolean.value is True
    assert cat.data_type == "CATEGORICAL" and cat.value == "good"
    assert text.data_type == "TEXT" and text.value == "fine" and text.source == "ANNOTATION"
    assert num.subject is not None and num.subject.kind == "trace" and num.subject.id == "t1"
    assert boolean.subject is not None and boolean.subject.kind == "observation"
    assert boolean.subject.id == "o1" and boolean.subject.trace_id == "t1"
    assert cat.subject is not None and cat.subject.kind == "session" and cat.subject.id == "sess"
    assert num.timestamp == T0 and num.environment == "default" and num.project_id == "proj-test"


# --- observations: order, cursor, limits, fields, filters ------------------------------------------------


def test_observation_order_and_cursor_return_each_record_once(fake: FakeLangfuse, http: httpx.Client) -> None:
    # Many ties on startTime, so traceId hash and id decide the order and the cursor must handle them.
    for i in range(60):
        fake.add_observation(start_time=T0 + timedelta(milliseconds=i % 4), trace_id=f"trace-{i % 7}")
    expected = sorted(
        (r for r in get_all(http, OBS, limit=1000)),
        key=order_key,
        reverse=True,
    )
    for limit in (1, 7, 10, 59, 60, 61):
        records = get_all(http, OBS, limit=limit)
        assert [r["id"] for r in records] == [r["id"] for r in expected], limit
    assert len(expected) == 60


def test_cursor_format_and_absence(fake: FakeLangfuse, http: httpx.Client) -> None:
    for i in range(10):
        fake.add_observation(id=f"o{i}", trace_id="t", start_time=T0 + timedelta(seconds=i))
    first = http.get(OBS, params={"limit": 5}).json()
    assert [r["id"] for r in first["data"]] == ["o9", "o8", "o7", "o6", "o5"]
    token = json.loads(base64.b64decode(first["meta"]["cursor"]))
    assert token == {
        "lastStartTimeTo": format_ms(int((T0 + timedelta(seconds=5)).timestamp() * 1000)),
        "lastTraceId": "t",
        "lastId": "o5",
    }
    # A full last page has no cursor either.
    second = http.get(OBS, params={"limit": 5, "cursor": first["meta"]["cursor"]}).json()
    assert [r["id"] for r in second["data"]] == ["o4", "o3", "o2", "o1", "o0"]
    assert "cursor" not in second["meta"]
    short = http.get(OBS, params={"limit": 50}).json()
    assert len(short["data"]) == 10 and "cursor" not in short["meta"]
    assert http.get(OBS, params={"cursor": "not-a-cursor"}).status_code == 400


def test_keyset_cursor_skips_records_landing_above_it(fake: FakeLangfuse, http: httpx.Client) -> None:
    for i in range(4):
        fake.add_observation(id=f"o{i}", start_time=T0 + timedelta(seconds=i))
    first = http.get(OBS, params={"limit": 2}).json()
    fake.add_observation(id="late-new", start_time=T0 + timedelta(seconds=10))
    fake.add_observation(id="late-old", start_time=T0 - timedelta(seconds=10))
    rest = http.get(OBS, params={"limit": 10, "cursor": first["meta"]["cursor"]}).json()
    assert [r["id"] for r in rest["data"]] == ["o1", "o0", "late-old"]


def test_limits(fake: FakeLangfuse, http: httpx.Client, api: LangfuseAPI) -> None:
    fake.add_observation()
    fake.add_score()
    assert http.get(OBS, params={"limit": 1000}).status_code == 200
    for bad in ("1001", "0", "-1", "ten"):
        resp = http.get(OBS, params={"limit": bad})
        assert resp.status_code == 400, bad
        assert "message" in resp.json()
    assert http.get(SCORES, params={"limit": 100}).json()["meta"]["limit"] == 100
    assert http.get(SCORES).json()["meta"]["limit"] == 50
    for bad in ("101", "0"):
        assert http.get(SCORES, params={"limit": bad}).status_code == 400
    with pytest.raises(ApiError) as err:
        api.observations.get_many(limit=1001, request_options=NO_RETRY)
    assert err.value.status_code == 400
    with pytest.raises(ApiError) as err:
        api.scores.get_many(limit=101, request_options=NO_RETRY)
    assert err.value.status_code == 400


def test_bad_requests(fake: FakeLangfuse, http: httpx.Client) -> None:
    # the server drops an unknown group of the single string, and refuses a repeated `fields`
    assert http.get(OBS, params={"fields": "core,nope"}).status_code == 200
    assert http.get(OBS, params={"fields": ["core", "nope"]}).status_code == 400
    assert http.get(OBS, params={"parseIoAsJson": "true"}).status_code == 400
    assert http.get(OBS, params={"parseIoAsJson": "false"}).status_code == 200
    assert http.get(OBS, params={"fromStartTime": "yesterday"}).status_code == 400
    assert http.get(OBS, params={"level": "LOUD"}).status_code == 400
    assert http.get(SCORES, params={"fields": "details,basic"}).status_code == 400
    assert http.get("/api/public/traces").status_code == 404
    assert http.get("/api/public/observations").status_code == 404
    assert http.get("/api/public/v2/scores").status_code == 404
    assert http.post(OBS, json={}).status_code == 405


def test_observation_field_groups(fake: FakeLangfuse, http: httpx.Client) -> None:
    fake.add_trace(observations=1, start_time=T0)
    every = ",".join(OBSERVATION_FIELD_GROUPS)
    core = set(OBSERVATION_FIELD_GROUPS["core"])
    basic = set(OBSERVATION_FIELD_GROUPS["basic"])
    cases: list[tuple[str | None, set[str]]] = [
        (None, core | basic),
        ("core", core),
        ("usage", core | set(OBSERVATION_FIELD_GROUPS["usage"])),
        (
            "time, metrics",
            core | {"completionStartTime", "createdAt", "updatedAt", "latency", "timeToFirstToken"},
        ),
        (every, {k for keys in OBSERVATION_FIELD_GROUPS.values() for k in keys}),
    ]
    for fields, keys in cases:
        params = {"fields": fields} if fields is not None else {}
        for rec in http.get(OBS, params=params).json()["data"]:
            assert set(rec) == keys, fields
    records = http.get(OBS, params={"fields": every, "type": "SPAN"}).json()["data"]
    assert len(records) == 1
    span = records[0]
    assert span["usageDetails"] == {} and span["costDetails"] == {} and span["metadata"] == {}
    assert span["model"] is None and span["promptName"] is None and span["tags"] == []
    assert span["startTime"] == "2026-11-27T07:37:16.522Z"
    gen = http.get(OBS, params={"fields": "io", "type": "GENERATION"}).json()["data"][0]
    assert isinstance(gen["input"], str) and json.loads(gen["input"])[0]["role"] == "user"


def test_metadata_values_are_cut_unless_expanded(fake: FakeLangfuse, http: httpx.Client) -> None:
    fake.add_observation(metadata={"long": "x" * 500, "short": "y", "other": "z" * 300})
    meta = http.get(OBS, params={"fields": "metadata"}).json()["data"][0]["metadata"]
    assert meta == {"long": "x" * 200, "short": "y", "other": "z" * 200}
    # naming any key, or reading io, reads every value whole, as the server does
    whole = {"long": "x" * 500, "short": "y", "other": "z" * 300}
    meta = http.get(OBS, params={"fields": "metadata", "expandMetadata": "long"}).json()["data"][0]["metadata"]
    assert meta == whole
    meta = http.get(OBS, params={"fields": "metadata,io"}).json()["data"][0]["metadata"]
    assert meta == whole


def test_time_filters_are_half_open(fake: FakeLangfuse, http: httpx.Client, api: LangfuseAPI) -> None:
    for i in range(5):
        fake.add_observation(id=f"o{i}", start_time=T0 + timedelta(milliseconds=i))

    def ids(**params: Any) -> list[str]:
        return [r["id"] for r in get_all(http, OBS, **params)]

    t1 = "2026-11-27T07:37:16.523Z"
    t3 = "2026-11-27T07:37:16.525Z"
    assert ids(fromStartTime=t1, toStartTime=t3) == ["o2", "o1"]
    # SDK style microseconds and "+00:00" offsets, and fractions of any length.
    sdk_style = {
        "fromStartTime": "2026-11-27T07:37:16.523000Z",
        "toStartTime": "2026-11-27T07:37:16.525000+00:00",
    }
    assert ids(**sdk_style) == ["o2", "o1"]
    assert ids(fromStartTime="2026-11-27T07:37:16.5225Z") == ["o4", "o3", "o2", "o1"]
    assert ids(toStartTime="2026-11-27T07:37:16.5231Z") == ["o1", "o0"]
    assert ids(fromStartTime="2026-11-27T08:37:16.523+01:00", toStartTime=t1) == []
    page = api.observations.get_many(from_start_time=T0, to_start_time=T0 + timedelta(milliseconds=1))
    assert [o.id for o in page.data] == ["o0"]


def test_observation_filters(fake: FakeLangfuse, http: httpx.Client) -> None:
    prod = fake.add_trace(trace_id="tp", observations=2, environment="production", user_id="u", name="chat")
    fake.add_trace(trace_id="ts", observations=1, environment="staging", session_id="s", level="ERROR")
    fake.add_observation(environment="dev", type="EVENT", name="ping")

    def ids(**params: Any) -> set[str]:
        return {r["id"] for r in get_all(http, OBS, **params)}

    assert len(ids()) == 6
    assert ids(traceId="tp") == {r["id"] for r in prod}
    assert len(ids(environment=["production", "staging"])) == 5
    assert len(ids(environment="dev")) == 1
    assert len(ids(isRootObservation="true")) == 3
    assert len(ids(isRootObservation="false")) == 3
    assert len(ids(type="GENERATION")) == 2
    assert len(ids(level="ERROR")) == 1
    assert len(ids(name="ping")) == 1
    assert ids(userId="u") == {r["id"] for r in prod}
    assert len(ids(sessionId="s")) == 2
    assert ids(parentObservationId=prod[0]["id"]) == {r["id"] for r in prod[1:]}


def test_score_fields_and_filters(fake: FakeLangfuse, http: httpx.Client) -> None:
    fake.add_score(trace_id="t1", name="q", config_id="c1", metadata={"k": "v"}, author_user_id="a", queue_id="q1")
    fake.add_score(observation_id="o1", trace_id="t1", name="q", source="EVAL", environment="prod")
    fake.add_score(session_id="s1", name="r", value="x", data_type="CATEGORICAL")
    core = set(SCORE_FIELD_GROUPS["core"])
    for rec in http.get(SCORES).json()["data"]:
        assert set(rec) == core
    everything = http.get(SCORES, params={"fields": "details,annotation,subject", "configId": "c1"}).json()
    [rec] = everything["data"]
    assert set(rec) == core | {"comment", "configId", "metadata", "authorUserId", "queueId", "subject"}
    assert (rec["metadata"], rec["authorUserId"], rec["queueId"]) == ({"k": "v"}, "a", "q1")

    def count(**params: Any) -> int:
        return len(get_all(http, SCORES, **params))

    assert count(traceId="t1") == 2
    assert count(observationId="o1") == 1
    assert count(sessionId="s1") == 1
    assert count(name="q") == 2
    assert count(source="EVAL") == 1
    assert count(dataType="CATEGORICAL") == 1
    assert count(environment="prod") == 1


def test_score_time_filters_and_cursor(fake: FakeLangfuse, http: httpx.Client) -> None:
    for i in range(30):
        fake.add_score(id=f"s{i:02d}", timestamp=T0 + timedelta(seconds=i // 3))
    records = get_all(http, SCORES, limit=4)
    assert [r["id"] for r in records] == [f"s{i:02d}" for i in reversed(range(30))]
    window = get_all(
        http,
        SCORES,
        limit=4,
        fromTimestamp=format_ms(int(T0.timestamp() * 1000) + 1000),
        toTimestamp="2026-11-27T07:37:19.522Z",
    )
    assert [r["id"] for r in window] == ["s08", "s07", "s06", "s05", "s04", "s03"]
    cursor = http.get(SCORES, params={"limit": 4}).json()["meta"]["cursor"]
    assert "=" not in cursor and "+" not in cursor and "/" not in cursor  # base64url


# --- visibility and updates -------------------------------------------------------------------------------


def test_visibility_delay(fake: FakeLangfuse, http: httpx.Client, clock: FakeClock) -> None:
    fake.add_observation(id="now")
    fake.add_observation(id="late", visible_after=30)
    fake.add_score(id="late-score", visible_after=20)
    assert [r["id"] for r in get_all(http, OBS)] == ["now"]
    assert get_all(http, SCORES) == []
    clock.now += 20
    assert [r["id"] for r in get_all(http, SCORES)] == ["late-score"]
    assert [r["id"] for r in get_all(http, OBS)] == ["now"]
    clock.now += 10
    assert {r["id"] for r in get_all(http, OBS)} == {"now", "late"}


def test_updates_become_visible_after_their_delay(fake: FakeLangfuse, http: httpx.Client, clock: FakeClock) -> None:
    added = fake.add_observation(id="o", name="before", level="DEFAULT")
    assert added["updatedAt"] == added["createdAt"]
    clock.now += 5
    updated = fake.update_observation("o", visible_after=10, name="after", level="ERROR", statusMessage="boom")
    assert updated["updatedAt"] == format_ms(int(clock.now * 1000)) != updated["createdAt"]

    def current() -> dict[str, Any]:
        [rec] = get_all(http, OBS, fields="basic,time")
        return rec

    assert (current()["name"], current()["updatedAt"]) == ("before", added["updatedAt"])
    clock.now += 10
    rec = current()
    assert (rec["name"], rec["level"], rec["statusMessage"]) == ("after", "ERROR", "boom")
    assert rec["updatedAt"] == updated["updatedAt"] and rec["createdAt"] == added["createdAt"]

    fake.add_score(id="s", value=0.1)
    fake.update_score("s", visible_after=5, value=0.9, comment="re-scored")
    assert get_all(http, SCORES)[0]["value"] == 0.1
    clock.now += 5
    [score] = get_all(http, SCORES, fields="details")
    assert (score["value"], score["comment"]) == (0.9, "re-scored")
    with pytest.raises(KeyError):
        fake.update_observation("missing", name="x")
    with pytest.raises(ValueError):
        fake.update_observation("o", no_such_field=1)


def test_update_moving_start_time(fake: FakeLangfuse, http: httpx.Client, clock: FakeClock) -> None:
    fake.add_observation(id="a", start_time=T0)
    fake.add_observation(id="b", start_time=T0 + timedelta(seconds=1))
    fake.update_observation("a", visible_after=3, start_time=T0 + timedelta(seconds=2))
    assert [r["id"] for r in get_all(http, OBS)] == ["b", "a"]
    clock.now += 3
    assert [r["id"] for r in get_all(http, OBS)] == ["a", "b"]
    assert get_all(http, OBS)[0]["startTime"] == format_ms(int(T0.timestamp() * 1000) + 2000)


def test_raw_observation_is_served_as_stored(fake: FakeLangfuse, http: httpx.Client, api: LangfuseAPI) -> None:
    raw = {"id": "bad", "traceId": 7, "startTime": "not a time", "surprise": [1, 2]}
    fake.add_raw_observation(raw, start_time=T0)
    fake.add_observation(id="good", start_time=T0 - timedelta(seconds=1))
    data = http.get(OBS, params={"fields": "core"}).json()["data"]
    assert data == [raw, data[1]] and data[1]["id"] == "good"
    with pytest.raises(Exception):  # noqa: B017 - the SDK's parse error type is not part of its API
        api.observations.get_many()


# --- faults, rate limits, request log ------------------------------------------------------------------


def test_rate_limit_next(fake: FakeLangfuse, http: httpx.Client, clock: FakeClock) -> None:
    fake.rate_limit_next(1, retry_after=7)
    resp = http.get(OBS)
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "7"
    assert resp.headers["X-RateLimit-Remaining"] == "0"
    assert int(resp.headers["X-RateLimit-Limit"]) > 0
    # a JavaScript Date.toString(), as the server writes it
    assert resp.headers["X-RateLimit-Reset"] == javascript_date(clock.now + 7)
    assert resp.headers["X-RateLimit-Reset"].endswith(" GMT+0000 (Coordinated Universal Time)")
    body = resp.json()
    assert body["message"] == "Rate limit exceeded" and body["code"] == "rate_limited"
    details = body["details"]
    assert details["retryAfterSeconds"] == 7 and details["remaining"] == 0
    assert details["limit"] == int(resp.headers["X-RateLimit-Limit"])
    assert parse_iso_us(details["resetAt"]) == int((clock.now + 7) * 1000) * 1000
    assert http.get(OBS).status_code == 200


def test_faults_apply_to_data_requests_in_order(fake: FakeLangfuse, http: httpx.Client) -> None:
    fake.fail_next(2, status=500)
    fake.malformed_next()
    fake.fail_next(1)
    assert http.get("/api/public/health").status_code == 200  # not a data endpoint
    assert http.get("/api/public/projects").status_code == 200
    first = http.get(OBS)
    assert (first.status_code, first.json()) == (500, {"message": "Internal Server Error"})
    assert http.get(SCORES).status_code == 500
    malformed = http.get(OBS)
    assert malformed.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        malformed.json()
    assert http.get(SCORES).status_code == 503
    assert http.get(OBS).status_code == 200
    # Bad credentials do not consume a fault.
    fake.fail_next()
    assert httpx.get(fake.url + OBS, auth=("pk", "wrong")).status_code == 401
    assert http.get(OBS).status_code == 503


def test_sdk_sees_injected_errors(fake: FakeLangfuse, api: LangfuseAPI) -> None:
    fake.fail_next(1, status=502)
    with pytest.raises(ApiError) as err:
        api.observations.get_many(request_options=NO_RETRY)
    assert err.value.status_code == 502
    fake.rate_limit_next(1, retry_after=3)
    with pytest.raises(ApiError) as err:
        api.scores.get_many(request_options=NO_RETRY)
    assert err.value.status_code == 429 and err.value.headers is not None
    assert err.value.headers["retry-after"] == "3"


def test_slow_next_makes_clients_time_out(fake: FakeLangfuse, http: httpx.Client) -> None:
    fake.slow_next(1, seconds=0.6)
    with pytest.raises(httpx.ReadTimeout):
        http.get(OBS, timeout=0.1)
    assert http.get(OBS, timeout=1).status_code == 200


def test_set_rate_limit_budget(fake: FakeLangfuse, http: httpx.Client, clock: FakeClock) -> None:
    clock.now = 1_800_000_000 + 45.5  # 14.5 s before the window ends
    fake.set_rate_limit(3)
    remaining = []
    for _ in range(3):
        resp = http.get(OBS)
        assert resp.status_code == 200
        # the server puts rate-limit headers on the 429 alone
        remaining.append(resp.headers.get("X-RateLimit-Remaining"))
    assert remaining == [None, None, None]
    assert http.get("/api/public/projects").status_code == 200  # not counted
    blocked = http.get(SCORES)
    assert blocked.status_code == 429
    assert blocked.headers["Retry-After"] == "15"
    assert blocked.headers["X-RateLimit-Limit"] == "3"
    assert blocked.headers["X-RateLimit-Remaining"] == "0"
    assert blocked.headers["X-RateLimit-Reset"] == javascript_date(1_800_000_060)
    assert blocked.json()["details"]["limit"] == 3
    clock.now += 15
    assert http.get(OBS).status_code == 200
    fake.set_rate_limit(None)
    assert "X-RateLimit-Limit" not in http.get(OBS).headers


def test_request_log(fake: FakeLangfuse, http: httpx.Client) -> None:
    http.get(OBS, params={"limit": 5, "environment": ["a", "b"]})
    http.get(SCORES)
    http.get("/api/public/health")
    httpx.get(fake.url + SCORES, auth=("x", "y"))
    assert fake.count("/v2/observations") == 1
    assert fake.count("/v3/scores") == 2
    assert fake.count("/health") == 1
    first = fake.requests[0]
    assert isinstance(first, RequestRecord)
    assert (first.method, first.path, first.status) == ("GET", OBS, 200)
    assert first.query == {"limit": ["5"], "environment": ["a", "b"]}
    assert [r.status for r in fake.requests] == [200, 200, 200, 401]
    fake.reset_requests()
    assert fake.requests == [] and fake.count("") == 0


# --- server lifecycle, parsing, speed -------------------------------------------------------------------


def test_stop_drops_keep_alive_connections_and_restart_reuses_port(clock: FakeClock) -> None:
    fake = FakeLangfuse(clock=clock).start()
    url = fake.url
    with httpx.Client(base_url=url, auth=(fake.public_key, fake.secret_key), timeout=2) as client:
        assert client.get(OBS).status_code == 200
        assert client.get(OBS).status_code == 200  # same kept-alive connection
        fake.stop()
        with pytest.raises(httpx.TransportError):
            client.get(OBS)
        fake.start()
        assert fake.url == url
        assert client.get(OBS).status_code == 200
    fake.stop()
    with pytest.raises(RuntimeError):
        _ = fake.url


def test_keep_alive_is_used(fake: FakeLangfuse, http: httpx.Client) -> None:
    for _ in range(5):
        resp = http.get(OBS)
        assert resp.http_version == "HTTP/1.1" and "content-length" in resp.headers
    with socket.create_connection(("127.0.0.1", int(fake.url.rsplit(":", 1)[1]))) as sock:
        auth = base64.b64encode(f"{fake.public_key}:{fake.secret_key}".encode()).decode()
        request = f"GET {OBS} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n\r\n".encode()
        sock.sendall(request + request)
        received = b""
        while received.count(b"HTTP/1.1 200") < 2:
            chunk = sock.recv(65536)
            assert chunk
            received += chunk


def test_parse_iso_us() -> None:
    expected = int(T0.timestamp()) * 1_000_000 + 522_000
    for text in (
        "2026-11-27T07:37:16.522Z",
        "2026-11-27T07:37:16.522000Z",
        "2026-11-27T07:37:16.522+00:00",
        "2026-11-27T07:37:16.522 00:00",  # an unescaped "+" in a query string
        "2026-11-27T08:37:16.522+01:00",
        "2026-11-27T07:37:16.5220000009Z",
        "2026-11-27T07:37:16.522",
    ):
        assert parse_iso_us(text) == expected, text
    assert parse_iso_us("2026-11-27T07:37:16Z") == expected - 522_000
    with pytest.raises(ValueError):
        parse_iso_us("27/11/2026")


def test_add_validation(fake: FakeLangfuse) -> None:
    fake.add_observation(id="x")
    with pytest.raises(ValueError):
        fake.add_observation(id="x")
    with pytest.raises(ValueError):
        fake.add_observation(colour="red")
    with pytest.raises(ValueError):
        fake.add_score(data_type="FLOAT")
    score = fake.add_score(value="1", data_type="BOOLEAN")
    assert score["value"] is True and score["subject"]["kind"] == "trace"
    assert fake.add_score(value=3, data_type="NUMERIC")["value"] == 3.0


def test_large_page_out_of_many(fake: FakeLangfuse, http: httpx.Client) -> None:
    for i in range(20_000):
        fake.add_observation(start_time=T0 + timedelta(milliseconds=i))
    resp = http.get(OBS, params={"limit": 1000, "fields": "core,basic,time,usage,trace_context"})
    assert resp.status_code == 200
    body = resp.json()
    assert len(body["data"]) == 1000 and "cursor" in body["meta"]
    assert body["data"][0]["startTime"] == format_ms(int(T0.timestamp() * 1000) + 19_999)
    tail = http.get(OBS, params={"limit": 1000, "toStartTime": format_ms(int(T0.timestamp() * 1000) + 500)})
    assert len(tail.json()["data"]) == 500 and "cursor" not in tail.json()["meta"]
