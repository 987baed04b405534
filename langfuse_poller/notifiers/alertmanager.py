"""The `alertmanager` notifier: alert groups as Prometheus Alertmanager alerts, over its API v2.

Each notification is one alert in a `POST /api/v2/alerts` (the `postableAlerts` body of Alertmanager's
api/v2/openapi.yaml: `labels`, `annotations`, `startsAt`, `endsAt`, `generatorURL`). Alertmanager knows an
alert by its label set, so a group keeps the same labels for its whole life:

* `alertname` is the rule's name; each `group_by` path becomes a label (`label_names`): `data.` is dropped and
  every character a label name cannot hold becomes `_` (`data.metadata.team` -> `metadata_team`); a name already
  taken (`alertname`, or an earlier path's) gets `_2`, `_3`, ... An empty value (the field was absent) is no
  label: Alertmanager drops empty labels anyway (api/v2/api.go, `removeEmptyLabels`).
* `severity` is the group's own label when the rule groups by a field named so, else the event's
  `data.severity`, else the notifier's `labels.severity`, else "critical". The notifier's `labels` fill in
  only what the alert does not set itself, as Prometheus' external labels do.
* `rule.firing` sends `startsAt` = when the group opened (fired) and no `endsAt`: Alertmanager then keeps the
  alert active for its `resolve_timeout` (api/v2/api.go, `postAlertsHandler`), so the daemon re-sends every
  open group it told this notifier every `resend_interval` (`alerting/resend.py`), as Prometheus re-sends
  its firing alerts. `rule.resolved` sends the same labels with `endsAt` = when the group resolved.
* Any other event (a rule with `group = false`, `send-test-event`) is an alert of its own, `alertname` = the
  event type and `event_id` = its id: it is never re-sent, so Alertmanager resolves it after its
  `resolve_timeout`.

With several URLs (an Alertmanager HA pair) every alert goes to each of them, as Prometheus sends to every
Alertmanager it knows, and a delivery succeeds when one of them accepted it: a member that was down gets the
alert at the next re-send. A refusal (4xx but 429) from all is final; Alertmanager's message is in the error.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import DeliveryError
from ..events import Event
from ..util.durations import format_time
from ..util.redaction import hide
from ..util.toml_tables import Secret, Table
from . import http
from .base import Notifier
from .messages import message_for

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

ALERTS_PATH = "/api/v2/alerts"
DEFAULT_SEVERITY = "critical"
# label names as every Alertmanager version accepts them (model.LabelName's legacy form)
LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED_LABELS = frozenset({"alertname"})
# how long a resolved group is remembered, against a re-send that read the group just before it resolved
RESOLVED_MEMORY = 3600.0
ALERT_EVENTS = ("rule.firing", "rule.resolved")


def label_names(paths: Iterable[str], taken: Iterable[str] = RESERVED_LABELS) -> dict[str, str]:
    """The Alertmanager label name of each `group_by` path, in order: `data.model` -> `model`.

    `data.` is dropped, any other character a label name cannot hold becomes `_`, a name that would start with a
    digit (or be empty) gets a leading `_`, and a name already taken gets `_2`, `_3`, ... (the later path yields).
    """
    used = set(taken)
    names: dict[str, str] = {}
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9_]", "_", path.removeprefix("data."))
        if not base or base[0].isdigit():
            base = "_" + base
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        names[path] = name
    return names


@dataclass(frozen=True)
class AlertmanagerSettings:
    """`[notifiers.NAME] type = "alertmanager"`: `url` (one, or a list for an HA pair), `username` and `password`
    or `bearer_token`, `labels`, `resend_interval`, `timeout`."""

    urls: tuple[str, ...]
    username: str | None
    password: Secret | None
    bearer_token: Secret | None
    labels: tuple[tuple[str, str], ...]
    resend_interval: timedelta
    timeout: timedelta

    @classmethod
    def from_table(cls, table: Table) -> AlertmanagerSettings:
        expected = 'Alertmanager\'s base URL, e.g. "http://127.0.0.1:9093", or a list of them for an HA pair'
        raw = table.raw("url")
        urls = [raw] if isinstance(raw, str) else raw
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise table.error("url", raw, expected)
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise table.error("url", url, expected)
            if parts.username is not None or parts.password is not None:
                # a password in the URL would show wherever the URL does: it has keys of its own
                raise table.error("url", "<hidden>", f"{expected}, without credentials (use username and password)")
            if parts.query or parts.fragment:
                raise table.error("url", url, f"{expected}, without query or fragment")
        if len({url.rstrip("/") for url in urls}) != len(urls):
            raise table.error("url", raw, f"{expected}, each URL once")
        username = table.string("username")
        password = table.secret("password")
        bearer_token = table.secret("bearer_token")
        if (username is None) != (password is None):
            missing = "password (or password_file)" if password is None else "username"
            raise table.error(missing.split(" ")[0], None, f"{missing}: basic auth takes both username and password")
        if bearer_token is not None and username is not None:
            raise table.error("bearer_token", "<hidden>", "either bearer_token or username and password, not both")
        labels = table.table("labels")
        pairs = []
        for key in labels.data:
            value = labels.raw(key)
            if not LABEL_NAME.fullmatch(key) or key in RESERVED_LABELS:
                raise labels.error(key, key, "a label name ([A-Za-z_][A-Za-z0-9_]*) other than alertname")
            if not isinstance(value, str) or not value:
                raise labels.error(key, value, "a non-empty string (Alertmanager drops empty labels)")
            pairs.append((key, value))
        labels.finish()
        return cls(
            urls=tuple(url.rstrip("/") for url in urls),
            username=username,
            password=password,
            bearer_token=bearer_token,
            labels=tuple(pairs),
            resend_interval=table.positive_duration("resend_interval", "1m"),
            timeout=table.positive_duration("timeout", "10s"),
        )

    def build(self, name: str) -> AlertmanagerNotifier:
        return AlertmanagerNotifier(self, name)


class AlertmanagerNotifier(Notifier):
    """Posts alerts to one Alertmanager, or to each of an HA pair; `resend` re-sends open groups."""

    # safe to call from several threads at once (redis/worker.py, Dispatcher): httpx.Client is thread-safe
    concurrent = True

    def __init__(self, settings: AlertmanagerSettings, name: str = "alertmanager") -> None:
        self.settings = settings
        self.name = name
        headers = {}
        if settings.bearer_token is not None:
            headers["Authorization"] = f"Bearer {settings.bearer_token.reveal()}"
        elif settings.username is not None and settings.password is not None:
            credentials = f"{settings.username}:{settings.password.reveal()}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        if "Authorization" in headers:
            hide(headers["Authorization"])
        self.client: httpx.Client = http.client(settings.timeout.total_seconds(), headers)
        # dedup keys of the groups this notifier resolved, and when: a re-send never brings one back
        self._resolved: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def resend_interval(self) -> float:
        """Seconds between re-sends of the open groups this notifier was told about."""
        return self.settings.resend_interval.total_seconds()

    def alerts_for(self, event: Event) -> list[dict[str, Any]]:
        """The `postableAlerts` body for one event: one alert."""
        data = event.data
        message = message_for(event)
        labels: dict[str, str] = {}
        annotations = {
            # the title's leading emoji is for chat; Alertmanager's templates add their own decoration
            "summary": re.sub(r"^\W+", "", message.title),
            "description": "\n".join(f"{label}: {value}" for label, value in message.facts),
        }
        if event.type in ALERT_EVENTS:
            labels["alertname"] = str(data.get("rule"))
            group: Mapping[str, Any] = data.get("group") or {}
            for path, name in label_names(group).items():
                if group[path]:
                    labels[name] = str(group[path])
            annotations["count"] = str(data.get("count", 0))
            starts_at = data.get("openedAt") or format_time(event.timestamp)
        else:
            labels["alertname"] = event.type
            labels["event_id"] = event.id
            if isinstance(data.get("environment"), str) and data["environment"]:
                labels["environment"] = data["environment"]
            starts_at = format_time(event.timestamp)
        if isinstance(data.get("severity"), str) and data["severity"]:
            labels.setdefault("severity", data["severity"])
        for key, value in self.settings.labels:
            labels.setdefault(key, value)
        labels.setdefault("severity", DEFAULT_SEVERITY)
        alert: dict[str, Any] = {"labels": labels, "annotations": annotations, "startsAt": starts_at}
        if message.url and message.url.startswith(("http://", "https://")):
            annotations["langfuse_url"] = message.url
            alert["generatorURL"] = message.url
        if event.type == "rule.resolved":
            alert["endsAt"] = format_time(event.timestamp)
        return [alert]

    def send(self, event: Event) -> None:
        alerts = self.alerts_for(event)
        key = data_key(event)
        if event.type == "rule.resolved" and key is not None:
            # taken after any re-send in flight has posted: the resolve then lands after it, and no later
            # re-send posts this group again
            with self._lock:
                self._remember(key)
        self._post(alerts)

    def resend(self, events: Sequence[Event]) -> int:
        """Re-send firing groups in one request, but those this notifier already resolved; how many went.
        Raises DeliveryError when no Alertmanager accepted them."""
        with self._lock:
            alerts = [a for e in events if data_key(e) not in self._resolved for a in self.alerts_for(e)]
            if alerts:
                self._post(alerts)
            return len(alerts)

    def _remember(self, key: str) -> None:
        now = time.monotonic()
        self._resolved = {k: at for k, at in self._resolved.items() if at > now - RESOLVED_MEMORY}
        self._resolved[key] = now

    def _post(self, alerts: list[dict[str, Any]]) -> None:
        errors: list[DeliveryError] = []
        for url in self.settings.urls:
            try:
                http.post(self.client, url + ALERTS_PATH, where=f"Alertmanager {url}", json=alerts)
            except DeliveryError as exc:
                errors.append(exc)
        if len(errors) < len(self.settings.urls):
            for error in errors:
                log.warning("notifier %s: %s; another Alertmanager accepted the alerts", self.name, error)
            return
        if len(errors) == 1:
            raise errors[0]
        waits = [e.retry_after for e in errors if e.retry_after is not None]
        raise DeliveryError(
            "; ".join(str(e) for e in errors),
            retryable=any(e.retryable for e in errors),
            retry_after=max(waits) if waits else None,
        )

    def close(self) -> None:
        self.client.close()


def data_key(event: Event) -> str | None:
    """The group's dedup key of an alert notification (stable for one life of a group), else None."""
    key = event.data.get("dedupKey") if event.type in ALERT_EVENTS else None
    return key if isinstance(key, str) else None
