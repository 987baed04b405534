"""Completeness: what langfuse-poller and the common polling recipe deliver when records become visible late.

    python bench/completeness.py                     # 30 simulated minutes at 1 trace/s
    python bench/completeness.py --minutes 30 --rate 1 --seed 1

Records become readable 0-30 s after they start (uniformly), and 5% of them 30 s to 5 minutes after
(FakeLangfuse `visible_after`), as Langfuse Cloud's ingestion does (its docs: typically 15-30 s, older SDKs
up to ~10 minutes). A trace is a root span and a generation (trace.created, generation.created); one trace in
10 also gets a score (score.created).

In one run, on one injected clock and against one FakeLangfuse, these pollers read the same records:

* langfuse-poller, in this process, with the config defaults (interval 10s, lookback 10m, reread 1m,
  sweep_interval 2m, settle 2s): `poll_once()` at every interval, then its delivery worker, into a handler;
  and again with `settle = "30s"` (the head then waits until most records are visible), with its own state;
* the naive recipe: every `--naive-every` seconds, for each stream, ONE page (`limit` `--naive-limit`) with
  fromStartTime / fromTimestamp = the last check time and no upper bound, then last check = now. It turns
  every record it gets into its events and dedups nothing;
* the naive recipe with an overlap: the same, from `--overlap` before the last check, the usual attempt at
  catching late records.

The clock moves one second at a time; traffic runs `--minutes`, then the pollers keep polling without new
traffic until every record is visible and older than lookback plus two sweep intervals. Reported per poller:
events delivered against expected, duplicates (deliveries beyond the first of an id), API requests, and the
time from a record becoming visible to its delivery (simulated seconds). Target for langfuse-poller: 100%
delivered, 0 duplicates.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROUTED, Clock, Traffic, machine, percentile, table

from langfuse_poller.config import parse_config
from langfuse_poller.events import Event
from langfuse_poller.registry import Registry
from langfuse_poller.runtime import Runtime
from langfuse_poller.testing.fake_langfuse import FakeLangfuse, format_ms

SCORE_EVERY = 10
NAIVE_READS = (("/api/public/v2/observations", "fromStartTime"), ("/api/public/v3/scores", "fromTimestamp"))


@dataclass
class Outcome:
    name: str
    delivered: Counter[str] = field(default_factory=Counter)
    first_at: dict[str, float] = field(default_factory=dict)
    requests: int = 0

    def got(self, event_id: str, now: float) -> None:
        self.delivered[event_id] += 1
        self.first_at.setdefault(event_id, now)

    def handler(self, clock: Clock) -> Callable[[Event], None]:
        """A langfuse-poller handler that counts each event it is given, at the clock's time."""
        return lambda event: self.got(event.id, clock())


class NaivePoller:
    """The common recipe: one page from the last check time (minus `overlap`) on, no dedup."""

    def __init__(self, fake: FakeLangfuse, clock: Clock, *, limit: int, overlap: float, name: str) -> None:
        self.client = httpx.Client(base_url=fake.url, auth=(fake.public_key, fake.secret_key), timeout=30)
        self.clock = clock
        self.limit = limit
        self.overlap = overlap
        self.last_check = clock()
        self.outcome = Outcome(name)

    def poll(self) -> None:
        now = self.clock()
        since = format_ms(int((self.last_check - self.overlap) * 1000))
        for path, param in NAIVE_READS:
            response = self.client.get(path, params={param: since, "limit": self.limit})
            self.outcome.requests += 1
            response.raise_for_status()
            for record in response.json()["data"]:
                for event_id in naive_events(path, record):
                    self.outcome.got(event_id, now)
        self.last_check = now

    def close(self) -> None:
        self.client.close()


def naive_events(path: str, record: dict[str, Any]) -> list[str]:
    """The event ids a record yields, named as langfuse-poller names them (no record here is an error)."""
    if path.endswith("/v3/scores"):
        return [f"score.created:{record['id']}"]
    ids = []
    if record.get("isRootObservation"):
        ids.append(f"trace.created:{record['traceId']}")
    if record.get("type") == "GENERATION":
        ids.append(f"generation.created:{record['id']}")
    return ids


def delay(rng: random.Random, late_share: float, normal_max: float, late_max: float) -> float:
    """Seconds from a record's start to its visibility."""
    if rng.random() < late_share:
        return rng.uniform(normal_max, late_max)
    return rng.uniform(0.0, normal_max)


def run(args: argparse.Namespace) -> tuple[list[Outcome], Traffic, float]:
    rng = random.Random(args.seed)
    random.seed(args.seed)
    clock = Clock()
    traffic = Traffic()
    with FakeLangfuse(clock=clock) as fake, tempfile.TemporaryDirectory(prefix="bench-completeness-") as tmp:
        ours: list[tuple[Outcome, Runtime]] = []
        for settle in args.settle.split(","):
            poll = {"interval": args.interval, "start": "now"}  # everything else: the defaults
            name = "langfuse-poller (defaults)"
            if settle != "default":
                poll["settle"] = settle
                name = f"langfuse-poller (settle {settle})"
            config = parse_config(
                {
                    "langfuse": {"base_url": fake.url, "public_key": fake.public_key, "secret_key": fake.secret_key},
                    "poll": poll,
                    "state": {"path": str(Path(tmp) / f"state-{len(ours)}.db")},
                },
                "bench/completeness.py",
            )
            outcome = Outcome(name)
            handlers = Registry()
            handlers.register(outcome.handler(clock), ROUTED, name="deliver")
            ours.append((outcome, Runtime.build(config, handlers=handlers, clock=clock)))
        naive = [
            NaivePoller(fake, clock, limit=args.naive_limit, overlap=0.0, name="naive: one page since the last check"),
            NaivePoller(
                fake,
                clock,
                limit=args.naive_limit,
                overlap=args.overlap,
                name=f"naive with {args.overlap:g} s overlap",
            ),
        ]
        began = time.perf_counter()
        try:
            for _, runtime in ours:
                runtime.poller.start_streams()
            interval = config.poll.interval.total_seconds()
            traffic_for = args.minutes * 60
            drain = args.late_max + (config.poll.lookback + 2 * config.poll.sweep_interval).total_seconds()
            pending = 0.0
            tick = 0
            while tick < traffic_for + drain:
                clock.advance(1.0)
                tick += 1
                if tick <= traffic_for:
                    # the traces that started during the second just past
                    pending += args.rate
                    for _ in range(int(pending)):
                        start = clock() - rng.random()
                        visible = start + delay(rng, args.late_share, args.normal_max, args.late_max)
                        traffic.add_trace(
                            fake,
                            start,
                            visible_after=max(0.0, visible - clock()),
                            score=traffic.traces % SCORE_EVERY == 0,
                        )
                    pending -= int(pending)
                if tick % round(interval) == 0:
                    for outcome, runtime in ours:
                        before = len(fake.requests)
                        result = runtime.poller.poll_once()
                        if result.errors:
                            raise RuntimeError(f"poll failed: {result.errors}")
                        outcome.requests += len(fake.requests) - before
                        runtime.worker.run_until_idle()
                if tick % round(args.naive_every) == 0:
                    for poller in naive:
                        poller.poll()
        finally:
            for _, runtime in ours:
                runtime.close()
            for poller in naive:
                poller.close()
        elapsed = time.perf_counter() - began
    return [*(o for o, _ in ours), *(p.outcome for p in naive)], traffic, elapsed


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="simulated minutes of traffic")
    parser.add_argument("--rate", type=float, default=1.0, help="traces per second")
    parser.add_argument("--interval", default="10s", help="langfuse-poller's poll interval")
    parser.add_argument(
        "--settle",
        default="default,30s",
        help='comma-separated settle of each langfuse-poller run ("default": 2s, the config default)',
    )
    parser.add_argument("--normal-max", type=float, default=30.0, help="most records are visible within this")
    parser.add_argument("--late-share", type=float, default=0.05, help="the share visible later")
    parser.add_argument("--late-max", type=float, default=300.0, help="the latest a record becomes visible")
    parser.add_argument("--naive-every", type=float, default=10.0, help="seconds between the naive polls")
    parser.add_argument("--naive-limit", type=int, default=50, help="the page size the naive recipe asks for")
    parser.add_argument("--overlap", type=float, default=60.0, help="seconds of overlap of the second naive one")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"completeness: {machine()}")
    print(
        f"{args.minutes:g} simulated minutes at {args.rate:g} traces/s (root + generation, 1 score per "
        f"{SCORE_EVERY} traces); visible 0-{args.normal_max:g} s after the start, {args.late_share:.0%} up to "
        f"{args.late_max:g} s; naive polls every {args.naive_every:g} s, limit {args.naive_limit}\n"
    )
    outcomes, traffic, elapsed = run(args)
    expected = traffic.expected
    figures: dict[str, dict[str, float]] = {}
    rows = []
    for outcome in outcomes:
        got = set(outcome.delivered)
        delivered = len(expected & got)
        lat = [outcome.first_at[i] - traffic.visible_at[i] for i in expected & got]
        duplicates = sum(n - 1 for n in outcome.delivered.values() if n > 1)
        figures[outcome.name] = {
            "expected": len(expected),
            "delivered": delivered,
            "duplicates": duplicates,
            "unexpected": len(got - expected),
            "requests": outcome.requests,
            "p50": percentile(lat, 50),
            "p99": percentile(lat, 99),
        }
        rows.append(
            (
                outcome.name,
                f"{delivered}/{len(expected)}",
                f"{delivered / len(expected):.1%}" if expected else "-",
                duplicates,
                len(got - expected),
                outcome.requests,
                f"{percentile(lat, 50):.0f} / {percentile(lat, 99):.0f}",
            )
        )
    headers = (
        "poller",
        "events delivered",
        "share",
        "duplicates",
        "unexpected ids",
        "API requests",
        "visible to delivered p50/p99 (s)",
    )
    print(table(headers, rows))
    print(
        f"\n{traffic.traces} traces, {traffic.observations} observations, {traffic.scores} scores -> "
        f"{len(expected)} events; simulated in {elapsed:.1f} s"
    )
    for name, f in figures.items():
        if name.startswith("langfuse-poller"):
            met = f["delivered"] == f["expected"] and f["duplicates"] == 0 and f["unexpected"] == 0
            print(f"{name}: target 100% delivered, 0 duplicates: {'met' if met else 'missed'}")
    return figures


if __name__ == "__main__":
    main()
