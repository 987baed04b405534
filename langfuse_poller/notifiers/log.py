"""The `log` notifier: one line per event in the daemon's log."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..config import Table
from ..events import Event

LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LogSettings:
    """`[notifiers.NAME] type = "log"`: `level` of the log lines (default info)."""

    level: str = "info"

    @classmethod
    def from_table(cls, table: Table) -> LogSettings:
        level = (table.string("level", "info") or "info").lower()
        if level not in LEVELS:
            raise table.error("level", level, "one of " + ", ".join(LEVELS))
        return cls(level)

    def build(self, name: str) -> LogNotifier:
        return LogNotifier(name, self)


class LogNotifier:
    def __init__(self, name: str, settings: LogSettings) -> None:
        self.logger = logging.getLogger(f"langfuse_poller.notifier.{name}")
        self.level = logging.getLevelName(settings.level.upper())

    def send(self, event: Event) -> None:
        data = event.data
        what = data.get("name") or data.get("scoreId") or data.get("observationId") or ""
        extra = f" value={data['value']}" if "value" in data else ""
        level = f" level={data['level']}" if data.get("level") else ""
        self.logger.log(self.level, "%s %s%s%s %s", event.type, what, level, extra, data.get("url", ""))

    def close(self) -> None:
        pass
