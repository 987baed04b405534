"""``GET /api/public/v2/observations`` and ``GET /api/public/v3/scores``: the read API of Langfuse Cloud.

Both are keyset-paginated: a page is the newest ``limit`` matching records below the cursor, and
``meta.cursor`` (base64 JSON of the last record's sort key) is there only when more follow. Records are
served in field groups (``fields=``), filtered by time window and by equality, newest first. These are what
``serve="v2"`` and ``serve="both"`` answer.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any, Final

from .fields import LEVELS, OBSERVATION_FIELD_GROUPS, SCORE_FIELD_GROUPS
from .index import Entry, trace_hash
from .query import BadRequest, Query, comma_values, parse_bool, parse_limit, query_value, time_bounds
from .records import Records
from .wire import Record, Response, format_ms, json_response, parse_iso_us

OBSERVATIONS_PATH: Final = "/api/public/v2/observations"
SCORES_PATH: Final = "/api/public/v3/scores"

OBSERVATIONS_DEFAULT_LIMIT: Final = 50
OBSERVATIONS_MAX_LIMIT: Final = 1000
SCORES_DEFAULT_LIMIT: Final = 50
SCORES_MAX_LIMIT: Final = 100
_METADATA_CUT: Final = 200
# /v3/scores reads its query with a strict zod schema: any other parameter is a 400, and every parameter is one
# string, so a repeated one (an array) is a 400 too; the filters among them take comma-separated values
# (packages/shared/src/features/scores/interfaces/api/v3/endpoints.ts)
_SCORES_V3_FILTERS: Final = (
    "id",
    "name",
    "environment",
    "configId",
    "queueId",
    "authorUserId",
    "traceId",
    "sessionId",
    "observationId",
    "source",
    "dataType",
)
_SCORES_V3_PARAMS: Final = frozenset(
    {
        *_SCORES_V3_FILTERS,
        "limit",
        "fields",
        "cursor",
        "value",
        "experimentId",
        "valueMin",
        "valueMax",
        "fromTimestamp",
        "toTimestamp",
        "userId",
        "traceTags",
    }
)


class V2Lists(Records):
    """The cursor-paginated list endpoints, as a mixin of ``FakeLangfuse`` reading its records."""

    duplicate_rows: bool

    def _list_observations(self, query: Query) -> Response:
        groups = _observation_groups(query)
        limit = parse_limit(query_value(query, "limit"), OBSERVATIONS_DEFAULT_LIMIT, OBSERVATIONS_MAX_LIMIT)
        if parse_bool(query, "parseIoAsJson"):
            raise BadRequest("parseIoAsJson=true is no longer supported; input/output are raw strings")
        if query_value(query, "filter"):
            raise BadRequest("the `filter` parameter is not supported by FakeLangfuse")
        cursor = query_value(query, "cursor")
        cursor_key: tuple[Any, ...] | None = None
        if cursor:
            try:
                c = _b64decode_json(cursor)
                last_trace = c["lastTraceId"] or ""
                cursor_key = (
                    parse_iso_us(c["lastStartTimeTo"]) // 1000,
                    trace_hash(last_trace),
                    c["lastId"],
                )
            except (ValueError, KeyError, TypeError, binascii.Error) as exc:
                raise BadRequest(f"invalid cursor: {exc}") from exc
        lo, hi = time_bounds(query, "fromStartTime", "toStartTime")

        checks: list[tuple[str, Any]] = []
        for param in ("type", "level", "traceId", "name", "userId", "sessionId", "version"):
            value = query_value(query, param)
            if value is not None:
                checks.append((param, value))
        level = query_value(query, "level")
        if level is not None and level not in LEVELS:
            raise BadRequest(f"invalid level {level!r}")
        is_root = parse_bool(query, "isRootObservation")
        if is_root is not None:
            checks.append(("isRootObservation", is_root))
        parent = query_value(query, "parentObservationId")
        if parent is not None:
            checks.append(("parentObservationId", parent or None))
        # repeated or comma-separated, both work here (web/src/pages/api/public/v2/observations/index.ts)
        environments = comma_values(query, "environment")

        def matches(rec: Record) -> bool:
            for name, expected in checks:
                if rec.get(name) != expected:
                    return False
            return not environments or rec.get("environment") in environments

        keys = tuple(k for g in OBSERVATION_FIELD_GROUPS if g in groups for k in OBSERVATION_FIELD_GROUPS[g])
        expand = [k for k in (query_value(query, "expandMetadata") or "").split(",") if k.strip()]
        # the server reads metadata from events_core, whose values are cut at 200 characters, unless expandMetadata
        # names any key or io is read: then from events_full, every value whole, named or not
        # (packages/shared/src/server/repositories/events.ts, getObservationsV2FromEventsTableForPublicApi)
        cut_metadata = "metadata" in groups and not expand and "io" not in groups

        page, last, more = self._page(self._observations, lo, hi, cursor_key, limit, matches)
        if self.duplicate_rows:
            page, last, more = self._with_unmerged_rows(page, last, more, limit)
        data: list[Record] = []
        for entry, rec in page:
            if entry.raw:
                data.append(rec)
                continue
            out = {k: rec[k] for k in keys}
            if "totalCost" in out:
                out["totalCost"] = _total_cost(rec)
            if cut_metadata:
                out["metadata"] = _cut_metadata(out["metadata"])
            data.append(out)
        meta: dict[str, Any] = {}
        if more and last is not None:
            token = {
                "lastStartTimeTo": format_ms(last.key[0]),
                "lastTraceId": last.trace_id,
                "lastId": last.key[2],
            }
            meta["cursor"] = base64.b64encode(json.dumps(token).encode()).decode()
        return json_response(200, {"data": data, "meta": meta})

    def _with_unmerged_rows(
        self, page: list[tuple[Entry, Record]], last: Entry | None, more: bool, limit: int
    ) -> tuple[list[tuple[Entry, Record]], Entry | None, bool]:
        """The page as a not yet merged table serves it: each updated record's previous version beside it.

        The endpoint reads a ReplacingMergeTree without FINAL or LIMIT 1 BY, so until a background merge one page
        can hold two rows of one id with different updatedAt
        (packages/shared/src/server/repositories/events.ts, `getObservationsV2FromEventsTableForPublicApi`).
        Both rows count against the limit, as the server's LIMIT counts rows.
        """
        now = self.clock()
        rows: list[tuple[Entry, Record]] = []
        with self._lock:
            for entry, rec in page:
                rows.append((entry, rec))
                visible = [version for at, version in entry.versions if at <= now and version is not None]
                if len(visible) > 1 and visible[-1] is rec:
                    rows.append((entry, visible[-2]))
        if len(rows) > limit:
            rows = rows[:limit]
            return rows, rows[-1][0], True
        return rows, last, more

    def _list_scores(self, query: Query) -> Response:
        _check_strict_scores_query(query)
        groups = _parse_groups(query_value(query, "fields"), SCORE_FIELD_GROUPS, ())
        limit = parse_limit(query_value(query, "limit"), SCORES_DEFAULT_LIMIT, SCORES_MAX_LIMIT)
        cursor = query_value(query, "cursor")
        cursor_key: tuple[Any, ...] | None = None
        if cursor:
            try:
                c = _b64decode_json(cursor)
                cursor_key = (parse_iso_us(c["lastTimestamp"]) // 1000, c["lastId"])
            except (ValueError, KeyError, TypeError, binascii.Error) as exc:
                raise BadRequest(f"invalid cursor: {exc}") from exc
        lo, hi = time_bounds(query, "fromTimestamp", "toTimestamp")
        if "userId" in query or "traceTags" in query:
            raise BadRequest("userId and traceTags require a trace JOIN and are not supported in v3; use v2")
        filters = [(param, allowed) for param in _SCORES_V3_FILTERS if (allowed := comma_values(query, param))]

        def matches(rec: Record) -> bool:
            return all(rec.get(name) in allowed for name, allowed in filters)

        keys = tuple(k for g in SCORE_FIELD_GROUPS if g == "core" or g in groups for k in SCORE_FIELD_GROUPS[g])
        page, last, more = self._page(self._scores, lo, hi, cursor_key, limit, matches)
        data = [{k: rec[k] for k in keys} for _, rec in page]
        meta: dict[str, Any] = {"limit": limit}
        if more and last is not None:
            token = {"lastTimestamp": format_ms(last.key[0]), "lastId": last.key[1]}
            meta["cursor"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode().rstrip("=")
        return json_response(200, {"data": data, "meta": meta})


def _check_strict_scores_query(query: Query) -> None:
    """A 400 with zod's issues for what the strict schema of /v3/scores refuses: unknown or repeated parameters."""
    issues: list[dict[str, Any]] = []
    unknown = sorted(name for name in query if name not in _SCORES_V3_PARAMS)
    if unknown:
        keys = ", ".join(f"'{name}'" for name in unknown)
        issues.append(
            {
                "code": "unrecognized_keys",
                "keys": unknown,
                "path": [],
                "message": f"Unrecognized key(s) in object: {keys}",
            }
        )
    for name, values in query.items():
        if name in _SCORES_V3_PARAMS and len(values) > 1:
            issues.append(
                {
                    "code": "invalid_type",
                    "expected": "string",
                    "received": "array",
                    "path": [name],
                    "message": "Expected string, received array",
                }
            )
    if issues:
        raise BadRequest("; ".join(issue["message"] for issue in issues), issues)


def _b64decode_json(text: str) -> Any:
    # Cursors travel in query strings, where "+" can turn into a space and padding may be dropped.
    text = text.strip().replace(" ", "+")
    padded = text + "=" * (-len(text) % 4)
    raw = base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))
    return json.loads(raw)


def _observation_groups(query: Query) -> frozenset[str]:
    """The field groups /v2/observations serves: unknown ones dropped without a word, core alone when nothing
    valid is left, core and basic when `fields` is empty or absent; repeated, `fields` is a 400, as only the
    single string is filtered (web/src/pages/api/public/v2/observations/index.ts)."""
    values = query.get("fields") or []
    if len(values) > 1:
        raise BadRequest("fields must be one comma-separated string")
    text = values[0] if values else ""
    if not text.strip():
        return frozenset(("core", "basic"))
    groups = {g.strip() for g in text.split(",")} & OBSERVATION_FIELD_GROUPS.keys()
    return frozenset(groups | {"core"})


def _total_cost(rec: Record) -> float:
    """totalCost as the server serves it: the cost details' total, 0 (not null) when there is none
    (packages/shared/src/server/repositories/observations_converters.ts, `reduceUsageOrCostDetails`)."""
    details = rec.get("costDetails")
    total = details.get("total") if isinstance(details, Mapping) else None
    return float(total) if isinstance(total, int | float) else 0


def _parse_groups(text: str | None, table: Mapping[str, tuple[str, ...]], default: tuple[str, ...]) -> frozenset[str]:
    if text is None or not text.strip():
        return frozenset(("core", *default))
    groups = {g.strip() for g in text.split(",") if g.strip()}
    unknown = groups - table.keys()
    if unknown:
        raise BadRequest(f"unknown field group(s) {sorted(unknown)}; valid: {sorted(table)}")
    return frozenset(groups | {"core"})


def _cut_metadata(metadata: Any) -> Any:
    if not isinstance(metadata, dict):
        return metadata
    if not any(isinstance(v, str) and len(v) > _METADATA_CUT for v in metadata.values()):
        return metadata
    return {k: v[:_METADATA_CUT] if isinstance(v, str) and len(v) > _METADATA_CUT else v for k, v in metadata.items()}
