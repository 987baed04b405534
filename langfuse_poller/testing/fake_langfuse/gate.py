"""What a data request meets before an endpoint reads anything: credentials, faults, rate limits.

Langfuse checks the Basic credentials of a key pair (401 otherwise), then counts the request against a
rate limit per fixed one-minute window, with its own smaller bucket for the legacy traces and v1
observations, and answers a 429 with ``Retry-After`` once the window is spent. Only that 429 carries
rate-limit headers; a successful answer carries none. On top of that a test can make the next data requests
fail (5xx), be rate limited, come back malformed or slow, as a real outage does.
"""

from __future__ import annotations

import base64
import binascii
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .legacy import OBSERVATIONS_V1_PATH, TRACES_PATH
from .wire import Response, error_response, format_ms, json_response

# Langfuse Cloud counts these in its smaller legacy bucket; /v2/scores counts with the current endpoints
_LEGACY_BUCKET: Final = frozenset({TRACES_PATH, OBSERVATIONS_V1_PATH})
# The limit reported in a 429 from rate_limit_next() when no budget is configured (Langfuse Cloud Pro).
_DEFAULT_REPORTED_LIMIT: Final = 1000

UNAUTHORIZED_MESSAGE: Final = "Invalid credentials. Confirm that you've configured the correct host."
_MALFORMED_BODY: Final = b'{"data": [{"id": "truncated-'
# answers of an unexpected shape, as a proxy, a misconfigured base_url or a broken server gives them:
# (body, Content-Type) by the name `unexpected_next` takes
UNEXPECTED_BODIES: Final[dict[str, tuple[bytes, str]]] = {
    "list": (b"[]", "application/json"),
    "no-data": (b'{"meta": {}}', "application/json"),
    "data-not-list": (b'{"data": {"id": "x"}, "meta": {}}', "application/json"),
    "cursor": (b'{"data": [], "meta": {"cursor": 42}}', "application/json"),
    "html": (b"<html><body><h1>Sign in</h1></body></html>", "text/html; charset=utf-8"),
    "empty": (b"", "application/json"),
}


@dataclass
class RateBucket:
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
class Fault:
    """One injected fault, for one data request."""

    kind: str  # "fail" | "rate" | "malformed" | "slow" | "unexpected"
    value: float = 0.0
    retry_after_header: bool = True  # "rate": whether the 429 carries Retry-After
    body: str = ""  # "unexpected": the name of the body in UNEXPECTED_BODIES


class Gate:
    """Credentials, injected faults and rate limits of ``FakeLangfuse``.

    A mixin; ``FakeLangfuse.__init__`` sets the state declared here.
    """

    public_key: str
    secret_key: str
    clock: Callable[[], float]
    _lock: threading.RLock
    _faults: deque[Fault]
    _bucket: RateBucket
    _legacy_bucket: RateBucket
    _stopping: threading.Event

    def fail_next(self, n: int = 1, status: int = 503) -> None:
        """Answer the next ``n`` data requests with ``status`` and an "Internal Server Error" message."""
        self._queue_faults(n, Fault("fail", status))

    def rate_limit_next(self, n: int = 1, retry_after: float = 1, *, retry_after_header: bool = True) -> None:
        """Answer the next ``n`` data requests with a Langfuse Cloud 429 (``Retry-After`` rounded up).

        ``retry_after_header=False`` leaves ``Retry-After`` out, as a proxy that drops it does: the window's end
        is then only in ``X-RateLimit-Reset`` and the body.
        """
        self._queue_faults(n, Fault("rate", retry_after, retry_after_header))

    def malformed_next(self, n: int = 1) -> None:
        """Answer the next ``n`` data requests with a 200 whose body is not valid JSON."""
        self._queue_faults(n, Fault("malformed"))

    def unexpected_next(self, n: int = 1, body: str = "list") -> None:
        """Answer the next ``n`` data requests with a 200 of an unexpected shape, by name (``UNEXPECTED_BODIES``):
        a JSON list, no ``data``, ``data`` not a list, ``meta.cursor`` not a string, an HTML page, an empty body."""
        if body not in UNEXPECTED_BODIES:
            raise ValueError(f"body must be one of {sorted(UNEXPECTED_BODIES)}, got {body!r}")
        self._queue_faults(n, Fault("unexpected", body=body))

    def slow_next(self, n: int = 1, seconds: float = 5.0) -> None:
        """Delay the next ``n`` data requests by ``seconds`` (wall time) before answering them normally."""
        self._queue_faults(n, Fault("slow", seconds))

    def _queue_faults(self, n: int, fault: Fault) -> None:
        with self._lock:
            self._faults.extend([fault] * n)

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._faults.clear()

    def set_rate_limit(self, per_minute: int | None) -> None:
        """Allow ``per_minute`` data requests per fixed one-minute window of ``clock()``; None turns it off.

        Requests past the budget get a 429 until the window ends; only that 429 carries ``Retry-After`` and
        ``X-RateLimit-Limit/-Remaining/-Reset``, as on the real server.
        """
        with self._lock:
            self._bucket = RateBucket(per_minute)

    def set_legacy_rate_limit(self, per_minute: int | None) -> None:
        """Like ``set_rate_limit``, for the legacy bucket (traces and v1 observations), counted apart."""
        with self._lock:
            self._legacy_bucket = RateBucket(per_minute)

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

    def _injected_fault(self) -> Response | None:
        """Take the next queued fault: the answer it makes, or None to answer normally (after any delay)."""
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is not None:
            if fault.kind == "fail":
                return error_response(int(fault.value), "Internal Server Error")
            if fault.kind == "rate":
                limit = self._bucket.limit or _DEFAULT_REPORTED_LIMIT
                refused = self._too_many(math.ceil(fault.value), limit, self.clock() + fault.value)
                if not fault.retry_after_header:
                    refused.headers = [(k, v) for k, v in refused.headers if k != "Retry-After"]
                return refused
            if fault.kind == "malformed":
                return Response(200, _MALFORMED_BODY)
            if fault.kind == "unexpected":
                body, content_type = UNEXPECTED_BODIES[fault.body]
                return Response(200, body, [("Content-Type", content_type)])
            self._stopping.wait(fault.value)
        return None

    def _take_rate_limit(self, path: str) -> Response | None:
        """Count a data request to ``path`` in its bucket: a 429 once the window is spent, else None.

        A request let through gets no rate-limit headers: the server adds them to the 429 alone
        (web/src/features/public-api/server/RateLimitService.ts, `createHttpHeaderFromRateLimit`).
        """
        with self._lock:
            bucket = self._legacy_bucket if path in _LEGACY_BUCKET else self._bucket
            if bucket.limit is not None:
                now = self.clock()
                if bucket.take(now) is None:
                    window_end = (math.floor(now / 60) + 1) * 60
                    return self._too_many(max(1, math.ceil(window_end - now)), bucket.limit, window_end)
        return None

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
                ("X-RateLimit-Reset", javascript_date(reset_at)),
            ],
        )


def javascript_date(seconds: float) -> str:
    """A time as JavaScript's ``Date.toString()`` writes it on a server running in UTC.

    The server sends ``X-RateLimit-Reset`` as ``new Date(...).toString()``, not as Unix seconds
    (web/src/features/public-api/server/RateLimitService.ts), e.g.
    ``Sat Aug 22 2026 08:22:47 GMT+0000 (Coordinated Universal Time)``; the body's ``resetAt`` is ISO.
    """
    # fixed English names: JavaScript's are, whatever this process's locale says
    t = time.gmtime(math.floor(seconds))
    day = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[t.tm_wday]
    month = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")[t.tm_mon - 1]
    return (
        f"{day} {month} {t.tm_mday:02d} {t.tm_year} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} "
        "GMT+0000 (Coordinated Universal Time)"
    )
