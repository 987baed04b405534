"""The `slack` notifier: Block Kit messages through an incoming webhook or a bot token (`chat.postMessage`).

slack-sdk's own retry handlers retry a 429 (after its Retry-After), a 500/503 and a dropped connection once,
in place. A longer Retry-After, or a second failure, goes back to the durable queue as a retryable failure
with the server's Retry-After: a sleeping sender would hold up a clean stop, and the queue already knows
how to wait.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..errors import DeliveryError
from ..events import Event
from ..util.toml_tables import Secret, Table
from .base import Notifier, retry_after
from .messages import Message, message_for

DEFAULT_API_URL = "https://slack.com/api/"
# slack-sdk logs the full webhook URL (a secret) at INFO when it retries, and at DEBUG on every request
logging.getLogger("slack_sdk").setLevel(logging.WARNING)
# a Retry-After up to this many seconds is waited out in place; a longer one is left to the delivery queue
INLINE_RETRY_AFTER = 5.0
MAX_FIELDS = 10  # Block Kit: a section holds at most 10 fields, of at most 2000 characters each
MAX_FIELD_CHARS = 2000
MAX_TEXT_CHARS = 3000  # a section's text
MAX_LINKS = 5
# Slack's answers that mean "this will never work": a wrong token, channel or payload
PERMANENT_ERRORS = frozenset(
    {
        "invalid_auth",
        "not_authed",
        "account_inactive",
        "token_revoked",
        "channel_not_found",
        "not_in_channel",
        "is_archived",
        "invalid_blocks",
        "invalid_payload",
        "no_text",
        "missing_scope",
        "action_prohibited",
        "no_service",
        "posting_to_general_channel_denied",
        "msg_too_long",
        "invalid_arguments",
        "invalid_blocks_format",
    }
)


@dataclass(frozen=True)
class SlackSettings:
    """`[notifiers.NAME] type = "slack"`: `webhook_url`, or `token` and `channel`; optional `api_url`, `timeout`.

    Either secret may come from `<key>_file`, or from SLACK_WEBHOOK_URL / SLACK_BOT_TOKEN when the table has neither.
    """

    webhook_url: Secret | None
    token: Secret | None
    channel: str | None
    api_url: str
    timeout: timedelta

    @classmethod
    def from_table(cls, table: Table) -> SlackSettings:
        webhook_url = table.secret("webhook_url")
        token = table.secret("token")
        if webhook_url is None and token is None:
            # the environment is the fallback when the table names neither
            webhook_url = table.secret("webhook_url", env=("SLACK_WEBHOOK_URL",))
            token = None if webhook_url else table.secret("token", env=("SLACK_BOT_TOKEN",))
        channel = table.string("channel")
        if (webhook_url is None) == (token is None):
            raise table.error(
                "webhook_url",
                "both set" if webhook_url else None,
                'either webhook_url = "https://hooks.slack.com/services/..." or token = "xoxb-..." with channel',
            )
        if webhook_url is not None and not webhook_url.reveal().startswith(("https://", "http://")):
            raise table.error("webhook_url", "<hidden>", "an https:// incoming-webhook URL")
        if webhook_url is not None and (channel is not None or table.has("api_url")):
            # an incoming webhook posts to the channel it was made for, at its own URL
            key = "channel" if channel is not None else "api_url"
            raise table.error(key, table.raw(key), f"no {key} with webhook_url (it is for token mode)")
        if token is not None and channel is None:
            raise table.error("channel", None, 'the channel to post to, e.g. "#alerts" or a channel id, with token')
        api_url = table.string("api_url", DEFAULT_API_URL) or DEFAULT_API_URL
        if not api_url.startswith(("https://", "http://")):
            raise table.error("api_url", api_url, "an http:// or https:// URL such as https://slack.com/api/")
        return cls(
            webhook_url=webhook_url,
            token=token,
            channel=channel,
            api_url=api_url if api_url.endswith("/") else api_url + "/",
            timeout=table.positive_duration("timeout", "10s"),
        )

    def build(self, name: str) -> SlackNotifier:
        return SlackNotifier(name, self)


def _retry_handlers() -> list[Any]:
    from slack_sdk.http_retry.builtin_handlers import (
        ConnectionErrorRetryHandler,
        RateLimitErrorRetryHandler,
        ServerErrorRetryHandler,
    )

    class ShortRateLimitRetryHandler(RateLimitErrorRetryHandler):
        """Waits out a short Retry-After in place; a long one is the delivery queue's to wait."""

        def _can_retry(self, *, state: Any, request: Any, response: Any = None, error: Any = None) -> bool:
            if response is None or response.status_code != 429:
                return False
            wait = retry_after(response.headers)
            return wait is not None and wait <= INLINE_RETRY_AFTER

    return [
        ConnectionErrorRetryHandler(max_retry_count=1),
        ShortRateLimitRetryHandler(max_retry_count=1),
        ServerErrorRetryHandler(max_retry_count=1),
    ]


def _escape(text: str) -> str:
    """Slack mrkdwn treats &, < and > as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _fit(text: str, limit: int) -> str:
    """Cut escaped mrkdwn to `limit` characters without splitting an entity such as `&amp;`."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    entity = cut.rfind("&")
    if entity != -1 and ";" not in cut[entity:]:
        cut = cut[:entity]
    return cut + "…"


def _link(url: str) -> str:
    """A URL inside Slack's `<url|text>`: `|`, `<` and `>` would end it early."""
    return url.replace("|", "%7C").replace("<", "%3C").replace(">", "%3E")


def blocks_for(message: Message, event: Event) -> list[dict[str, Any]]:
    """Block Kit: a header, the facts as fields, sample links, a "View trace" button, and a context line."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": message.title[:150], "emoji": True}}
    ]
    if message.facts:
        blocks.append(
            {
                "type": "section",
                "fields": [
                    {"type": "mrkdwn", "text": _fit(f"*{_escape(label)}*\n{_escape(value)}", MAX_FIELD_CHARS)}
                    for label, value in message.facts[:MAX_FIELDS]
                ],
            }
        )
    if message.links and message.status == "firing":
        lines = [f"• <{_link(url)}|{_escape(text[:200])}>" for text, url in message.links[-MAX_LINKS:]]
        # a link cut in half would break the markup: whole lines are dropped to fit Slack's 3000 characters
        while len(lines) > 1 and sum(len(line) + 1 for line in lines) > MAX_TEXT_CHARS - 20:
            lines.pop(0)
        text = _fit("*Latest matches*\n" + "\n".join(lines), MAX_TEXT_CHARS)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    if message.url:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "View trace"},
                        "url": message.url,
                        "action_id": "view_trace",
                    }
                ],
            }
        )
    blocks.append(
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": _escape(f"langfuse-poller · {event.type} · {event.id}")[:3000]}],
        }
    )
    return blocks


class SlackNotifier(Notifier):
    # safe to call from several threads at once (redis/worker.py, Dispatcher): slack-sdk opens a connection per request
    concurrent = True

    def __init__(self, name: str, settings: SlackSettings) -> None:
        self.name = name
        self.settings = settings
        timeout = int(max(1.0, settings.timeout.total_seconds()))
        self._webhook: Any = None
        self._web: Any = None
        if settings.webhook_url is not None:
            from slack_sdk.webhook import WebhookClient

            self._webhook = WebhookClient(
                settings.webhook_url.reveal(), timeout=timeout, retry_handlers=_retry_handlers()
            )
        else:
            from slack_sdk import WebClient

            assert settings.token is not None
            self._web = WebClient(
                token=settings.token.reveal(),
                base_url=settings.api_url,
                timeout=timeout,
                retry_handlers=_retry_handlers(),
            )

    def send(self, event: Event) -> None:
        message = message_for(event)
        blocks = blocks_for(message, event)
        if self._webhook is not None:
            self._send_webhook(message.text, blocks)
        else:
            self._post_message(message.text, blocks)

    def _send_webhook(self, text: str, blocks: list[dict[str, Any]]) -> None:
        try:
            response = self._webhook.send(text=text, blocks=blocks, unfurl_links=False)
        except Exception as exc:
            # connection refused or reset, a timeout: the URL is a secret and stays out of the message
            raise DeliveryError(f"cannot reach the Slack webhook: {type(exc).__name__}") from None
        status = response.status_code
        if status == 200:
            return
        what = f"the Slack webhook answered HTTP {status} ({str(response.body)[:100]})"
        if status == 429 or status >= 500:
            raise DeliveryError(what, retry_after=retry_after(response.headers))
        raise DeliveryError(what, retryable=False)

    def _post_message(self, text: str, blocks: list[dict[str, Any]]) -> None:
        from slack_sdk.errors import SlackApiError

        try:
            self._web.chat_postMessage(channel=self.settings.channel, text=text, blocks=blocks, unfurl_links=False)
        except SlackApiError as exc:
            status = exc.response.status_code
            error = exc.response.get("error") if isinstance(exc.response.data, dict) else None
            what = f"Slack chat.postMessage to {self.settings.channel} failed: HTTP {status} {error or ''}".strip()
            if status == 429 or status >= 500 or error == "ratelimited":
                raise DeliveryError(what, retry_after=retry_after(exc.response.headers)) from None
            raise DeliveryError(what, retryable=error not in PERMANENT_ERRORS and status < 400) from None
        except Exception as exc:
            raise DeliveryError(f"cannot reach Slack at {self.settings.api_url}: {type(exc).__name__}") from None

    def close(self) -> None:
        pass
