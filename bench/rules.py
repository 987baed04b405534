"""Rules that measure: what each costs per event, and what their state holds at 10,000 keys.

    python bench/rules.py                                  # all three parts (~2 min)
    python bench/rules.py --part cost --events 50000       # microseconds per event per rule, each type
    python bench/rules.py --part keys --keys 10000         # 10,000 keys x p95 over 1 h windows: RSS, state size
    python bench/rules.py --part cap --keys 10000          # max_groups reached: twice as many keys as the cap

Each part builds the daemon's runtime on a throwaway SQLite state, with a clock that follows the events' time,
and hands the matches to a rule's alert groups in batches of 2,000, about what a catch-up's write transaction
applies to a rule at once, each `Alerter.record` in one write transaction, every group it moved read and saved.

cost: one rule at a time over the same generations (`--models` models, the group_by key; one every 100 ms of
event time, so an hour's window holds 36,000 of them) and, for new_value, error messages of 50 kinds, each
with its own numbers and ids. The figures are wall and CPU time per event for the rule, with the store,
after a warm-up batch; `--profile` writes a cProfile of each rule's run next to it. keys: a p95 of latency
per user over 1 h windows, `--keys` users, each with values in every bucket of its window. cap: a sum per
user with `max_groups = --keys`, fed twice as many users: the second half goes to the overflow group.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from langfuse_poller.config import parse_config
from langfuse_poller.events import Event
from langfuse_poller.rules import Rule
from langfuse_poller.runtime import Runtime
from langfuse_poller.testing.fake_langfuse import FakeLangfuse

BATCH = 2000  # about the generations of a catch-up transaction's pages, which a rule gets at once
START = 1_800_000_000.0

RULES: dict[str, dict[str, Any]] = {
    "metric sum": {"type": "metric", "value": "data.totalCost", "aggregate": "sum", "window": "1h", "above": 1e9},
    "metric p95": {"type": "metric", "value": "data.latency", "aggregate": "p95", "window": "1h", "above": 1e9},
    "ratio": {"type": "ratio", "share": 'data.level == "ERROR"', "window": "15m", "above": 0.99, "min_count": 50},
    "spike": {"type": "spike", "value": "data.totalCost", "aggregate": "sum", "window": "1h", "factor": 100},
    "new_value (fingerprint)": {
        "type": "new_value",
        "events": ["trace.updated"],
        "value": "data.statusMessage",
        "fingerprint": True,
        "learn": "0s",
    },
    # for scale: a rule that counts, no measure
    "frequency (for scale)": {"type": "frequency", "threshold": 10_000, "window": "5m"},
}

ERROR_KINDS = [
    "timeout after {n}s calling /v1/users/{n}/orders (req {hex})",
    "rate limited by provider: retry in {n} ms, request id req_{n}x{n}",
    "tool 'search' failed: HTTP {n} from https://api.example.com/q?id={n}",
    'invalid JSON in model output at char {n}: "{word}"',
    "context length exceeded: {n} tokens > 128000 (trace {uuid})",
]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    return f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}"


class Bench:
    """A runtime on a throwaway state with one rule, and a clock that follows the events' time."""

    def __init__(self, fake: FakeLangfuse, tmp: str, name: str, rule: dict[str, Any]) -> None:
        self.now = START
        table = {"name": name.split(" ")[0], "events": ["generation.created"], "notify": ["file"], **rule}
        self.path = Path(tmp) / f"{table['name']}.db"
        config = parse_config(
            {
                "langfuse": {"base_url": fake.url, "public_key": "pk-lf-test", "secret_key": "sk-lf-test"},
                "state": {"path": str(self.path)},
                "notifiers": {"file": {"type": "jsonl", "path": f"{tmp}/alerts.jsonl"}},
                "rules": [table],
            },
            "bench",
        )
        self.runtime = Runtime.build(config, clock=lambda: self.now)
        self.runtime.alerter.start(self.now)
        self.rule: Rule = config.rules[0]

    def record(self, batch: list[Event]) -> tuple[float, float]:
        """Hand a batch to the rule as a write transaction does; the seconds it took, on the wall and of CPU
        (this process's, which other work on a shared machine inflates less)."""
        self.now = max(self.now, batch[-1].timestamp.timestamp())
        began, cpu = time.perf_counter(), time.process_time()
        with self.runtime.store.write(self.now) as tx:
            self.runtime.alerter.record(tx, self.rule, batch)
        return time.perf_counter() - began, time.process_time() - cpu

    def state(self) -> tuple[int, int, int]:
        """Groups, the bytes of their measures as stored (orjson), and the state file's bytes (with its WAL)."""
        with self.runtime.store.write(self.now) as tx:
            groups = list(tx.alert_state.groups())
        measured = sum(len(orjson.dumps(group.measure)) for group in groups)
        files = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*"))
        return len(groups), measured, files

    def close(self) -> None:
        self.runtime.close()


def generations(count: int, keys: int, seed: int, *, key: str = "model", step: float = 0.1) -> Iterator[Event]:
    """Generations in event-time order, one every `step` seconds, their `key` one of `keys` values."""
    rnd = random.Random(seed)
    for n in range(count):
        ts = START + n * step
        data = {
            "projectId": "p",
            "traceId": f"t{n}",
            "observationId": f"o{n}",
            "name": "llm-call",
            "level": "ERROR" if rnd.random() < 0.02 else "DEFAULT",
            "environment": "production",
            "model": f"model-{rnd.randrange(keys)}",
            "userId": f"user-{rnd.randrange(keys)}",
            "totalCost": rnd.uniform(0.0001, 0.01),
            "latency": rnd.lognormvariate(0.5, 1.0),
            "url": f"https://cloud.langfuse.com/project/p/traces/t{n}",
        }
        if key == "userId":
            data["userId"] = f"user-{n % keys}"
        yield Event(f"generation.created:o{n}", "generation.created", datetime.fromtimestamp(ts, UTC), "poll", data)


def errors(count: int, seed: int) -> Iterator[Event]:
    """trace.updated errors, one every 100 ms, of 50 kinds (ERROR_KINDS x 10 services), each with its own values."""
    rnd = random.Random(seed)
    for n in range(count):
        kind = rnd.choice(ERROR_KINDS)
        message = f"svc-{rnd.randrange(10)}: " + kind.format(
            n=rnd.randrange(1, 100_000),
            hex=f"{rnd.getrandbits(40):010x}",
            word=rnd.choice(["foo", "bar", "baz"]),
            uuid="9b2c1d3e-4f50-4a6b-8c7d-" + f"{rnd.getrandbits(48):012x}",
        )
        data = {
            "projectId": "p",
            "traceId": f"t{n}",
            "observationId": f"o{n}",
            "name": "step",
            "level": "ERROR",
            "statusMessage": message,
            "environment": "production",
            "url": f"https://cloud.langfuse.com/project/p/traces/t{n}",
        }
        ts = datetime.fromtimestamp(START + n * 0.1, UTC)
        yield Event(f"trace.updated:o{n}:1", "trace.updated", ts, "poll", data)


def batches(events: Iterator[Event]) -> Iterator[list[Event]]:
    batch: list[Event] = []
    for event in events:
        batch.append(event)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class Cost:
    rule: str
    events: int
    seconds: float
    cpu: float
    groups: int

    @property
    def micros(self) -> float:
        return self.seconds / self.events * 1e6

    @property
    def cpu_micros(self) -> float:
        return self.cpu / self.events * 1e6


def run_cost(fake: FakeLangfuse, tmp: str, args: argparse.Namespace, only: Callable[[str], bool]) -> list[Cost]:
    results = []
    for name, rule in RULES.items():
        if not only(name):
            continue
        bench = Bench(fake, tmp, name, {**rule, "group_by": ["data.model"]} if "new_value" not in name else rule)
        made = errors if "new_value" in name else (lambda n, s: generations(n, args.models, s))
        stream = batches(made(args.events + BATCH, args.seed))
        bench.record(next(stream))  # warm-up: the rule's plan, CEL's caches, the groups' first rows
        profile = cProfile.Profile() if args.profile else None
        spent, cpu, counted = 0.0, 0.0, 0
        for batch in stream:
            if profile is not None:
                profile.enable()
            wall, used = bench.record(batch)
            if profile is not None:
                profile.disable()
            spent, cpu, counted = spent + wall, cpu + used, counted + len(batch)
        if profile is not None:
            profile.dump_stats(f"{args.profile}.{name.split(' ')[0]}.{name.split(' ')[1] if ' ' in name else ''}")
        results.append(Cost(name, counted, spent, cpu, bench.state()[0]))
        bench.close()
    return results


def run_keys(fake: FakeLangfuse, tmp: str, args: argparse.Namespace, *, cap: bool) -> dict[str, float]:
    """p95 per user over 1 h (keys), or a sum per user with max_groups reached (cap)."""
    if cap:
        rule = {**RULES["metric sum"], "group_by": ["data.userId"], "max_groups": args.keys}
        users, per_user = 2 * args.keys, 5
    else:
        rule = {**RULES["metric p95"], "group_by": ["data.userId"]}
        users, per_user = args.keys, args.values
    bench = Bench(fake, tmp, "cap sum" if cap else "keys p95", rule)
    count = users * per_user
    # spread over one window (an hour), each user's values over all of it: every bucket of every group is used
    step = 3600.0 / count
    before = rss_mb()
    spent, cpu = 0.0, 0.0
    for batch in batches(generations(count, users, args.seed, key="userId", step=step)):
        wall, used = bench.record(batch)
        spent, cpu = spent + wall, cpu + used
    # before the groups are all loaded at once to be weighed, which the daemon never does
    after, peak = rss_mb(), peak_mb()
    groups, measured, files = bench.state()
    figures = {
        "events": count,
        "us per event": spent / count * 1e6,
        "CPU us per event": cpu / count * 1e6,
        "groups": groups,
        "measure bytes per group": measured / max(1, groups),
        "measures MB": measured / 1e6,
        "state file MB": files / 1e6,
        "RSS MB before": before,
        "RSS MB after": after,
        "peak RSS MB": peak,
        "overflowed matches": bench.runtime.alerter.overflowed[bench.rule.name],
    }
    bench.close()
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("cost", "keys", "cap", "all"), default="all")
    parser.add_argument("--events", type=int, default=50_000, help="cost: events per rule, after a warm-up batch")
    parser.add_argument("--models", type=int, default=100, help="cost: models, the rules' group_by")
    parser.add_argument("--keys", type=int, default=10_000, help="keys: users; cap: max_groups (2x the users)")
    parser.add_argument("--values", type=int, default=60, help="keys: values per user over the hour")
    parser.add_argument("--rule", help="cost: only the rules whose name starts with this")
    parser.add_argument("--profile", metavar="PATH", help="cost: write a cProfile of each rule to PATH.<rule>")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"{machine()}; batches of {BATCH}")
    found: dict[str, Any] = {}
    with FakeLangfuse() as fake, tempfile.TemporaryDirectory() as tmp:
        if args.part in ("cost", "all"):
            costs = run_cost(fake, tmp, args, lambda name: args.rule is None or name.startswith(args.rule))
            print(f"\ncost per event, {args.events} events per rule, group_by over {args.models} models:")
            print(f"{'rule':<26} {'us/event':>9} {'CPU us':>7} {'groups':>7}")
            for cost in costs:
                print(f"{cost.rule:<26} {cost.micros:>9.1f} {cost.cpu_micros:>7.1f} {cost.groups:>7}")
            found["cost"] = costs
        for part in ("keys", "cap"):
            if args.part not in (part, "all"):
                continue
            keys = args.keys
            figures = run_keys(fake, tmp, args, cap=part == "cap")
            title = (
                f"max_groups = {keys} reached: a sum per user, {2 * keys} users"
                if part == "cap"
                else f"{keys} keys x p95 over 1 h windows, {args.values} values per key"
            )
            print(f"\n{title}:")
            for label, value in figures.items():
                print(f"  {label:<26} {value:,.1f}" if isinstance(value, float) else f"  {label:<26} {value:,}")
            found[part] = figures
    return found


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
