"""Usage metrics at their largest: scrape time with N series per metric, and memory as traffic goes on.

    python bench/usage_metrics.py --series 1000 --batches 2000

Builds the daemon's metrics (`[metrics] usage = true`, `usage_labels = ["traceName"]`) on a loopback port, fills
every usage metric with `--series` series (models x environments x trace names, and score names), then times
GET /metrics as Prometheus asks for it (OpenMetrics, gzip) and in the plain text format, with a page of
traffic between two scrapes; the first scrape after the fill writes every series. Then it counts
`--batches` more pages of events (each a page of a catch-up: generations, traces, errors, scores) whose label
values stay inside the full label space, plus values beyond it that fold into "other", and prints the RSS
of the process every tenth of the way: flat once the label space is full.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from langfuse_poller.config import parse_config
from langfuse_poller.events import Event, Seen
from langfuse_poller.runtime import Runtime
from langfuse_poller.service.metrics import Metrics
from langfuse_poller.testing.fake_langfuse import FakeLangfuse

MODELS = 10
ENVIRONMENTS = 2
PAGE = 1000  # events per batch, as a page of observations holds
# the metrics the fill brings to `--series` series each; traces and errors reach it too (names x environments)
FILLED = ("generations_total", "cost_usd_total", "generation_latency_seconds", "traces_total", "score_value")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Pages:
    """Events of made-up records over a label space of `series` series per metric: the generation series are
    models x environments x trace names, the others names x environments (and some trace names beyond the cap)."""

    def __init__(self, series: int, seed: int) -> None:
        self.trace_names = max(1, series // (MODELS * ENVIRONMENTS))
        self.names = max(1, series // ENVIRONMENTS)
        self.random = random.Random(seed)
        self.serial = 0
        self.now = datetime.now(UTC)

    def page(self, beyond: float = 0.0) -> list[tuple[Event, Seen | None]]:
        made: list[tuple[Event, Seen | None]] = []
        pick = self.random.randrange
        for _ in range(PAGE // 4):
            self.serial += 1
            n = self.serial
            trace_name = f"trace-{pick(self.trace_names)}" if self.random.random() >= beyond else f"late-{n}"
            name = f"root-{pick(self.names)}"
            model, env = f"model-{pick(MODELS)}", f"env-{pick(ENVIRONMENTS)}"
            generation: dict[str, Any] = {
                "model": model,
                "environment": env,
                "level": "ERROR" if n % 20 == 0 else "DEFAULT",
                "traceName": trace_name,
                "usageDetails": {"input": 100 + n % 50, "output": 20 + n % 30, "total": 120 + n % 80},
                "costDetails": {"total": 0.0001 * (n % 13)},
                "totalCost": 0.0001 * (n % 13),
                "latency": self.random.lognormvariate(0.5, 1.0),
                "timeToFirstToken": self.random.lognormvariate(-1.0, 0.8),
            }
            made.append((Event(f"generation.created:{n}", "generation.created", self.now, "poll", generation), None))
            trace = {"name": name, "environment": env, "level": "DEFAULT"}
            made.append((Event(f"trace.created:{n}", "trace.created", self.now, "poll", trace), None))
            error = {"name": name, "environment": env, "level": "ERROR", "observationId": f"o{n}"}
            made.append((Event(f"trace.updated:{n}:1", "trace.updated", self.now, "poll", error), None))
            score = {
                "name": f"judge-{pick(self.names)}",
                "environment": env,
                "source": "EVAL",
                "dataType": "NUMERIC",
                "value": self.random.random(),
            }
            made.append((Event(f"score.created:{n}", "score.created", self.now, "poll", score), None))
        return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=1000, help="series per usage metric (the label cap)")
    parser.add_argument("--batches", type=int, default=2000, help="pages of 1,000 events counted after the fill")
    parser.add_argument("--scrapes", type=int, default=20, help="scrapes timed in each format")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.series} series per metric; pages of {PAGE} events")
    with FakeLangfuse() as fake, tempfile.TemporaryDirectory() as tmp:
        config = parse_config(
            {
                "langfuse": {"base_url": fake.url, "public_key": "pk-lf-test", "secret_key": "sk-lf-test"},
                "state": {"path": f"{tmp}/state.db"},
                "metrics": {
                    "listen": "127.0.0.1:0",
                    "usage": True,
                    "usage_labels": ["traceName"],
                    "usage_max_series": max(1, args.series // (MODELS * ENVIRONMENTS)),
                },
            },
            "bench",
        )
        runtime = Runtime.build(config)
        metrics = Metrics(runtime)
        usage = metrics.usage
        assert usage is not None
        metrics.serve("127.0.0.1", 0)
        try:
            pages = Pages(args.series, args.seed)
            started = time.perf_counter()
            while True:
                usage.tally(pages.page(), set())()
                if all(usage.series(name) >= args.series for name in FILLED):
                    break
            filled = time.perf_counter() - started
            per_metric = {name: usage.series(name) for name in FILLED}
            print(f"filled in {filled:.1f} s; series: {per_metric}")
            usage.tally(pages.page(), set())()
            began = time.perf_counter()
            first = httpx.get(f"http://127.0.0.1:{metrics.port}/metrics", timeout=30)
            spent = (time.perf_counter() - began) * 1000
            print(f"first scrape, every series written: {spent:.1f} ms, {usage.render().count(chr(10))} lines")
            assert first.status_code == 200
            url = f"http://127.0.0.1:{metrics.port}/metrics"
            formats = {
                "Prometheus' request (OpenMetrics, gzip)": {
                    "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
                    "Accept-Encoding": "gzip",
                },
                "text format, no compression": {"Accept": "text/plain", "Accept-Encoding": "identity"},
            }
            with httpx.Client(timeout=30) as client:
                for label, headers in formats.items():
                    times, size = [], 0
                    for _ in range(args.scrapes):
                        # a page of traffic between two scrapes, as a catch-up makes (a busier one than most): the
                        # series it changed are written again, the others come from the last scrape's text
                        usage.tally(pages.page(), set())()
                        began = time.perf_counter()
                        # the body as sent: Prometheus, not the daemon, spends the time to decompress it
                        with client.stream("GET", url, headers=headers) as response:
                            size = sum(map(len, response.iter_raw()))
                        times.append((time.perf_counter() - began) * 1000)
                        assert response.status_code == 200
                    times.sort()
                    print(
                        f"scrape, {label}: median {statistics.median(times):.1f} ms, "
                        f"p90 {times[int(len(times) * 0.9) - 1]:.1f} ms, max {times[-1]:.1f} ms; "
                        f"{size / 1e6:.2f} MB sent"
                    )
            rss = [(0, rss_mb())]
            spent = 0.0
            for batch in range(1, args.batches + 1):
                # one trace name in fifty is new: it folds into "other"
                page = pages.page(beyond=0.02)
                began = time.perf_counter()
                usage.tally(page, set())()
                spent += time.perf_counter() - began
                if batch % max(1, args.batches // 10) == 0:
                    rss.append((batch, rss_mb()))
            each = spent / (args.batches * PAGE) * 1e6
            print(f"counted {args.batches * PAGE} events: {spent:.1f} s in tally and apply, {each:.1f} us per event")
            print("RSS after batches: " + ", ".join(f"{batch}: {mb:.1f} MB" for batch, mb in rss))
            print(f"RSS growth over the last 90%: {rss[-1][1] - rss[1][1]:+.1f} MB")
            folded = sum(usage.folded.values())
            print(f"folded into 'other': {folded:.0f} records; lines now {usage.render().count(chr(10))}")
        finally:
            metrics.close()
            runtime.close()


if __name__ == "__main__":
    main()
