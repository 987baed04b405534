"""What a data request meets before an endpoint reads anything: credentials, faults, rate limits.

Langfuse checks the Basic credentials of a key pair (401 otherwise), then counts the request against a
rate limit per fixed one-minute window, with its own smaller bucket for the legacy traces and v1
observations, and answers a 429 with ``Retry-After`` once the window is spent. On top of that a test can
make the next data requests fail (5xx), be rate limited, come back malformed or slow, as a real outage does.
"""

from __future__ import annotations

import base64
import binascii
import math
import threading
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

    kind: str  # "fail" | "rate" | "malformed" | "slow"
    value: float = 0.0


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

    def rate_limit_next(self, n: int = 1, retry_after: float = 1) -> None:
        """Answer the next ``n`` data requests with a Langfuse Cloud 429 (``Retry-After`` rounded up)."""
        self._queue_faults(n, Fault("rate", retry_after))

    def malformed_next(self, n: int = 1) -> None:
        """Answer the next ``n`` data requests with a 200 whose body is not valid JSON."""
        self._queue_faults(n, Fault("malformed"))

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

        While set, every data response carries ``X-RateLimit-Limit/-Remaining/-Reset`` and requests past the
        budget get a 429 until the window ends.
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
                return self._too_many(math.ceil(fault.value), limit, self.clock() + fault.value)
            if fault.kind == "malformed":
                return Response(200, _MALFORMED_BODY)
            self._stopping.wait(fault.value)
        return None

    def _take_rate_limit(self, path: str) -> tuple[Response | None, list[tuple[str, str]]]:
        """Count a data request to ``path`` in its bucket: a 429 once the window is spent, else the headers."""
        rate_headers: list[tuple[str, str]] = []
        with self._lock:
            bucket = self._legacy_bucket if path in _LEGACY_BUCKET else self._bucket
            if bucket.limit is not None:
                now = self.clock()
                reset = bucket.take(now)
                if reset is None:
                    window_end = (math.floor(now / 60) + 1) * 60
                    return self._too_many(max(1, math.ceil(window_end - now)), bucket.limit, window_end), []
                rate_headers = [
                    ("X-RateLimit-Limit", str(bucket.limit)),
                    ("X-RateLimit-Remaining", str(bucket.limit - bucket.used)),
                    ("X-RateLimit-Reset", str(reset)),
                ]
        return None, rate_headers

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
