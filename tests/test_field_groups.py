"""`[poll] fields`: what the optional field groups of /v2/observations add to the events, end to end.

Each group is read from the stand-in by the real poller (PollHarness) on both read paths; input and output are
redacted and cut as configured; `expandMetadata` is sent only when metadata is read; what is added never changes
which events are made or their ids.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langfuse_poller.events import Event, EventFactory, ExtraFields, Seen
from langfuse_poller.notifiers.messages import message_for
from langfuse_poller.registry import Registry
from langfuse_poller.testing import FakeLangfuse, PollHarness

OBSERVATION_EVENTS = ("trace.created", "trace.updated", "generation.created", "observation.created")
PROMPT_KEYS = ("promptId", "promptName", "promptVersion")
ALL_EXTRA_KEYS = (*PROMPT_KEYS, "metadata", "input", "output")


def _everything(seen: list[Event]) -> Registry:
    """A registry whose handler records every observation event, observation.created included."""
    handlers = Registry()
    handlers.register(seen.append, list(OBSERVATION_EVENTS), name="everything")
    return handlers


def _poll(langfuse: FakeLangfuse, poll: dict[str, Any]) -> dict[str, Event]:
    """Poll once with `[poll]` updated by `poll`, and return the observation events by id."""
    seen: list[Event] = []
    with PollHarness(langfuse, handlers=_everything(seen), poll=poll) as harness:
        harness.poll()
    return {event.id: event for event in seen}


def _add_errored_generation(langfuse: FakeLangfuse, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trace whose root has `extra` too, and an ERROR generation under it with `extra`: every observation event."""
    start = datetime.now(UTC) - timedelta(minutes=5)
    root = langfuse.add_observation(trace_id="t1", id="root", start_time=start, name="chat", trace_name="chat", **extra)
    generation = langfuse.add_observation(
        trace_id="t1",
        id="gen",
        start_time=start,
        type="GENERATION",
        name="llm-call",
        level="ERROR",
        status_message="upstream 500",
        parent_observation_id="root",
        model="gpt-4o",
        trace_name="chat",
        **extra,
    )
    return root, generation


PROMPT = {"prompt_id": "prompt-7", "prompt_name": "support-answer", "prompt_version": 3}


# --- prompt -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("serve", ["v2", "legacy"])
def test_prompt_fields_reach_generation_updated_and_observation_events(serve: str) -> None:
    with FakeLangfuse() as langfuse:
        langfuse.serve = serve
        _add_errored_generation(langfuse, **PROMPT)
        events = _poll(langfuse, {"fields": ["prompt"]})
    expected = {"promptId": "prompt-7", "promptName": "support-answer", "promptVersion": 3}
    for event_id in ("generation.created:gen", "observation.created:gen", "observation.created:root"):
        assert {k: events[event_id].data[k] for k in PROMPT_KEYS} == expected, event_id
    updated = next(e for e in events.values() if e.type == "trace.updated")
    assert {k: updated.data[k] for k in PROMPT_KEYS} == expected
    # the trace is not its root's prompt: trace.created has no prompt, and nothing else of the other groups
    assert not set(ALL_EXTRA_KEYS) & set(events["trace.created:t1"].data)
    assert not {"metadata", "input", "output"} & set(events["generation.created:gen"].data)


@pytest.mark.parametrize("serve", ["v2", "legacy"])
def test_without_fields_the_extra_keys_are_absent_not_null(serve: str) -> None:
    with FakeLangfuse() as langfuse:
        langfuse.serve = serve
        # the legacy lists serve input, output, metadata and prompt whatever is asked: they are left out all the same
        _add_errored_generation(langfuse, metadata={"k": "v"}, input="hello", output="hi", **PROMPT)
        events = _poll(langfuse, {})
    assert set(events) == {
        "trace.created:t1",
        "generation.created:gen",
        "observation.created:root",
        "observation.created:gen",
        next(i for i in events if i.startswith("trace.updated:gen:")),
    }
    for event in events.values():
        assert not set(ALL_EXTRA_KEYS) & set(event.data), event.id
    requested = [r.query for r in langfuse.requests if r.path.endswith("/v2/observations")]
    for query in requested:
        assert "expandMetadata" not in query
        assert not {"io", "metadata", "prompt"} & set(query["fields"][0].split(","))


def test_a_fetched_group_of_a_record_without_it_gives_null_keys() -> None:
    with FakeLangfuse() as langfuse:
        _add_errored_generation(langfuse)
        events = _poll(langfuse, {"fields": ["prompt", "io", "metadata"]})
    generation = events["generation.created:gen"].data
    assert {k: generation[k] for k in ALL_EXTRA_KEYS} == {
        "promptId": None,
        "promptName": None,
        "promptVersion": None,
        "metadata": {},
        "input": None,
        "output": None,
    }


def test_messages_show_the_prompt_and_its_version() -> None:
    with FakeLangfuse() as langfuse:
        _add_errored_generation(langfuse, **PROMPT)
        events = _poll(langfuse, {"fields": ["prompt"]})
    generation = message_for(events["generation.created:gen"])
    assert ("Prompt", "support-answer v3") in generation.facts
    assert "Prompt: support-answer v3" in generation.text
    updated = message_for(next(e for e in events.values() if e.type == "trace.updated"))
    assert ("Prompt", "support-answer v3") in updated.facts
    assert "Prompt: support-answer v3" in updated.text
    # a record without a prompt, or a poller that does not read them: no prompt fact
    without = message_for(events["trace.created:t1"])
    assert all(label != "Prompt" for label, _ in without.facts)


def test_an_alert_on_errors_names_the_prompt_of_its_latest_match() -> None:
    rule = {"name": "errors", "events": ["trace.updated"], "when": 'data.level == "ERROR"', "notify": ["log"]}
    rules = [{**rule, "group_wait": "0s"}]
    with FakeLangfuse() as langfuse:
        _add_errored_generation(langfuse, **PROMPT)
        with PollHarness(
            langfuse, handlers=Registry(), rules=rules, notifiers={"log": {"type": "log"}}, poll={"fields": ["prompt"]}
        ) as harness:
            harness.poll()
            alerts = harness.alerts()
    assert [a.type for a in alerts] == ["rule.firing"]
    message = message_for(alerts[0])
    assert ("Prompt", "support-answer v3") in message.facts


def test_the_stand_in_gives_a_trace_s_generation_a_prompt_when_asked() -> None:
    with FakeLangfuse() as langfuse:
        root, generation, _ = langfuse.add_trace(trace_id="t2", observations=2, prompt=("support-answer", 3))
        events = _poll(langfuse, {"fields": ["prompt"]})
    assert (generation["promptName"], generation["promptVersion"]) == ("support-answer", 3)
    assert root["promptName"] is None
    data = events[f"generation.created:{generation['id']}"].data
    assert {k: data[k] for k in PROMPT_KEYS} == {
        "promptId": generation["promptId"],
        "promptName": "support-answer",
        "promptVersion": 3,
    }


# --- io -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("serve", ["v2", "legacy"])
def test_input_and_output_reach_every_observation_event_trace_created_included(serve: str) -> None:
    with FakeLangfuse() as langfuse:
        langfuse.serve = serve
        # a JSON text as a client sends it: the legacy lists parse it, and it is written again the same way
        _add_errored_generation(langfuse, input='{"messages":["hello"]}', output="hi there")
        events = _poll(langfuse, {"fields": ["io"]})
    assert {e.type for e in events.values()} == set(OBSERVATION_EVENTS)
    for event in events.values():
        # the raw string the server sends; on the legacy path, the JSON it parsed, written again compactly
        assert event.data["input"] == '{"messages":["hello"]}', event.id
        assert event.data["output"] == "hi there", event.id
        assert not {*PROMPT_KEYS, "metadata"} & set(event.data), event.id


def test_input_and_output_are_cut_to_io_max_chars_with_a_marker() -> None:
    with FakeLangfuse() as langfuse:
        _add_errored_generation(langfuse, input="x" * 2500, output="y" * 2000)
        cut = _poll(langfuse, {"fields": ["io"]})["generation.created:gen"].data
        short = _poll(langfuse, {"fields": ["io"], "io_max_chars": 10})["generation.created:gen"].data
        whole = _poll(langfuse, {"fields": ["io"], "io_max_chars": 0})["generation.created:gen"].data
    assert cut["input"] == "x" * 2000 + "…[truncated 500 chars]"
    assert cut["output"] == "y" * 2000  # exactly at the limit: whole, no marker
    assert short["input"] == "x" * 10 + "…[truncated 2490 chars]"
    assert short["output"] == "y" * 10 + "…[truncated 1990 chars]"
    assert (whole["input"], whole["output"]) == ("x" * 2500, "y" * 2000)


def test_input_and_output_are_redacted_before_they_are_cut() -> None:
    secret = "sk-" + "a" * 40
    with FakeLangfuse() as langfuse:
        _add_errored_generation(
            langfuse, input=f"key {secret} and mail bob@example.com", output="x" * 30 + secret + " tail"
        )
        poll = {"fields": ["io"], "redact_io": [r"sk-[A-Za-z0-9]+", r"(?i)[a-z0-9.]+@example\.com"], "io_max_chars": 35}
        events = _poll(langfuse, poll)
    generation = events["generation.created:gen"].data
    assert generation["input"] == "key [redacted] and mail [redacted]"
    # the secret straddles the cut: redacted first, so none of it shows
    assert generation["output"] == "x" * 30 + "[reda…[truncated 10 chars]"
    assert all(secret[:6] not in e.to_json() for e in events.values())


# --- metadata -------------------------------------------------------------------------------------------------------


def test_metadata_reaches_the_events_and_expand_metadata_is_sent_only_with_it() -> None:
    long_value = "v" * 300
    with FakeLangfuse() as langfuse:
        _add_errored_generation(langfuse, metadata={"request": long_value, "user_tier": "gold"})
        events = _poll(langfuse, {"fields": ["metadata"], "expand_metadata": ["request", "doc"]})
        cut = _poll(langfuse, {"fields": ["metadata"]})
        requests = [r.query for r in langfuse.requests if r.path.endswith("/v2/observations")]
    generation = events["generation.created:gen"].data
    assert generation["metadata"] == {"request": long_value, "user_tier": "gold"}
    assert events["observation.created:root"].data["metadata"]["request"] == long_value
    updated = next(e for e in events.values() if e.type == "trace.updated")
    assert updated.data["metadata"]["user_tier"] == "gold"
    assert "metadata" not in events["trace.created:t1"].data
    assert not {*PROMPT_KEYS, "input", "output"} & set(generation)
    # without expandMetadata the server cuts every value at 200 characters
    assert cut["generation.created:gen"].data["metadata"]["request"] == "v" * 200
    with_expand = [q for q in requests if "expandMetadata" in q]
    assert with_expand and all(q["expandMetadata"] == ["request,doc"] for q in with_expand)
    assert all("metadata" in q["fields"][0].split(",") for q in with_expand)
    assert len(with_expand) < len(requests)  # the second poller, without expand_metadata, sent none


def test_the_reader_sends_expand_metadata_only_when_it_reads_metadata() -> None:
    from langfuse_poller.config import LangfuseConfig, Secret
    from langfuse_poller.langfuse.reader import LangfuseReader

    with FakeLangfuse() as langfuse:
        config = LangfuseConfig(base_url=langfuse.url, public_key="pk-lf-test", secret_key=Secret("sk-lf-test"))
        now = datetime.now(UTC)
        for extra in ((), ("io",), ("metadata",)):
            reader = LangfuseReader(config, extra_fields=extra, expand_metadata=("request",))
            try:
                list(reader.observations(now - timedelta(minutes=1), now))
            finally:
                reader.close()
        queries = [r.query for r in langfuse.requests if r.path.endswith("/v2/observations")]
    assert ["expandMetadata" in q for q in queries] == [False, False, True]


# --- the same events, the same ids -----------------------------------------------------------------------------------

observations = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["SPAN", "GENERATION", "EVENT"]),
        "level": st.sampled_from(["DEFAULT", "WARNING", "ERROR", "DEBUG"]),
        "isRootObservation": st.sampled_from([True, False, None]),
        "parentObservationId": st.sampled_from([None, "p"]),
        "updatedAt": st.sampled_from(["2026-11-27T07:37:17.000Z", "2026-11-27T07:38:00.000Z", None]),
        "input": st.one_of(st.none(), st.text(max_size=50), st.dictionaries(st.text(max_size=5), st.integers())),
        "output": st.one_of(st.none(), st.text(max_size=50)),
        "metadata": st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5))),
        "promptName": st.one_of(st.none(), st.text(max_size=10)),
        "promptVersion": st.one_of(st.none(), st.integers(min_value=1, max_value=99)),
    }
)
previous = st.one_of(
    st.none(),
    st.builds(Seen, st.sampled_from(["1795765037000", "0"]), st.sampled_from(["", "DEFAULT", "ERROR", "WARNING"])),
)


@settings(max_examples=200, deadline=None)
@given(
    record=observations,
    seen=previous,
    subscribed=st.booleans(),
    groups=st.sets(st.sampled_from(["io", "metadata", "prompt"])),
    io_max_chars=st.integers(min_value=0, max_value=20),
)
def test_what_is_added_never_changes_which_events_are_made_nor_their_ids(
    record: dict[str, Any], seen: Seen | None, subscribed: bool, groups: set[str], io_max_chars: int
) -> None:
    record = {
        "id": "o1",
        "traceId": "t1",
        "projectId": "p1",
        "startTime": "2026-11-27T07:37:16.522Z",
        **{k: v for k, v in record.items() if v is not None or k == "isRootObservation"},
    }
    plain = EventFactory("https://cloud.langfuse.com", lambda: subscribed)
    extras = ExtraFields(frozenset(groups), io_max_chars=io_max_chars, redact_io=(r"\d+",))
    rich = EventFactory("https://cloud.langfuse.com", lambda: subscribed, extras)
    before, after = plain.from_observation(record, seen), rich.from_observation(record, seen)
    assert [(e.id, e.type, e.timestamp) for e in after.events] == [(e.id, e.type, e.timestamp) for e in before.events]
    assert (after.key, after.seen) == (before.key, before.seen)
    for old, new in zip(before.events, after.events, strict=True):
        # what was there is kept, unchanged, in its place; only the groups read are added
        assert list(new.data)[: len(old.data)] == list(old.data)
        assert {k: new.data[k] for k in old.data} == dict(old.data)
        added = set(new.data) - set(old.data)
        wanted = {"input", "output"} if "io" in groups else set()
        if new.type != "trace.created":
            wanted |= set(PROMPT_KEYS) if "prompt" in groups else set()
            wanted |= {"metadata"} if "metadata" in groups else set()
        assert added == wanted
        for key in ("input", "output"):
            text = new.data.get(key)
            if isinstance(text, str) and io_max_chars:
                assert len(text.partition("…[truncated ")[0]) <= io_max_chars


def test_the_readme_and_the_example_config_say_what_each_group_adds() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme, example = (root / "README.md").read_text(), (root / "config.example.toml").read_text()
    for text in (readme, example):
        for word in ("io_max_chars", "redact_io", "expand_metadata", "promptVersion", "metadata", "input"):
            assert word in text
        for group in ("prompt", "metadata", "io"):
            assert f'"{group}"' in text
