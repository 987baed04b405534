"""Alert state in Redis: how long the reads of `status`, `/metrics` and the alerter's tick take with large groups.

    python bench/alert_state_reads.py                  # 100 p95 groups with an hour's window each
    python bench/alert_state_reads.py --groups 1000 --firing 50

A p95 rule keeps a percentile sketch per bucket of its window, so one group is tens of kB of JSON. A throwaway
redis-server on loopback gets `--groups` such groups (one value a second for an hour each, latencies over four
decades), of which `--firing` are firing and the rest watching; then each read of the alert state is timed, the
best of 5: `counts` (every scrape of /metrics), `firing_count`, `next_due_after`, `open_groups` (`status`, the
alertmanager re-send), `any_due` and `due` (each alerter tick).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import machine, table
from failover import Redis

from langfuse_poller.alerting import measures
from langfuse_poller.alerting.groups import open_group
from langfuse_poller.alerting.state import group_to_json
from langfuse_poller.config import DeliveryConfig, parse_config
from langfuse_poller.events import Event
from langfuse_poller.redis.standby.alert_state import RedisAlertStore
from langfuse_poller.redis.standby.keys import PollerKeys
from langfuse_poller.redis.standby.replica import PollCancel, Replica

T0 = 1_800_000_000.0


def best(call: Callable[[], Any], runs: int = 5) -> float:
    """The fastest of `runs` calls, in milliseconds."""
    fastest = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        call()
        fastest = min(fastest, time.perf_counter() - started)
    return fastest * 1000


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=100, help="p95 groups (default 100)")
    parser.add_argument("--firing", type=int, default=5, help="of which firing (default 5)")
    args = parser.parse_args(argv)
    print(f"alert state reads: {machine()}")
    config = parse_config(
        {
            "langfuse": {"base_url": "http://127.0.0.1:9", "public_key": "pk", "secret_key": "sk"},
            "notifiers": {"log": {"type": "log"}},
            "rules": [
                {
                    "name": "latency",
                    "type": "metric",
                    "events": ["generation.created"],
                    "value": "data.latency",
                    "aggregate": "p95",
                    "window": "1h",
                    "group_by": ["data.model"],
                    "above": 10.0,
                    "notify": ["log"],
                }
            ],
        },
        "bench",
    )
    rule = config.rules[0]
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="alert-reads-") as tmp:
        redis = Redis(Path(tmp))
        keys = PollerKeys("bench")
        leader = Replica(redis.client, keys, "r", 600.0, PollCancel(threading.Event()))
        try:
            leader.tick()
            store = RedisAlertStore(redis.client, keys, token=leader.token, delivery=DeliveryConfig())
            rng = random.Random(1)
            sizes = []
            with store.write(T0 + 3600) as tx:
                for n in range(args.groups):
                    group = open_group(rule, f'["m{n}"]', {"data.model": f"m{n}"}, T0)
                    for second in range(3600):
                        event = Event(
                            id=f"generation.created:{n}:{second}",
                            type="generation.created",
                            timestamp=datetime.fromtimestamp(T0 + second, UTC),
                            source="poll",
                            data={"model": f"m{n}"},
                        )
                        measures.record_value(rule, group, event, 10 ** rng.uniform(-2, 2), T0 + 3600, silenced=False)
                    group.state = "firing" if n < args.firing else "watching"
                    group.next_at = T0 + 4000
                    sizes.append(len(group_to_json(group)))
                    tx.alert_state.save(group)
            print(
                f"{args.groups} groups ({args.firing} firing), {sum(sizes) / len(sizes) / 1000:.0f} kB of JSON each, "
                f"{sum(sizes) / 1e6:.1f} MB in all\n"
            )
            state = store.alert_state()
            reads: list[tuple[str, Callable[[], Any]]] = [
                ("counts", state.counts),
                ("firing_count", state.firing_count),
                ("next_due_after", lambda: state.next_due_after(T0)),
                ("open_groups", state.open_groups),
                ("any_due", lambda: state.any_due(T0)),
                ("due", lambda: state.due(T0)),
            ]
            for name, call in reads:
                timings[name] = best(call)
        finally:
            leader.close()
            redis.close()
    print(table(("read", "best of 5 (ms)"), [(name, f"{ms:.1f}") for name, ms in timings.items()]))
    return timings


if __name__ == "__main__":
    main()
