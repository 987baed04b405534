"""Idle and steady API cost: requests per hour for an idle project and for a busy one, on a simulated hour.

    python bench/steady.py                      # an hour at 10 traces/s, interval 10s, lookback 10m
    python bench/steady.py --rate 10 --hours 1 --interval 10s --lookback 10m

The poller runs in this process against a FakeLangfuse that shares its injected clock: the clock moves one
`interval` at a time, the traffic of that interval is added, and `poller.poll_once()` runs as the daemon's
poll job would (the sweeps run inside it when due). Nothing sleeps, so an hour takes seconds to a minute.

A trace here is a root span and one generation (2 observations), visible as soon as it starts; one trace in
10 also gets a score (timestamp = the trace's start). Events go to an in-process handler, which checks that
each one arrives exactly once.

Two settings are measured: the defaults (`reread = ["1m"]`, `sweep_interval = "2m"`: every record is read
by the head, at 1 m and at `lookback`) and a quota-saving one (`reread = []`, `sweep_interval = "5m"`: the
head and `lookback` only). Requests are counted over one hour after a warm-up of `lookback` plus two sweep
intervals (so that every sweep tier has data behind it), and split by what asked for them: a request whose
window ends `settle` before the moment it was sent is the head's, one whose window ends a re-read age
before it is a sweep's.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROUTED, Clock, Traffic, machine, table

from langfuse_poller.config import parse_config
from langfuse_poller.events import Event
from langfuse_poller.registry import Registry
from langfuse_poller.runtime import Runtime
from langfuse_poller.testing.fake_langfuse import FakeLangfuse, parse_iso_us
from langfuse_poller.util.durations import parse_duration

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},  # reread ["1m"], sweep_interval "2m": the config defaults
    "quota-saving": {"reread": [], "sweep_interval": "5m"},
}
SCORE_EVERY = 10  # one trace in 10 gets a score
STREAM_OF = {"/api/public/v2/observations": "observations", "/api/public/v3/scores": "scores"}
TO_PARAM = {"observations": "toStartTime", "scores": "toTimestamp"}


@dataclass
class Figures:
    project: str
    settings: str
    polls: float  # per hour
    by_stream: dict[str, float]  # requests per hour
    head: float
    sweeps: float
    records_read: float  # per hour
    records_made: float  # per hour
    delivered: int
    expected: int
    duplicates: int
    elapsed: float  # wall seconds of the simulation

    @property
    def total(self) -> float:
        return sum(self.by_stream.values())

    @property
    def ratio(self) -> float:
        """Requests against one per stream per poll."""
        return self.total / (len(self.by_stream) * self.polls)

    @property
    def overhead(self) -> float:
        """What the re-reads add to the head's requests."""
        return self.sweeps / self.head if self.head else float("nan")


def simulate(
    project: str, settings: str, *, rate: float, hours: float, interval: str, lookback: str, seed: int
) -> Figures:
    rng = random.Random(seed)
    random.seed(seed)
    clock = Clock()
    poll: dict[str, Any] = {"interval": interval, "lookback": lookback, "start": "now", **SETTINGS[settings]}
    step = parse_duration(interval).total_seconds()
    with FakeLangfuse(clock=clock) as fake, tempfile.TemporaryDirectory(prefix="bench-steady-") as tmp:
        config = parse_config(
            {
                "langfuse": {"base_url": fake.url, "public_key": fake.public_key, "secret_key": fake.secret_key},
                "poll": poll,
                "state": {"path": str(Path(tmp) / "state.db")},
            },
            "bench/steady.py",
        )
        warmup = config.poll.lookback.total_seconds() + 2 * config.poll.sweep_interval.total_seconds()
        measured = hours * 3600
        got: Counter[str] = Counter()
        handlers = Registry()

        def count(event: Event) -> None:
            got[event.id] += 1

        handlers.register(count, ROUTED, name="count")
        traffic = Traffic()
        runtime = Runtime.build(config, handlers=handlers, clock=clock)
        began = time.perf_counter()
        try:
            runtime.poller.start_streams()
            begin_at = clock() + warmup
            end_at = begin_at + measured
            polls = 0
            read = 0
            made_before = 0
            backlog = 0.0
            while clock() < end_at:
                clock.advance(step)
                if project == "busy":
                    # the traces that started during the interval just past, at random moments
                    backlog += rate * step
                    for _ in range(int(backlog)):
                        scored = traffic.traces % SCORE_EVERY == 0
                        traffic.add_trace(fake, clock() - rng.uniform(0, step), score=scored)
                    backlog -= int(backlog)
                if clock() <= begin_at:
                    made_before = traffic.observations + traffic.scores
                result = runtime.poller.poll_once()
                if result.errors:
                    raise RuntimeError(f"poll failed: {result.errors}")
                runtime.worker.run_until_idle()
                if clock() > begin_at:
                    polls += 1
                    read += sum(s.records for s in result.streams)
            made = traffic.observations + traffic.scores - made_before
            requests = [r for r in fake.requests if r.path in STREAM_OF and begin_at < r.at <= end_at]
            # one more interval without traffic: the head reaches the last records (not counted)
            clock.advance(step + config.poll.settle.total_seconds())
            runtime.poller.poll_once()
            runtime.worker.run_until_idle()
        finally:
            runtime.close()
        elapsed = time.perf_counter() - began
    settle = config.poll.settle.total_seconds()
    first_age = min(age.total_seconds() for age in config.poll.sweep_ages)
    by_stream = dict.fromkeys(config.poll.streams, 0)
    head = sweeps = 0
    for r in requests:
        stream = STREAM_OF[r.path]
        by_stream[stream] += 1
        window_end = parse_iso_us(r.query[TO_PARAM[stream]][-1]) / 1e6
        if r.at - window_end < (settle + first_age) / 2:
            head += 1
        else:
            sweeps += 1
    per_hour = 3600 / measured
    expected = traffic.expected
    return Figures(
        project=project,
        settings=settings,
        polls=polls * per_hour,
        by_stream={s: n * per_hour for s, n in by_stream.items()},
        head=head * per_hour,
        sweeps=sweeps * per_hour,
        records_read=read * per_hour,
        records_made=made * per_hour,
        delivered=len(expected & set(got)),
        expected=len(expected),
        duplicates=sum(n - 1 for n in got.values() if n > 1) + len(set(got) - expected),
        elapsed=elapsed,
    )


def main(argv: Sequence[str] | None = None) -> list[Figures]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=10.0, help="traces per second of the busy project")
    parser.add_argument("--hours", type=float, default=1.0, help="simulated time measured, after the warm-up")
    parser.add_argument("--interval", default="10s")
    parser.add_argument("--lookback", default="10m")
    parser.add_argument("--projects", default="idle,busy", help="comma-separated: idle, busy")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"steady: {machine()}")
    print(
        f"interval {args.interval}, lookback {args.lookback}, {args.hours:g} h measured; busy = {args.rate:g} traces/s "
        f"(root + generation each, 1 score per {SCORE_EVERY} traces)\n"
    )
    figures = []
    for project in args.projects.split(","):
        for settings in args.settings.split(","):
            figures.append(
                simulate(
                    project,
                    settings,
                    rate=args.rate,
                    hours=args.hours,
                    interval=args.interval,
                    lookback=args.lookback,
                    seed=args.seed,
                )
            )
    rows = [
        (
            f.project,
            f.settings,
            round(f.polls),
            round(f.by_stream.get("observations", 0)),
            round(f.by_stream.get("scores", 0)),
            round(f.total),
            round(f.head),
            round(f.sweeps),
            f"{f.ratio:.3f}",
            "-" if f.project == "idle" else f"{f.overhead:.0%}",
            "-" if not f.records_made else f"{f.records_read / f.records_made:.2f}",
            f"{f.delivered}/{f.expected}",
            f.duplicates,
            f"{f.elapsed:.1f}",
        )
        for f in figures
    ]
    headers = (
        "project",
        "settings",
        "polls/h",
        "observations req/h",
        "scores req/h",
        "total req/h",
        "head req/h",
        "re-read req/h",
        "total / (streams x polls)",
        "re-read overhead",
        "reads per record",
        "events delivered",
        "duplicates",
        "wall s",
    )
    print(table(headers, rows))
    for f in figures:
        if f.project == "idle":
            verdict = "met" if f.ratio <= 1.1 else "missed"
            print(f"idle, {f.settings}: {f.ratio:.3f} requests per stream per poll (target <= 1.1: {verdict})")
        else:
            verdict = "met" if f.overhead <= 0.10 else "missed"
            added = f"the re-reads add {f.overhead:.0%} to the head's requests"
            print(f"busy, {f.settings}: {added} (target <= 10%: {verdict})")
    if any(math.isnan(f.ratio) for f in figures):
        raise SystemExit("no poll was measured")
    return figures


if __name__ == "__main__":
    main()
