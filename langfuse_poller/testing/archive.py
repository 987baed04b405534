"""Reading what a jsonl notifier wrote: which event ids arrived, how often, and what is torn.

A process killed mid-write leaves a partial last line, which is counted as torn rather than as an event; the
crash tests, the chaos and failover benchmarks and the standby tests all judge "nothing lost, repeats within
the contract" from these counts.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def read_archive(path: Path) -> tuple[Counter[str], int]:
    """Event ids in a jsonl archive with their number of lines, and the number of torn lines."""
    ids: Counter[str] = Counter()
    torn = 0
    if not path.exists():
        return ids, torn
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            ids[json.loads(line)["id"]] += 1
        except (ValueError, KeyError, TypeError):
            torn += 1
    return ids, torn


def repeats(counts: Counter[str]) -> int:
    """Deliveries beyond the first, summed over ids."""
    return sum(n - 1 for n in counts.values() if n > 1)
