"""A loopback HTTP stand-in for the Langfuse public read API.

``FakeLangfuse`` serves ``/api/public/health``, ``/api/public/projects``, ``/api/public/v2/observations`` and
``/api/public/v3/scores`` the way Langfuse Cloud does (auth, limits, field groups, keyset cursors, ordering,
time filters, 429 rate limiting), so that pollers can be tested end to end with the real SDK or plain httpx.
It also lets a test make data visible late (ingestion delay), update records, and inject faults.

It also serves the legacy read endpoints of self-hosted Langfuse v3 from the same data: ``/api/public/traces``
(and ``/traces/{id}``), ``/api/public/observations`` (v1) and ``/api/public/v2/scores``, page-based (``page``,
``limit`` up to 100, ``meta {page, limit, totalItems, totalPages}``), newest first (traces: ``orderBy``), in
their own record shapes, with their own rate-limit bucket. ``serve`` picks what the server has: ``"v2"`` (the
default, Langfuse Cloud today: 404 on the legacy endpoints), ``"legacy"`` (a self-hosted v3: 404 on
``/v2/observations`` and ``/v3/scores``) or ``"both"``; ``on_data_request`` lets a test change the data between
two requests.

Usage::

    with FakeLangfuse() as fake:
        fake.add_trace(observations=2)
        api = LangfuseAPI(base_url=fake.url, username=fake.public_key, password=fake.secret_key)
        page = api.observations.get_many(limit=100)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

from .fields import LEVELS, OBSERVATION_FIELD_GROUPS, SCORE_FIELD_GROUPS
from .index import Entry, Index, trace_hash
from .query import (
    BadRequest,
    ceil_div,
    check,
    equality_checks,
    parse_bool,
    parse_limit,
    query_value,
    time_bounds,
)
from .records import Records
from .wire import (
    Record,
    Response,
    datetime_to_ms,
    error_response,
    format_ms,
    json_response,
    parse_iso_us,
)

__all__ = [
    "OBSERVATION_FIELD_GROUPS",
    "SCORE_FIELD_GROUPS",
    "BadRequest",
    "FakeLangfuse",
    "Record",
    "RequestRecord",
    "datetime_to_ms",
    "format_ms",
    "parse_iso_us",
]

HEALTH_PATH: Final = "/api/public/health"
PROJECTS_PATH: Final = "/api/public/projects"
OBSERVATIONS_PATH: Final = "/api/public/v2/observations"
SCORES_PATH: Final = "/api/public/v3/scores"
TRACES_PATH: Final = "/api/public/traces"
OBSERVATIONS_V1_PATH: Final = "/api/public/observations"
SCORES_V2_PATH: Final = "/api/public/v2/scores"
_V2_PATHS: Final = frozenset({OBSERVATIONS_PATH, SCORES_PATH})
_LEGACY_PATHS: Final = frozenset({TRACES_PATH, OBSERVATIONS_V1_PATH, SCORES_V2_PATH})
_DATA_PATHS: Final = _V2_PATHS | _LEGACY_PATHS
_KNOWN_PATHS: Final = frozenset({HEALTH_PATH, PROJECTS_PATH}) | _DATA_PATHS
# Langfuse Cloud counts these in its smaller legacy bucket; /v2/scores counts with the current endpoints
_LEGACY_BUCKET: Final = frozenset({TRACES_PATH, OBSERVATIONS_V1_PATH})
SERVES: Final = ("v2", "legacy", "both")

SERVER_VERSION: Final = "3.130.0"


OBSERVATIONS_DEFAULT_LIMIT: Final = 50
OBSERVATIONS_MAX_LIMIT: Final = 1000
SCORES_DEFAULT_LIMIT: Final = 50
SCORES_MAX_LIMIT: Final = 100
LEGACY_DEFAULT_LIMIT: Final = 50
LEGACY_MAX_LIMIT: Final = 100
TRACE_FIELD_GROUPS: Final = ("core", "io", "scores", "observations", "metrics")
"""Field groups of the legacy traces list (``fields=``); all of them by default."""
_METADATA_CUT: Final = 200
# The limit reported in a 429 from rate_limit_next() when no budget is configured (Langfuse Cloud Pro).
_DEFAULT_REPORTED_LIMIT: Final = 1000

_UNAUTHORIZED_MESSAGE: Final = "Invalid credentials. Confirm that you've configured the correct host."
_MALFORMED_BODY: Final = b'{"data": [{"id": "truncated-'


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the fake answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    status: int
    at: float = 0.0
    """clock() when the request was answered."""


def _b64decode_json(text: str) -> Any:
    # Cursors travel in query strings, where "+" can turn into a space and padding may be dropped.
    text = text.strip().replace(" ", "+")
    padded = text + "=" * (-len(text) % 4)
    raw = base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))
    return json.loads(raw)


@dataclass
class _RateBucket:
    """A rate limit of `limit` requests per fixed one-minute window of the clock, as Langfuse Cloud counts."""

    limit: int | None = None
    window: int = -1
    used: int = 0

    def take(self, now: float) -> int | None:
        """Count one request; the window's reset time (unix seconds), or None when the window is spent."""
        assert self.limit is not None
        window = math.floor(now / 60)
        if window != self.window:
            self.window, self.used = window, 0
        if self.used >= self.limit:
            return None
        self.used += 1
        return (window + 1) * 60


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: str  # "fail" | "rate" | "malformed" | "slow"
    value: float = 0.0


# --- HTTP plumbing ----------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: FakeLangfuse) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name with getfqdn(), which can stall on some resolvers.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without this, Nagle plus delayed ACKs add ~40 ms per response.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        split = urlsplit(self.path)
        query = parse_qs(split.query, keep_blank_values=True)
        response = self.server.fake._handle(method, split.path, query, self.headers.get("Authorization"))
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(response.body)))
            for name, value in response.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(response.body)
        except OSError:
            # The client gave up (timeout tests) or stop() closed the socket.
            self.close_connection = True


# --- the fake ---------------------------------------------------------------------------------------------


class FakeLangfuse(Records):
    """A Langfuse public read API on 127.0.0.1: in-memory store, visibility delays, fault injection.

    Records are stored in wire format (camelCase keys, RFC 3339 UTC timestamps with milliseconds). Every
    record, and every update of one, becomes visible ``visible_after`` seconds (by ``clock``) after it was
    added; until an update is visible, the previous version is served. Faults set with ``fail_next`` and
    friends apply to the next requests to the data endpoints (``/v2/observations``, ``/v3/scores``) in
    order of arrival, after the credentials were checked.
    """

    def __init__(
        self,
        *,
        public_key: str = "pk-lf-test",
        secret_key: str = "sk-lf-test",
        project_id: str = "proj-test",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.public_key = public_key
        self.secret_key = secret_key
        self.project_id = project_id
        self.clock = clock
        self.requests: list[RequestRecord] = []
        """Every request served, in order of answer."""
        self.errors: list[BaseException] = []
        """Exceptions raised while handling requests (each answered with a 500); empty in a healthy test."""
        self.healthy = True
        """When False, the health endpoint answers 503."""
        self._serving = "v2"
        self.on_data_request: Callable[[str, dict[str, list[str]]], None] | None = None
        """Called with (path, query) before each data request is answered, e.g. to add records between pages."""
        self._lock = threading.RLock()
        self._observations = Index()
        self._scores = Index()
        self._faults: deque[_Fault] = deque()
        # data requests per fixed one-minute window: the current bucket, and the legacy endpoints' own
        self._bucket = _RateBucket()
        self._legacy_bucket = _RateBucket()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()

    @property
    def serve(self) -> str:
        """The read endpoints served: "v2" (Langfuse Cloud since 2026-11-16: 404 on the legacy ones), "legacy" (a
        self-hosted v3: 404 on /v2/observations and /v3/scores) or "both" (a self-hosted v4 with the opt-in)."""
        return self._serving

    @serve.setter
    def serve(self, value: str) -> None:
        if value not in SERVES:
            raise ValueError(f"serve must be one of {SERVES}, got {value!r}")
        self._serving = value

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``; only valid once started."""
        if self._server is None:
            raise RuntimeError("FakeLangfuse is not started")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> FakeLangfuse:
        """Start serving on a free loopback port (the same port again after a stop()); returns self."""
        if self._server is not None:
            raise RuntimeError("FakeLangfuse is already started")
        self._stopping.clear()
        server = _Server(("127.0.0.1", self._port), self)
        self._port = server.server_address[1]
        self._server = server
        # A short poll interval keeps stop() fast; serve_forever only polls to notice shutdown().
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-langfuse", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections, so clients see the server as gone."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeLangfuse:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _track(self, conn: socket.socket, active: bool) -> None:
        with self._lock:
            if active:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # -- faults --------------------------------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 503) -> None:
        """Answer the next ``n`` data requests with ``status`` and an "Internal Server Error" message."""
        self._queue_faults(n, _Fault("fail", status))

    def rate_limit_next(self, n: int = 1, retry_after: float = 1) -> None:
        """Answer the next ``n`` data requests with a Langfuse Cloud 429 (``Retry-After`` rounded up)."""
        self._queue_faults(n, _Fault("rate", retry_after))

    def malformed_next(self, n: int = 1) -> None:
        """Answer the next ``n`` data requests with a 200 whose body is not valid JSON."""
        self._queue_faults(n, _Fault("malformed"))

    def slow_next(self, n: int = 1, seconds: float = 5.0) -> None:
        """Delay the next ``n`` data requests by ``seconds`` (wall time) before answering them normally."""
        self._queue_faults(n, _Fault("slow", seconds))

    def _queue_faults(self, n: int, fault: _Fault) -> None:
        with self._lock:
            self._faults.extend([fault] * n)

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._faults.clear()

    def set_rate_limit(self, per_minute: int | None) -> None:
        """Allow ``per_minute`` data requests per fixed one-minute window of ``clock()``; None turns it off.

        While set, every data response carries ``X-RateLimit-Limit/-Remaining/-Reset`` and requests past the
        budget get a 429 until the window ends.
        """
        with self._lock:
            self._bucket = _RateBucket(per_minute)

    def set_legacy_rate_limit(self, per_minute: int | None) -> None:
        """Like ``set_rate_limit``, for the legacy bucket (traces and v1 observations), counted apart."""
        with self._lock:
            self._legacy_bucket = _RateBucket(per_minute)

    # -- request log ---------------------------------------------------------------------------------------

    def count(self, path_suffix: str) -> int:
        """Number of requests whose path ends with ``path_suffix`` (e.g. ``"/v2/observations"``)."""
        with self._lock:
            return sum(1 for r in self.requests if r.path.endswith(path_suffix))

    def reset_requests(self) -> None:
        """Forget the request log."""
        with self._lock:
            self.requests.clear()

    # -- request handling ----------------------------------------------------------------------------------

    def _handle(self, method: str, path: str, query: dict[str, list[str]], auth: str | None) -> Response:
        try:
            response = self._route(method, path, query, auth)
        except Exception as exc:
            with self._lock:
                self.errors.append(exc)
            response = error_response(500, "Internal Server Error")
        # Logged before the answer is written, so a client that got its response always finds it in the log.
        with self._lock:
            self.requests.append(RequestRecord(method, path, query, response.status, self.clock()))
        return response

    def _route(self, method: str, path: str, query: dict[str, list[str]], auth: str | None) -> Response:
        trace_id: str | None = None
        if path.startswith(TRACES_PATH + "/") and path.count("/") == 4:
            path, trace_id = TRACES_PATH, unquote(path.rsplit("/", 1)[1])
        if path not in _KNOWN_PATHS:
            return error_response(404, "Not Found")
        if (self.serve == "v2" and path in _LEGACY_PATHS) or (self.serve == "legacy" and path in _V2_PATHS):
            return error_response(404, "Not Found")
        if method != "GET":
            return error_response(405, "Method Not Allowed")
        if path == HEALTH_PATH:
            if not self.healthy:
                return json_response(503, {"status": "Database not available", "version": SERVER_VERSION})
            return json_response(200, {"status": "OK", "version": SERVER_VERSION})
        if not self._authorized(auth):
            return error_response(401, _UNAUTHORIZED_MESSAGE)
        if path == PROJECTS_PATH:
            return json_response(200, self._projects_payload())

        hook = self.on_data_request
        if hook is not None:
            hook(path if trace_id is None else f"{TRACES_PATH}/{trace_id}", query)
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is not None:
            if fault.kind == "fail":
                return error_response(int(fault.value), "Internal Server Error")
            if fault.kind == "rate":
                limit = self._bucket.limit or _DEFAULT_REPORTED_LIMIT
                return self._too_many(math.ceil(fault.value), limit, self.clock() + fault.value)
            if fault.kind == "malformed":
                return Response(200, _MALFORMED_BODY)
            self._stopping.wait(fault.value)

        rate_headers: list[tuple[str, str]] = []
        with self._lock:
            bucket = self._legacy_bucket if path in _LEGACY_BUCKET else self._bucket
            if bucket.limit is not None:
                now = self.clock()
                reset = bucket.take(now)
                if reset is None:
                    window_end = (math.floor(now / 60) + 1) * 60
                    return self._too_many(max(1, math.ceil(window_end - now)), bucket.limit, window_end)
                rate_headers = [
                    ("X-RateLimit-Limit", str(bucket.limit)),
                    ("X-RateLimit-Remaining", str(bucket.limit - bucket.used)),
                    ("X-RateLimit-Reset", str(reset)),
                ]
        listings: dict[str, Callable[[dict[str, list[str]]], Response]] = {
            OBSERVATIONS_PATH: self._list_observations,
            SCORES_PATH: self._list_scores,
            TRACES_PATH: self._list_traces,
            OBSERVATIONS_V1_PATH: self._list_observations_v1,
            SCORES_V2_PATH: self._list_scores_v2,
        }
        try:
            response = self._get_trace(trace_id) if trace_id is not None else listings[path](query)
        except BadRequest as exc:
            response = error_response(400, "Invalid request data", error=str(exc))
        response.headers.extend(rate_headers)
        return response

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        return decoded == f"{self.public_key}:{self.secret_key}"

    def _projects_payload(self) -> dict[str, Any]:
        return {
            "data": [
                {
                    "id": self.project_id,
                    "name": "test-project",
                    "metadata": {},
                    "retentionDays": None,
                    "organization": {"id": "org-test", "name": "test-org"},
                }
            ]
        }

    @staticmethod
    def _too_many(retry_after: int, limit: int, reset_at: float) -> Response:
        reset_at_text = format_ms(math.floor(reset_at * 1000))
        return json_response(
            429,
            {
                "message": "Rate limit exceeded",
                "code": "rate_limited",
                "details": {
                    "retryAfterSeconds": retry_after,
                    "limit": limit,
                    "remaining": 0,
                    "resetAt": reset_at_text,
                },
            },
            [
                ("Retry-After", str(retry_after)),
                ("X-RateLimit-Limit", str(limit)),
                ("X-RateLimit-Remaining", "0"),
                ("X-RateLimit-Reset", str(math.ceil(reset_at))),
            ],
        )

    # -- listing -------------------------------------------------------------------------------------------

    def _list_observations(self, query: dict[str, list[str]]) -> Response:
        groups = _parse_groups(query_value(query, "fields"), OBSERVATION_FIELD_GROUPS, ("core", "basic"))
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
        environments = frozenset(query.get("environment", ()))

        def matches(rec: Record) -> bool:
            for name, expected in checks:
                if rec.get(name) != expected:
                    return False
            return not environments or rec.get("environment") in environments

        keys = tuple(k for g in OBSERVATION_FIELD_GROUPS if g in groups for k in OBSERVATION_FIELD_GROUPS[g])
        expand = frozenset(k.strip() for k in (query_value(query, "expandMetadata") or "").split(",") if k.strip())
        cut_metadata = "metadata" in groups

        page, last, more = self._page(self._observations, lo, hi, cursor_key, limit, matches)
        data: list[Record] = []
        for entry, rec in page:
            if entry.raw:
                data.append(rec)
                continue
            out = {k: rec[k] for k in keys}
            if cut_metadata:
                out["metadata"] = _cut_metadata(out["metadata"], expand)
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

    def _list_scores(self, query: dict[str, list[str]]) -> Response:
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
        checks: list[tuple[str, Any]] = []
        for param in (
            "id",
            "name",
            "source",
            "dataType",
            "traceId",
            "observationId",
            "sessionId",
            "configId",
            "queueId",
            "authorUserId",
        ):
            value = query_value(query, param)
            if value is not None:
                checks.append((param, value))
        environments = frozenset(query.get("environment", ()))

        def matches(rec: Record) -> bool:
            for name, expected in checks:
                if rec.get(name) != expected:
                    return False
            return not environments or rec.get("environment") in environments

        keys = tuple(k for g in SCORE_FIELD_GROUPS if g == "core" or g in groups for k in SCORE_FIELD_GROUPS[g])
        page, last, more = self._page(self._scores, lo, hi, cursor_key, limit, matches)
        data = [{k: rec[k] for k in keys} for _, rec in page]
        meta: dict[str, Any] = {"limit": limit}
        if more and last is not None:
            token = {"lastTimestamp": format_ms(last.key[0]), "lastId": last.key[1]}
            meta["cursor"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode().rstrip("=")
        return json_response(200, {"data": data, "meta": meta})

    # -- legacy listing (page-based, self-hosted Langfuse v3) ----------------------------------------------

    def _roots(self) -> dict[str, Record]:
        """The visible root observation of each trace, by trace id: what the legacy endpoints serve as traces."""
        found = self._visible_range(self._observations, None, None, _is_root)
        return {rec["traceId"]: rec for _, rec in found}

    def _list_observations_v1(self, query: dict[str, list[str]]) -> Response:
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
        environments = frozenset(query.get("environment", ()))

        def matches(_: Entry, rec: Record) -> bool:
            return check(rec, checks) and (not environments or rec.get("environment") in environments)

        # start_time DESC: the only order this endpoint has
        found = self._visible_range(self._observations, lo, hi, matches)[::-1]
        chunk, meta = _page_of(found, page, limit)
        data = [rec if entry.raw else _v1_observation(rec) for entry, rec in chunk]
        return json_response(200, {"data": data, "meta": meta})

    def _list_traces(self, query: dict[str, list[str]]) -> Response:
        page = _parse_page(query_value(query, "page"))
        limit = parse_limit(query_value(query, "limit"), LEGACY_DEFAULT_LIMIT, LEGACY_MAX_LIMIT)
        groups = _trace_groups(query_value(query, "fields"))
        column, _, direction = (query_value(query, "orderBy") or "timestamp.desc").partition(".")
        if column != "timestamp" or direction.lower() not in ("asc", "desc"):
            raise BadRequest(f"orderBy {column}.{direction} is not supported by FakeLangfuse (only timestamp.asc/desc)")
        lo, hi = time_bounds(query, "fromTimestamp", "toTimestamp")
        checks = equality_checks(query, ("userId", "sessionId", "version", "release"))
        name = query_value(query, "name")
        environments = frozenset(query.get("environment", ()))
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
        chunk, meta = _page_of(found, page, limit)
        return json_response(200, {"data": [self._trace(rec, groups) for _, rec in chunk], "meta": meta})

    def _get_trace(self, trace_id: str) -> Response:
        root = self._roots().get(trace_id)
        if root is None:
            return error_response(404, f"Trace {trace_id} not found within authorized project")
        trace = self._trace(root, frozenset(("core", "io", "metrics")))
        members = self._visible_range(self._observations, None, None, lambda e, r: r.get("traceId") == trace_id)
        trace["observations"] = [rec if entry.raw else _v1_observation(rec) for entry, rec in members]
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

    def _list_scores_v2(self, query: dict[str, list[str]]) -> Response:
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
        environments = frozenset(query.get("environment", ()))

        def matches(_: Entry, rec: Record) -> bool:
            return (
                check(rec, checks)
                and (not ids or rec["id"] in ids)
                and (not environments or rec.get("environment") in environments)
            )

        # timestamp DESC, id DESC
        found = self._visible_range(self._scores, lo, hi, matches)[::-1]
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


# --- query parsing ----------------------------------------------------------------------------------------


def _parse_groups(text: str | None, table: Mapping[str, tuple[str, ...]], default: tuple[str, ...]) -> frozenset[str]:
    if text is None or not text.strip():
        return frozenset(("core", *default))
    groups = {g.strip() for g in text.split(",") if g.strip()}
    unknown = groups - table.keys()
    if unknown:
        raise BadRequest(f"unknown field group(s) {sorted(unknown)}; valid: {sorted(table)}")
    return frozenset(groups | {"core"})


def _cut_metadata(metadata: Any, expand: frozenset[str]) -> Any:
    if not isinstance(metadata, dict):
        return metadata
    if not any(isinstance(v, str) and len(v) > _METADATA_CUT for v in metadata.values()):
        return metadata
    return {
        k: v[:_METADATA_CUT] if isinstance(v, str) and len(v) > _METADATA_CUT and k not in expand else v
        for k, v in metadata.items()
    }


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
        "datasetRunId": None,
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
