"""Reading the Langfuse public API: read paths, cursor paging, field groups, rate limits, retries.

Everything is read over httpx with plain JSON decoding: the SDK's typed parsing costs about 5 ms per record,
which a catch-up of a million observations cannot pay, and its typed models refuse answers that lack fields
the poller does not need (older servers send projects without `organization`). What each answer must hold is
checked where it is read, so an unexpected one is an ApiError that names the endpoint, never a traceback.

Two read paths yield the same records: "v2" (`/v2/observations` and `/v3/scores`, cursor paging) and
"legacy" (the page-based lists of self-hosted Langfuse v3, see legacy.py). With `api = "auto"` each stream
finds its path by reading: the v2 endpoint first, the legacy one when that answers 404. A 404 later (a server
downgraded, or v4's opt-in turned off) looks again at once, and a stream on the legacy path checks every
`LEGACY_RECHECK` seconds, with one small request, whether the server has grown the v2 endpoint (an upgrade
to v4). Switching is seamless: both paths make the same events with the same ids from the same records, and
the watermarks and dedup keys are the same.

Requests are paced per rate-limit bucket, as Langfuse Cloud counts them: the legacy reads (traces, v1
observations) have their own, smaller bucket. `max_requests_per_minute` budgets each bucket apart
(`legacy_max_requests_per_minute` the legacy one, when set). Only a 429 carries rate-limit headers (a
successful answer has none, so none is looked at): it pauses the bucket whose endpoint answered it for its
`Retry-After`, or, should that be missing, until its `X-RateLimit-Reset` (a JavaScript date string), and the
same request is tried again after that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import tenacity

from ..config import LangfuseConfig
from ..errors import ApiError, AuthError
from ..util.backoff import jittered_backoff
from ..util.durations import format_time
from .answers import error_message, list_body, newest_rows, retry_after
from .legacy import OBSERVATIONS_V1_PATH, SCORES_V2_PATH, TRACES_PATH, LegacyReader

log = logging.getLogger(__name__)

OBSERVATIONS_PATH = "/api/public/v2/observations"
SCORES_PATH = "/api/public/v3/scores"
OBSERVATIONS_PAGE = 1000  # the endpoint's maximum: fewer requests per record
SCORES_PAGE = 100
# what the events need; `io` (raw input and output, can be huge) only when the config asks for it
OBSERVATION_FIELDS = ("core", "basic", "time", "model", "usage", "metrics", "trace_context")
SCORE_FIELDS = ("details", "subject")
MAX_RETRY_AFTER = 300.0
RETRY_ATTEMPTS = 6
READ_PATHS = ("v2", "legacy")  # newest first: the order in which `auto` tries them
# the list endpoint of each stream on each read path
ENDPOINTS = {
    ("observations", "v2"): OBSERVATIONS_PATH,
    ("scores", "v2"): SCORES_PATH,
    ("observations", "legacy"): OBSERVATIONS_V1_PATH,
    ("scores", "legacy"): SCORES_V2_PATH,
}
LEGACY_LISTS = frozenset({OBSERVATIONS_V1_PATH, SCORES_V2_PATH, TRACES_PATH})
DATA_LISTS = LEGACY_LISTS | {OBSERVATIONS_PATH, SCORES_PATH}
# the endpoints Langfuse Cloud counts in its smaller legacy bucket (langfuse-api.md: traces, v1 observations)
LEGACY_BUCKET_PREFIXES = (TRACES_PATH, OBSERVATIONS_V1_PATH)
LEGACY_RECHECK = 3600.0  # seconds between checks, on the legacy path, for the v2 endpoint


class Cancelled(Exception):
    """Raised out of a wait when the daemon is stopping."""


class _Retry(Exception):
    """A failure worth trying again after `retry_after` seconds (or the backoff when None)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Page:
    """One page of a list endpoint: its records as plain dicts, and the cursor of the next page.

    `cursor` is None on the last page of a pass; the legacy path, whose pages are numbered, puts a marker there.
    """

    records: list[Any]
    cursor: str | None


@dataclass(frozen=True)
class CheckResult:
    """What `check` learnt from the server: its version and the project the keys belong to."""

    version: str
    projects: tuple[tuple[str, str], ...]


def host_of(url: str) -> str:
    return urlsplit(url).netloc or url


@dataclass
class _Bucket:
    """Pacing of one server-side rate-limit bucket: a client budget, and the pause the server asked for."""

    name: str
    min_gap: float  # seconds between two requests: 60 / the configured budget per minute (0: none)
    not_before: float = 0.0  # no request before this time: the server said this bucket is spent
    last_request: float = 0.0


def _bucket_name(path: str) -> str:
    return "legacy" if path.startswith(LEGACY_BUCKET_PREFIXES) else "current"


class LangfuseReader:
    """Reads observations and scores page by page, on each stream's read path; counts its requests; paces them.

    `cancel`, when set, interrupts any wait (429, backoff) with `Cancelled`, so a stopping daemon never
    sleeps through a minute-long Retry-After.
    """

    def __init__(
        self,
        config: LangfuseConfig,
        *,
        extra_fields: Sequence[str] = (),
        expand_metadata: Sequence[str] = (),
        environments: Sequence[str] = (),
        cancel: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        from .. import __version__

        self.config = config
        self.host = host_of(config.base_url)
        self.observation_fields = ",".join((*OBSERVATION_FIELDS, *extra_fields))
        # without the metadata group the server ignores it; with it, naming any key makes every value come uncut
        # (web/src/pages/api/public/v2/observations/index.ts, repositories/events.ts)
        self.expand_metadata = ",".join(expand_metadata) if "metadata" in extra_fields else ""
        self.environments = tuple(environments)
        self.cancel = cancel or threading.Event()
        self.clock = clock
        self.requests = 0
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max

        def gap(per_minute: int) -> float:
            return 60.0 / per_minute if per_minute else 0.0

        self.buckets = {
            "current": _Bucket("current", gap(config.max_requests_per_minute)),
            "legacy": _Bucket("legacy", gap(config.legacy_max_requests_per_minute)),
        }
        # the read path of each stream: forced by the config, else found by reading (None: not yet known)
        self.read_paths: dict[str, str] = {}
        self._found_at: dict[str, float] = {}
        # told of every read path found or changed (the runtime keeps it in the state, for `status`)
        self.on_read_path: Callable[[str, str], None] = lambda stream, path: None
        # told of each request's outcome (path, and "200", "429", ... or "timeout", "error") and of each deliberate
        # wait (seconds): the metrics count the requests, and the watchdog sees that a poll is alive
        self.on_request: Callable[[str, str], None] = lambda path, outcome: None
        self.on_wait: Callable[[float], None] = lambda seconds: None
        self.legacy = LegacyReader(self.get, host=self.host, environments=self.environments, clock=clock)
        self.client = httpx.Client(
            base_url=config.base_url,
            auth=(config.public_key, config.secret_key.reveal()),
            timeout=config.timeout.total_seconds(),
            headers={"User-Agent": f"langfuse-poller/{__version__}", "Accept": "application/json"},
        )

    def close(self) -> None:
        self.client.close()

    # the list endpoints, on the stream's read path

    def observations(self, start: datetime, end: datetime) -> Iterator[Page]:
        """Pages of observations with start time in [start, end), in the shape of /v2/observations."""
        return self._read("observations", start, end)

    def scores(self, start: datetime, end: datetime) -> Iterator[Page]:
        """Pages of scores with timestamp in [start, end), in the shape of /v3/scores."""
        return self._read("scores", start, end)

    def _read(self, stream: str, start: datetime, end: datetime) -> Iterator[Page]:
        path = self._known_path(stream)
        if path is not None:
            try:
                yield from self._source(stream, path, start, end)
                return
            except ApiError as exc:
                if self.config.api != "auto" or exc.status != 404:
                    raise
                # the server lost the endpoint: find the path again, and read the window on it from its start
                # (pages already committed are read again: the dedup keys make that harmless)
                log.warning("Langfuse %s: %s; looking for the read path again", stream, exc)
        yield from self._find_and_read(stream, start, end)

    def _known_path(self, stream: str) -> str | None:
        if self.config.api != "auto":
            self._note_path(stream, self.config.api)
            return self.config.api
        path = self.read_paths.get(stream)
        if path == "legacy" and self.clock() - self._found_at.get(stream, 0.0) >= LEGACY_RECHECK:
            self._found_at[stream] = self.clock()
            try:
                served = self.serves(stream, "v2")
            except ApiError as exc:
                served = False
                log.info(
                    "Langfuse %s: checking for %s failed (%s); staying on the legacy path",
                    stream,
                    ENDPOINTS[stream, "v2"],
                    exc,
                )
            if served:
                self._note_path(stream, "v2")
                return "v2"
        return path

    def _find_and_read(self, stream: str, start: datetime, end: datetime) -> Iterator[Page]:
        """Read the window on the newest path whose endpoint the server has, and remember that path."""
        for path in READ_PATHS:
            pages = self._source(stream, path, start, end)
            try:
                first = next(pages, None)
            except ApiError as exc:
                if exc.status == 404:
                    continue
                raise
            self._note_path(stream, path)
            if first is not None:
                yield first
                yield from pages
            return
        raise self._no_read_path(stream)

    def _note_path(self, stream: str, path: str) -> None:
        if self.read_paths.get(stream) == path:
            return
        previous = self.read_paths.get(stream)
        self.read_paths[stream] = path
        self._found_at[stream] = self.clock()
        how = "as configured" if self.config.api != "auto" else 'found by api = "auto"'
        log.info(
            "Langfuse %s: reading %s %s (%s path, %s)%s",
            stream,
            self.host,
            ENDPOINTS[stream, path],
            path,
            how,
            f"; was {previous}" if previous else "",
        )
        self.on_read_path(stream, path)

    def _source(self, stream: str, path: str, start: datetime, end: datetime) -> Iterator[Page]:
        if path == "legacy":
            legacy = self.legacy
            batches = legacy.observations(start, end) if stream == "observations" else legacy.scores(start, end)
            return (Page(records, None if last else "legacy:next") for records, last in batches)
        if stream == "observations":
            return self._v2_observations(start, end)
        return self._v2_scores(start, end)

    def serves(self, stream: str, path: str) -> bool:
        """Whether the server has `stream`'s endpoint on read path `path`: one request for one record."""
        endpoint = ENDPOINTS[stream, path]
        now = self.clock()
        start, end = format_time(utc_from_timestamp(now - 60)), format_time(utc_from_timestamp(now))
        params: dict[str, Any] = {"limit": 1}
        if path == "legacy":
            params["page"] = 1
        if stream == "observations":
            params.update(fromStartTime=start, toStartTime=end)
            if path == "v2":
                params["fields"] = "core"
        else:
            params.update(fromTimestamp=start, toTimestamp=end)
        try:
            body = self.get(endpoint, params)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        # an answer the poller could not read is no endpoint it can read from
        if path == "legacy":
            list_body(self.host, endpoint, body)
        else:
            self._cursor_page(endpoint, body)
        return True

    def find_read_path(self, stream: str) -> str:
        """The read path `stream` would use (the configured one, or the newest the server has); ApiError if none."""
        paths = READ_PATHS if self.config.api == "auto" else (self.config.api,)
        for path in paths:
            if self.serves(stream, path):
                return path
        if self.config.api == "auto":
            raise self._no_read_path(stream)
        raise ApiError(self._missing_endpoint(ENDPOINTS[stream, self.config.api]), status=404)

    def _no_read_path(self, stream: str) -> ApiError:
        tried = " nor ".join(ENDPOINTS[stream, path] for path in READ_PATHS)
        return ApiError(
            f"{self.host} has neither {tried} (HTTP 404 for both): check that [langfuse] base_url "
            f"({self.config.base_url}) is the Langfuse server",
            status=404,
        )

    def _missing_endpoint(self, path: str) -> str:
        forced = self.config.api != "auto"
        if path in LEGACY_LISTS:
            return f"{self.host} has no {path} (404): a server without the legacy endpoints (Langfuse Cloud)" + (
                '; set [langfuse] api = "auto" or "v2"' if forced else ""
            )
        return (
            f"{self.host} has no {path} (404): a self-hosted Langfuse v3 server, or v4 without "
            "LANGFUSE_MIGRATION_V4_ALLOW_PREVIEW_OPT_IN=true"
            + ('; set [langfuse] api = "auto" to read its legacy endpoints' if forced else "")
        )

    def _v2_observations(self, start: datetime, end: datetime) -> Iterator[Page]:
        params: dict[str, Any] = {
            "fields": self.observation_fields,
            "limit": OBSERVATIONS_PAGE,
            "fromStartTime": format_time(start),
            "toStartTime": format_time(end),
        }
        if self.environments:
            params["environment"] = list(self.environments)
        if self.expand_metadata:
            params["expandMetadata"] = self.expand_metadata
        return (Page(newest_rows(page.records), page.cursor) for page in self._pages(OBSERVATIONS_PATH, params))

    def _v2_scores(self, start: datetime, end: datetime) -> Iterator[Page]:
        params: dict[str, Any] = {
            "fields": ",".join(SCORE_FIELDS),
            "limit": SCORES_PAGE,
            "fromTimestamp": format_time(start),
            "toTimestamp": format_time(end),
        }
        if self.environments:
            # one comma-separated value: the endpoint's strict schema answers 400 to a repeated parameter
            # (packages/shared/src/features/scores/interfaces/api/v3/endpoints.ts)
            params["environment"] = ",".join(self.environments)
        return self._pages(SCORES_PATH, params)

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[Page]:
        cursor: str | None = None
        while True:
            page_params = dict(params, cursor=cursor) if cursor else params
            page = self._cursor_page(path, self.get(path, page_params))
            cursor = page.cursor
            yield page
            if not cursor:
                return

    def _cursor_page(self, path: str, body: Any) -> Page:
        """A page of a cursor list from its answer; ApiError when the answer is not one."""
        data, meta = list_body(self.host, path, body)
        cursor = meta.get("cursor") or None
        if cursor is not None and not isinstance(cursor, str):
            raise ApiError(
                f"{self.host} answered GET {path} with a meta.cursor that is not a string "
                f"({type(cursor).__name__} {str(cursor)[:40]!r})"
            )
        return Page(data, cursor)

    # one request, with rate limits and retries

    def get(self, path: str, params: Mapping[str, Any]) -> Any:
        """GET a JSON document, retrying timeouts, 5xx, 429 and malformed bodies with backoff and jitter."""
        backoff = jittered_backoff(self.backoff_initial, self.backoff_max)

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, _Retry) and exc.retry_after is not None:
                return min(exc.retry_after, MAX_RETRY_AFTER)
            return float(backoff(state))

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Retry),
            wait=wait,
            stop=tenacity.stop_after_attempt(RETRY_ATTEMPTS),
            sleep=self._sleep,
            before_sleep=lambda state: log.warning(
                "Langfuse %s: %s; retrying in %.1fs",
                path,
                state.outcome.exception() if state.outcome else "?",
                state.next_action.sleep if state.next_action else 0,
            ),
            reraise=True,
        )
        try:
            return retrying(self._get_once, path, params)
        except _Retry as exc:
            raise ApiError(
                f"{self.host} kept failing GET {path} ({exc}) after {RETRY_ATTEMPTS} attempts; "
                "the next poll will try again"
            ) from None

    def _sleep(self, seconds: float) -> None:
        self.on_wait(seconds)
        if self.cancel.wait(seconds):
            raise Cancelled()

    def _pace(self, bucket: _Bucket) -> None:
        """Wait, if need be, for the bucket's server-side window and its configured request budget."""
        now = self.clock()
        wait = max(bucket.not_before - now, bucket.last_request + bucket.min_gap - now)
        if wait > 0:
            log.info("Langfuse rate limit (%s endpoints): waiting %.1fs before the next request", bucket.name, wait)
            self._sleep(wait)
        bucket.last_request = self.clock()

    def _get_once(self, path: str, params: Mapping[str, Any]) -> Any:
        if self.cancel.is_set():
            raise Cancelled()
        bucket = self.buckets[_bucket_name(path)]
        self._pace(bucket)
        self.requests += 1
        try:
            response = self.client.get(path, params=params)
        except httpx.TimeoutException:
            self.on_request(path, "timeout")
            raise _Retry(f"no answer within {self.config.timeout.total_seconds():g}s") from None
        except httpx.TransportError as exc:
            self.on_request(path, "error")
            raise _Retry(f"cannot reach {self.host}: {exc}") from None
        self.on_request(path, str(response.status_code))
        status = response.status_code
        if status == 429:
            wait = retry_after(response, self.clock())
            if wait:
                # the bucket is spent for every endpoint counted in it, not only for this request
                bucket.not_before = max(bucket.not_before, self.clock() + min(wait, MAX_RETRY_AFTER))
            raise _Retry("rate limited (429)", wait)
        if status >= 500 or status in (408, 409):
            raise _Retry(f"HTTP {status}")
        if status in (401, 403):
            raise self.auth_error(status, error_message(response))
        if status == 404 and path in DATA_LISTS:
            raise ApiError(self._missing_endpoint(path), status=status)
        if status >= 400:
            raise ApiError(f"{self.host} refused GET {path}: HTTP {status}: {error_message(response)}", status=status)
        return self._json(path, response)

    def _json(self, path: str, response: httpx.Response) -> Any:
        """The JSON of a successful answer. An answer that is not JSON at all (empty, an HTML page from a proxy or
        a login page) is an ApiError at once: it will not change within seconds, and the next poll asks again.
        JSON that breaks off (a connection cut mid-body) is tried again."""
        content = response.content
        if not content.strip():
            raise ApiError(f"{self.host} answered GET {path} with an empty body (HTTP {response.status_code})")
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and "json" not in content_type:
            text = " ".join(response.text[:80].split())
            raise ApiError(
                f"{self.host} answered GET {path} with {content_type}, not JSON ({text!r}): check that "
                f"[langfuse] base_url ({self.config.base_url}) is the Langfuse server itself"
            )
        try:
            # a page of 1000 observations is a few megabytes of JSON: orjson reads it several times faster
            return orjson.loads(content)
        except ValueError:
            raise _Retry("the answer was not valid JSON") from None

    def auth_error(self, status: int, detail: str) -> AuthError:
        return AuthError(
            f"{self.host} rejected the API keys (public key {self.config.public_key}, HTTP {status}: {detail}). "
            "Check [langfuse] public_key and secret_key (or LANGFUSE_PUBLIC_KEY / LANGFUSE_SECRET_KEY), and that "
            "base_url is the region or host where the project lives",
            status=status,
        )

    # the checks, read as plain JSON

    def check(self) -> CheckResult:
        """Reach the server (health) and prove the keys (projects); raises ApiError or AuthError saying which.

        Both answers are read as plain JSON and only `version`, and each project's `id` and `name`, are looked
        at: the SDK's typed models require fields that older servers omit (a project's `organization`, added in
        Langfuse v3.143.0), and valid keys are valid whatever else the answer holds.
        """
        health = self._check_get("/api/public/health", "is not healthy")
        version = health.get("version") if isinstance(health, Mapping) else None
        body = self._check_get("/api/public/projects", "cannot list projects")
        projects, _ = list_body(self.host, "/api/public/projects", body)
        found: list[tuple[str, str]] = []
        for project in projects:
            if not isinstance(project, Mapping) or not isinstance(project.get("id"), str):
                raise ApiError(f"{self.host} answered GET /api/public/projects with a project that has no 'id'")
            found.append((project["id"], str(project.get("name") or "?")))
        return CheckResult(version=str(version or "?"), projects=tuple(found))

    def _check_get(self, path: str, trouble: str) -> Any:
        """One request of `check`, without retries or pacing (neither endpoint is rate-limited)."""
        try:
            response = self.client.get(path)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach {self.config.base_url}: {exc}") from None
        status = response.status_code
        if status in (401, 403):
            raise self.auth_error(status, error_message(response))
        if status >= 400:
            raise ApiError(f"{self.host} {trouble}: GET {path} answered HTTP {status}", status=status)
        try:
            return self._json(path, response)
        except _Retry:
            raise ApiError(f"{self.host} answered GET {path} with JSON that breaks off") from None


def utc_from_timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
