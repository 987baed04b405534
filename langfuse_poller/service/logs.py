"""Log lines on stderr: for people (text), for journald (journal) and for log shippers (json); never a secret.

* `text`: `2026-11-27 07:37:16,522 INFO langfuse_poller.service.daemon: ...`, as before.
* `journal`: no timestamp (journald adds its own) and a syslog priority prefix on every line, `<3>` error,
  `<4>` warning, `<6>` info, `<7>` debug, so that `journalctl -p warning` and the colours work. Chosen by `auto`
  when `$JOURNAL_STREAM` names the device and inode of stderr, as systemd documents (a child that inherited
  the variable but writes elsewhere gets text).
* `json`: one object per line: `time` (RFC 3339, UTC), `level`, `logger`, `message`, and `exception` when there
  is a traceback.

Every formatter replaces the values of the config's secrets with `***` (see util/redaction.py, which `Secret`
fills), including in tracebacks: a library that logs a URL with its token stays harmless.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from ..util.redaction import redact

FORMATS = ("auto", "text", "journal", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """Lines for a terminal or a file: time, level, logger, message."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald reads from a `<N>` prefix."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """Lines for journald: `<priority>LEVEL logger: message`, the prefix on each line of a traceback too."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        # journald makes one entry per line: without its own prefix a traceback line would be logged as info
        return "\n".join(prefix + line for line in redact(super().format(record)).splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger, message, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


FORMATTERS: dict[str, type[logging.Formatter]] = {
    "text": TextFormatter,
    "journal": JournalFormatter,
    "json": JsonFormatter,
}


def stream_is_journal(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Whether `stream` is the journald stream systemd connected ($JOURNAL_STREAM is "device:inode" of it)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def resolve_format(log_format: str, stream: TextIO) -> str:
    """The format `auto` stands for on `stream`: journal under systemd's journald, else text."""
    if log_format != "auto":
        return log_format
    return "journal" if stream_is_journal(stream) else "text"


def setup_logging(level: str = "info", log_format: str = "auto", *, stream: TextIO | None = None) -> str:
    """Send the log to `stream` (stderr) in `log_format`; returns the format used."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    stream = sys.stderr if stream is None else stream
    chosen = resolve_format(log_format, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(FORMATTERS[chosen]())
    root = logging.getLogger()
    # like logging.basicConfig: the first setup wins (a program embedding the CLI may have configured logging)
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(getattr(logging, level.upper()))
        # Python's warnings too, in the same format (and under systemd, with a priority)
        logging.captureWarnings(True)
    # request logs of the HTTP clients carry full URLs, and notifier URLs can hold tokens
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "skipped: maximum number of running instances reached" each interval while a long poll runs is expected
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    return chosen
