"""The `webhook` notifier: POSTs the envelope, with `webhook-id` and, given a secret, Langfuse's signature."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ..events import Event
from ..util.toml_tables import Secret, Table
from ..webhooks.signing import HEADER, sign
from . import http
from .base import Notifier


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


class WebhookNotifier(Notifier):
    # safe to call from several threads at once (redis/worker.py, Dispatcher): httpx.Client is thread-safe
    concurrent = True

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.client = http.client(settings.timeout.total_seconds(), dict(settings.headers))

    def send(self, event: Event) -> None:
        body = event.to_json().encode()
        headers = {"content-type": "application/json", "webhook-id": event.id}
        if self.settings.secret is not None:
            headers[HEADER] = sign(self.settings.secret.reveal(), body)
        url = self.settings.url.reveal()
        http.post(self.client, url, where=_redacted(url), content=body, headers=headers)

    def close(self) -> None:
        self.client.close()


def _redacted(url: str) -> str:
    """The URL without path and query, which often hold a token (Slack-style hook URLs do)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..."
