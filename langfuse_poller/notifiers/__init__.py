"""Notifiers: where matching events are sent. Each type parses its own settings and builds its sender."""

from __future__ import annotations

from typing import Any, Protocol

from ..util.toml_tables import Table
from .base import BatchNotifier, Notifier, NotifierConfig

__all__ = ["BatchNotifier", "Notifier", "build_notifier", "notifier_types", "parse_notifier"]


class Settings(Protocol):
    def build(self, name: str) -> Notifier: ...


def notifier_types() -> dict[str, Any]:
    """The built-in types, by the name used in `type = "..."`. Imported lazily: config is read by every command."""
    from .alertmanager import AlertmanagerSettings
    from .jsonl import JsonlSettings
    from .log import LogSettings
    from .pagerduty import PagerDutySettings
    from .slack import SlackSettings
    from .webhook import WebhookSettings

    return {
        "webhook": WebhookSettings,
        "jsonl": JsonlSettings,
        "log": LogSettings,
        "slack": SlackSettings,
        "pagerduty": PagerDutySettings,
        "alertmanager": AlertmanagerSettings,
    }


def parse_notifier(name: str, table: Table) -> NotifierConfig:
    """Read one `[notifiers.NAME]` table into a NotifierConfig with the type's own typed settings."""
    kind = table.required_str("type", expected="a notifier type: " + ", ".join(sorted(notifier_types())))
    types = notifier_types()
    if kind not in types:
        raise table.error("type", kind, "a notifier type: " + ", ".join(sorted(types)))
    settings = types[kind].from_table(table)
    table.finish()
    return NotifierConfig(name=name, type=kind, settings=settings, key=table.prefix)


def build_notifier(config: NotifierConfig) -> Notifier:
    settings: Settings = config.settings
    return settings.build(config.name)
