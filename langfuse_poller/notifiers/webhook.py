"""The `webhook` notifier: POSTs the envelope, with `webhook-id` and, given a secret, Langfuse's signature."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..config import Secret, Table
from ..errors import DeliveryError
from ..events import Event
from ..signing import HEADER, sign

# statuses that say "not now" rather than "never": retried, and the target rests meanwhile
RETRY_STATUSES = frozenset({408, 409, 425, 429})


@dataclass(frozen=True)
class WebhookSettings:
    """`[notifiers.NAME] type = "webhook"`: `url`, optional `secret` (or `secret_file`), `headers`, `timeout`."""

    url: Secret
    secret: Secret | None
    headers: tuple[tuple[str, str], ...]
    timeout: timedelta

    @classmethod
    def from_table(cls, table: Table) -> WebhookSettings:
        url = table.secret("url")
        if url is None or not url.reveal().startswith(("http://", "https://")):
            raise table.error("url", None if url is None else "<hidden>", "an http:// or https:// URL")
        headers = table.table("headers")
        pairs = []
        for key in headers.data:
            value = headers.string(key)
            pairs.append((key, value or ""))
        headers.finish()
        return cls(
            url=url,
            secret=table.secret("secret"),
            headers=tuple(pairs),
            timeout=table.duration("timeout", "10s"),
        )

    def build(self, name: str) -> WebhookNotifier:
        return WebhookNotifier(self)


class WebhookNotifier:
    def __init__(self, settings: WebhookSettings) -> None:
        import httpx

        from .. import __version__

        self.settings = settings
        self.client = httpx.Client(
            timeout=settings.timeout.total_seconds(),
            headers={"User-Agent": f"langfuse-poller/{__version__}", **dict(settings.headers)},
        )

    def send(self, event: Event) -> None:
        import httpx

        body = event.to_json().encode()
        headers = {"content-type": "application/json", "webhook-id": event.id}
        if self.settings.secret is not None:
            headers[HEADER] = sign(self.settings.secret.reveal(), body)
        url = self.settings.url.reveal()
        where = _redacted(url)
        try:
            response = self.client.post(url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise DeliveryError(f"{where} did not answer within {self.settings.timeout.total_seconds():g}s") from None
        except httpx.TransportError as exc:
            raise DeliveryError(f"cannot reach {where}: {type(exc).__name__}") from None
        status = response.status_code
        if status < 300:
            return
        retry_after = _retry_after(response.headers)
        if status >= 500 or status in RETRY_STATUSES:
            raise DeliveryError(f"{where} answered HTTP {status}", retry_after=retry_after)
        raise DeliveryError(f"{where} refused the event: HTTP {status} {response.text[:200]!r}", retryable=False)

    def close(self) -> None:
        self.client.close()


def _redacted(url: str) -> str:
    """The URL without path and query, which often hold a token (Slack-style hook URLs do)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..."


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after")
    try:
        return float(value) if value else None
    except ValueError:
        return None
