"""The poll algorithm: a head window per stream, sweeps that re-read for late records, bounded catch-up.

The API filters only on start time (scores: timestamp), never on when a record became visible, so a record
can appear late inside a window already read. Each stream therefore keeps, in SQLite:

* a head watermark H: every poll reads [H, now - settle) and moves H to its end;
* one sweep watermark per re-read age A (the `reread` ages, then `lookback`): a sweep reads
  [W_A, min(H, now - A)) and moves W_A to its end. Every instant is thus read by the head and once more at
  each age, so a record that becomes visible up to `lookback` late is still read, and the API cost of the
  re-reads is one extra pass over the data per age, with full pages, however busy the project is. Sweeps run
  every `sweep_interval`, not every poll, so an idle poll costs one request per stream.
* dedup keys (record id, version, level) for every record inside the re-read range, so a record read twice
  yields its events once; they are pruned once every watermark has passed them.

A window is read in slices (oldest first, sized to about 20 pages), each page committed with its events and
dedup keys in one transaction, the slice's last page together with the new watermark. A crash therefore
loses at most the slice in flight, whose re-read the dedup keys make harmless, and memory holds one page.
A slice read long after its end (a catch-up) also moves the sweep watermarks it makes redundant.

The reader serves each stream from its read path (api.py): the cursor lists of `/v2/observations` and
`/v3/scores`, or the page-based lists of self-hosted Langfuse v3 (legacy.py, which explains how a fixed upper
bound per window and a bound that moves down keep shifting pages from losing records). Both yield the same
records, so the windows, watermarks and dedup keys here do not depend on the path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .api import Cancelled, LangfuseReader, Page, utc_from_timestamp
from .config import PollConfig
from .errors import LangfusePollerError
from .events import Event, EventFactory, MalformedRecord, Seen, Synthesis, record_key
from .store import Store, Transaction

log = logging.getLogger(__name__)

TARGET_PAGES_PER_SLICE = 20
MIN_SLICE = 1.0
MAX_SLICE = 86400.0


def prefetched(pages: Iterator[Page]) -> Iterator[Page]:
    """The same pages, the next one requested while the current one is committed.

    The server's time to answer (and the network's) then overlaps the work on the page before, which in a
    catch-up is a third of the run. Errors arrive in order, after the pages before them; a consumer that stops
    early stops the reading at the next page.
    """
    slots: queue.Queue[tuple[Page | None, BaseException | None]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def read() -> None:
        try:
            for page in pages:
                while not stop.is_set():
                    try:
                        slots.put((page, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((None, None))
        except BaseException as exc:  # handed to the consumer, in order
            slots.put((None, exc))

    reader = threading.Thread(target=read, name="prefetch", daemon=True)
    reader.start()
    try:
        while True:
            page, error = slots.get()
            if error is not None:
                raise error
            if page is None:
                return
            yield page
    finally:
        stop.set()
        # the reader may wait to hand over a page nobody will take
        with contextlib.suppress(queue.Empty):
            slots.get_nowait()
        reader.join(timeout=5)
        close = getattr(pages, "close", None)
        if close is not None and not reader.is_alive():
            close()


def quantize(seconds: float) -> float:
    """Window bounds at whole milliseconds, the precision of the API's time filters."""
    return math.floor(seconds * 1000) / 1000


@dataclass
class StreamResult:
    """What one poll of one stream did."""

    stream: str
    requests: int = 0
    records: int = 0
    events: int = 0
    bad_records: int = 0
    error: str | None = None


@dataclass
class PollResult:
    """What one poll of every stream did."""

    streams: list[StreamResult] = field(default_factory=list)

    @property
    def events(self) -> int:
        return sum(s.events for s in self.streams)

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.streams)

    @property
    def errors(self) -> list[str]:
        return [f"{s.stream}: {s.error}" for s in self.streams if s.error]


Router = Callable[[Event], Sequence[str]]


@dataclass
class PreparedPage:
    """A page turned into what its transaction writes."""

    changed: list[Synthesis] = field(default_factory=list)
    routed: list[tuple[Event, Sequence[str]]] = field(default_factory=list)
    bad: list[tuple[Any, Exception]] = field(default_factory=list)


class Poller:
    """Reads every configured stream into the store; see the module docstring for the design."""

    def __init__(
        self,
        poll: PollConfig,
        store: Store,
        reader: LangfuseReader,
        factory: EventFactory,
        router: Router,
        *,
        clock: Callable[[], float] = time.time,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.poll = poll
        self.store = store
        self.reader = reader
        self.factory = factory
        self.router = router
        self.clock = clock
        self.on_commit = on_commit
        self.ages = tuple(age.total_seconds() for age in poll.sweep_ages)
        self._slice = {stream: poll.catchup_slice.total_seconds() for stream in poll.streams}

    def start_streams(self, now: float | None = None) -> None:
        """Create the state of streams seen for the first time, starting where the config says."""
        from .durations import parse_start

        now = self.clock() if now is None else now
        start = quantize(parse_start(self.poll.start, utc_from_timestamp(now)).timestamp())
        for stream in self.poll.streams:
            self.store.ensure_stream(stream, start, self.ages)

    def poll_once(self, now: float | None = None, *, force_sweeps: bool = False) -> PollResult:
        """Poll every stream: the head, then each sweep that is due (all of them with force_sweeps)."""
        result = PollResult()
        for stream in self.poll.streams:
            stream_result = StreamResult(stream)
            result.streams.append(stream_result)
            started = self.reader.requests
            try:
                self.poll_stream(stream, stream_result, self.clock() if now is None else now, force_sweeps)
            except Cancelled:
                raise
            except LangfusePollerError as exc:
                stream_result.error = str(exc)
                log.error("poll of %s failed: %s", stream, exc)
            finally:
                stream_result.requests = self.reader.requests - started
            self.store.record_poll(stream, error=stream_result.error)
        return result

    def poll_stream(self, stream: str, result: StreamResult, now: float, force_sweeps: bool = False) -> None:
        state = self.store.stream(stream)
        if state is None:
            self.start_streams(now)
            state = self.store.stream(stream)
            assert state is not None
        head_end = quantize(now - self.poll.settle.total_seconds())
        if head_end > state.head:
            self.read_window(stream, state.head, head_end, result, head=True)
        for age in self.ages:
            last_run = self.store.sweep_last_run(stream, age)
            if force_sweeps or last_run is None or now - last_run >= self.poll.sweep_interval.total_seconds():
                state = self.store.stream(stream)
                assert state is not None
                start = state.sweeps.get(age, state.head)
                end = quantize(min(state.head, now - age))
                if end > start:
                    self.read_window(stream, start, end, result, head=False, age=age)
                else:
                    with self.store.write() as tx:
                        tx.set_sweep(stream, age, start, ran=True)
        floor = min([state.head, *state.sweeps.values()]) if (state := self.store.stream(stream)) else now
        self.store.prune_seen(stream, floor)

    def read_window(
        self,
        stream: str,
        start: float,
        end: float,
        result: StreamResult,
        *,
        head: bool,
        age: float | None = None,
    ) -> None:
        """Read [start, end) in slices, oldest first, committing page by page; move the watermark(s)."""
        slice_start = start
        while slice_start < end:
            slice_end = min(end, quantize(slice_start + self._slice[stream]))
            if slice_end <= slice_start:
                slice_end = end
            pages = self._read_slice(stream, slice_start, slice_end, result, head=head, age=age)
            self._resize_slice(stream, slice_end - slice_start, pages)
            slice_start = slice_end

    def _resize_slice(self, stream: str, duration: float, pages: int) -> None:
        # aim at ~20 pages a slice: few enough to lose little on a crash, many enough that the slice's
        # last, partly filled page costs under 5% more requests than the minimum. The next slice is sized
        # by the density just read (a backlog is rarely far from even), within a factor of 8 per step
        if pages > TARGET_PAGES_PER_SLICE or (pages < TARGET_PAGES_PER_SLICE // 2 and duration >= self._slice[stream]):
            scale = min(8.0, max(0.25, TARGET_PAGES_PER_SLICE / max(pages, 1)))
            self._slice[stream] = min(MAX_SLICE, max(MIN_SLICE, duration * scale))

    def _read_slice(
        self, stream: str, start: float, end: float, result: StreamResult, *, head: bool, age: float | None
    ) -> int:
        read_at = self.clock()
        pages = 0
        for page in self._pages(stream, utc_from_timestamp(start), utc_from_timestamp(end)):
            pages += 1
            # the events are made before the write transaction opens: the delivery threads, which need the
            # write lock to record what they sent, wait only for the SQL
            prepared = self._prepare_page(stream, page)
            with self.store.write() as tx:
                made = self._commit_page(tx, stream, prepared, end)
                result.records += len(page.records)
                result.events += made
                if page.cursor is None:
                    self._advance(tx, stream, start, end, read_at, head=head, age=age)
                tx.count_poll(stream, 1, len(page.records), made)
            if made:
                self.on_commit()
        return pages

    def _pages(self, stream: str, start: datetime, end: datetime) -> Iterator[Page]:
        pages = self.reader.observations(start, end) if stream == "observations" else self.reader.scores(start, end)
        return prefetched(pages)

    def _prepare_page(self, stream: str, page: Page) -> PreparedPage:
        """The events of a page and their targets, what to remember, and what cannot be parsed."""
        keys = [record_key(stream, record) for record in page.records]
        # a read outside the write transaction is safe: only this poller writes `seen`, one page at a time
        previous = self.store.seen_states([key for key in keys if key])
        prepared = PreparedPage()
        for record, key in zip(page.records, keys, strict=True):
            try:
                if key is None:
                    raise MalformedRecord("the record has no string 'id'")
                synthesis = self.factory.from_record(stream, record, previous.get(key))
            except (MalformedRecord, TypeError, ValueError, KeyError, AttributeError) as exc:
                prepared.bad.append((record, exc))
                continue
            # a record that yields events always comes with a new version or level: one check covers both
            if previous.get(key) != synthesis.seen:
                prepared.changed.append(synthesis)
            for event in synthesis.events:
                targets = self.router(event)
                if targets:
                    prepared.routed.append((event, targets))
        return prepared

    def _commit_page(self, tx: Transaction, stream: str, prepared: PreparedPage, window_end: float) -> int:
        for record, exc in prepared.bad:
            self._keep_bad_record(tx, stream, record, exc, window_end)
        # one statement per table and page: per-row statements cost more than everything else in a catch-up
        tx.remember(stream, prepared.changed)
        return tx.enqueue_many(prepared.routed)

    def _keep_bad_record(self, tx: Transaction, stream: str, record: Any, exc: Exception, window_end: float) -> None:
        raw = json.dumps(record, sort_keys=True, default=str, ensure_ascii=False)
        key = f"x:{stream}:{hashlib.sha256(raw.encode()).hexdigest()[:32]}"
        # a bad record is read again by every sweep: remember it so it becomes one dead letter, not several.
        # Its own time may be what is broken; the window's end is no earlier, so the key outlives every re-read.
        if tx.seen_states([key]):
            return
        tx.remember(stream, [Synthesis(key, utc_from_timestamp(window_end), Seen("bad"), ())])
        tx.add_bad_record(stream, raw, f"{type(exc).__name__}: {exc}")
        log.warning("a %s record could not be parsed (%s); kept as a dead letter", stream, exc)

    def _advance(
        self,
        tx: Transaction,
        stream: str,
        start: float,
        end: float,
        read_at: float,
        *,
        head: bool,
        age: float | None,
    ) -> None:
        if head:
            tx.set_head(stream, end)
        for tier_age, watermark in tx.sweep_watermarks(stream).items():
            if tier_age == age:
                tx.set_sweep(stream, tier_age, end, ran=True)
            elif watermark >= start:
                # this read already saw [start, end) at an age beyond the tier's: no need to read it again
                reach = min(end, quantize(read_at - tier_age))
                if reach > watermark:
                    tx.set_sweep(stream, tier_age, reach)
