"""``FakeLangfuse``: the stand-in a test holds, and which endpoint family answers which request.

A request is answered in this order: 404 for an unknown path or for an endpoint family the server does not
serve (``serve``), 405 for a method other than GET, health (no credentials needed), 401 for bad
credentials, projects; a data request then calls ``on_data_request``, meets the injected faults and the
rate limit (``gate``), and its endpoint family answers it, or answers 400 for a query it rejects. Every
request goes into the request log, and an exception inside becomes a 500.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from .gate import UNAUTHORIZED_MESSAGE, Fault, Gate, RateBucket
from .index import Index
from .legacy import OBSERVATIONS_V1_PATH, SCORES_V2_PATH, TRACES_PATH, LegacyLists
from .query import BadRequest, Query
from .server import LoopbackServer
from .status import HEALTH_PATH, PROJECTS_PATH, health_response, projects_response
from .v2 import OBSERVATIONS_PATH, SCORES_PATH, V2Lists
from .wire import Response, error_response

_V2_PATHS: Final = frozenset({OBSERVATIONS_PATH, SCORES_PATH})
_LEGACY_PATHS: Final = frozenset({TRACES_PATH, OBSERVATIONS_V1_PATH, SCORES_V2_PATH})
_DATA_PATHS: Final = _V2_PATHS | _LEGACY_PATHS
_KNOWN_PATHS: Final = frozenset({HEALTH_PATH, PROJECTS_PATH}) | _DATA_PATHS
SERVES: Final = ("v2", "legacy", "both")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the fake answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    status: int
    at: float = 0.0
    """clock() when the request was answered."""


class FakeLangfuse(LoopbackServer, Gate, V2Lists, LegacyLists):
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
        self.projects_organization = True
        """When False, /api/public/projects answers without `organization`, as servers before v3.143.0 do."""
        self.duplicate_rows = False
        """When True, /v2/observations serves an updated record's previous version beside it in the same page,
        as the server does until its table's parts merge."""
        self._serving = "v2"
        self.on_data_request: Callable[[str, dict[str, list[str]]], None] | None = None
        """Called with (path, query) before each data request is answered, e.g. to add records between pages."""
        self._lock = threading.RLock()
        self._observations = Index()
        self._scores = Index()
        self._faults: deque[Fault] = deque()
        self._ties = None
        # data requests per fixed one-minute window: the current bucket, and the legacy endpoints' own
        self._bucket = RateBucket()
        self._legacy_bucket = RateBucket()
        self._server = None
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

    def count(self, path_suffix: str) -> int:
        """Number of requests whose path ends with ``path_suffix`` (e.g. ``"/v2/observations"``)."""
        with self._lock:
            return sum(1 for r in self.requests if r.path.endswith(path_suffix))

    def reset_requests(self) -> None:
        """Forget the request log."""
        with self._lock:
            self.requests.clear()

    def _handle(self, method: str, path: str, query: Query, auth: str | None) -> Response:
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

    def _route(self, method: str, path: str, query: Query, auth: str | None) -> Response:
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
            return health_response(self.healthy)
        if not self._authorized(auth):
            return error_response(401, UNAUTHORIZED_MESSAGE)
        if path == PROJECTS_PATH:
            return projects_response(self.project_id, organization=self.projects_organization)

        hook = self.on_data_request
        if hook is not None:
            hook(path if trace_id is None else f"{TRACES_PATH}/{trace_id}", query)
        refused = self._injected_fault()
        if refused is not None:
            return refused
        refused = self._take_rate_limit(path)
        if refused is not None:
            return refused
        listings: dict[str, Callable[[Query], Response]] = {
            OBSERVATIONS_PATH: self._list_observations,
            SCORES_PATH: self._list_scores,
            TRACES_PATH: self._list_traces,
            OBSERVATIONS_V1_PATH: self._list_observations_v1,
            SCORES_V2_PATH: self._list_scores_v2,
        }
        try:
            response = self._get_trace(trace_id, query) if trace_id is not None else listings[path](query)
        except BadRequest as exc:
            response = error_response(
                400, "Invalid request data", error=exc.issues if exc.issues is not None else str(exc)
            )
        return response
