"""The `jsonl` notifier: one envelope per line, appended and fsync'd before the delivery is recorded."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DeliveryError
from ..events import Event
from ..util.toml_tables import Table
from .base import Notifier

TAIL_BYTES = 4 << 20


@dataclass(frozen=True)
class JsonlSettings:
    """`[notifiers.NAME] type = "jsonl"`: `path` of the file to append to."""

    path: Path

    @classmethod
    def from_table(cls, table: Table) -> JsonlSettings:
        path = table.required_str("path", expected="the path of the file to append events to")
        return cls(Path(path).expanduser())

    def build(self, name: str) -> JsonlNotifier:
        return JsonlNotifier(self.path)


class JsonlNotifier(Notifier):
    """Appends envelopes. A batch is written and fsync'd once; ids found at the end of the file are skipped,
    so a crash between the fsync and the delivery record repeats nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._recent: set[str] | None = None
        self._torn = False

    def _load_recent(self) -> set[str]:
        # only the file's tail can hold lines whose delivery was not yet recorded when the process died
        recent: set[str] = set()
        try:
            with self.path.open("rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                start = max(0, size - TAIL_BYTES)
                handle.seek(start)
                tail = handle.read()
        except FileNotFoundError:
            return recent
        # a process killed mid-write leaves a torn last line: the next write starts on a fresh line
        self._torn = bool(tail) and not tail.endswith(b"\n")
        lines = tail.splitlines()
        for line in lines[1:] if start > 0 else lines:
            try:
                recent.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                continue
        return recent

    def send(self, event: Event) -> None:
        self.send_many([event])

    def send_many(self, events: Sequence[Event]) -> None:
        self.send_raw([(event.id, event.to_json()) for event in events])

    def send_raw(self, items: Sequence[tuple[str, str]]) -> None:
        if self._recent is None:
            self._recent = self._load_recent()
        lines = [text + "\n" for event_id, text in items if event_id not in self._recent]
        if lines and self._torn:
            lines.insert(0, "\n")
        if lines:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write("".join(lines))
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                raise DeliveryError(f"cannot append to {self.path}: {exc.strerror}") from None
            self._torn = False

    def close(self) -> None:
        pass
