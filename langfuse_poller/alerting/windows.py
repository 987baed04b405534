"""Sliding windows in event time, made of fixed buckets: what a measuring rule keeps per group. Pure logic, no I/O.

A window of length W is split into `BUCKETS` buckets of width b = W / BUCKETS, aligned to multiples of b since
the epoch, so a bucket's index is floor(ts / b) and every group of a rule cuts time at the same places. At
progress p (how far the poller has read, in event time), with k = floor(p / b), the window is the buckets
k - BUCKETS + 1 ... k: the last W of event time, rounded out to whole buckets (its far edge is exact to W/30),
and never a record later than the bucket that holds p. A spike rule's previous window is the BUCKETS buckets
before those. `window_range` is that definition, for the engine and for anyone who recomputes a window.

Each bucket holds the count, sum, min and max of its values, and only what its rule's aggregate needs besides:
a percentile sketch, or a bounded set of distinct values. A late record lands in the bucket of its own
timestamp; a record older than the window it would join has been judged without it, and is dropped.

Percentiles use DDSketch's logarithmic mapping (the `ddsketch` package, DataDog's): a value goes to the bin
ceil(log_gamma(v)), gamma = (1 + a) / (1 - a), and a bin stands for a value within a relative error a =
RELATIVE_ACCURACY (1%) of every value it holds. The bins of a bucket are kept sparse, so a bucket stores a few
dozen (bin, count) pairs however many values it saw; a window's quantile adds its buckets' bins (counts merge
exactly) and walks them as DDSketch's `key_at_rank` does: the value of rank q * (n - 1), within 1% of it.

Buckets are plain lists, so the state is the JSON that the alert state stores, with nothing to convert:
[index, count, sum, min, max, bins or None, distinct or None].
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ddsketch.mapping import LogarithmicMapping

BUCKETS = 30
RELATIVE_ACCURACY = 0.01
# a bucket keeps at most this many distinct values: beyond it, `distinct` counts at least this many per bucket
DISTINCT_CAP = 1000
MAPPING = LogarithmicMapping(RELATIVE_ACCURACY)
ZERO = "z"
NEGATIVE = "n"

INDEX, COUNT, SUM, MIN, MAX, BINS, DISTINCT = range(7)
Bucket = list[Any]


def bucket_width(window: float) -> float:
    """The width of one bucket of a window of `window` seconds."""
    return window / BUCKETS


def bucket_index(ts: float, width: float) -> int:
    """The bucket that holds the event time `ts`."""
    return math.floor(ts / width)


def window_range(progress: float, width: float, back: int = 0) -> tuple[int, int]:
    """The first and last bucket index of the window at `progress`; `back = 1`: the window before it."""
    last = bucket_index(progress, width) - back * BUCKETS
    return last - BUCKETS + 1, last


def distinct_key(value: Any) -> str:
    """A short stable digest of a value for the distinct set: ids of any length cost 12 characters."""
    text = value if isinstance(value, str) else repr(value)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def sketch_key(value: float) -> str:
    """The sketch bin of a value: DDSketch's mapping of its magnitude, its sign, or zero."""
    if value > MAPPING.min_possible:
        return str(MAPPING.key(value))
    if value < -MAPPING.min_possible:
        return NEGATIVE + str(MAPPING.key(-value))
    return ZERO


def add(buckets: list[Bucket], index: int, value: float, *, sketch: bool = False, distinct: str | None = None) -> None:
    """Add one value to the bucket `index` (made when new); buckets stay ordered by index."""
    position = len(buckets)
    # values arrive mostly in time order: the bucket is found from the end
    while position and buckets[position - 1][INDEX] > index:
        position -= 1
    if position and buckets[position - 1][INDEX] == index:
        bucket = buckets[position - 1]
        bucket[COUNT] += 1
        bucket[SUM] += value
        bucket[MIN] = min(bucket[MIN], value)
        bucket[MAX] = max(bucket[MAX], value)
    else:
        bucket = [index, 1, value, value, value, {} if sketch else None, [] if distinct is not None else None]
        buckets.insert(position, bucket)
    if sketch:
        key = sketch_key(value)
        bucket[BINS][key] = bucket[BINS].get(key, 0) + 1
    if distinct is not None and len(bucket[DISTINCT]) < DISTINCT_CAP and distinct not in bucket[DISTINCT]:
        bucket[DISTINCT].append(distinct)


def prune(buckets: list[Bucket], first: int) -> None:
    """Drop the buckets older than index `first`: no window that is still to be judged holds them."""
    drop = 0
    while drop < len(buckets) and buckets[drop][INDEX] < first:
        drop += 1
    del buckets[:drop]


@dataclass(frozen=True)
class Summary:
    """What the buckets of one window hold together."""

    count: int
    sum: float
    min: float | None
    max: float | None
    bins: dict[str, int]
    distinct: int


def summarize(buckets: Sequence[Bucket], first: int, last: int) -> Summary:
    """The buckets with an index in [first, last], merged."""
    count, total = 0, 0.0
    low: float | None = None
    high: float | None = None
    bins: dict[str, int] = {}
    seen: set[str] = set()
    get = bins.get
    # every group a batch moves is judged: this runs for each bucket of each, so it calls no function it can spare
    for bucket in buckets:
        if not first <= bucket[INDEX] <= last:
            continue
        count += bucket[COUNT]
        total += bucket[SUM]
        # min() and max() without the calls: the first of equal values is kept, as they keep it
        smallest, largest = bucket[MIN], bucket[MAX]
        if low is None or smallest < low:
            low = smallest
        if high is None or largest > high:
            high = largest
        sketch = bucket[BINS]
        if sketch:
            # a p95 window merges its 30 buckets' bins: a plain loop costs a third of Counter.update, which
            # checks its argument's type (an ABC) on every call
            for key, times in sketch.items():
                bins[key] = get(key, 0) + times
        if bucket[DISTINCT]:
            seen.update(bucket[DISTINCT])
    return Summary(count, total, low, high, bins, len(seen))


def aggregate(summary: Summary, name: str) -> float | None:
    """The aggregate `name` (sum, avg, min, max, count, distinct, p50 ...) of a window; None when it is empty."""
    if summary.count == 0:
        return None
    if name == "count":
        return float(summary.count)
    if name == "sum":
        return summary.sum
    if name == "avg":
        return summary.sum / summary.count
    if name == "min":
        return summary.min
    if name == "max":
        return summary.max
    if name == "distinct":
        return float(summary.distinct)
    value = quantile(summary.bins, int(name[1:]) / 100)
    # a bin's value may lie a little outside what was seen: the exact extremes bound it
    assert value is not None and summary.min is not None and summary.max is not None
    return min(max(value, summary.min), summary.max)


def quantile(bins: Mapping[str, int], q: float) -> float | None:
    """The value of rank q * (n - 1) among the values the bins hold, within RELATIVE_ACCURACY of it."""
    total = sum(bins.values())
    if total == 0:
        return None
    rank = q * (total - 1)
    try:
        # the usual window: no zero and no negative value, so every bin is an integer (`sketch_key` wrote it
        # with str(), which finds it again below)
        indexes = sorted(map(int, bins))
    except ValueError:
        return _signed_quantile(bins, rank)
    # only the bin the rank falls in is mapped back to a value (a power): a window of an hour holds a few
    # hundred bins. A high quantile is found from the top, where few bins lie above its rank
    if rank * 2 >= total:
        running = total
        for index in reversed(indexes):
            running -= bins[str(index)]
            if running <= rank:
                return MAPPING.value(index)
    else:
        running = 0
        for index in indexes:
            running += bins[str(index)]
            if running > rank:
                return MAPPING.value(index)
    return MAPPING.value(indexes[-1])


def _signed_quantile(bins: Mapping[str, int], rank: float) -> float:
    """`quantile` over bins that hold zero or negative values besides."""
    # the bins in value order: negatives from the largest magnitude, zero, positives
    negatives = sorted(((int(k[1:]), k) for k in bins if k.startswith(NEGATIVE)), reverse=True)
    positives = sorted((int(k), k) for k in bins if k != ZERO and not k.startswith(NEGATIVE))
    running = 0
    for index, key in negatives:
        running += bins[key]
        if running > rank:
            return -MAPPING.value(index)
    running += bins.get(ZERO, 0)
    if running > rank or not positives:
        return 0.0
    for index, key in positives:
        running += bins[key]
        if running > rank:
            return MAPPING.value(index)
    return MAPPING.value(positives[-1][0])
