"""`demo`: langfuse-poller at work in half a minute, with no keys, no config and no network.

A loopback Langfuse stand-in receives a stream of made-up traffic (traces, generations, some errors, some
low scores, some records visible a few seconds late); the real daemon polls it with a throwaway state and
rules like the example config's, prints each event as its handlers get it and each alert as the alert
notifiers would send it, and ends with a summary.
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from ..events import Event

TRACE_NAMES = ("chat", "search", "checkout", "summarize")
ERROR_RATE = 0.12
WARNING_RATE = 0.05
SCORE_RATE = 0.6
LOW_SCORE_RATE = 0.25
LATE_RATE = 0.1  # records visible a few seconds after they start, as Langfuse's ingestion sometimes does

DEMO_RULES: list[dict[str, Any]] = [
    {
        "name": "trace-errors",
        "events": ["trace.updated"],
        "when": 'data.level == "ERROR"',
        "group_by": ["data.name"],
        "group_wait": "3s",
        "group_interval": "10s",
        "resolve_after": "15s",
        "notify": ["alerts"],
    },
    {
        "name": "low-scores",
        "events": ["score.created"],
        "when": 'data.dataType == "NUMERIC" && data.value < 0.5',
        "group_by": ["data.name"],
        "group_wait": "3s",
        "group_interval": "10s",
        "resolve_after": "15s",
        "notify": ["alerts"],
    },
    {
        "name": "error-storm",
        "type": "frequency",
        "events": ["trace.updated"],
        "when": 'data.level == "ERROR"',
        "threshold": 4,
        "window": "20s",
        "group_wait": "0s",
        "notify": ["alerts"],
    },
]


class Traffic(threading.Thread):
    """Adds made-up traces and scores to the stand-in until stopped."""

    def __init__(self, langfuse: Any, seed: int | None) -> None:
        super().__init__(name="demo-traffic", daemon=True)
        self.langfuse = langfuse
        self.random = random.Random(seed)
        self.stopped = threading.Event()
        self.traces = 0
        self.scores = 0

    def run(self) -> None:
        while not self.stopped.wait(self.random.uniform(0.2, 0.6)):
            self.add_one()

    def add_one(self) -> None:
        rnd = self.random
        roll = rnd.random()
        level = "ERROR" if roll < ERROR_RATE else "WARNING" if roll < ERROR_RATE + WARNING_RATE else "DEFAULT"
        late = rnd.uniform(2, 6) if rnd.random() < LATE_RATE else 0.0
        records = self.langfuse.add_trace(
            name=rnd.choice(TRACE_NAMES),
            observations=rnd.randint(1, 3),
            level=level,
            environment="production",
            user_id=f"user-{rnd.randint(1, 40)}",
            visible_after=late,
        )
        self.traces += 1
        if rnd.random() < SCORE_RATE:
            low = rnd.random() < LOW_SCORE_RATE
            value = round(rnd.uniform(0.05, 0.45) if low else rnd.uniform(0.55, 1.0), 2)
            self.langfuse.add_score(trace_id=records[0]["traceId"], name="helpfulness", value=value, source="EVAL")
            self.scores += 1


class Printer:
    """Prints events and alerts as they come, one line each, from any thread."""

    def __init__(self, out: TextIO, started: float) -> None:
        self.out = out
        self.started = started
        self.lock = threading.Lock()
        self.events: Counter[str] = Counter()

    def line(self, kind: str, text: str) -> None:
        with self.lock:
            self.out.write(f"{time.time() - self.started:6.1f}s  {kind:<8} {text}\n")
            self.out.flush()

    def event(self, event: Event) -> None:
        data = event.data
        self.events[event.type] += 1
        what = data.get("name") or ""
        if event.type.startswith("score."):
            what = f"{what} = {data.get('value')}"
        elif event.type == "generation.created":
            tokens = (data.get("usage") or {}).get("totalTokens")
            what = f"{what} {data.get('model')} {tokens or 0:.0f} tokens"
        level = f" [{data['level']}]" if data.get("level") not in (None, "DEFAULT") else ""
        trace = str(data.get("traceId") or "")[:8]
        self.line("event", f"{event.type:<19} {what}{level}  (trace {trace})")


class AlertLines(logging.Handler):
    """Shows what the `log` alert notifier sends, as the demo's ALERT lines."""

    def __init__(self, printer: Printer) -> None:
        super().__init__()
        self.printer = printer
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.printer.line("ALERT", record.getMessage())


def run_demo(duration: float, *, seed: int | None = None, out: TextIO = sys.stdout) -> int:
    from ..config import parse_config
    from ..registry import Registry
    from ..runtime import Runtime
    from ..testing.fake_langfuse import FakeLangfuse
    from .daemon import Daemon

    started = time.time()
    printer = Printer(out, started)
    alert_lines = AlertLines(printer)
    alert_logger = logging.getLogger("langfuse_poller.notifier.alerts")
    alert_logger.addHandler(alert_lines)
    alert_logger.propagate = False
    for noisy in ("langfuse_poller", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    alert_logger.setLevel(logging.INFO)

    handlers = Registry()
    handlers.register(printer.event, ("trace.*", "generation.*", "score.*"), name="demo.print")
    with tempfile.TemporaryDirectory(prefix="langfuse-poller-demo-") as tmp, FakeLangfuse() as langfuse:
        config = parse_config(
            {
                "langfuse": {
                    "base_url": langfuse.url,
                    "public_key": langfuse.public_key,
                    "secret_key": langfuse.secret_key,
                },
                "poll": {
                    "interval": "1s",
                    "start": "now",
                    "settle": "0s",
                    "reread": ["10s"],
                    "lookback": "1m",
                    "sweep_interval": "5s",
                },
                "state": {"path": str(Path(tmp) / "state.db")},
                "notifiers": {"alerts": {"type": "log", "level": "warning"}},
                "rules": DEMO_RULES,
            },
            "demo",
        )
        out.write(
            f"langfuse-poller demo: a Langfuse stand-in at {langfuse.url} with made-up traffic, polled every second "
            f"for {duration:g}s (Ctrl-C to stop). Rules: {', '.join(r['name'] for r in DEMO_RULES)}.\n"
        )
        traffic = Traffic(langfuse, seed)
        runtime = Runtime.build(config, handlers=handlers)
        daemon = Daemon(runtime)
        timer = threading.Timer(duration, daemon.stop)
        timer.daemon = True
        traffic.start()
        timer.start()
        try:
            daemon.run(install_signals=True)
        finally:
            timer.cancel()
            traffic.stopped.set()
            traffic.join(timeout=5)
        requests = {path.rsplit("/", 1)[-1]: langfuse.count(path) for path in _data_paths()}
    alert_logger.removeHandler(alert_lines)
    events = ", ".join(f"{count} {kind}" for kind, count in sorted(printer.events.items())) or "none"
    out.write(
        f"\nsummary: {traffic.traces} traces and {traffic.scores} scores made in "
        f"{time.time() - started:.0f}s; events delivered: {events}; "
        f"alerts sent: {alert_lines.count}; API requests: "
        + ", ".join(f"{name} {count}" for name, count in requests.items())
        + "\n"
    )
    out.write(
        "Next: copy config.example.toml, set your Langfuse keys, and run `langfuse-poller check`, "
        "then `langfuse-poller run`.\n"
    )
    return 0


def _data_paths() -> tuple[str, ...]:
    from ..testing.fake_langfuse import OBSERVATIONS_PATH, SCORES_PATH

    return (OBSERVATIONS_PATH, SCORES_PATH)
