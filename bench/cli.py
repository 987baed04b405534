"""Command start-up: `langfuse-poller --help` and `status`, each in fresh processes; median of several runs.

    python bench/cli.py                 # 11 runs of each
    python bench/cli.py --runs 21 --importtime

Each run is a new process of the installed console script (the one next to this Python), timed from spawn to
exit. `status` reads a state that `once` filled first from a FakeLangfuse (200 traces, a webhook notifier that
is down, so the queue is not empty), and never contacts Langfuse. The interpreter's own start (`python -c
pass`) and `import langfuse_poller` are measured the same way, as the floor. Target: median under 0.3 s.
`--importtime` adds the ten slowest imports of each command (`python -X importtime`).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import child_env, machine, table, write_config

from langfuse_poller.testing.fake_langfuse import FakeLangfuse

TARGET = 0.3
SCRIPT = Path(sys.executable).parent / "langfuse-poller"


@dataclass
class Timing:
    name: str
    command: list[str]
    runs: list[float]
    target: float | None

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def met(self) -> bool:
        return self.target is None or self.median < self.target


def timed(cmd: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=60)
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return took


def slowest_imports(cmd: list[str], env: dict[str, str], count: int = 10) -> list[tuple[str, float]]:
    """The `count` imports with the largest cumulative time (seconds) in one run of `cmd`."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *cmd[1:]] if cmd[0] == sys.executable else cmd,
        capture_output=True,
        text=True,
        env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
        timeout=60,
    )
    rows = []
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m and len(m.group(3)) <= 3:  # top-level imports only: their cumulative time holds their children's
            rows.append((m.group(4), int(m.group(2)) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:count]


def prepared_state(tmp: Path) -> Path:
    """A config whose state `once` filled: streams, counters, a pending queue (its webhook is down)."""
    with FakeLangfuse() as fake:
        now = datetime.now(UTC)
        for index in range(200):
            start = now - timedelta(seconds=30 + index * 10)
            records = fake.add_trace(start_time=start, observations=1, level="ERROR" if index % 10 == 0 else "DEFAULT")
            fake.add_score(trace_id=records[0]["traceId"], timestamp=start)
        config = write_config(
            tmp / "config.toml",
            fake,
            poll={"start": "-1h"},
            # nothing listens on port 9: every delivery fails and stays queued
            notifiers={
                "hook": {"type": "webhook", "url": "http://127.0.0.1:9/hook", "timeout": "1s"},
                "archive": {"type": "jsonl", "path": str(tmp / "events.jsonl")},
            },
            delivery={"backoff": "1h"},
        )
        subprocess.run(
            [str(SCRIPT), "once", "--config", str(config)], capture_output=True, env=child_env(), timeout=120
        )  # exits 1: the webhook deliveries are left pending, as wanted
    return config


def main(argv: Sequence[str] | None = None) -> list[Timing]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=11, help="fresh processes per command")
    parser.add_argument("--importtime", action="store_true", help="also list the slowest imports of each command")
    args = parser.parse_args(argv)
    print(f"cli: {machine()}")
    print(f"{args.runs} fresh processes per command, interleaved; {SCRIPT}\n")
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp_name:
        tmp = Path(tmp_name)
        config = prepared_state(tmp)
        env = {**child_env(), "XDG_CONFIG_HOME": str(tmp / "xdg"), "XDG_STATE_HOME": str(tmp / "xdg")}
        status_cmd = [str(SCRIPT), "status", "--config", str(config)]
        timings = [
            Timing("python -c pass (floor)", [sys.executable, "-c", "pass"], [], None),
            Timing("python -c 'import langfuse_poller'", [sys.executable, "-c", "import langfuse_poller"], [], None),
            Timing("langfuse-poller --help", [str(SCRIPT), "--help"], [], TARGET),
            Timing("langfuse-poller status", status_cmd, [], TARGET),
            Timing(
                "langfuse-poller status --json", [str(SCRIPT), "status", "--config", str(config), "--json"], [], TARGET
            ),
        ]
        for timing in timings:  # one unmeasured run each: the first start reads the files from disk
            timed(timing.command, env)
        for _ in range(args.runs):
            for timing in timings:  # interleaved, so that a busy moment of the machine hits all alike
                timing.runs.append(timed(timing.command, env))
        imports = {}
        if args.importtime:
            for timing in timings[2:]:
                cmd = [sys.executable, "-c", "from langfuse_poller.cli import main; main()", *timing.command[1:]]
                imports[timing.name] = slowest_imports(cmd, env)
    rows = [
        (
            t.name,
            f"{t.median * 1000:.0f}",
            f"{min(t.runs) * 1000:.0f}",
            f"{max(t.runs) * 1000:.0f}",
            "-" if t.target is None else f"< {t.target * 1000:.0f}",
            "-" if t.target is None else ("met" if t.met else "missed"),
        )
        for t in timings
    ]
    print(table(("command", "median ms", "min ms", "max ms", "target ms", "verdict"), rows))
    for name, slow in imports.items():
        print(f"\nslowest imports of {name} (cumulative ms): " + ", ".join(f"{m} {s * 1000:.0f}" for m, s in slow))
    if os.cpu_count() and os.getloadavg()[0] > os.cpu_count():  # type: ignore[operator]
        print(f"\nnote: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores while measuring")
    return timings


if __name__ == "__main__":
    main()
