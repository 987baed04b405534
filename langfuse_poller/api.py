"""Reading the Langfuse public API: cursor paging, field groups, rate limits, retries.

The list endpoints are read over httpx with plain JSON decoding: the SDK's typed parsing costs about 5 ms per
record, which a catch-up of a million observations cannot pay. The SDK's `LangfuseAPI` (no background
threads) is used where typed answers are cheap and worth it: the health and key checks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import tenacity

from .backoff import jittered_backoff
from .config import LangfuseConfig
from .durations import format_time
from .errors import ApiError, AuthError, LangfusePollerError

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


class Cancelled(Exception):
    """Raised out of a wait when the daemon is stopping."""


class _Retry(Exception):
    """A failure worth trying again after `retry_after` seconds (or the backoff when None)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Page:
    """One page of a list endpoint: its records as plain dicts, and the cursor of the next page."""

    records: list[Any]
    cursor: str | None


@dataclass(frozen=True)
class CheckResult:
    """What `check` learnt from the server: its version and the project the keys belong to."""

    version: str
    projects: tuple[tuple[str, str], ...]


def host_of(url: str) -> str:
    return urlsplit(url).netloc or url


def _retry_after(response: httpx.Response, now: float) -> float | None:
    """Seconds to wait from Retry-After (seconds or an HTTP date), else from X-RateLimit-Reset."""
    header = response.headers.get("retry-after")
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(header).timestamp() - now)
            except (TypeError, ValueError):
                pass
    reset = response.headers.get("x-ratelimit-reset")
    if reset:
        try:
            return max(0.0, float(reset) - now)
        except ValueError:
            return None
    return None


class LangfuseReader:
    """Reads observations and scores page by page; counts its requests; waits out rate limits.

    `cancel`, when set, interrupts any wait (429, backoff) with `Cancelled`, so a stopping daemon never
    sleeps through a minute-long Retry-After.
    """

    def __init__(
        self,
        config: LangfuseConfig,
        *,
        extra_fields: Sequence[str] = (),
        environments: Sequence[str] = (),
        cancel: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        from . import __version__

        self.config = config
        self.host = host_of(config.base_url)
        self.observation_fields = ",".join((*OBSERVATION_FIELDS, *extra_fields))
        self.environments = tuple(environments)
        self.cancel = cancel or threading.Event()
        self.clock = clock
        self.requests = 0
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._not_before = 0.0  # no request before this time: the server said its budget is spent
        self._min_gap = 60.0 / config.max_requests_per_minute if config.max_requests_per_minute else 0.0
        self._last_request = 0.0
        self.client = httpx.Client(
            base_url=config.base_url,
            auth=(config.public_key, config.secret_key.reveal()),
            timeout=config.timeout.total_seconds(),
            headers={"User-Agent": f"langfuse-poller/{__version__}", "Accept": "application/json"},
        )

    def close(self) -> None:
        self.client.close()

    # the list endpoints

    def observations(self, start: datetime, end: datetime) -> Iterator[Page]:
        """Pages of observations with start time in [start, end), newest first, as the API orders them."""
        params: dict[str, Any] = {
            "fields": self.observation_fields,
            "limit": OBSERVATIONS_PAGE,
            "fromStartTime": format_time(start),
            "toStartTime": format_time(end),
        }
        if self.environments:
            params["environment"] = list(self.environments)
        return self._pages(OBSERVATIONS_PATH, params)

    def scores(self, start: datetime, end: datetime) -> Iterator[Page]:
        """Pages of scores with timestamp in [start, end), newest first."""
        params: dict[str, Any] = {
            "fields": ",".join(SCORE_FIELDS),
            "limit": SCORES_PAGE,
            "fromTimestamp": format_time(start),
            "toTimestamp": format_time(end),
        }
        return self._pages(SCORES_PATH, params)

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[Page]:
        cursor: str | None = None
        while True:
            page_params = dict(params, cursor=cursor) if cursor else params
            body = self.get(path, page_params)
            data = body.get("data") if isinstance(body, Mapping) else None
            if not isinstance(data, list):
                raise ApiError(f"{self.host} answered GET {path} with JSON that has no 'data' list")
            meta = body.get("meta") if isinstance(body.get("meta"), Mapping) else {}
            cursor = meta.get("cursor") or None
            yield Page(data, cursor)
            if not cursor:
                return

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
        if self.cancel.wait(seconds):
            raise Cancelled()

    def _pace(self) -> None:
        """Wait, if need be, for the server's rate-limit window and the configured request budget."""
        now = self.clock()
        wait = max(self._not_before - now, self._last_request + self._min_gap - now)
        if wait > 0:
            log.info("Langfuse rate limit: waiting %.1fs before the next request", wait)
            self._sleep(wait)
        self._last_request = self.clock()

    def _get_once(self, path: str, params: Mapping[str, Any]) -> Any:
        if self.cancel.is_set():
            raise Cancelled()
        self._pace()
        self.requests += 1
        try:
            response = self.client.get(path, params=params)
        except httpx.TimeoutException:
            raise _Retry(f"no answer within {self.config.timeout.total_seconds():g}s") from None
        except httpx.TransportError as exc:
            raise _Retry(f"cannot reach {self.host}: {exc}") from None
        self._note_rate_limit(response)
        status = response.status_code
        if status == 429:
            raise _Retry("rate limited (429)", _retry_after(response, self.clock()))
        if status >= 500 or status in (408, 409):
            raise _Retry(f"HTTP {status}")
        if status in (401, 403):
            raise self.auth_error(status, _message(response))
        if status == 404 and path == OBSERVATIONS_PATH:
            raise ApiError(
                f"{self.host} has no {path} (404): a self-hosted Langfuse v3 server, or v4 without "
                "LANGFUSE_MIGRATION_V4_ALLOW_PREVIEW_OPT_IN=true",
                status=status,
            )
        if status >= 400:
            raise ApiError(f"{self.host} refused GET {path}: HTTP {status}: {_message(response)}", status=status)
        try:
            return response.json()
        except ValueError:
            raise _Retry("the answer was not valid JSON") from None

    def _note_rate_limit(self, response: httpx.Response) -> None:
        remaining = response.headers.get("x-ratelimit-remaining")
        if remaining is not None and remaining.strip() == "0":
            wait = _retry_after(response, self.clock())
            if wait:
                self._not_before = max(self._not_before, self.clock() + min(wait, MAX_RETRY_AFTER))

    def auth_error(self, status: int, detail: str) -> AuthError:
        return AuthError(
            f"{self.host} rejected the API keys (public key {self.config.public_key}, HTTP {status}: {detail}). "
            "Check [langfuse] public_key and secret_key (or LANGFUSE_PUBLIC_KEY / LANGFUSE_SECRET_KEY), and that "
            "base_url is the region or host where the project lives",
            status=status,
        )

    # the checks, through the SDK's typed client

    def check(self) -> CheckResult:
        """Reach the server (health) and prove the keys (projects); raises ApiError or AuthError saying which."""
        try:
            from langfuse.api import LangfuseAPI
            from langfuse.api.core.api_error import ApiError as SdkApiError
        except ImportError as exc:  # pragma: no cover - the dependency is declared
            raise LangfusePollerError(f"the langfuse package is missing: {exc}") from None

        api = LangfuseAPI(
            base_url=self.config.base_url,
            username=self.config.public_key,
            password=self.config.secret_key.reveal(),
            timeout=self.config.timeout.total_seconds(),
        )
        no_retries: Any = {"max_retries": 0}

        def call(path: str, request: Callable[[], Any], trouble: str) -> Any:
            try:
                return request()
            except SdkApiError as exc:
                if exc.status_code in (401, 403):
                    raise self.auth_error(exc.status_code, _body_message(exc.body)) from None
                raise ApiError(
                    f"{self.host} {trouble}: GET {path} answered HTTP {exc.status_code}", status=exc.status_code
                ) from None
            except httpx.HTTPError as exc:
                raise ApiError(f"cannot reach {self.config.base_url}: {exc}") from None

        health = call("/api/public/health", lambda: api.health.health(request_options=no_retries), "is not healthy")
        projects = call(
            "/api/public/projects", lambda: api.projects.get(request_options=no_retries), "cannot list projects"
        )
        return CheckResult(
            version=str(getattr(health, "version", "?")),
            projects=tuple((p.id, p.name) for p in projects.data),
        )


def _body_message(body: Any) -> str:
    if isinstance(body, Mapping) and body.get("message"):
        return str(body["message"])
    return str(body)[:200] if body else "no details"


def _message(response: httpx.Response) -> str:
    try:
        return _body_message(response.json())
    except ValueError:
        return response.text[:200] or response.reason_phrase


def utc_from_timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
