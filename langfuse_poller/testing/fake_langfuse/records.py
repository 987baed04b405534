"""The records the stand-in serves, and how a test adds and changes them.

Stands in for what Langfuse's ingestion leaves in its tables: observations (a trace is its root observation
plus its children, as Langfuse v4 stores it) and scores, in wire format. Every record, and every update of
one, becomes visible ``visible_after`` seconds after it was written, as ingestion lags in the real server.
The endpoint families read them with ``_page`` (newest first, by cursor) or ``_visible_range`` (whole).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from .fields import OBSERVATION_KEYS, SCORE_DATA_TYPES, SCORE_KEYS, SCORE_SOURCES, finish_score, wire_changes
from .index import Entry, Index, trace_hash
from .wire import EPOCH, Record, datetime_to_ms, format_ms, new_id, parse_iso_us


class Records:
    """The stored observations and scores of ``FakeLangfuse``: adding, updating, counting and reading them.

    A mixin; ``FakeLangfuse.__init__`` sets the state declared here.
    """

    clock: Callable[[], float]
    project_id: str
    _lock: threading.RLock
    _observations: Index
    _scores: Index

    def _now_ms(self) -> int:
        return math.floor(self.clock() * 1000)

    def add_observation(
        self,
        *,
        id: str | None = None,
        trace_id: str | None = None,
        start_time: datetime | None = None,
        type: str = "SPAN",
        name: str = "span",
        level: str = "DEFAULT",
        status_message: str | None = None,
        parent_observation_id: str | None = None,
        is_root: bool | None = None,
        visible_after: float = 0.0,
        **extra: Any,
    ) -> Record:
        """Store an observation and return its full wire record.

        ``extra`` sets any other field of the field-group table, by camelCase or snake_case name
        (``end_time=``, ``user_id=``, ``usage_details=``, ``tags=``, ...); datetimes are formatted, and
        ``input``/``output`` are stored as raw strings (non-strings are JSON encoded), as Langfuse serves
        them.
        ``is_root`` defaults to "has no parent". Unknown field names raise ``ValueError``.
        """
        now_ms = self._now_ms()
        created = format_ms(now_ms)
        start_ms = now_ms if start_time is None else datetime_to_ms(start_time)
        rec: Record = {
            "id": id or new_id(),
            "traceId": trace_id or new_id(),
            "startTime": format_ms(start_ms),
            "endTime": None,
            "projectId": self.project_id,
            "parentObservationId": parent_observation_id,
            "type": type,
            "name": name,
            "level": level,
            "statusMessage": status_message,
            "version": None,
            "environment": "default",
            "bookmarked": False,
            "public": False,
            "userId": None,
            "sessionId": None,
            "isRootObservation": parent_observation_id is None if is_root is None else is_root,
            "completionStartTime": None,
            "createdAt": created,
            "updatedAt": created,
            "input": None,
            "output": None,
            "metadata": {},
            "model": None,
            "internalModelId": None,
            "modelParameters": None,
            "usageDetails": {},
            "costDetails": {},
            "totalCost": None,
            "usagePricingTierName": None,
            "promptId": None,
            "promptName": None,
            "promptVersion": None,
            "latency": None,
            "timeToFirstToken": None,
            "traceName": None,
            "tags": [],
            "release": None,
        }
        latency_given = "latency" in extra
        if extra:
            wire = wire_changes(extra, OBSERVATION_KEYS)
            rec.update(wire)
            if "startTime" in wire:
                start_ms = parse_iso_us(rec["startTime"]) // 1000
        if rec["endTime"] is not None and not latency_given:
            rec["latency"] = (parse_iso_us(rec["endTime"]) - parse_iso_us(rec["startTime"])) / 1e6
        visible_at = self.clock() + visible_after
        trace_key = rec["traceId"] or ""
        key = (start_ms, trace_hash(trace_key), rec["id"])
        entry = Entry(key, trace_key, False, [(visible_at, rec)])
        with self._lock:
            if rec["id"] in self._observations.by_id:
                raise ValueError(f"observation {rec['id']!r} exists; use update_observation()")
            self._observations.by_id[rec["id"]] = entry
            self._observations.add(entry)
        return rec

    def add_trace(
        self,
        *,
        trace_id: str | None = None,
        name: str = "trace",
        start_time: datetime | None = None,
        observations: int = 0,
        level: str = "DEFAULT",
        visible_after: float = 0.0,
        environment: str = "default",
        user_id: str | None = None,
        session_id: str | None = None,
        tags: Iterable[str] = (),
        generation: bool = True,
        prompt: tuple[str, int] | None = None,
    ) -> list[Record]:
        """Store a trace as Langfuse v4 sees it: a root observation plus ``observations`` children.

        The root is a SPAN named ``name`` with ``isRootObservation`` true, no parent, and ``level``. The
        children are parented to it with level DEFAULT; the first is a GENERATION (model ``gpt-4o`` with
        usage, cost and latency; made from the Langfuse prompt ``prompt``, a (name, version), when given)
        when ``generation`` is true, the rest are SPANs. All share the trace's start
        time (so a time window never splits a trace), environment, user, session, tags and trace name.
        Returns the stored records, root first.
        """
        tid = trace_id or new_id()
        start_ms = self._now_ms() if start_time is None else datetime_to_ms(start_time)
        start = EPOCH + timedelta(milliseconds=start_ms)
        h = trace_hash(tid)
        gen_ms = 400 + h % 1600
        context: dict[str, Any] = {
            "environment": environment,
            "userId": user_id,
            "sessionId": session_id,
            "traceName": name,
            "tags": list(tags),
        }
        root_ms = (gen_ms if observations and generation else 0) + 100
        root = self.add_observation(
            trace_id=tid,
            start_time=start,
            type="SPAN",
            name=name,
            level=level,
            is_root=True,
            visible_after=visible_after,
            end_time=start + timedelta(milliseconds=root_ms),
            **context,
        )
        records = [root]
        used: dict[str, Any] = {}
        if prompt is not None:
            used = {
                "prompt_id": f"prompt-{prompt[0]}-{prompt[1]}",
                "prompt_name": prompt[0],
                "prompt_version": prompt[1],
            }
        for i in range(observations):
            if i == 0 and generation:
                tokens_in, tokens_out = 50 + h % 200, 10 + (h >> 8) % 100
                cost_in, cost_out = tokens_in * 2.5e-6, tokens_out * 1e-5
                child = self.add_observation(
                    trace_id=tid,
                    start_time=start,
                    type="GENERATION",
                    name="llm-call",
                    parent_observation_id=root["id"],
                    visible_after=visible_after,
                    end_time=start + timedelta(milliseconds=gen_ms),
                    completion_start_time=start + timedelta(milliseconds=gen_ms // 4),
                    time_to_first_token=(gen_ms // 4) / 1000,
                    model="gpt-4o",
                    internal_model_id="model-gpt-4o",
                    model_parameters={"temperature": 0.7},
                    usage_details={"input": tokens_in, "output": tokens_out, "total": tokens_in + tokens_out},
                    cost_details={"input": cost_in, "output": cost_out, "total": cost_in + cost_out},
                    total_cost=cost_in + cost_out,
                    input=[{"role": "user", "content": "Hello"}],
                    output={"role": "assistant", "content": "Hi there"},
                    **used,
                    **context,
                )
            else:
                child = self.add_observation(
                    trace_id=tid,
                    start_time=start,
                    type="SPAN",
                    name=f"step-{i}",
                    parent_observation_id=root["id"],
                    visible_after=visible_after,
                    end_time=start + timedelta(milliseconds=50),
                    **context,
                )
            records.append(child)
        return records

    def add_raw_observation(self, record: dict[str, Any], *, start_time: datetime, visible_after: float = 0.0) -> None:
        """Store ``record`` as given (it may be malformed); it is served unchanged, whatever ``fields`` says.

        ``start_time`` places it in the order and time filters, whatever its own ``startTime`` says.
        """
        trace_id = record.get("traceId")
        rec_id = record.get("id")
        trace_key = trace_id if isinstance(trace_id, str) else ""
        id_key = rec_id if isinstance(rec_id, str) else ""
        key = (datetime_to_ms(start_time), trace_hash(trace_key), id_key)
        entry = Entry(key, trace_key, True, [(self.clock() + visible_after, record)])
        with self._lock:
            self._observations.add(entry)

    def add_score(
        self,
        *,
        id: str | None = None,
        trace_id: str | None = None,
        observation_id: str | None = None,
        session_id: str | None = None,
        name: str = "quality",
        value: float | bool | str = 1.0,
        data_type: str = "NUMERIC",
        source: str = "API",
        timestamp: datetime | None = None,
        comment: str | None = None,
        visible_after: float = 0.0,
        environment: str = "default",
        **extra: Any,
    ) -> Record:
        """Store a score and return its full wire record.

        ``value`` is coerced by ``data_type`` (NUMERIC: float, BOOLEAN: bool, others: str). The subject is, as the
        server picks it, the observation if ``observation_id`` is given, else the session, else the trace; with
        none of the three a new trace id is made up. ``extra`` sets ``config_id``, ``metadata``,
        ``author_user_id``, ``queue_id`` or ``dataset_run_id`` (an experiment's score: its subject, before any
        other).
        The stored record also keeps ``traceId``/``observationId``/``sessionId``/``datasetRunId`` (never served by
        /v3/scores) for filtering.
        """
        if data_type not in SCORE_DATA_TYPES:
            raise ValueError(f"unknown score dataType {data_type!r}")
        if source not in SCORE_SOURCES:
            raise ValueError(f"unknown score source {source!r}")
        if trace_id is None and observation_id is None and session_id is None:
            trace_id = new_id()
        now_ms = self._now_ms()
        created = format_ms(now_ms)
        rec: Record = {
            "id": id or new_id(),
            "projectId": self.project_id,
            "name": name,
            "value": value,
            "dataType": data_type,
            "source": source,
            "timestamp": format_ms(now_ms if timestamp is None else datetime_to_ms(timestamp)),
            "environment": environment,
            "createdAt": created,
            "updatedAt": created,
            "comment": comment,
            "configId": None,
            "metadata": {},
            "authorUserId": None,
            "queueId": None,
            "traceId": trace_id,
            "observationId": observation_id,
            "sessionId": session_id,
            "datasetRunId": None,
        }
        rec.update(wire_changes(extra, SCORE_KEYS))
        finish_score(rec, subject_given="subject" in extra)
        entry = Entry(self._score_key(rec), "", False, [(self.clock() + visible_after, rec)])
        with self._lock:
            if rec["id"] in self._scores.by_id:
                raise ValueError(f"score {rec['id']!r} exists; use update_score()")
            self._scores.by_id[rec["id"]] = entry
            self._scores.add(entry)
        return rec

    def update_observation(self, id: str, *, visible_after: float = 0.0, **changes: Any) -> Record:
        """Change fields of an observation (camelCase or snake_case keys) and bump ``updatedAt`` to now.

        The new version is served once ``visible_after`` seconds have passed; the previous one until then.
        Changing ``startTime`` or ``traceId`` moves the record in the order at that same moment.
        Returns the new version.
        """
        return self._update(self._observations, id, visible_after, changes, score=False)

    def update_score(self, id: str, *, visible_after: float = 0.0, **changes: Any) -> Record:
        """Change fields of a score like ``update_observation`` does; ``value`` is coerced by ``dataType``."""
        return self._update(self._scores, id, visible_after, changes, score=True)

    def _update(
        self, index: Index, rec_id: str, visible_after: float, changes: Mapping[str, Any], *, score: bool
    ) -> Record:
        wire = wire_changes(changes, SCORE_KEYS if score else OBSERVATION_KEYS)
        if "id" in wire and wire["id"] != rec_id:
            raise ValueError("the id of a record cannot change")
        visible_at = self.clock() + visible_after
        with self._lock:
            entry = index.by_id.get(rec_id)
            current = entry.latest() if entry is not None else None
            if entry is None or current is None:
                raise KeyError(rec_id)
            rec = {**current, **wire, "updatedAt": format_ms(self._now_ms())}
            key: tuple[Any, ...]
            if score:
                finish_score(rec, subject_given="subject" in wire)
                key = self._score_key(rec)
            else:
                key = self._observation_key(rec)
            if key == entry.key:
                entry.versions.append((visible_at, rec))
            else:
                entry.versions.append((visible_at, None))
                moved = Entry(key, rec.get("traceId") or "", False, [(visible_at, rec)])
                index.by_id[rec_id] = moved
                index.add(moved)
        return rec

    @staticmethod
    def _observation_key(rec: Record) -> tuple[int, int, str]:
        trace_id = rec.get("traceId") or ""
        return (parse_iso_us(rec["startTime"]) // 1000, trace_hash(trace_id), rec["id"])

    @staticmethod
    def _score_key(rec: Record) -> tuple[int, str]:
        return (parse_iso_us(rec["timestamp"]) // 1000, rec["id"])

    def observation_count(self) -> int:
        """Number of stored observations (visible or not, raw included)."""
        with self._lock:
            return len(self._observations)

    def score_count(self) -> int:
        """Number of stored scores (visible or not)."""
        with self._lock:
            return len(self._scores)

    def _page(
        self,
        index: Index,
        lo_ms: int | None,
        hi_ms: int | None,
        cursor_key: tuple[Any, ...] | None,
        limit: int,
        matches: Callable[[Record], bool],
    ) -> tuple[list[tuple[Entry, Record]], Entry | None, bool]:
        """Up to ``limit`` visible matching records, newest first, and whether another one follows."""
        now = self.clock()
        with self._lock:
            return index.page(now, lo_ms, hi_ms, cursor_key, limit, matches)

    def _visible_range(
        self, index: Index, lo_ms: int | None, hi_ms: int | None, matches: Callable[[Entry, Record], bool]
    ) -> list[tuple[Entry, Record]]:
        """Every visible matching record with time in [lo, hi), oldest first (ties in key order)."""
        now = self.clock()
        with self._lock:
            return index.visible_range(now, lo_ms, hi_ms, matches)
