"""The `pagerduty` notifier: PagerDuty Events API v2 over httpx.

An alert group triggers with a `dedup_key` stable per rule and group, so PagerDuty folds its updates and
repeats into one incident, and its `rule.resolved` resolves that incident. A forwarded event (a rule with
`group = false`) triggers an incident of its own, keyed by the event id.

PagerDuty's own client (`pagerduty` 7.x) was not used: it retries a 429 without limit inside the call,
sleeping without regard to shutdown, and brings a second HTTP stack; the durable queue already retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..events import Event
from ..util.toml_tables import Secret, Table
from . import http
from .base import Notifier
from .messages import message_for

DEFAULT_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
SEVERITIES = ("critical", "error", "warning", "info")
MAX_SUMMARY = 1024
MAX_LINKS = 5


@dataclass(frozen=True)
class PagerDutySettings:
    """`[notifiers.NAME] type = "pagerduty"`: `routing_key`, `severity`, `source`, `events_url`, `timeout`."""

    routing_key: Secret
    severity: str
    source: str
    events_url: str
    timeout: timedelta

    @classmethod
    def from_table(cls, table: Table) -> PagerDutySettings:
        routing_key = table.secret("routing_key", env=("PAGERDUTY_ROUTING_KEY",))
        if routing_key is None:
            raise table.error(
                "routing_key",
                None,
                "the integration's routing key (Events API v2), in routing_key, routing_key_file, "
                "or the PAGERDUTY_ROUTING_KEY environment variable",
            )
        severity = table.string("severity", "error") or "error"
        if severity not in SEVERITIES:
            raise table.error("severity", severity, "one of " + ", ".join(SEVERITIES))
        events_url = table.string("events_url", DEFAULT_EVENTS_URL) or DEFAULT_EVENTS_URL
        if not events_url.startswith(("https://", "http://")):
            raise table.error("events_url", events_url, f"an http:// or https:// URL such as {DEFAULT_EVENTS_URL}")
        return cls(
            routing_key=routing_key,
            severity=severity,
            source=table.string("source", "langfuse-poller") or "langfuse-poller",
            events_url=events_url,
            timeout=table.positive_duration("timeout", "10s"),
        )

    def build(self, name: str) -> PagerDutyNotifier:
        return PagerDutyNotifier(self)


class PagerDutyNotifier(Notifier):
    # safe to call from several threads at once (redis/worker.py, Dispatcher): httpx.Client is thread-safe
    concurrent = True

    def __init__(self, settings: PagerDutySettings) -> None:
        self.settings = settings
        self.client = http.client(settings.timeout.total_seconds())

    def body(self, event: Event) -> dict[str, Any]:
        """The Events API v2 request for one event."""
        routing_key = self.settings.routing_key.reveal()
        data = event.data
        if event.type == "rule.resolved":
            return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": data["dedupKey"]}
        message = message_for(event)
        alert = event.type == "rule.firing"
        details: dict[str, Any] = {label: value for label, value in message.facts}
        if alert:
            details = {"Rule": data.get("rule"), **details, "samples": data.get("samples") or []}
        else:
            details["event"] = event.envelope()
        payload: dict[str, Any] = {
            "summary": message.text[:MAX_SUMMARY],
            "source": self.settings.source,
            # a rule's warn_* threshold pages at warning; its main one at the configured severity
            "severity": "warning" if alert and data.get("severity") == "warning" else self.settings.severity,
            "timestamp": data.get("lastAt") if alert and data.get("lastAt") else event.envelope()["timestamp"],
            "component": data.get("rule") if alert else data.get("name"),
            "group": ", ".join(f"{k.removeprefix('data.')}={v}" for k, v in (data.get("group") or {}).items())
            if alert
            else None,
            "class": ", ".join(data.get("events") or []) if alert else event.type,
            "custom_details": details,
        }
        links = [{"href": url, "text": text} for text, url in message.links[-MAX_LINKS:]]
        if not links and message.url:
            links = [{"href": message.url, "text": "View trace in Langfuse"}]
        return {
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": data["dedupKey"] if alert else event.id,
            "payload": {key: value for key, value in payload.items() if value},
            "links": links,
            "client": "langfuse-poller",
            **({"client_url": message.url} if message.url else {}),
        }

    def send(self, event: Event) -> None:
        # a 400 means the event is invalid (a wrong routing key among them): resending it cannot help
        url = self.settings.events_url
        http.post(self.client, url, where=f"PagerDuty {url}", json=self.body(event))

    def close(self) -> None:
        self.client.close()
