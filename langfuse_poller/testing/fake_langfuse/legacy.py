"""The page-based read endpoints of self-hosted Langfuse v3, served from the same records.

``GET /api/public/traces`` (and ``/traces/{id}``), ``GET /api/public/observations`` (v1) and
``GET /api/public/v2/scores``: ``page`` and ``limit`` (up to 100), ``meta {page, limit, totalItems,
totalPages}``, newest first (traces: ``orderBy``), each in its own record shape. A trace is made from its
root observation. These are what ``serve="legacy"`` and ``serve="both"`` answer.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any, Final

from .fields import LEVELS
from .index import Entry
from .query import (
    BadRequest,
    Query,
    ceil_div,
    check,
    comma_values,
    equality_checks,
    parse_limit,
    query_value,
    time_bounds,
)
from .records import Records
from .wire import Record, Response, error_response, json_response

TRACES_PATH: Final = "/api/public/traces"
OBSERVATIONS_V1_PATH: Final = "/api/public/observations"
SCORES_V2_PATH: Final = "/api/public/v2/scores"

LEGACY_DEFAULT_LIMIT: Final = 50
LEGACY_MAX_LIMIT: Final = 100
TRACE_FIELD_GROUPS: Final = ("core", "io", "scores", "observations", "metrics")
"""Field groups of the legacy traces list (``fields=``); all of them by default."""


class LegacyLists(Records):
    """The page-based list endpoints, as a mixin of ``FakeLangfuse`` reading its records."""

    _ties: random.Random | None

    def shuffle_ties(self, seed: int | None = 0) -> None:
        """Serve records that share a millisecond in a new order on each request (drawn from ``seed``, so a test
        sees the same orders each run); None serves them in one stable order again.

        The legacy lists sort by time alone: v1 observations by start time, traces by timestamp, v2 scores by
        timestamp and write time, with no tie-break, and ClickHouse does not promise one order of equal rows
        from one query to the next (web/src/pages/api/public/observations/index.ts,
        packages/shared/src/server/repositories/traces.ts, packages/shared/src/server/repositories/scores.ts).
        """
        with self._lock:
            self._ties = None if seed is None else random.Random(seed)

    def _order_ties(self, found: list[tuple[Entry, Record]]) -> list[tuple[Entry, Record]]:
        """``found`` (sorted by time) with each run of one millisecond in this request's order."""
        with self._lock:
            ties = self._ties
            if ties is None:
                return found
            out: list[tuple[Entry, Record]] = []
            for _, run in itertools.groupby(found, key=lambda item: item[0].key[0]):
                group = list(run)
                ties.shuffle(group)
                out.extend(group)
            return out

    def _roots(self) -> dict[str, Record]:
        """The visible root observation of each trace, by trace id: what the legacy endpoints serve as traces."""
        found = self._visible_range(self._observations, None, None, _is_root)
        return {rec["traceId"]: rec for _, rec in found}

    def _list_observations_v1(self, query: Query) -> Response:
        page = _parse_page(query_value(query, "page"))
        limit = parse_limit(query_value(query, "limit"), LEGACY_DEFAULT_LIMIT, LEGACY_MAX_LIMIT)
        if query_value(query, "filter"):
            raise BadRequest("the `filter` parameter is not supported by FakeLangfuse")
        lo, hi = time_bounds(query, "fromStartTime", "toStartTime")
        checks = equality_checks(query, ("type", "name", "userId", "level", "traceId", "version"))
        level = query_value(query, "level")
        if level is not None and level not in LEVELS:
            raise BadRequest(f"invalid level {level!r}")
        parent = query_value(query, "parentObservationId")
        if parent is not None:
            checks.append(("parentObservationId", parent or None))
        environments = comma_values(query, "environment")

        def matches(_: Entry, rec: Record) -> bool:
            return check(rec, checks) and (not environments or rec.get("environment") in environments)

        # start_time DESC: the only order this endpoint has
        found = self._order_ties(self._visible_range(self._observations, lo, hi, matches)[::-1])
        chunk, meta = _page_of(found, page, limit)
        data = [rec if entry.raw else _v1_observation(rec) for entry, rec in chunk]
        return json_response(200, {"data": data, "meta": meta})

    def _list_traces(self, query: Query) -> Response:
        page = _parse_page(query_value(query, "page"))
        limit = parse_limit(query_value(query, "limit"), LEGACY_DEFAULT_LIMIT, LEGACY_MAX_LIMIT)
        groups = _trace_groups(query_value(query, "fields"))
        column, _, direction = (query_value(query, "orderBy") or "timestamp.desc").partition(".")
        if column != "timestamp" or direction.lower() not in ("asc", "desc"):
            raise BadRequest(f"orderBy {column}.{direction} is not supported by FakeLangfuse (only timestamp.asc/desc)")
        lo, hi = time_bounds(query, "fromTimestamp", "toTimestamp")
        checks = equality_checks(query, ("userId", "sessionId", "version", "release"))
        name = query_value(query, "name")
        environments = comma_values(query, "environment")
        tags = frozenset(query.get("tags", ()))

        def matches(entry: Entry, rec: Record) -> bool:
            return (
                _is_root(entry, rec)
                and check(rec, checks)
                and (name is None or (rec.get("traceName") or rec.get("name")) == name)
                and (not environments or rec.get("environment") in environments)
                and tags <= set(rec.get("tags") or ())
            )

        found = self._visible_range(self._observations, lo, hi, matches)
        if direction.lower() == "desc":
            found.reverse()
        found = self._order_ties(found)
        chunk, meta = _page_of(found, page, limit)
        return json_response(200, {"data": [self._trace(rec, groups) for _, rec in chunk], "meta": meta})

    def _get_trace(self, trace_id: str, query: Query) -> Response:
        """One trace: without `fields` (or with no group the server knows) all of it, its observations with their
        input and output, its scores and metrics; with `fields=core` the trace alone, `latency` and `totalCost`
        -1 (web/src/pages/api/public/traces/[traceId].ts)."""
        root = self._roots().get(trace_id)
        if root is None:
            return error_response(
                404, f"Trace {trace_id} not found within authorized project", error="LangfuseNotFoundError"
            )
        text = query_value(query, "fields") or ""
        groups = {g.strip() for g in text.split(",")} & set(TRACE_FIELD_GROUPS) or set(TRACE_FIELD_GROUPS)
        trace = self._trace(root, frozenset(groups | {"io", "metrics"}))
        if "io" not in groups:
            trace.update(input="", output="", metadata={})
        if "metrics" not in groups:
            trace.update(latency=-1, totalCost=-1)
        trace["observations"] = []
        if "observations" in groups:
            members = self._visible_range(self._observations, None, None, lambda e, r: r.get("traceId") == trace_id)
            trace["observations"] = [rec if entry.raw else _v1_observation(rec) for entry, rec in members]
        trace["scores"] = []
        if "scores" in groups:
            scores = self._visible_range(self._scores, None, None, lambda e, r: r.get("traceId") == trace_id)
            trace["scores"] = [_v2_score(rec, None) for _, rec in scores]
        return json_response(200, trace)

    def _trace(self, root: Record, groups: frozenset[str]) -> Record:
        """A trace as the legacy endpoints serve it, made from its root observation."""
        trace_id = root["traceId"]
        out: Record = {
            "id": trace_id,
            "externalId": None,
            "timestamp": root["startTime"],
            "name": root.get("traceName") or root.get("name"),
            "userId": root.get("userId"),
            "release": root.get("release"),
            "version": root.get("version"),
            "projectId": root["projectId"],
            "environment": root.get("environment") or "default",
            "public": bool(root.get("public")),
            "bookmarked": bool(root.get("bookmarked")),
            "tags": list(root.get("tags") or ()),
            "sessionId": root.get("sessionId"),
            "createdAt": root["createdAt"],
            "updatedAt": root["updatedAt"],
            "htmlPath": f"/project/{root['projectId']}/traces/{trace_id}",
        }
        if "io" in groups:  # the server counts metadata with io
            out["input"] = _json_value(root.get("input"))
            out["output"] = _json_value(root.get("output"))
            out["metadata"] = root.get("metadata")
        members: list[tuple[Entry, Record]] = []
        if groups & {"observations", "metrics"}:
            members = self._visible_range(self._observations, None, None, lambda e, r: r.get("traceId") == trace_id)
        if "observations" in groups:
            out["observations"] = [rec.get("id") for _, rec in members]
        if "scores" in groups:
            scores = self._visible_range(self._scores, None, None, lambda e, r: r.get("traceId") == trace_id)
            out["scores"] = [rec["id"] for _, rec in scores]
        if "metrics" in groups:
            out["latency"] = root.get("latency")
            out["totalCost"] = sum(rec.get("totalCost") or 0.0 for _, rec in members)
        return out

    def _list_scores_v2(self, query: Query) -> Response:
        page = _parse_page(query_value(query, "page"))
        limit = parse_limit(query_value(query, "limit"), LEGACY_DEFAULT_LIMIT, LEGACY_MAX_LIMIT)
        fields = query_value(query, "fields")
        groups = {"score", "trace"} if not fields else {g.strip() for g in fields.split(",")} & {"score", "trace"}
        if (query_value(query, "userId") or query.get("traceTags")) and "trace" not in groups:
            raise BadRequest("filtering by userId or traceTags needs the `trace` field group")
        lo, hi = time_bounds(query, "fromTimestamp", "toTimestamp")
        checks = equality_checks(
            query, ("name", "source", "dataType", "traceId", "sessionId", "configId", "queueId", "observationId")
        )
        ids = frozenset(i.strip() for i in (query_value(query, "scoreIds") or "").split(",") if i.strip())
        # repeated or comma-separated, unlike /v3/scores (web/src/pages/api/public/v2/scores/index.ts)
        environments = comma_values(query, "environment")

        def matches(_: Entry, rec: Record) -> bool:
            return (
                check(rec, checks)
                and (not ids or rec["id"] in ids)
                and (not environments or rec.get("environment") in environments)
            )

        # timestamp DESC, then write time: no tie-break that holds from one request to the next
        found = self._order_ties(self._visible_range(self._scores, lo, hi, matches)[::-1])
        roots = self._roots() if "trace" in groups else {}
        user_id = query_value(query, "userId")
        tags = frozenset(query.get("traceTags", ()))
        if user_id is not None or tags:
            found = [
                (entry, rec)
                for entry, rec in found
                if (root := roots.get(rec.get("traceId") or "")) is not None
                and (user_id is None or root.get("userId") == user_id)
                and tags <= set(root.get("tags") or ())
            ]
        chunk, meta = _page_of(found, page, limit)
        data = [_v2_score(rec, roots.get(rec.get("traceId") or "") if "trace" in groups else False) for _, rec in chunk]
        return json_response(200, {"data": data, "meta": meta})


def _parse_page(text: str | None) -> int:
    if text is None or text == "":
        return 1
    try:
        page = int(text)
    except ValueError as exc:
        raise BadRequest(f"page must be an integer, got {text!r}") from exc
    if page < 1:
        raise BadRequest(f"page must be 1 or more, got {page}")
    return page


def _page_of(items: list[Any], page: int, limit: int) -> tuple[list[Any], dict[str, int]]:
    """One page of a page-based legacy list, and its meta."""
    total = len(items)
    meta = {"page": page, "limit": limit, "totalItems": total, "totalPages": ceil_div(total, limit)}
    return items[(page - 1) * limit : page * limit], meta


def _trace_groups(text: str | None) -> frozenset[str]:
    # the server drops groups it does not know; `core` is always served
    if text is None or not text.strip():
        return frozenset(TRACE_FIELD_GROUPS)
    return frozenset({g.strip() for g in text.split(",")} & set(TRACE_FIELD_GROUPS)) | {"core"}


def _is_root(entry: Entry, rec: Record) -> bool:
    return not entry.raw and bool(rec.get("isRootObservation")) and isinstance(rec.get("traceId"), str)


def _json_value(text: Any) -> Any:
    """Input/output as the legacy endpoints serve them: parsed JSON where the stored string is JSON."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _v1_observation(rec: Record) -> Record:
    """An observation as ``GET /api/public/observations`` (v1) serves it: no trace context, no root flag."""
    usage = rec.get("usageDetails") or {}
    cost = rec.get("costDetails") or {}
    tokens = {key: usage.get(key) or 0 for key in ("input", "output", "total")}
    return {
        "id": rec["id"],
        "projectId": rec["projectId"],
        "traceId": rec["traceId"],
        "parentObservationId": rec["parentObservationId"],
        "name": rec["name"],
        "type": rec["type"],
        "environment": rec["environment"],
        "startTime": rec["startTime"],
        "endTime": rec["endTime"],
        "version": rec["version"],
        "createdAt": rec["createdAt"],
        "updatedAt": rec["updatedAt"],
        "input": _json_value(rec["input"]),
        "output": _json_value(rec["output"]),
        "metadata": rec["metadata"],
        "level": rec["level"],
        "statusMessage": rec["statusMessage"],
        "model": rec["model"],
        "modelParameters": rec["modelParameters"],
        "completionStartTime": rec["completionStartTime"],
        "promptId": rec["promptId"],
        "promptName": rec["promptName"],
        "promptVersion": rec["promptVersion"],
        "usageDetails": usage,
        "costDetails": cost,
        "usage": {"unit": "TOKENS", **tokens},
        "unit": "TOKENS",
        "promptTokens": tokens["input"],
        "completionTokens": tokens["output"],
        "totalTokens": tokens["total"],
        "usagePricingTierName": rec["usagePricingTierName"],
        "usagePricingTierId": None,
        "modelId": rec["internalModelId"],
        "inputPrice": None,
        "outputPrice": None,
        "totalPrice": None,
        "calculatedInputCost": cost.get("input"),
        "calculatedOutputCost": cost.get("output"),
        "calculatedTotalCost": rec["totalCost"],
        "latency": rec["latency"],
        "timeToFirstToken": rec["timeToFirstToken"],
    }


def _v2_score(rec: Record, root: Record | bool | None) -> Record:
    """A score as ``GET /api/public/v2/scores`` serves it: a number beside ``stringValue``; ids, no subject.

    ``root`` is the root observation of the score's trace for the ``trace`` field group (None: no such
    trace), or False when the group was not asked for.
    """
    data_type = rec["dataType"]
    value = rec["value"]
    out: Record = {
        "id": rec["id"],
        "projectId": rec["projectId"],
        "traceId": rec["traceId"],
        "observationId": rec["observationId"],
        "sessionId": rec["sessionId"],
        "datasetRunId": rec.get("datasetRunId"),
        "name": rec["name"],
        "dataType": data_type,
        "source": rec["source"],
        "timestamp": rec["timestamp"],
        "createdAt": rec["createdAt"],
        "updatedAt": rec["updatedAt"],
        "authorUserId": rec["authorUserId"],
        "comment": rec["comment"],
        "metadata": rec["metadata"],
        "configId": rec["configId"],
        "queueId": rec["queueId"],
        "environment": rec["environment"],
    }
    if data_type == "NUMERIC":
        out["value"] = value
    elif data_type == "BOOLEAN":
        out["value"] = 1.0 if value else 0.0
        out["stringValue"] = "True" if value else "False"
    elif data_type == "TEXT":
        out["stringValue"] = value  # a number means nothing for TEXT: the server omits `value`
    else:
        out["value"] = None  # CATEGORICAL without a config, CORRECTION: the text is the value
        out["stringValue"] = value
    if root is not False:
        out["trace"] = (
            None
            if not isinstance(root, dict)
            else {
                "userId": root.get("userId"),
                "tags": list(root.get("tags") or ()),
                "environment": root.get("environment"),
                "sessionId": root.get("sessionId"),
            }
        )
    return out
