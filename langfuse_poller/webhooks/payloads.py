"""Events from the webhooks Langfuse sends: prompt versions, monitor alerts, project notifications.

| payload `type`         | event                                    | `data` holds                                 |
|------------------------|------------------------------------------|----------------------------------------------|
| `prompt-version`       | `prompt.created` / `updated` / `deleted` | projectId, promptId, name, version, labels,  |
|                        |                                          | url                                          |
| `monitor-alert`        | `alert.<severity in lower case>`         | projectId, monitorId, title, body, severity, |
|                        |                                          | url, dataUrl                                 |
| `project-notification` | `project.notification`                   | projectId, eventType, severity, message, url |
| anything else          | `webhook.unknown`                        | type                                         |

Monitor severities are Langfuse's Prisma enum `MonitorSeverity`: PAUSED, UNKNOWN, NO_DATA, OK, WARNING, ALERT,
hence `alert.paused` ... `alert.alert`. A monitor's recovery is sent as OK (`alert.ok`;
packages/shared/src/features/monitors/processor/applyStateMachine.ts), and `monitorId` is the only id shared
by a firing and its recovery: a rule that groups by `data.monitorId` and resolves on `alert.ok`
(`resolve_when`) follows one incident per monitor. A severity Langfuse may add later follows the same rule;
one that is not a word becomes `alert.unknown`.

A payload that already has the event envelope's shape (`event`, `timestamp`, `data`) passes through as it is,
with its own `id` if it has one; only its `source` becomes "webhook". Every other event keeps the whole
payload under `data.payload`. Nothing is dropped: a payload that fits no known shape is `webhook.unknown`.

The id is `<event>:<payload id>`, so Langfuse's retries of one delivery (same payload id) yield the same
event, which the store keeps once; a payload without an id gets a digest of its content instead, which a
retry repeats too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote

from ..events import Event
from ..util.durations import parse_time

SOURCE = "webhook"
UNKNOWN = "webhook.unknown"
PROMPT_ACTIONS = ("created", "updated", "deleted")
# what a monitor-alert's payload.severity can be, in Langfuse's order (`MonitorSeverity`)
MONITOR_SEVERITIES = ("PAUSED", "UNKNOWN", "NO_DATA", "OK", "WARNING", "ALERT")
# an event type that passes through must look like one: "trace.updated", "alert.warning", "my_team.deploy"
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_SEVERITY = re.compile(r"[a-z0-9_\-]{1,40}")


def event_from_webhook(
    payload: Mapping[str, Any], *, received_at: datetime, base_url: str = "https://cloud.langfuse.com"
) -> Event:
    """The event for one webhook payload (a JSON object). `received_at` stands in for a missing timestamp."""
    kind = payload.get("type")
    if _is_envelope(payload):
        # passes through as it is; only `source` says where it came from this time
        return Event(
            id=_event_id(str(payload["event"]), payload),
            type=str(payload["event"]),
            timestamp=_timestamp(payload.get("timestamp"), received_at),
            source=SOURCE,
            data=dict(payload["data"]),
        )
    if kind == "prompt-version" and payload.get("action") in PROMPT_ACTIONS:
        event_type = f"prompt.{payload['action']}"
        data = _prompt_data(payload, base_url)
    elif kind == "monitor-alert":
        alert = _mapping(payload.get("payload"))
        severity = alert.get("severity")
        level = severity.lower() if isinstance(severity, str) else ""
        event_type = f"alert.{level if _SEVERITY.fullmatch(level) else 'unknown'}"
        data = _alert_data(alert)
    elif kind == "project-notification":
        event_type = "project.notification"
        data = _notification_data(_mapping(payload.get("event")))
    else:
        event_type = UNKNOWN
        data = {"type": kind if isinstance(kind, str) else None}
    data["payload"] = dict(payload)
    return Event(
        id=_event_id(event_type, payload),
        type=event_type,
        timestamp=_timestamp(payload.get("timestamp"), received_at),
        source=SOURCE,
        data=data,
    )


def _is_envelope(payload: Mapping[str, Any]) -> bool:
    """Whether the payload already has the envelope's shape: {event, timestamp, data{...}}."""
    event = payload.get("event")
    return (
        isinstance(event, str)
        and len(event) <= 200
        and _EVENT_TYPE.fullmatch(event) is not None
        and "timestamp" in payload
        and isinstance(payload.get("data"), Mapping)
    )


def _event_id(event_type: str, payload: Mapping[str, Any]) -> str:
    payload_id = payload.get("id")
    if isinstance(payload_id, str | int) and not isinstance(payload_id, bool) and str(payload_id).strip():
        payload_id = str(payload_id).strip()
        # an envelope keeps its own id, which a poller elsewhere already made `<event>:<record id>...`
        return payload_id if _is_envelope(payload) else f"{event_type}:{payload_id}"
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return f"{event_type}:sha256-{hashlib.sha256(canonical.encode()).hexdigest()[:32]}"


def _timestamp(value: Any, received_at: datetime) -> datetime:
    if isinstance(value, str):
        try:
            return parse_time(value)
        except ValueError:
            pass
    return received_at


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _prompt_data(payload: Mapping[str, Any], base_url: str) -> dict[str, Any]:
    prompt = _mapping(payload.get("prompt"))
    project_id = prompt.get("projectId")
    name = prompt.get("name")
    url = None
    if isinstance(project_id, str) and isinstance(name, str):
        url = f"{base_url.rstrip('/')}/project/{project_id}/prompts/{quote(name, safe='')}"
        if isinstance(prompt.get("version"), int):
            url += f"?version={prompt['version']}"
    return {
        "projectId": project_id,
        "promptId": prompt.get("id"),
        "name": name,
        "version": prompt.get("version"),
        "labels": prompt.get("labels") or [],
        "tags": prompt.get("tags") or [],
        "type": prompt.get("type"),
        "commitMessage": prompt.get("commitMessage"),
        "action": payload.get("action"),
        "user": payload.get("user"),
        "url": url,
    }


def _alert_data(alert: Mapping[str, Any]) -> dict[str, Any]:
    message = _mapping(alert.get("message"))
    return {
        "projectId": alert.get("projectId"),
        "monitorId": alert.get("monitorId"),
        "title": message.get("title"),
        "body": message.get("body"),
        "severity": alert.get("severity"),
        "url": alert.get("permalink"),
        # sent with WARNING and ALERT only: the data behind the alert
        "dataUrl": alert.get("dataPermalink"),
    }


def _notification_data(notification: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "projectId": notification.get("projectId"),
        "eventType": notification.get("eventType"),
        "severity": notification.get("severity"),
        "message": notification.get("message"),
        "url": notification.get("url"),
    }
