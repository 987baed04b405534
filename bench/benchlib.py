"""What the benchmarks share: a hand-moved clock, the traffic they make, a loopback webhook receiver, tables,
percentiles and `langfuse-poller` subprocesses.

Not a benchmark itself. The scripts next to it import it as `benchlib` (running `python bench/X.py` puts
`bench/` first on the path; tests/test_bench_smoke.py adds it).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from langfuse_poller.testing.fake_langfuse import FakeLangfuse, parse_iso_us

# every event type the benchmarks route; not "*", which would subscribe to observation.created
ROUTED = ["trace.*", "generation.*", "score.*"]


class Clock:
    """A clock moved by hand, shared by the stand-in, the poller and the store."""

    def __init__(self, start: float | None = None) -> None:
        # a whole second, so that simulated polls fall on round times
        self.now = float(math.floor(time.time() if start is None else start))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# --- traffic --------------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """The records put into the stand-in, with the moment each became readable (thread-safe)."""

    # event id -> when its record became visible (clock seconds)
    visible_at: dict[str, float] = field(default_factory=dict)
    traces: int = 0
    observations: int = 0
    scores: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def expected(self) -> set[str]:
        with self.lock:
            return set(self.visible_at)

    def add_trace(
        self,
        fake: FakeLangfuse,
        start: float,
        *,
        visible_after: float = 0.0,
        score: bool = False,
        level: str = "DEFAULT",
    ) -> list[dict[str, Any]]:
        """One trace as the benchmarks define it: a root span and one generation (2 observations), and, when
        `score`, one score on the trace with the trace's start as its timestamp. Events: trace.created,
        generation.created, score.created when scored, trace.updated when `level` is ERROR or WARNING."""
        visible = fake.clock() + visible_after
        records = fake.add_trace(start_time=at(start), observations=1, level=level, visible_after=visible_after)
        root, generation = records
        ids = [f"trace.created:{root['traceId']}", f"generation.created:{generation['id']}"]
        if level in ("ERROR", "WARNING"):
            ids.append(f"trace.updated:{root['id']}:{parse_iso_us(root['updatedAt']) // 1000}")
        if score:
            value = round(random.random(), 3)
            rec = fake.add_score(
                trace_id=root["traceId"], timestamp=at(start), value=value, visible_after=visible_after
            )
            ids.append(f"score.created:{rec['id']}")
        with self.lock:
            self.traces += 1
            self.observations += 2
            self.scores += int(score)
            for event_id in ids:
                self.visible_at[event_id] = visible
        return records


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# --- output ---------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table (aligned, so that it reads as well in a terminal)."""
    cells = [[str(h) for h in headers], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def machine() -> str:
    """One line about where the figures were measured."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, {platform.system()}"


# --- langfuse-poller subprocesses -----------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """This environment without LANGFUSE_* settings, which could point the daemon elsewhere."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LANGFUSE_")}


def command(verb: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "langfuse_poller", verb, "--config", str(config), *extra]


def write_config(
    path: Path,
    fake: FakeLangfuse,
    *,
    poll: dict[str, Any],
    notifiers: dict[str, dict[str, Any]],
    delivery: dict[str, Any] | None = None,
) -> Path:
    """A config for `fake` with its state next to `path`, routing every benchmarked event type to `notifiers`."""

    def toml(value: Any) -> str:
        return json.dumps(value)  # strings, numbers and lists of strings: JSON is TOML here

    lines = [
        "[langfuse]",
        f"base_url = {toml(fake.url)}",
        f"public_key = {toml(fake.public_key)}",
        f"secret_key = {toml(fake.secret_key)}",
        "[poll]",
        *[f"{k} = {toml(v)}" for k, v in poll.items()],
        "[state]",
        f"path = {toml(str(path.parent / 'state.db'))}",
        "[delivery]",
        *[f"{k} = {toml(v)}" for k, v in (delivery or {}).items()],
        "[[rules]]",
        'name = "everything"',
        f"events = {toml(ROUTED)}",
        f"notify = {toml(list(notifiers))}",
    ]
    for name, settings in notifiers.items():
        lines.append(f"[notifiers.{name}]")
        lines.extend(f"{k} = {toml(v)}" for k, v in settings.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def status(config: Path) -> dict[str, Any]:
    done = subprocess.run(
        command("status", config, "--json"), capture_output=True, text=True, timeout=60, env=child_env()
    )
    if done.returncode != 0:
        raise RuntimeError(f"status failed ({done.returncode}): {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def wait_for_output(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float) -> bool:
    """Wait until `text` appears in the log; False if the process exited or the time ran out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(encoding="utf-8", errors="replace"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False
