"""The windows of the rules that measure: whatever the order and lateness of the same records, a window's
aggregate is the batch computation over the records it holds (exact, or within the sketch's relative error)."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from langfuse_poller.alerting.windows import (
    BUCKETS,
    RELATIVE_ACCURACY,
    Bucket,
    add,
    aggregate,
    bucket_index,
    bucket_width,
    distinct_key,
    prune,
    summarize,
    window_range,
)

WINDOW = 600.0
WIDTH = bucket_width(WINDOW)
PERCENTILES = ("p50", "p90", "p95", "p99")

values = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.integers(min_value=-1000, max_value=1000).map(float),
    st.sampled_from([0.0, 0.001, 1.5, 12.25]),
)
# a record: its event time (seconds into the test's two windows), its value, and a user for `distinct`
records = st.lists(
    st.tuples(st.floats(min_value=0, max_value=2 * WINDOW), values, st.sampled_from(["u1", "u2", "u3", "u4"])),
    max_size=80,
)


def batch(records: list[tuple[float, float, str]], progress: float, name: str) -> float | None:
    """The aggregate over the records the window at `progress` holds, computed from the records themselves."""
    first, last = window_range(progress, WIDTH)
    held = [(value, user) for ts, value, user in records if first <= bucket_index(ts, WIDTH) <= last]
    if not held:
        return None
    numbers = sorted(value for value, _ in held)
    exact = {
        "count": float(len(numbers)),
        "sum": math.fsum(numbers),
        "avg": math.fsum(numbers) / len(numbers),
        "min": numbers[0],
        "max": numbers[-1],
        "distinct": float(len({user for _, user in held})),
    }
    if name in exact:
        return exact[name]
    # the rank DDSketch's quantile reads: q * (n - 1), rounded down
    return numbers[math.floor(int(name[1:]) / 100 * (len(numbers) - 1))]


@settings(max_examples=200, deadline=None)
@given(
    records=records,
    order=st.randoms(use_true_random=False),
    progress=st.floats(min_value=WINDOW, max_value=2 * WINDOW),
    name=st.sampled_from(["count", "sum", "avg", "min", "max", "distinct", *PERCENTILES]),
)
def test_a_window_is_its_records_whatever_their_order_and_lateness(
    records: list[tuple[float, float, str]], order: Any, progress: float, name: str
) -> None:
    shuffled = list(records)
    order.shuffle(shuffled)
    buckets: list[Bucket] = []
    # progress moves on while the records arrive, late ones among them; the engine prunes what every window to
    # come has left behind, and drops a record older than that
    moving = 0.0
    for n, (ts, value, user) in enumerate(shuffled):
        moving = min(progress, max(moving, order.uniform(0, progress)) if n % 3 else moving)
        first, _ = window_range(moving, WIDTH)
        prune(buckets, first)
        if bucket_index(ts, WIDTH) < first:
            continue
        add(
            buckets,
            bucket_index(ts, WIDTH),
            value,
            sketch=name in PERCENTILES,
            distinct=distinct_key(user) if name == "distinct" else None,
        )
    # the state goes through JSON as the alert state stores it
    buckets = json.loads(json.dumps(buckets))
    found = aggregate(summarize(buckets, *window_range(progress, WIDTH)), name)
    expected = batch(records, progress, name)
    if expected is None:
        assert found is None
    elif name in PERCENTILES:
        assert found is not None
        assert abs(found - expected) <= RELATIVE_ACCURACY * abs(expected) + 1e-12, (found, expected)
    elif name in ("sum", "avg"):
        assert found is not None
        assert math.isclose(found, expected, rel_tol=1e-9, abs_tol=1e-6)
    else:
        assert found == expected


def test_the_window_is_thirty_buckets_aligned_to_the_epoch() -> None:
    assert BUCKETS == 30 and WIDTH == 20.0
    # at 12:00:05 a 10-minute window starts at 11:50:20 and ends with the bucket that holds 12:00:05
    noon = 1_800_000_000.0 - 1_800_000_000.0 % 3600
    first, last = window_range(noon + 5, WIDTH)
    assert (first * WIDTH, (last + 1) * WIDTH) == (noon - 600 + 20, noon + 20)
    assert window_range(noon + 5, WIDTH, back=1) == (first - BUCKETS, last - BUCKETS)
