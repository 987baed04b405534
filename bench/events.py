"""Event making: microseconds per observation record in `EventFactory.from_record` and `events_of`.

    python bench/events.py                        # 2000 traces (10100 records), 20 rounds
    python bench/events.py --traces 5000 --rounds 15 --dump events.txt

The hot path of a catch-up, measured in this process without HTTP or SQLite. The records are the stand-in's
(FakeLangfuse.add_trace, as bench/catchup.py makes them): per trace a root span, a generation with usage and
cost, three spans; one root in 10 an ERROR, one trace in 20 with a WARNING span besides. They are cut to the
fields the reader asks for and pass through JSON, as the API's pages do. Each record comes with what the state
remembers of it: most are new, some were seen at the same version (a lookback's re-read: nothing to make),
some at an older version and level (a root that moved, an error seen before it was one).

Three calls are timed, one after the other in each round so that a busy moment of the machine hits all
alike: `from_record` (a slice that keeps dedup keys), `events_of` (one that keeps none), and `from_record`
with observation.created subscribed. Each round times the records in chunks of a few milliseconds; the
figure is each chunk's minimum over the rounds, summed, which a shared machine's busy moments hardly move.
Ids, times and the states are the same on every run, so `--dump` files of two versions of the code compare
byte for byte.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import machine, table

import langfuse_poller
from langfuse_poller.events import EventFactory, Seen, record_version
from langfuse_poller.langfuse.reader import OBSERVATION_FIELDS
from langfuse_poller.testing.fake_langfuse import OBSERVATION_FIELD_GROUPS, FakeLangfuse

BASE_URL = "https://langfuse.example.com"
# where the made-up traffic starts: fixed, so that every run makes the same records
EPOCH = datetime(2026, 11, 1, tzinfo=UTC)
STREAM = "observations"
# records per timed chunk: a few milliseconds, short enough that some round of each finds the machine quiet
CHUNK = 500
Pair = tuple[dict[str, Any], Seen | None]


@dataclass
class Timing:
    name: str
    call: Callable[[dict[str, Any], Seen | None], object]
    # per round, the seconds of each chunk of records
    runs: list[list[float]] = field(default_factory=list)
    events: int = 0
    records: int = 0

    @property
    def best(self) -> float:
        """Microseconds per record: each chunk's fastest round, summed. A busy moment of a shared machine spoils
        a chunk of one round, seldom the same chunk in every round, so this is steadier than the fastest round."""
        return sum(map(min, zip(*self.runs, strict=True))) / self.records * 1e6

    @property
    def median(self) -> float:
        """Microseconds per record of the median round, whole: what a busy machine makes of it."""
        return sorted(sum(run) for run in self.runs)[len(self.runs) // 2] / self.records * 1e6


@dataclass
class Figures:
    records: int
    new: int
    same: int
    moved: int
    timings: list[Timing]


def make_records(traces: int, seed: int) -> list[Pair]:
    """Observation records as the reader gets them, each with what the state remembers of it (None: new)."""
    ticks = itertools.count()
    # the stand-in stamps createdAt and updatedAt with its clock: a clock of its own calls makes them repeatable
    fake = FakeLangfuse(clock=lambda: EPOCH.timestamp() + next(ticks) / 1000)
    fields = [key for group in OBSERVATION_FIELDS for key in OBSERVATION_FIELD_GROUPS[group]]
    made: list[dict[str, Any]] = []
    for index in range(traces):
        start = EPOCH + timedelta(seconds=index)
        trace_id = f"trace-{index:07d}"
        records = fake.add_trace(
            trace_id=trace_id,
            name=f"app-{index % 7}",
            start_time=start,
            observations=4,
            level="ERROR" if index % 10 == 0 else "DEFAULT",
            user_id=f"user-{index % 50}",
            session_id=f"session-{index % 200}",
            tags=["bench"] if index % 3 else [],
        )
        if index % 20 == 5:
            warning = fake.add_observation(
                trace_id=trace_id,
                start_time=start,
                name="retry",
                level="WARNING",
                status_message="rate limited, retried",
                parent_observation_id=records[0]["id"],
            )
            records.append(warning)
        made.extend(records)
    # the stand-in's ids are random: numbered instead, parents along with them
    ids = {record["id"]: f"obs-{number:08d}" for number, record in enumerate(made)}
    rng = random.Random(seed)
    pairs: list[Pair] = []
    for record in made:
        wire = {key: record[key] for key in fields}
        wire["id"] = ids[wire["id"]]
        wire["parentObservationId"] = ids.get(wire["parentObservationId"])
        wire = orjson.loads(orjson.dumps(wire))
        draw = rng.random()
        previous: Seen | None = None
        if draw >= 0.7:
            version = record_version(wire)
            level = wire["level"] or "DEFAULT"
            # a re-read of an unchanged record, or one that changed (and, if an error now, was not before)
            previous = Seen(version, level) if draw < 0.9 else Seen(str(int(version) - 60_000), "DEFAULT")
        pairs.append((wire, previous))
    return pairs


def timed(call: Callable[[dict[str, Any], Seen | None], object], pairs: Sequence[Pair]) -> list[float]:
    """Seconds of one pass of `call` over every pair, by chunk of CHUNK pairs."""
    took = []
    for offset in range(0, len(pairs), CHUNK):
        chunk = pairs[offset : offset + CHUNK]
        began = time.perf_counter()
        for record, previous in chunk:
            call(record, previous)
        took.append(time.perf_counter() - began)
    return took


def main(argv: Sequence[str] | None = None) -> Figures:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=int, default=2000, help="5 or 6 observation records each (default 2000)")
    parser.add_argument("--rounds", type=int, default=20, help="timed passes of each call (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="which records count as seen before")
    parser.add_argument("--dump", metavar="PATH", help="write every event's JSON here, one per line, in call order")
    args = parser.parse_args(argv)
    pairs = make_records(max(1, args.traces), args.seed)
    plain = EventFactory(BASE_URL)
    subscribed = EventFactory(BASE_URL, lambda: True)
    timings = [
        Timing("from_record", lambda r, p: plain.from_record(STREAM, r, p).events, records=len(pairs)),
        Timing("events_of", lambda r, p: plain.events_of(STREAM, r, p), records=len(pairs)),
        Timing(
            "from_record, observation.created on",
            lambda r, p: subscribed.from_record(STREAM, r, p).events,
            records=len(pairs),
        ),
    ]
    lines: list[str] = []
    for timing in timings:  # one unmeasured pass each, which also counts the events and fills the dump
        for record, previous in pairs:
            events: Any = timing.call(record, previous)
            timing.events += len(events)
            lines.extend(event.to_json() for event in events)
    for _ in range(max(1, args.rounds)):
        for timing in timings:
            timing.runs.append(timed(timing.call, pairs))
    new = sum(previous is None for _, previous in pairs)
    moved = sum(previous is not None and previous.version != record_version(record) for record, previous in pairs)
    figures = Figures(len(pairs), new, len(pairs) - new - moved, moved, timings)
    if args.dump:
        Path(args.dump).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    print(f"events: {machine()}")
    print(f"langfuse_poller from {Path(langfuse_poller.__file__).parent}")
    print(
        f"{figures.records} observation records ({new} new, {figures.same} seen unchanged, {moved} seen at an "
        f"older version), {args.rounds} rounds, interleaved\n"
    )
    rows = [(t.name, t.events, f"{t.best:.3f}", f"{t.median:.3f}") for t in timings]
    print(table(("call", "events", "min µs/record", "median round µs/record"), rows))
    return figures


if __name__ == "__main__":
    main()
