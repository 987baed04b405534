"""`demo`: langfuse-poller at work in half a minute, with no keys, no config and no network.

A loopback Langfuse stand-in receives a stream of made-up traffic (traces, generations, some errors, some
low scores, some records visible a few seconds late); the real daemon polls it with a throwaway state and
rules like the example config's, prints each event as its handlers get it and each alert as the alert
notifiers would send it, and ends with a summary.

One story runs through it: a user's agent loop runs away from the first second to the eighth, a costly
generation at every step. The example's cost-per-user rule, on a window of seconds instead of a day, warns,
then fires, and resolves once the loop has been stopped and its cost has left the window.
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ..events import Event

TRACE_NAMES = ("chat", "search", "checkout", "summarize")
ERROR_RATE = 0.12
WARNING_RATE = 0.05
SCORE_RATE = 0.6
LOW_SCORE_RATE = 0.25
LATE_RATE = 0.1  # records visible a few seconds after they start, as Langfuse's ingestion sometimes does
RUNAWAY_USER = "user-13"
RUNAWAY_FROM, RUNAWAY_UNTIL = 1.0, 8.0  # seconds after the traffic starts

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
    {
        # config.example.toml's cost-per-user, its day and dollars scaled down to the demo's seconds and cents
        "name": "cost-per-user",
        "type": "metric",
        "events": ["generation.created"],
        "when": 'data.environment == "production"',
        "value": "data.totalCost",
        "aggregate": "sum",
        "window": "10s",
        "group_by": ["data.userId"],
        "above": 0.5,
        "warn_above": 0.2,
        "group_wait": "0s",
        "resolve_after": "3s",
        "notify": ["alerts"],
    },
]


class Traffic(threading.Thread):
    """Adds made-up traces and scores to the stand-in until stopped, and, from RUNAWAY_FROM to RUNAWAY_UNTIL
    seconds, a costly generation of RUNAWAY_USER's agent loop at each step; `say` tells the story."""

    def __init__(self, langfuse: Any, seed: int | None, say: Callable[[str], None] = lambda text: None) -> None:
        super().__init__(name="demo-traffic", daemon=True)
        self.langfuse = langfuse
        self.random = random.Random(seed)
        self.say = say
        self.stopped = threading.Event()
        self.traces = 0
        self.scores = 0
        self.loop: dict[str, Any] | None = None  # the runaway agent loop's trace, while it runs
        self.loop_cost = 0.0
        self.loop_steps = 0

    def run(self) -> None:
        started = time.monotonic()
        while not self.stopped.wait(self.random.uniform(0.2, 0.6)):
            self.add_one()
            self.agent_loop(time.monotonic() - started)

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

    def agent_loop(self, elapsed: float) -> None:
        if elapsed < RUNAWAY_FROM or self.loop_steps < 0:
            return
        if elapsed >= RUNAWAY_UNTIL:
            if self.loop is not None:
                self.say(f"{RUNAWAY_USER}'s agent loop is stopped: {self.loop_steps} steps, ${self.loop_cost:.2f}")
                self.loop, self.loop_steps = None, -1
            return
        context = {"environment": "production", "user_id": RUNAWAY_USER, "trace_name": "agent-loop"}
        if self.loop is None:
            self.loop = self.langfuse.add_trace(name="agent-loop", environment="production", user_id=RUNAWAY_USER)[0]
            self.traces += 1
            self.say(f"{RUNAWAY_USER}'s agent loop runs away: a long-context generation at every step")
        assert self.loop is not None
        # a long context at every step: about ten cents a call, where a chat turn costs a tenth of a cent
        tokens_in, tokens_out = self.random.randint(30_000, 45_000), self.random.randint(500, 1_500)
        cost_in, cost_out = tokens_in * 2.5e-6, tokens_out * 1e-5
        self.langfuse.add_observation(
            trace_id=self.loop["traceId"],
            parent_observation_id=self.loop["id"],
            type="GENERATION",
            name="agent-step",
            model="gpt-4o",
            usage_details={"input": tokens_in, "output": tokens_out, "total": tokens_in + tokens_out},
            cost_details={"input": cost_in, "output": cost_out, "total": cost_in + cost_out},
            **context,
        )
        self.loop_steps += 1
        self.loop_cost += cost_in + cost_out


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
            cost = data.get("totalCost") or 0.0
            what = f"{what} {data.get('model')} {tokens or 0:.0f} tokens ${cost:.4f} ({data.get('userId')})"
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
        traffic = Traffic(langfuse, seed, lambda text: printer.line("story", text))
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
