"""Event making: which records yield which events, with which ids."""

from __future__ import annotations

import pytest

from langfuse_poller.events import Event, EventFactory, ExtraFields, MalformedRecord, Seen, record_version

FACTORY = EventFactory("https://cloud.langfuse.com/", lambda: True)


def obs(**fields: object) -> dict[str, object]:
    record: dict[str, object] = {
        "id": "o1",
        "traceId": "t1",
        "projectId": "p1",
        "type": "SPAN",
        "startTime": "2026-11-27T07:37:16.522Z",
        "updatedAt": "2026-11-27T07:37:17.000Z",
        "level": "DEFAULT",
        "parentObservationId": "o0",
        "isRootObservation": False,
    }
    record.update(fields)
    return record


def types(outcome: object) -> list[str]:
    return [e.id for e in outcome.events]  # type: ignore[attr-defined]


def test_a_root_generation_with_an_error() -> None:
    record = obs(type="GENERATION", isRootObservation=True, parentObservationId=None, level="ERROR", traceName="chat")
    result = FACTORY.from_observation(record, None)
    assert types(result) == [
        "trace.created:t1",
        "generation.created:o1",
        "observation.created:o1",
        "trace.updated:o1:1795765037000",
    ]
    created = result.events[0]
    assert created.data["name"] == "chat"
    assert created.data["url"] == "https://cloud.langfuse.com/project/p1/traces/t1"
    assert created.timestamp.isoformat() == "2026-11-27T07:37:16.522000+00:00"
    assert result.seen == Seen("1795765037000", "ERROR")


def test_each_event_of_an_observation_has_exactly_this_envelope() -> None:
    # the text is what handlers and notifiers receive: the fields, their order and their values are pinned
    record = obs(
        type="GENERATION",
        isRootObservation=True,
        parentObservationId=None,
        level="ERROR",
        statusMessage="upstream 500",
        name="llm-call",
        traceName="chat",
        environment="production",
        userId="u1",
        sessionId="s1",
        tags=["beta"],
        release="v2",
        model="gpt-4o",
        usageDetails={"input": 120, "output": 30},
        costDetails={"total": 0.0012},
        totalCost=0.0012,
        latency=1.25,
        timeToFirstToken=0.3,
    )
    assert [e.to_json() for e in FACTORY.from_observation(record, None).events] == [
        (
            '{"id":"trace.created:t1","event":"trace.created","timestamp":"2026-11-27T07:37:16.522Z",'
            '"source":"poll","data":{"projectId":"p1","traceId":"t1","observationId":"o1","name":"chat",'
            '"level":"ERROR","statusMessage":"upstream 500","environment":"production",'
            '"url":"https://cloud.langfuse.com/project/p1/traces/t1","userId":"u1","sessionId":"s1",'
            '"tags":["beta"],"release":"v2"}}'
        ),
        (
            '{"id":"generation.created:o1","event":"generation.created","timestamp":"2026-11-27T07:37:16.522Z",'
            '"source":"poll","data":{"projectId":"p1","traceId":"t1","observationId":"o1","name":"llm-call",'
            '"level":"ERROR","statusMessage":"upstream 500","environment":"production",'
            '"url":"https://cloud.langfuse.com/project/p1/traces/t1","traceName":"chat","userId":"u1",'
            '"sessionId":"s1","model":"gpt-4o","usage":{"promptTokens":120.0,"completionTokens":30.0,"totalTokens":150.0},'
            '"usageDetails":{"input":120,"output":30},"costDetails":{"total":0.0012},"totalCost":0.0012,'
            '"latency":1.25,"timeToFirstToken":0.3}}'
        ),
        (
            '{"id":"observation.created:o1","event":"observation.created","timestamp":"2026-11-27T07:37:16.522Z",'
            '"source":"poll","data":{"projectId":"p1","traceId":"t1","observationId":"o1","name":"llm-call",'
            '"level":"ERROR","statusMessage":"upstream 500","environment":"production",'
            '"url":"https://cloud.langfuse.com/project/p1/traces/t1","type":"GENERATION",'
            '"parentObservationId":null}}'
        ),
        (
            '{"id":"trace.updated:o1:1795765037000","event":"trace.updated",'
            '"timestamp":"2026-11-27T07:37:16.522Z","source":"poll","data":{"projectId":"p1","traceId":"t1",'
            '"observationId":"o1","name":"llm-call","level":"ERROR","statusMessage":"upstream 500",'
            '"environment":"production","url":"https://cloud.langfuse.com/project/p1/traces/t1",'
            '"type":"GENERATION","traceName":"chat","userId":"u1","sessionId":"s1","tags":["beta"],'
            '"isRootObservation":true}}'
        ),
    ]


def test_the_field_groups_read_are_added_last_to_the_data_of_each_observation_event() -> None:
    # [poll] fields = ["prompt", "metadata", "io"]: the prompt, the metadata and the io follow the fields every
    # poller sends, so that a receiver pinned to those sees them unchanged; trace.created gets the io alone
    factory = EventFactory(
        "https://cloud.langfuse.com/", lambda: True, ExtraFields(frozenset({"io", "metadata", "prompt"}), 8)
    )
    record = obs(
        type="GENERATION",
        isRootObservation=True,
        parentObservationId=None,
        level="ERROR",
        promptId="pr1",
        promptName="answer",
        promptVersion=3,
        metadata={"tier": "gold"},
        input='{"q":"hello there"}',
        output="hi",
    )
    extra = (
        ',"promptId":"pr1","promptName":"answer","promptVersion":3,"metadata":{"tier":"gold"},'
        '"input":"{\\"q\\":\\"he…[truncated 11 chars]","output":"hi"}}'
    )
    texts = {e.type: e.to_json() for e in factory.from_observation(record, None).events}
    assert texts["trace.created"].endswith(
        ',"release":null,"input":"{\\"q\\":\\"he…[truncated 11 chars]","output":"hi"}}'
    )
    assert texts["generation.created"].endswith(',"timeToFirstToken":null' + extra)
    assert texts["observation.created"].endswith(',"parentObservationId":null' + extra)
    assert texts["trace.updated"].endswith(',"isRootObservation":true' + extra)


def test_seen_again_yields_only_what_changed() -> None:
    first = FACTORY.from_observation(obs(level="ERROR"), None)
    same = FACTORY.from_observation(obs(level="ERROR", updatedAt="2026-11-27T07:40:00.000Z"), first.seen)
    assert types(same) == []  # an error is reported once, not at every update of the same observation
    warning = FACTORY.from_observation(obs(level="WARNING"), None)
    worse = FACTORY.from_observation(obs(level="ERROR"), warning.seen)
    assert [e.type for e in worse.events] == ["trace.updated"]


def test_a_root_whose_updated_at_moved_is_trace_updated() -> None:
    root = obs(isRootObservation=True, parentObservationId=None)
    first = FACTORY.from_observation(root, None)
    assert [e.type for e in first.events] == ["trace.created", "observation.created"]
    moved = FACTORY.from_observation({**root, "updatedAt": "2026-11-27T08:00:00.000Z"}, first.seen)
    assert [e.id for e in moved.events] == ["trace.updated:o1:1795766400000"]
    again = FACTORY.from_observation({**root, "updatedAt": "2026-11-27T08:00:00.000Z"}, moved.seen)
    assert again.events == ()


def test_scores_created_and_updated() -> None:
    score = {
        "id": "s1",
        "projectId": "p1",
        "name": "helpfulness",
        "value": 0.25,
        "dataType": "NUMERIC",
        "source": "EVAL",
        "timestamp": "2026-11-27T07:37:16.522Z",
        "updatedAt": "2026-11-27T07:37:16.522Z",
        "subject": {"kind": "observation", "id": "o1", "traceId": "t1"},
        "comment": "meh",
    }
    created = FACTORY.from_score(score, None)
    [event] = created.events
    assert event.id == "score.created:s1"
    assert event.data["traceId"] == "t1" and event.data["observationId"] == "o1"
    assert event.data["value"] == 0.25 and event.data["comment"] == "meh"
    assert FACTORY.from_score(score, created.seen).events == ()
    updated = FACTORY.from_score({**score, "updatedAt": "2026-11-27T09:00:00.000Z"}, created.seen)
    assert [e.type for e in updated.events] == ["score.updated"]
    categorical = FACTORY.from_score({**score, "value": "good", "dataType": "CATEGORICAL"}, None)
    assert categorical.events[0].data["value"] is None
    assert categorical.events[0].data["stringValue"] == "good"
    boolean = FACTORY.from_score({**score, "value": True, "dataType": "BOOLEAN"}, None)
    assert boolean.events[0].data["value"] == 1.0


@pytest.mark.parametrize(
    "broken",
    [
        obs(traceId=None),
        obs(startTime="yesterday"),
        obs(startTime="0001-01-01T00:00:00+01:00"),
        obs(id=""),
        obs(projectId=3),
        ["not", "an", "object"],
    ],
)
def test_malformed_records_raise(broken: object) -> None:
    with pytest.raises(MalformedRecord):
        FACTORY.from_observation(broken, None)  # type: ignore[arg-type]


def test_a_version_out_of_the_range_of_dates_is_no_version() -> None:
    assert record_version({"updatedAt": "9999-12-31T23:59:59-01:00"}) == "0"


def test_envelope_round_trip() -> None:
    event = FACTORY.from_observation(obs(), None).events[0]
    again = Event.from_json(event.to_json())
    assert again == event
    assert set(event.envelope()) == {"id", "event", "timestamp", "source", "data"}


ROOT = {"isRootObservation": True, "parentObservationId": None}
RECORDS = [
    obs(),
    obs(level="ERROR"),
    obs(level="WARNING", updatedAt=None),
    obs(type="GENERATION", usageDetails={"input": 3}),
    obs(**ROOT),
    obs(**ROOT, level="ERROR", updatedAt="2026-11-27T08:00:00.000Z"),
    obs(**ROOT, updatedAt="not a time"),
    obs(isRootObservation=None, parentObservationId=None),
]
PREVIOUS = [None, Seen("1795765037000", "DEFAULT"), Seen("1795765037000", "ERROR"), Seen("0", "WARNING")]


@pytest.mark.parametrize("observation_created", [True, False])
def test_events_of_a_record_not_remembered_are_those_of_from_record(observation_created: bool) -> None:
    factory = EventFactory("https://cloud.langfuse.com/", lambda: observation_created)
    score = {"id": "s1", "projectId": "p1", "name": "q", "value": 1, "timestamp": "2026-11-27T07:37:16.522Z"}
    cases = [("observations", r) for r in RECORDS] + [("scores", score), ("scores", {**score, "updatedAt": "x"})]
    for stream, record in cases:
        for previous in [*PREVIOUS, Seen("0")]:
            made = factory.from_record(stream, record, previous).events
            assert factory.events_of(stream, record, previous) == made
            assert [e.to_json() for e in factory.events_of(stream, record, previous)] == [e.to_json() for e in made]


@pytest.mark.parametrize(
    "broken",
    [obs(traceId=None), obs(startTime="yesterday"), obs(id=""), obs(projectId=3), ["not", "an", "object"], None],
)
def test_a_record_not_remembered_is_checked_the_same(broken: object) -> None:
    with pytest.raises(MalformedRecord) as remembered:
        FACTORY.from_record("observations", broken, None)
    with pytest.raises(MalformedRecord) as not_remembered:
        FACTORY.events_of("observations", broken, None)
    assert str(not_remembered.value) == str(remembered.value)


def test_seen_compares_by_version_and_level() -> None:
    assert Seen("1", "ERROR") == Seen("1", "ERROR")
    assert Seen("1", "ERROR") != Seen("1") and Seen("1") != Seen("2") and Seen("1") is not None
    assert Seen("bad").level == ""


def test_a_generation_carries_its_traces_user_and_session_as_the_stand_in_serves_them() -> None:
    # /v2/observations serves userId and sessionId (the `basic` group) on every observation of a trace, not only
    # its root: a rule can measure cost per user on generation.created alone
    from langfuse_poller.testing import FakeLangfuse, PollHarness

    with FakeLangfuse() as langfuse:
        clock = [1_800_000_000.0]
        langfuse.clock = lambda: clock[0]
        with PollHarness(langfuse) as harness:
            langfuse.add_trace(trace_id="t-user", observations=2, user_id="user-7", session_id="session-3")
            langfuse.add_trace(trace_id="t-anonymous", observations=1)
            clock[0] += 1  # the head reads up to now, exclusive
            events = harness.poll()
    generations = {e.data["traceId"]: e.data for e in events if e.type == "generation.created"}
    assert (generations["t-user"]["userId"], generations["t-user"]["sessionId"]) == ("user-7", "session-3")
    assert (generations["t-anonymous"]["userId"], generations["t-anonymous"]["sessionId"]) == (None, None)
