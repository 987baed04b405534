"""HTTP for the notifiers that POST (webhook, PagerDuty): one client setup, one reading of the answer.

Statuses that say "not now" (5xx, 408, 409, 425, 429) are retryable with the server's Retry-After; any other
error status is final, and the delivery becomes a dead letter. `where` names the endpoint in errors: never
the full URL, whose path may hold a token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import DeliveryError
from .base import retry_after

if TYPE_CHECKING:
    import httpx

# statuses that say "not now" rather than "never": retried, and the target rests meanwhile
RETRY_STATUSES = frozenset({408, 409, 425, 429})


def client(timeout: float, headers: Mapping[str, str] | None = None) -> httpx.Client:
    import httpx

    from .. import __version__

    return httpx.Client(timeout=timeout, headers={"User-Agent": f"langfuse-poller/{__version__}", **(headers or {})})


def post(http: httpx.Client, url: str, *, where: str, **request: Any) -> httpx.Response:
    """POST, and raise DeliveryError (retryable or final) unless the answer is a success."""
    import httpx

    try:
        response = http.post(url, **request)
    except httpx.TimeoutException:
        timeout = http.timeout.read
        raise DeliveryError(
            f"{where} did not answer within {timeout:g}s" if timeout else f"{where} timed out"
        ) from None
    except httpx.TransportError as exc:
        raise DeliveryError(f"cannot reach {where}: {type(exc).__name__}") from None
    status = response.status_code
    if status < 300:
        return response
    if status >= 500 or status in RETRY_STATUSES:
        raise DeliveryError(f"{where} answered HTTP {status}", retry_after=retry_after(response.headers))
    raise DeliveryError(f"{where} refused the event: HTTP {status} {response.text[:200]!r}", retryable=False)
