"""Latency: from the moment a record becomes readable to the moment its event reaches a webhook, p50 and p99.

    python bench/latency.py                          # interval 1s and 5s, 25 s of traffic each (~1 minute)
    python bench/latency.py --intervals 1s,5s --seconds 25 --settle 0s

Real time, real processes: `langfuse-poller run` runs as a subprocess against a FakeLangfuse served from this
process, with a `webhook` notifier pointing at a loopback receiver here that timestamps each event id when it
arrives. Once the daemon has made its first poll, a thread adds traces at random moments (exponential gaps,
`--rate` per second on average), each visible at once (`visible_after=0`) with its start time the moment it
was added: that moment is when the record became readable, and latency is arrival minus it. A trace is a root
span and a generation (trace.created and generation.created), one in 10 with a score (score.created).

`settle` (the default config waits 2 s before reading an instant, for clocks and commits that lag) is set to
0 here, so that the figures show the poll interval and the pipeline; with `--settle 2s` each figure grows by
about the settle. Targets: p50 <= interval/2 + 0.2 s, p99 <= interval + 1 s (plus the settle, when not 0).

Besides the totals, each event's latency is split at the moment the head request whose window holds the
record was answered by the stand-in: the wait for that poll, and the rest (the poll's commit, the outbox, the
webhook delivery; a poll that brings many events sends them one after the other).
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    Traffic,
    child_env,
    command,
    machine,
    percentile,
    table,
    wait_for_output,
    write_config,
)

from langfuse_poller.testing.fake_langfuse import FakeLangfuse, parse_iso_us
from langfuse_poller.testing.loopback_webhook import LoopbackWebhook
from langfuse_poller.util.durations import parse_duration

SCORE_EVERY = 10


@dataclass
class Figures:
    interval: float
    settle: float
    events: int
    delivered: int
    latencies: list[float]
    waits: list[float]  # visible -> the head request that read the record was answered
    pipeline: list[float]  # that answer -> arrival at the webhook (events, outbox, delivery)

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p90(self) -> float:
        return percentile(self.latencies, 90)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)

    @property
    def p50_target(self) -> float:
        return self.settle + self.interval / 2 + 0.2

    @property
    def p99_target(self) -> float:
        return self.settle + self.interval + 1.0

    @property
    def met(self) -> bool:
        return self.delivered == self.events and self.p50 <= self.p50_target and self.p99 <= self.p99_target


def measure(interval: str, settle: str, *, seconds: float, rate: float, seed: int) -> Figures:
    rng = random.Random(seed)
    step = parse_duration(interval).total_seconds()
    traffic = Traffic()
    with (
        FakeLangfuse() as fake,
        LoopbackWebhook() as inbox,
        tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp,
    ):
        config = write_config(
            Path(tmp) / "config.toml",
            fake,
            poll={"interval": interval, "settle": settle, "start": "now"},
            notifiers={"hook": {"type": "webhook", "url": inbox.url}},
        )
        log = Path(tmp) / "run.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(command("run", config), stdout=out, stderr=subprocess.STDOUT, env=child_env())
        try:
            if not wait_for_output(proc, log, "langfuse-poller running", 30):
                raise RuntimeError(f"the daemon did not start:\n{log.read_text()}")
            # the first poll of both streams: the start-up is not what is measured
            deadline = time.monotonic() + 30
            while fake.count("/v2/observations") < 1 or fake.count("/v3/scores") < 1:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the daemon made no first poll:\n{log.read_text()}")
                time.sleep(0.02)
            stop = threading.Event()

            def add() -> None:
                # moments of a Poisson process, each waited for from the start: a late wake-up (this process
                # also serves the daemon's requests and deliveries) delays one record, not all that follow
                began = time.monotonic()
                moment = rng.expovariate(rate)
                while not stop.is_set() and moment < seconds:
                    stop.wait(max(0.0, began + moment - time.monotonic()))
                    traffic.add_trace(fake, time.time(), score=traffic.traces % SCORE_EVERY == 0)
                    moment += rng.expovariate(rate)

            adder = threading.Thread(target=add, daemon=True)
            adder.start()
            adder.join(seconds + 10)
            stop.set()
            expected = traffic.expected
            deadline = time.monotonic() + step + parse_duration(settle).total_seconds() + 15
            while not expected <= set(inbox.snapshot()) and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            if code != 0:
                raise RuntimeError(f"the daemon exited {code} after SIGTERM:\n{log.read_text()[-3000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        with inbox.lock:
            arrived = dict(inbox.first_at)
        heads = head_requests(fake)
    latencies, waits, pipeline = [], [], []
    for event_id in expected:
        if event_id not in arrived:
            continue
        visible = traffic.visible_at[event_id]
        latencies.append(arrived[event_id] - visible)
        # the head request whose window holds the record's start (= its visibility here), answered after it
        read = next(
            (
                at
                for lo, hi, at in heads["scores" if event_id.startswith("score.") else "observations"]
                if lo <= visible < hi and at >= visible
            ),
            None,
        )
        if read is not None and read <= arrived[event_id]:
            waits.append(read - visible)
            pipeline.append(arrived[event_id] - read)
    return Figures(
        interval=step,
        settle=parse_duration(settle).total_seconds(),
        events=len(expected),
        delivered=len(latencies),
        latencies=latencies,
        waits=waits,
        pipeline=pipeline,
    )


def head_requests(fake: FakeLangfuse) -> dict[str, list[tuple[float, float, float]]]:
    """(window start, window end, answered at) of each head request of each stream, oldest first (a sweep's
    window ends a re-read age before it is sent, a head's `settle` before)."""
    out: dict[str, list[tuple[float, float, float]]] = {"observations": [], "scores": []}
    for r in list(fake.requests):
        for stream, path, lo, hi in (
            ("observations", "/v2/observations", "fromStartTime", "toStartTime"),
            ("scores", "/v3/scores", "fromTimestamp", "toTimestamp"),
        ):
            if r.path.endswith(path) and r.status == 200:
                start, end = (parse_iso_us(r.query[name][-1]) / 1e6 for name in (lo, hi))
                if r.at - end < 30:
                    out[stream].append((start, end, r.at))
    return out


def main(argv: Sequence[str] | None = None) -> list[Figures]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", default="1s,5s", help="comma-separated poll intervals")
    parser.add_argument("--settle", default="0s", help="comma-separated settle values (the config's default: 2s)")
    parser.add_argument("--seconds", type=float, default=25.0, help="seconds of traffic per row")
    parser.add_argument("--rate", type=float, default=20.0, help="traces per second, on average")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"latency: {machine()}")
    print(f"{args.seconds:g} s of traffic per row, {args.rate:g} traces/s at random moments, visible at once\n")
    figures = [
        measure(interval, settle, seconds=args.seconds, rate=args.rate, seed=args.seed)
        for interval in args.intervals.split(",")
        for settle in args.settle.split(",")
    ]
    rows = [
        (
            f"{f.interval:g} s",
            f"{f.settle:g} s",
            f"{f.delivered}/{f.events}",
            f"{f.p50:.2f}",
            f"{f.p90:.2f}",
            f"{f.p99:.2f}",
            f"{max(f.latencies, default=float('nan')):.2f}",
            f"{percentile(f.waits, 50):.2f} / {percentile(f.waits, 99):.2f}",
            f"{percentile(f.pipeline, 50):.2f} / {percentile(f.pipeline, 99):.2f}",
            f"p50 <= {f.p50_target:.2f}, p99 <= {f.p99_target:.2f}",
            "met" if f.met else "missed",
        )
        for f in figures
    ]
    headers = (
        "interval",
        "settle",
        "events delivered",
        "p50 s",
        "p90 s",
        "p99 s",
        "max s",
        "wait for the poll p50/p99",
        "poll to webhook p50/p99",
        "target",
        "verdict",
    )
    print(table(headers, rows))
    return figures


if __name__ == "__main__":
    main()
