"""Synthetic events: the envelope, and how Langfuse records become events.

Ids are deterministic (`<event>:<record id>` for created events, `<event>:<record id>:<version>` for updates)
so that the same record never yields two different ids, whichever poll or replica sees it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import orjson

from .util.durations import format_time, parse_time

SOURCES = ("poll", "webhook", "test", "rule")
ERROR_LEVELS = ("ERROR", "WARNING")
# the dedup key of a record is its stream's prefix and its id
KEY_PREFIXES = {"observations": "o:", "scores": "s:"}
# which stream each polled event type is made from
STREAM_OF_EVENT = {
    "trace.created": "observations",
    "trace.updated": "observations",
    "generation.created": "observations",
    "observation.created": "observations",
    "score.created": "scores",
    "score.updated": "scores",
}


@dataclass(frozen=True)
class Event:
    """One event in the envelope that webhook payloads have, plus `id` and `source`."""

    id: str
    type: str
    timestamp: datetime
    source: str
    data: Mapping[str, Any]
    # the envelope as JSON, kept once made or read: a delivery stores, loads and sends the same text
    json_text: str | None = field(default=None, compare=False, repr=False)

    def envelope(self) -> dict[str, Any]:
        """The JSON-ready envelope: {id, event, timestamp, source, data}."""
        return {
            "id": self.id,
            "event": self.type,
            "timestamp": _format_utc(self.timestamp),
            "source": self.source,
            "data": self.data if type(self.data) is dict else dict(self.data),
        }

    def to_json(self) -> str:
        if self.json_text is None:
            text = orjson.dumps(self.envelope(), default=str).decode()
            object.__setattr__(self, "json_text", text)
            return text
        return self.json_text

    @classmethod
    def from_envelope(cls, envelope: Mapping[str, Any]) -> Event:
        """Rebuild an event from its envelope (as stored, or as received)."""
        return cls(
            id=str(envelope["id"]),
            type=str(envelope["event"]),
            timestamp=parse_time(str(envelope["timestamp"])),
            source=str(envelope.get("source", "webhook")),
            data=dict(envelope.get("data") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> Event:
        event = cls.from_envelope(orjson.loads(text))
        object.__setattr__(event, "json_text", text)
        return event


def _parse_utc(text: str) -> datetime:
    """parse_time, with a fast path for the form the API sends ("...Z"): a catch-up parses two per record."""
    if text[-1:] == "Z":
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            pass
    return parse_time(text)


def _format_utc(moment: datetime) -> str:
    """format_time, about a third cheaper: every event's envelope has one."""
    if moment.tzinfo is not UTC:
        return format_time(moment)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"


REDACTED = "[redacted]"
PROMPT_FIELDS = ("promptId", "promptName", "promptVersion")


class FieldGroupSettings(Protocol):
    """The `[poll]` keys ExtraFields is made from (config.PollConfig has them; events never imports config)."""

    @property
    def fields(self) -> tuple[str, ...]: ...

    @property
    def io_max_chars(self) -> int: ...

    @property
    def redact_io(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class ExtraFields:
    """What the events carry of the observation field groups that `[poll] fields` reads beyond their own.

    `prompt` adds promptId, promptName and promptVersion, `metadata` the metadata, to generation.created,
    trace.updated and observation.created; `io` adds input and output to those and to trace.created (a root
    observation's input and output are its trace's). A group read adds its keys to every such event, null when
    the record has none; a group not read adds none. Input and output are redacted with `redact_io` (regular
    expressions, matches become "[redacted]"), then cut to `io_max_chars` characters (0: kept whole) and marked.
    """

    groups: frozenset[str] = frozenset()
    io_max_chars: int = 2000
    redact_io: tuple[str, ...] = ()

    @classmethod
    def of(cls, poll: FieldGroupSettings) -> ExtraFields:
        """The extra fields a `[poll]` config asks for."""
        return cls(frozenset(poll.fields), poll.io_max_chars, poll.redact_io)


class _Extras:
    """ExtraFields at work: the added data of one record, for the events of each kind."""

    def __init__(self, extras: ExtraFields) -> None:
        self.io = "io" in extras.groups
        self.prompt = "prompt" in extras.groups
        self.metadata = "metadata" in extras.groups
        self.max_chars = extras.io_max_chars
        self.redact = tuple(re.compile(pattern) for pattern in extras.redact_io)

    def of(self, record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """What trace.created adds (the io), and what the other events add (prompt, metadata, io)."""
        io: dict[str, Any] = {}
        if self.io:
            io = {"input": self.text(record.get("input")), "output": self.text(record.get("output"))}
        added: dict[str, Any] = {}
        if self.prompt:
            added.update((key, record.get(key)) for key in PROMPT_FIELDS)
        if self.metadata:
            metadata = record.get("metadata")
            added["metadata"] = {} if metadata is None else metadata
        added.update(io)
        return io, added

    def text(self, value: Any) -> str | None:
        """Input or output as the text v2 serves, redacted, then cut; the legacy lists serve them parsed."""
        if value is None:
            return None
        text = value if isinstance(value, str) else _json_text(value)
        # redacted before the cut, so that a secret across the cut leaves no part of itself
        for pattern in self.redact:
            text = pattern.sub(REDACTED, text)
        if self.max_chars and len(text) > self.max_chars:
            return f"{text[: self.max_chars]}…[truncated {len(text) - self.max_chars} chars]"
        return text


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # an integer beyond 64 bits, which orjson does not write
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


class MalformedRecord(ValueError):
    """Raised when a record from the API lacks what an event needs; it becomes a dead letter with its raw JSON."""


# Seen and RecordOutcome are named tuples rather than frozen dataclasses: a catch-up makes one of each per record,
# and a named tuple costs half as much to make. Only Seen is compared, always with another Seen.
class Seen(NamedTuple):
    """What the store remembers of a record it has turned into events: its version, and its level."""

    version: str
    level: str = ""


class RecordOutcome(NamedTuple):
    """The events made from one record, and what to remember of the record from now on."""

    key: str
    timestamp: datetime
    seen: Seen
    events: tuple[Event, ...]


def record_version(record: Mapping[str, Any]) -> str:
    """The version of a record: its updatedAt in epoch milliseconds ("0" when the API did not send it)."""
    stamp = record.get("updatedAt") or record.get("createdAt")
    if not isinstance(stamp, str):
        return "0"
    try:
        return str(int(_parse_utc(stamp).timestamp() * 1000))
    except ValueError:
        return "0"


def record_key(stream: str, record: Any) -> str | None:
    """The dedup key of a record of `stream`; None when the record has no usable id."""
    record_id = record.get("id") if isinstance(record, Mapping) else None
    if not isinstance(record_id, str) or not record_id:
        return None
    return KEY_PREFIXES[stream] + record_id


def _required_str(record: Mapping[str, Any], field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value:
        raise MalformedRecord(f"field {field!r} must be a non-empty string, found {value!r}")
    return value


def _required_time(record: Mapping[str, Any], field: str) -> datetime:
    value = record.get(field)
    if not isinstance(value, str):
        raise MalformedRecord(f"field {field!r} must be an RFC 3339 time, found {value!r}")
    try:
        return _parse_utc(value)
    except ValueError:
        raise MalformedRecord(f"field {field!r} must be an RFC 3339 time, found {value!r}") from None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _usage(details: Any) -> dict[str, float | None]:
    """The classic {promptTokens, completionTokens, totalTokens} from Langfuse's usageDetails."""
    if not isinstance(details, Mapping):
        return {"promptTokens": None, "completionTokens": None, "totalTokens": None}
    prompt = _number(details.get("input"))
    completion = _number(details.get("output"))
    total = _number(details.get("total"))
    if total is None and (prompt is not None or completion is not None):
        total = (prompt or 0) + (completion or 0)
    return {"promptTokens": prompt, "completionTokens": completion, "totalTokens": total}


# shared by every record when no field group is read: the builders only read it
_NOTHING: dict[str, Any] = {}

# One builder per event type made from an observation: `common` holds the fields every one of them has, built
# once per record by EventFactory._observation, which alone decides which of them a record yields.


def _trace_created(
    record: Mapping[str, Any], common: dict[str, Any], trace_id: str, start: datetime, added: dict[str, Any]
) -> Event:
    """trace.created, from the root observation of a trace seen for the first time."""
    data = {
        **common,
        "name": record.get("traceName") or record.get("name"),
        "userId": record.get("userId"),
        "sessionId": record.get("sessionId"),
        "tags": record.get("tags") or [],
        "release": record.get("release"),
    }
    if added:
        data.update(added)
    return Event(id=f"trace.created:{trace_id}", type="trace.created", timestamp=start, source="poll", data=data)


def _generation_created(
    record: Mapping[str, Any], common: dict[str, Any], obs_id: str, start: datetime, added: dict[str, Any]
) -> Event:
    """generation.created, from a GENERATION observation seen for the first time."""
    data = {
        **common,
        "traceName": record.get("traceName"),
        # every observation of a trace carries its user and session (/v2/observations' `basic` group,
        # packages/shared/src/server/repositories/observations_converters.ts; on the legacy path, the trace's
        # context): what a rule needs to measure cost per user or per session
        "userId": record.get("userId"),
        "sessionId": record.get("sessionId"),
        "model": record.get("model"),
        "usage": _usage(record.get("usageDetails")),
        "usageDetails": record.get("usageDetails") or {},
        "costDetails": record.get("costDetails") or {},
        "totalCost": record.get("totalCost"),
        "latency": record.get("latency"),
        "timeToFirstToken": record.get("timeToFirstToken"),
    }
    if added:
        data.update(added)
    return Event(
        id=f"generation.created:{obs_id}", type="generation.created", timestamp=start, source="poll", data=data
    )


def _observation_created(
    record: Mapping[str, Any],
    common: dict[str, Any],
    obs_id: str,
    obs_type: str,
    start: datetime,
    added: dict[str, Any],
) -> Event:
    """observation.created, from any observation seen for the first time, when something subscribes to it."""
    data = {**common, "type": obs_type, "parentObservationId": record.get("parentObservationId")}
    if added:
        data.update(added)
    return Event(
        id=f"observation.created:{obs_id}", type="observation.created", timestamp=start, source="poll", data=data
    )


def _trace_updated(
    record: Mapping[str, Any],
    common: dict[str, Any],
    obs_id: str,
    obs_type: str,
    version: str,
    is_root: bool,
    start: datetime,
    added: dict[str, Any],
) -> Event:
    """trace.updated, from an observation first seen at an error level, or a root whose version moved."""
    data = {
        **common,
        "type": obs_type,
        "traceName": record.get("traceName"),
        "userId": record.get("userId"),
        "sessionId": record.get("sessionId"),
        "tags": record.get("tags") or [],
        "isRootObservation": is_root,
    }
    if added:
        data.update(added)
    return Event(
        id=f"trace.updated:{obs_id}:{version}", type="trace.updated", timestamp=start, source="poll", data=data
    )


class EventFactory:
    """Turns raw API records into events. `observation_created` says whether anything subscribes to it;
    `extras` what the events carry of the field groups `[poll] fields` reads."""

    def __init__(
        self,
        base_url: str,
        observation_created: Callable[[], bool] = lambda: False,
        extras: ExtraFields = ExtraFields(),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.observation_created = observation_created
        self.extras = extras
        # None without groups: the data of each event is then made as it is without the option, at no cost
        self._extras = _Extras(extras) if extras.groups else None

    def trace_url(self, project_id: str, trace_id: str | None) -> str:
        if trace_id:
            return f"{self.base_url}/project/{project_id}/traces/{trace_id}"
        return f"{self.base_url}/project/{project_id}"

    def from_record(self, stream: str, record: Any, previous: Seen | None) -> RecordOutcome:
        """Events for a record of `stream` ("observations" or "scores")."""
        if stream == "observations":
            return self.from_observation(record, previous)
        return self.from_score(record, previous)

    def events_of(self, stream: str, record: Any, previous: Seen | None) -> tuple[Event, ...]:
        """The events of `from_record`, the record checked the same way, for a read that remembers nothing of it
        (a slice that keeps no dedup keys): an observation then costs no time parse of its version, unless an
        event's id needs it."""
        if stream == "observations":
            return self._observation(record, previous, remember=False)[0]
        return self.from_score(record, previous).events

    def from_observation(self, record: Mapping[str, Any], previous: Seen | None) -> RecordOutcome:
        """Events for an observation seen for the first time (`previous` None) or seen again."""
        outcome = self._observation(record, previous, remember=True)[1]
        assert outcome is not None  # made whenever the record is to be remembered
        return outcome

    def _observation(
        self, record: Mapping[str, Any], previous: Seen | None, *, remember: bool
    ) -> tuple[tuple[Event, ...], RecordOutcome | None]:
        """The events of an observation, and, when it is to be remembered, its RecordOutcome."""
        if not isinstance(record, Mapping):
            raise MalformedRecord(f"an observation must be a JSON object, found {type(record).__name__}")
        obs_id = _required_str(record, "id")
        trace_id = _required_str(record, "traceId")
        project_id = _required_str(record, "projectId")
        obs_type = _required_str(record, "type")
        start = _required_time(record, "startTime")
        level = record.get("level") or "DEFAULT"
        is_root = bool(record.get("isRootObservation")) or (
            record.get("isRootObservation") is None and not record.get("parentObservationId")
        )
        # an error or warning yields one update when first seen at that level; a root yields one per new version
        became_error = level in ERROR_LEVELS and (previous is None or previous.level != level)
        # the version is a time parse, needed only to be remembered, to tell whether a root seen before moved, and
        # for the id of trace.updated: most records of a slice that keeps no dedup keys need none
        version = record_version(record) if remember or became_error or (is_root and previous is not None) else ""
        root_moved = is_root and previous is not None and version != previous.version
        created = previous is None and (is_root or obs_type == "GENERATION" or self.observation_created())
        if not (created or became_error or root_moved):
            # most observations of a trace are spans that yield nothing: only what the dedup key needs
            if not remember:
                return (), None
            return (), RecordOutcome(KEY_PREFIXES["observations"] + obs_id, start, Seen(version, level), ())
        common = {
            "projectId": project_id,
            "traceId": trace_id,
            "observationId": obs_id,
            "name": record.get("name"),
            "level": level,
            "statusMessage": record.get("statusMessage"),
            "environment": record.get("environment"),
            "url": self.trace_url(project_id, trace_id),
        }
        # what the field groups read add to the data, made once for all the record's events; never which events
        io, added = self._extras.of(record) if self._extras is not None else (_NOTHING, _NOTHING)
        # which events the record yields is decided here alone; the builders only shape each one's data
        events: list[Event] = []
        if previous is None:
            if is_root:
                events.append(_trace_created(record, common, trace_id, start, io))
            if obs_type == "GENERATION":
                events.append(_generation_created(record, common, obs_id, start, added))
            if self.observation_created():
                events.append(_observation_created(record, common, obs_id, obs_type, start, added))
        if became_error or root_moved:
            events.append(_trace_updated(record, common, obs_id, obs_type, version, is_root, start, added))
        made = tuple(events)
        if not remember:
            return made, None
        return made, RecordOutcome(KEY_PREFIXES["observations"] + obs_id, start, Seen(version, level), made)

    def from_score(self, record: Mapping[str, Any], previous: Seen | None) -> RecordOutcome:
        """score.created for a score seen for the first time, score.updated when its updatedAt moved."""
        if not isinstance(record, Mapping):
            raise MalformedRecord(f"a score must be a JSON object, found {type(record).__name__}")
        score_id = _required_str(record, "id")
        project_id = _required_str(record, "projectId")
        name = _required_str(record, "name")
        timestamp = _required_time(record, "timestamp")
        version = record_version(record)
        if previous is not None and previous.version == version:
            return RecordOutcome(KEY_PREFIXES["scores"] + score_id, timestamp, previous, ())
        raw_subject = record.get("subject")
        subject: Mapping[str, Any] = raw_subject if isinstance(raw_subject, Mapping) else {}
        kind = subject.get("kind")
        trace_id = subject.get("id") if kind == "trace" else subject.get("traceId")
        trace_id = trace_id or record.get("traceId")
        observation_id = subject.get("id") if kind == "observation" else record.get("observationId")
        session_id = subject.get("id") if kind == "session" else record.get("sessionId")
        raw_value = record.get("value")
        data_type = record.get("dataType") or "NUMERIC"
        if isinstance(raw_value, bool):
            value: float | None = 1.0 if raw_value else 0.0
            string_value: str | None = str(raw_value)
        elif isinstance(raw_value, int | float):
            value, string_value = float(raw_value), None
        else:
            value, string_value = None, None if raw_value is None else str(raw_value)
        data = {
            "projectId": project_id,
            "scoreId": score_id,
            "traceId": trace_id,
            "observationId": observation_id,
            "sessionId": session_id,
            "name": name,
            "value": value,
            "stringValue": string_value,
            "dataType": data_type,
            "source": record.get("source"),
            "comment": record.get("comment"),
            "environment": record.get("environment"),
            "configId": record.get("configId"),
            "url": self.trace_url(project_id, trace_id),
        }
        if previous is None:
            event = Event(f"score.created:{score_id}", "score.created", timestamp, "poll", data)
        else:
            event = Event(f"score.updated:{score_id}:{version}", "score.updated", timestamp, "poll", data)
        return RecordOutcome(KEY_PREFIXES["scores"] + score_id, timestamp, Seen(version), (event,))


def test_event(event_type: str = "trace.created", *, base_url: str = "https://cloud.langfuse.com") -> Event:
    """A synthetic event for `send-test-event`: realistic data, `source` "test", a fresh id."""
    import uuid

    now = datetime.now(UTC)
    suffix = uuid.uuid4().hex[:12]
    trace_id = f"test-trace-{suffix}"
    data: dict[str, Any] = {
        "projectId": "test-project",
        "traceId": trace_id,
        "observationId": f"test-observation-{suffix}",
        "name": "langfuse-poller test event",
        "level": "ERROR" if event_type == "trace.updated" else "DEFAULT",
        "statusMessage": "This is a test event sent by langfuse-poller send-test-event.",
        "environment": "test",
        "url": f"{base_url.rstrip('/')}/project/test-project/traces/{trace_id}",
    }
    if event_type.startswith("score."):
        data.update(scoreId=f"test-score-{suffix}", name="test-score", value=0.25, dataType="NUMERIC", source="API")
    if event_type == "generation.created":
        data.update(
            model="gpt-4o",
            usage={"promptTokens": 120.0, "completionTokens": 30.0, "totalTokens": 150.0},
            usageDetails={"input": 120, "output": 30, "total": 150},
            costDetails={"total": 0.0012},
            totalCost=0.0012,
            latency=1.25,
        )
    return Event(id=f"{event_type}:test-{suffix}", type=event_type, timestamp=now, source="test", data=data)
