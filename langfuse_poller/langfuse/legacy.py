"""The legacy read path, for self-hosted Langfuse v3: page-based lists, read so that shifting pages lose nothing.

Self-hosted Langfuse v3 has neither `/v2/observations` nor `/v3/scores` (v4 serves `/v2/observations` only
after an opt-in). It has `GET /api/public/observations` (v1) and `GET /api/public/v2/scores`, both page-based
(`page`, `limit` up to 100, `meta {page, limit, totalItems, totalPages}`) and newest first, and
`GET /api/public/traces` (the same paging; `orderBy=timestamp.asc`), whose records hold what a v1 observation
lacks: the trace's name, user, session, tags and release. The records are mapped to the shapes of the v2 read
path (`observation_from_v1`, `score_from_v2`), so that `EventFactory` makes the same events with the same ids
and versions (`updatedAt`) from them, and a server upgraded from v3 to v4 costs no duplicate and no gap.

Why page-based paging needs care here. A page number names a position in a result set that changes while we
page: a record that enters the set before our position moves every later record one place down (the last
record of page N is served again as the first of page N+1), and one that leaves moves them up (the first
record of page N+1 is never served). Three rules make both harmless:

1. A fixed upper bound. No request of one pass over a window [start, end) reaches past `end`, fixed before
   the pass: `now - settle` for the head, `now - age` for a sweep. Records keep arriving while we page, but
   new records start now, above `end`: they are outside the result set and move nothing. Without the bound,
   each of them, being the newest, would land on page 1 of a newest-first list and push every record not yet
   read one place further, onto a later page (the pass serves records twice, and on a busy project need
   never end).
2. The bound moves down, page numbers stay at 1. Each request asks for page 1 of [start, oldest + 1 ms),
   where `oldest` is the start time of the oldest record served so far: a keyset cursor made of time. Whatever
   enters or leaves the set above that point cannot move what the next request returns, so a record moved
   out of the window (or deleted) while we page cannot make us skip another. The bound is inclusive of the
   oldest millisecond, so the records sharing it are served twice: that overlap is what makes the cut safe,
   and the reader drops the ids it already returned at that millisecond (the store's dedup keys would catch
   them anyway). Only when one millisecond holds a whole page does the reader page by number, inside
   [t, t + 1 ms), where only records of that same millisecond can shift, and repeats are dropped again.
   The server orders by time alone, and ClickHouse serves a millisecond's ties in an order that can change
   from one request to the next, so pages 1..n of that millisecond can serve a record twice and another
   never: the reader reads the millisecond's pages round and round, dropping ids it has, until it holds as
   many as `totalItems` says there are (at most `TIE_PASSES` rounds).
3. Records that appear inside the window late. One whose start time lies below the current bound (older than
   everything served so far) is served by this pass. One above it, in the part already read, is not (as with
   the keyset cursor of `/v2/observations`); the next sweep reads the window again at each `reread` age and at
   `lookback`, and serves it then. Either way it is read within `lookback`, and its dedup key makes its events
   exactly once however many passes serve it.

The traces list is read oldest first (`orderBy=timestamp.asc`) with the mirror image of rule 2.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from ..errors import ApiError
from ..events import ERROR_LEVELS
from ..util.durations import format_time, parse_time
from .answers import list_body

log = logging.getLogger(__name__)

TRACES_PATH = "/api/public/traces"
OBSERVATIONS_V1_PATH = "/api/public/observations"
SCORES_V2_PATH = "/api/public/v2/scores"
LEGACY_PAGE = 100  # the maximum of every legacy list; above it the server answers 400
# what a v1 observation lacks and its trace has: trace context, under the names of /v2/observations
TRACE_CONTEXT = ("traceName", "userId", "sessionId", "tags", "release")
TRACE_CACHE_SIZE = 20_000
# rounds over the pages of one crowded millisecond, whose ties come in a new order on each request: each
# round serves every record with some chance, so a few rounds nearly always find them all; past this many the
# count is taken to be wrong (v2 scores count rows a merge has not yet deduplicated) and the pass goes on
TIE_PASSES = 20

Getter = Callable[[str, Mapping[str, Any]], Any]
# one page of records, and whether it is the last of the pass
Batch = tuple[list[Any], bool]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _ms(value: Any) -> int | None:
    """Epoch milliseconds of an RFC 3339 time (exact integer arithmetic), None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return (parse_time(value) - _EPOCH) // _MS
    except ValueError:
        return None


def _at_ms(ms: int) -> str:
    return format_time(_EPOCH + ms * _MS)


def _id(record: Any) -> str | None:
    value = record.get("id") if isinstance(record, Mapping) else None
    return value if isinstance(value, str) else None


# --- records, mapped to the shapes of the v2 read path -------------------------------------------------------


def observation_from_v1(record: Any, trace: Mapping[str, Any] | None) -> Any:
    """A v1 observation in the shape of `/v2/observations`, its trace's context added.

    A v1 observation carries what the events need under the same names (id, traceId, projectId, type, name,
    level, statusMessage, environment, startTime, createdAt, updatedAt, model, usageDetails, costDetails,
    latency, timeToFirstToken), except: `isRootObservation` (a v3 trace's root is its observation without a
    parent, the span the SDK opened first), `totalCost` (v1: `calculatedTotalCost`; 0 without a cost, as v2
    serves it), `internalModelId` (v1: `modelId`), and the trace context (`traceName`, `userId`, `sessionId`,
    `tags`, `release`), which is the trace's. What `[poll] fields` reads on v2 a v1 observation always has
    (input and output parsed, metadata uncut, promptId, promptName, promptVersion): it passes through, and the
    events take it only when asked. Anything that is not a JSON object is passed on as it is, to become a dead
    letter.
    """
    if not isinstance(record, Mapping):
        return record
    out = dict(record)
    out.setdefault("isRootObservation", not record.get("parentObservationId"))
    out.setdefault("totalCost", _total_cost(record))
    out.setdefault("internalModelId", record.get("modelId"))
    context = trace or {}
    for key in TRACE_CONTEXT:
        out.setdefault(key, context.get(key))
    if out.get("tags") is None:
        out["tags"] = []
    return out


def _total_cost(record: Mapping[str, Any]) -> float:
    """totalCost as `/v2/observations` serves it: the cost details' total, 0 (not null) when there is none
    (packages/shared/src/server/repositories/observations_converters.ts); v1's `calculatedTotalCost` when the
    details have no total."""
    details = record.get("costDetails")
    for total in (details.get("total") if isinstance(details, Mapping) else None, record.get("calculatedTotalCost")):
        if isinstance(total, int | float) and not isinstance(total, bool):
            return float(total)
    return 0


def score_from_v2(record: Any) -> Any:
    """A v2 score in the shape of `/v3/scores`: its value typed by `dataType`, its target as `subject`.

    v2 serves `value` as a number (1/0 for BOOLEAN) beside `stringValue` (the category, "True"/"False", the
    text); v3 serves one `value` that is a number, a boolean or a string. v2 names the target by `traceId`,
    `observationId`, `sessionId` or `datasetRunId`; v3 by `subject {kind, id, traceId?}`.
    """
    if not isinstance(record, Mapping):
        return record
    out = {k: v for k, v in record.items() if k not in ("stringValue", "trace", "datasetRunId")}
    data_type = record.get("dataType") or "NUMERIC"
    value = record.get("value")
    string_value = record.get("stringValue")
    if data_type == "BOOLEAN":
        if isinstance(value, int | float) and not isinstance(value, bool):
            out["value"] = value == 1
        else:
            out["value"] = value if isinstance(value, bool) else string_value == "True"
    elif data_type != "NUMERIC":
        out["value"] = string_value if string_value is not None else value
    trace_id, observation_id = record.get("traceId"), record.get("observationId")
    session_id, run_id = record.get("sessionId"), record.get("datasetRunId")
    if "subject" not in record:
        # /v3/scores's order, so that one score makes the same event on either path: experiment (dataset run),
        # observation, session, trace; only the observation subject names a trace
        # (packages/shared/src/server/repositories/scores.ts, `deriveSubjectForV3`)
        if run_id:
            out["subject"] = {"kind": "experiment", "id": run_id}
        elif observation_id:
            out["subject"] = {"kind": "observation", "id": observation_id, "traceId": trace_id}
        elif session_id:
            out["subject"] = {"kind": "session", "id": session_id}
        elif trace_id:
            out["subject"] = {"kind": "trace", "id": trace_id}
        for key in ("traceId", "observationId", "sessionId"):
            out.pop(key, None)
    return out


def trace_context(trace: Mapping[str, Any]) -> dict[str, Any]:
    """The context a trace gives its observations, under the names `/v2/observations` uses."""
    return {
        "traceName": trace.get("name"),
        "userId": trace.get("userId"),
        "sessionId": trace.get("sessionId"),
        "tags": trace.get("tags") or [],
        "release": trace.get("release"),
    }


def needs_trace(record: Any) -> bool:
    """Whether the events of this observation use its trace's context: roots, generations, errors, warnings."""
    return isinstance(record, Mapping) and (
        not record.get("parentObservationId")
        or record.get("type") == "GENERATION"
        or record.get("level") in ERROR_LEVELS
    )


@dataclass(frozen=True)
class _Known:
    """A trace's context as read at `read_at` (None: the server did not have the trace then)."""

    context: dict[str, Any] | None
    read_at: float


# --- reading --------------------------------------------------------------------------------------------------


class LegacyReader:
    """Reads windows of observations and scores from the legacy lists; see the module docstring.

    `get` is the reader's one-request function (retries, rate limits, cancel). Trace context is cached across
    passes (`TRACE_CACHE_SIZE` traces, least recently used first out), so that the children of a trace that
    started in an earlier window find it without a request.
    """

    def __init__(
        self,
        get: Getter,
        *,
        host: str = "Langfuse",
        environments: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        cache_size: int = TRACE_CACHE_SIZE,
    ) -> None:
        self.get = get
        self.host = host
        self.environments = tuple(environments)
        self.clock = clock
        self.cache_size = cache_size
        self._traces: OrderedDict[str, _Known] = OrderedDict()

    def observations(self, start: datetime, end: datetime) -> Iterator[Batch]:
        """Pages of observations with start time in [start, end), mapped to the v2 shape, with trace context."""
        params: dict[str, Any] = {}
        if self.environments:
            params["environment"] = list(self.environments)
        lo, hi = _window_ms(start, end)
        window_read = False
        for records, last in self._walk(
            OBSERVATIONS_V1_PATH, params, "startTime", ("fromStartTime", "toStartTime"), lo, hi, newest_first=True
        ):
            missing = self._missing(records)
            if missing and not window_read:
                # a root starts when its trace does: one read of the window's traces serves every root in it
                self._read_traces(lo, hi)
                window_read = True
                missing = self._missing(records)
            for trace_id in missing:
                self._read_trace(trace_id)
            yield [observation_from_v1(record, self._context(record)) for record in records], last

    def scores(self, start: datetime, end: datetime) -> Iterator[Batch]:
        """Pages of scores with timestamp in [start, end), newest first, mapped to the v3 shape."""
        lo, hi = _window_ms(start, end)
        # the `score` field group alone: the `trace` group costs the server a join the events do not need
        params: dict[str, Any] = {"fields": "score"}
        if self.environments:
            params["environment"] = list(self.environments)  # repeated or comma-separated: both work here
        bounds = ("fromTimestamp", "toTimestamp")
        for records, last in self._walk(SCORES_V2_PATH, params, "timestamp", bounds, lo, hi, newest_first=True):
            yield [score_from_v2(record) for record in records], last

    # trace context

    def _missing(self, records: Iterable[Any]) -> list[str]:
        """Trace ids whose context these records need and the cache cannot give (or gives from before a root moved)."""
        missing: dict[str, None] = {}
        for record in records:
            trace_id = record.get("traceId") if needs_trace(record) else None
            if not isinstance(trace_id, str) or not trace_id or trace_id in missing:
                continue
            known = self._traces.get(trace_id)
            if known is None:
                missing[trace_id] = None
            elif not record.get("parentObservationId"):
                # the root and its trace are written together: a root newer than what we know of its trace
                # means the trace may have changed (name, tags, user) since we read it
                updated = _ms(record.get("updatedAt"))
                if updated is not None and updated > known.read_at * 1000:
                    missing[trace_id] = None
        return list(missing)

    def _context(self, record: Any) -> dict[str, Any] | None:
        trace_id = record.get("traceId") if isinstance(record, Mapping) else None
        if not isinstance(trace_id, str) or trace_id not in self._traces:
            return None
        self._traces.move_to_end(trace_id)
        return self._traces[trace_id].context

    def _remember(self, trace_id: str, context: dict[str, Any] | None, read_at: float) -> None:
        self._traces[trace_id] = _Known(context, read_at)
        self._traces.move_to_end(trace_id)
        while len(self._traces) > self.cache_size:
            self._traces.popitem(last=False)

    def _read_traces(self, lo: int, hi: int) -> None:
        """Cache the context of every trace that starts in [lo, hi), oldest first, core fields only."""
        read_at = self.clock()
        for traces, _ in self._walk(
            TRACES_PATH,
            {"orderBy": "timestamp.asc", "fields": "core"},
            "timestamp",
            ("fromTimestamp", "toTimestamp"),
            lo,
            hi,
            newest_first=False,
        ):
            for trace in traces:
                if isinstance(trace, Mapping) and (trace_id := _id(trace)):
                    self._remember(trace_id, trace_context(trace), read_at)

    def _read_trace(self, trace_id: str) -> None:
        """One trace by id: for a child whose trace started before the window (or a trace not yet visible)."""
        read_at = self.clock()
        try:
            # without `fields` the server sends every observation of the trace with its input and output, its
            # scores and metrics (megabytes for a large trace); the context needs the trace alone
            # (web/src/pages/api/public/traces/[traceId].ts)
            trace = self.get(f"{TRACES_PATH}/{quote(trace_id, safe='')}", {"fields": "core"})
        except ApiError as exc:
            if exc.status != 404:
                raise
            # not (yet) visible: its observations go without trace context; a later root reads it again
            log.debug("trace %s is not on the server (404): its observations go without trace context", trace_id)
            self._remember(trace_id, None, read_at)
            return
        self._remember(trace_id, trace_context(trace) if isinstance(trace, Mapping) else None, read_at)

    # paging

    def _walk(
        self,
        path: str,
        params: Mapping[str, Any],
        field: str,
        bounds: tuple[str, str],
        lo: int,
        hi: int,
        *,
        newest_first: bool,
    ) -> Iterator[Batch]:
        """Every record with `field` in [lo, hi) ms, page by page; the last batch says so (rules 1 and 2)."""
        at_edge: set[str] = set()  # ids already returned whose time is the current bound's millisecond
        while lo < hi:
            records, more, _ = self._page(path, params, bounds, lo, hi, 1)
            fresh = [r for r in records if _id(r) not in at_edge]
            if not more:
                yield fresh, True
                return
            times = [t for r in records if (t := _ms(r.get(field) if isinstance(r, Mapping) else None)) is not None]
            times = [t for t in times if lo <= t < hi]
            if not times:
                # a full page and no time to cut at (malformed records): page on by number, bound still fixed
                yield fresh, False
                yield from self._numbered(path, params, bounds, lo, hi, at_edge | _ids(records), final=True)
                return
            edge = min(times) if newest_first else max(times)
            if (edge + 1 >= hi) if newest_first else (edge <= lo):
                # a whole page inside one millisecond: no time to cut at but the millisecond's own end
                yield fresh, False
                yield from self._millisecond(path, params, bounds, edge, at_edge | _ids(records))
                if newest_first:
                    hi = edge
                else:
                    lo = edge + 1
                at_edge = set()
                continue
            if newest_first:
                hi = edge + 1  # inclusive of the oldest millisecond served: the overlap
            else:
                lo = edge
            at_edge = {i for r in records if (i := _id(r)) and _ms(r.get(field)) == edge}
            yield fresh, False
        yield [], True

    def _numbered(
        self,
        path: str,
        params: Mapping[str, Any],
        bounds: tuple[str, str],
        lo: int,
        hi: int,
        returned: set[str],
        *,
        final: bool,
    ) -> Iterator[Batch]:
        """Page through [lo, hi) by page number from page 1, dropping ids already returned."""
        page = 1
        while True:
            records, more, _ = self._page(path, params, bounds, lo, hi, page)
            fresh = [r for r in records if _id(r) not in returned]
            returned.update(_ids(records))
            yield fresh, final and not more
            if not more:
                return
            page += 1

    def _millisecond(
        self, path: str, params: Mapping[str, Any], bounds: tuple[str, str], ms: int, returned: set[str]
    ) -> Iterator[Batch]:
        """Every record of millisecond `ms` not in `returned` (ids of that millisecond already returned).

        Its pages are read by number, round after round, until as many ids as the meta's `totalItems` are held:
        the ties of one millisecond come in an order that can change with each request, so one round of pages
        can serve one record twice and miss another.
        """
        # `returned` holds ids of this millisecond alone: those of the pages that found it
        page, requests = 1, 0
        while True:
            records, more, total = self._page(path, params, bounds, ms, ms + 1, page)
            requests += 1
            fresh = [r for r in records if _id(r) not in returned]
            returned.update(_ids(records))
            yield fresh, False
            if total is None:
                if not more:  # no count to go by: one round, as far as the pages go
                    return
                page += 1
                continue
            if len(returned) >= total:
                return
            if requests >= TIE_PASSES * max(1, -(-total // LEGACY_PAGE)):
                log.warning(
                    "%s %s: %d of the %d records at %s read after %d requests; going on without the rest "
                    "(the next sweep reads the millisecond again)",
                    self.host,
                    path,
                    len(returned),
                    total,
                    _at_ms(ms),
                    requests,
                )
                return
            page = page + 1 if more else 1

    def _page(
        self, path: str, params: Mapping[str, Any], bounds: tuple[str, str], lo: int, hi: int, page: int
    ) -> tuple[list[Any], bool, int | None]:
        """One page of [lo, hi), whether another follows it, and how many records [lo, hi) holds (if said)."""
        query = {**params, bounds[0]: _at_ms(lo), bounds[1]: _at_ms(hi), "page": page, "limit": LEGACY_PAGE}
        data, meta = list_body(self.host, path, self.get(path, query))
        total_pages = meta.get("totalPages")
        more = len(data) >= LEGACY_PAGE and (not isinstance(total_pages, int) or page < total_pages)
        total_items = meta.get("totalItems")
        return data, more, total_items if isinstance(total_items, int) and not isinstance(total_items, bool) else None


def _ids(records: Iterable[Any]) -> set[str]:
    return {i for r in records if (i := _id(r))}


def _window_ms(start: datetime, end: datetime) -> tuple[int, int]:
    # whole milliseconds, truncated as format_time truncates them on the v2 read path
    return (start - _EPOCH) // _MS, (end - _EPOCH) // _MS
