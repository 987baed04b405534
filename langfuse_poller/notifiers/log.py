"""The `log` notifier: one line per event in the daemon's log."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..events import Event
from ..util.toml_tables import Table
from .base import Notifier
from .messages import message_for

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


class LogNotifier(Notifier):
    # safe to call from several threads at once (redis/worker.py, Dispatcher): the logging module locks
    concurrent = True

    def __init__(self, name: str, settings: LogSettings) -> None:
        self.logger = logging.getLogger(f"langfuse_poller.notifier.{name}")
        self.level = logging.getLevelName(settings.level.upper())

    def send(self, event: Event) -> None:
        message = message_for(event)
        self.logger.log(self.level, "%s %s", message.text, message.url or "")

    def close(self) -> None:
        pass
