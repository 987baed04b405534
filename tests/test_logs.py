"""Log formats: text for people, journal (priority prefixes, no timestamps) for journald, json for shippers;
and no secret in any of them, even when a handler or a library logs one."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from langfuse_poller.service.logs import JournalFormatter, JsonFormatter, TextFormatter, stream_is_journal
from langfuse_poller.util.redaction import hide

from . import test_cli
from .test_cli import SECRET_KEY, SECRETS, URL_TOKEN, WEBHOOK_SECRET, Receiver, ago, rule, wait_for, webhook
from .test_service import config_file

pytestmark = pytest.mark.timeout(60)

langfuse = test_cli.langfuse
receiver = test_cli.receiver

JOURNAL_LINE = re.compile(r"^<[2-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


def record(level: int, message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("langfuse_poller.test", level, __file__, 1, message, args, exc_info)


def failure(text: str) -> BaseException:
    try:
        raise RuntimeError(text)
    except RuntimeError as exc:
        return exc


# --- the formatters, in this process --------------------------------------------------------------------------


def test_journal_lines_carry_the_priority_on_every_line_and_no_timestamp() -> None:
    formatter = JournalFormatter()
    for level, prefix in ((logging.DEBUG, "<7>"), (logging.INFO, "<6>"), (logging.WARNING, "<4>"), (50, "<2>")):
        line = formatter.format(record(level, "polled %d streams", 2))
        assert line == f"{prefix}{logging.getLevelName(level)} langfuse_poller.test: polled 2 streams"
    error = formatter.format(record(logging.ERROR, "poll failed", exc=failure("boom")))
    lines = error.splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), error
    assert lines[-1] == "<3>RuntimeError: boom"
    assert not TIMESTAMP.search(error)


def test_json_lines_parse_with_time_level_logger_message_and_exception() -> None:
    formatter = JsonFormatter()
    plain = json.loads(formatter.format(record(logging.INFO, "poll: %d new events", 3)))
    assert set(plain) == {"time", "level", "logger", "message"}
    assert plain["level"] == "info" and plain["logger"] == "langfuse_poller.test"
    assert plain["message"] == "poll: 3 new events"
    assert datetime.fromisoformat(plain["time"].replace("Z", "+00:00")).tzinfo is not None
    assert plain["time"].endswith("Z")
    broken = json.loads(formatter.format(record(logging.ERROR, "it broke", exc=failure("boom"))))
    assert broken["level"] == "error" and broken["exception"].endswith("RuntimeError: boom")
    assert "\n" not in formatter.format(record(logging.WARNING, "two\nlines"))


def test_hidden_values_are_masked_in_every_format_tracebacks_included() -> None:
    token = "T0ken-9f8e7d6c5b4a"
    url = f"https://hooks.example.com/services/{token}"
    hide(url)
    hide("sk-lf-in-process-secret")
    for formatter in (TextFormatter(), JournalFormatter(), JsonFormatter()):
        for message in (f"posting to {url}", f"path /services/{token} refused", "key sk-lf-in-process-secret"):
            line = formatter.format(record(logging.WARNING, "%s", message))
            assert token not in line and "sk-lf-in-process-secret" not in line, line
            assert "***" in line
        line = formatter.format(record(logging.ERROR, "failed", exc=failure(f"cannot reach {url}")))
        assert token not in line and "***" in line, line


def test_journal_stream_is_recognised_by_device_and_inode() -> None:
    read, write = os.pipe()
    try:
        with os.fdopen(write, "w", closefd=False) as stream:
            stat = os.fstat(write)
            assert stream_is_journal(stream, {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
            assert not stream_is_journal(stream, {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"})
            assert not stream_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
            assert not stream_is_journal(stream, {})
        assert not stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})
    finally:
        os.close(read)
        os.close(write)


# --- the daemon's log, end to end --------------------------------------------------------------------------

LEAKY_HANDLERS = """
import logging
import os

from langfuse_poller import on

log = logging.getLogger("user.handlers")


@on("trace.created", name="leaky")
def leaky(event):
    # a careless handler: it logs a webhook URL with its token, and fails with the Langfuse key in the error
    log.warning("about to post %s to %s", event.id, os.environ["LEAKY_URL"])
    log.debug("the hook's secret is %s", os.environ["LEAKY_SECRET"])
    raise ValueError("the API rejected key " + os.environ["LEAKY_KEY"])
"""


@pytest.fixture
def leaky_module(tmp_path: Path) -> Iterator[Path]:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "leaky_handlers.py").write_text(LEAKY_HANDLERS, encoding="utf-8")
    yield modules


def run_and_capture(
    config: Path, env: dict[str, str], *args: str, journal_stream: str | None = None, until: str = "failed"
) -> str:
    """Run the daemon with stderr on a pipe (whose device and inode $JOURNAL_STREAM may name) until `until`
    has been logged a few times; SIGTERM; its whole stderr."""
    read, write = os.pipe()
    stat = os.fstat(write)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "JOURNAL_", "NOTIFY_"))}
    child_env.update(env)
    if journal_stream == "this":
        child_env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
    elif journal_stream is not None:
        child_env["JOURNAL_STREAM"] = journal_stream
    proc = subprocess.Popen(
        [sys.executable, "-m", "langfuse_poller", "run", "--config", str(config), "--log-level", "debug", *args],
        stdout=subprocess.DEVNULL,
        stderr=write,
        stdin=subprocess.DEVNULL,
        env=child_env,
    )
    os.close(write)
    chunks: list[bytes] = []

    def drain() -> None:
        while data := os.read(read, 65536):
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: b"".join(chunks).count(until.encode()) >= 3 or proc.poll() is not None, 20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=10)
        os.close(read)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize(
    ("flag", "journal_stream", "expected"),
    [
        ("text", None, "text"),
        ("journal", None, "journal"),
        ("json", None, "json"),
        ("auto", "this", "journal"),  # systemd connected stderr to journald
        ("auto", "1:1", "text"),  # an inherited variable naming another stream
    ],
    ids=["text", "journal", "json", "auto-journald", "auto-elsewhere"],
)
def test_the_daemon_log_in_each_format_holds_no_secret(
    tmp_path: Path,
    langfuse: test_cli.FakeLangfuse,
    receiver: Receiver,
    leaky_module: Path,
    flag: str,
    journal_stream: str | None,
    expected: str,
) -> None:
    receiver.status = 500  # the webhook notifier logs its failures (with the URL redacted by itself)
    langfuse.add_trace(start_time=ago(20))
    body = webhook("hook", receiver.url) + rule("all", ["trace.*"], ["hook"])
    config = config_file(
        tmp_path / "config.toml", langfuse.url, body, extra='[handlers]\nmodules = ["leaky_handlers"]\n'
    )
    env = {
        "PYTHONPATH": str(leaky_module),
        "LEAKY_URL": receiver.url,
        "LEAKY_KEY": SECRET_KEY,
        "LEAKY_SECRET": WEBHOOK_SECRET,
    }
    output = run_and_capture(config, env, "--log-format", flag, journal_stream=journal_stream)

    for secret in SECRETS:
        assert secret not in output, f"{secret!r} in the {expected} log:\n{output}"
    # the careless handler's lines are there, masked: the masking happened, nothing was dropped
    assert "the API rejected key ***" in output and "about to post" in output, output
    assert "to ***" in output and URL_TOKEN not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, output
    if expected == "journal":
        for line in lines:
            assert line[:3] in ("<2>", "<3>", "<4>", "<6>", "<7>"), line
        assert all(JOURNAL_LINE.match(line) for line in lines if not line[3:].startswith((" ", "Traceback"))), output
        assert not any(TIMESTAMP.match(line[3:]) for line in lines), output
        assert any(line.startswith("<4>WARNING langfuse_poller.delivery: delivery of ") for line in lines), output
        assert any(line.startswith("<6>INFO langfuse_poller.service.daemon: langfuse-poller running") for line in lines)
        assert any(line.startswith("<7>DEBUG user.handlers: the hook's secret is ***") for line in lines), output
    elif expected == "json":
        entries = [json.loads(line) for line in lines]
        assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries), entries
        assert {"info", "warning", "debug"} <= {entry["level"] for entry in entries}
        assert any(e["logger"] == "langfuse_poller.service.daemon" and e["message"] == "stopped" for e in entries)
    else:
        assert all(TIMESTAMP.match(line) for line in lines if not line.startswith((" ", "Traceback"))), output
        assert any(" WARNING langfuse_poller.delivery: delivery of " in line for line in lines), output
