"""The poll algorithm: a head window per stream, sweeps that re-read for late records, bounded catch-up.

The API filters only on start time (scores: timestamp), never on when a record became visible, so a record
can appear late inside a window already read. Each stream therefore keeps, in its poll state (poll_state.py:
SQLite, or Redis with standby pollers):

* a head watermark H: every poll reads [H, now - settle) and moves H to its end;
* one sweep watermark per re-read age A (the `reread` ages, then `lookback`): a sweep reads
  [W_A, min(H, now - A)) and moves W_A to its end. Every instant is thus read by the head and once more at
  each age, so a record that becomes visible up to `lookback` late is still read, and the API cost of the
  re-reads is one extra pass over the data per age, with full pages, however busy the project is. Sweeps run
  every `sweep_interval`, not every poll. On a quiet stream (recent head reads found well under a page) the
  head's read starts at the oldest due sweep's watermark instead, so one request serves the head and the due
  sweeps, and an idle poll costs one request per stream.
* dedup keys (record id, version, level) for every record that a later read can read again, so a record read
  twice yields its events once; they are pruned once every watermark has passed them. A slice that every
  watermark passes once it is read (a catch-up, the lookback sweep) needs none.

A window is read in slices (oldest first, sized to about 20 pages), its pages committed with their events and
dedup keys a few at a time, the slice's last page together with the new watermark. A crash therefore loses at
most the slice in flight, whose re-read the event ids (unique in the outbox) and the dedup keys make harmless,
and memory holds one page. A slice read long after its end (a catch-up) also moves the sweep watermarks it
makes redundant.

The reader serves each stream from its read path (langfuse/reader.py): the cursor lists of `/v2/observations` and
`/v3/scores`, or the page-based lists of self-hosted Langfuse v3 (langfuse/legacy.py, which explains how a fixed upper
bound per window and a bound that moves down keep shifting pages from losing records). Both yield the same
records, so the windows, watermarks and dedup keys here do not depend on the path.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .config import PollConfig
from .errors import LangfusePollerError
from .events import Event, EventFactory, MalformedRecord, RecordOutcome, Seen, record_key
from .langfuse.reader import Cancelled, LangfuseReader, Page, utc_from_timestamp
from .poll_state import PollState, PollTransaction, StreamState

log = logging.getLogger(__name__)

TARGET_PAGES_PER_SLICE = 20
MIN_SLICE = 1.0
MAX_SLICE = 86400.0
# how many pages of a slice, at most, one write transaction holds, and for how long
COMMIT_PAGES = 10
COMMIT_SECONDS = 0.5
# how long a slice's open transaction waits for the next page before it commits
PAGE_WAIT = 0.05
# a stream whose head reads found at most this many records since the oldest due sweep's watermark is quiet:
# its head and due sweeps are read with one request (half the smallest page, 100 scores or legacy records)
QUIET_RECORDS = 50
RECENT_READS = 1000


def prefetched(pages: Iterator[Page], on_wait: Callable[[], None] | None = None) -> Iterator[Page]:
    """The same pages, the next one requested while the current one is committed.

    The server's time to answer (and the network's) then overlaps the work on the page before, which in a
    catch-up is a third of the run. Errors arrive in order, after the pages before them; a consumer that stops
    early stops the reading at the next page. `on_wait` is called (in the consumer's thread) when the next
    page is not there within PAGE_WAIT: the consumer commits what it holds instead of keeping the write lock
    through a slow answer or a rate-limit pause.
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
            try:
                page, error = slots.get(timeout=PAGE_WAIT)
            except queue.Empty:
                if on_wait is not None:
                    on_wait()
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
        # the reader's lists are generators, whose close() ends the read where the consumer stopped, but they are
        # declared (and tested) as plain iterators, which have none
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


# an event's delivery targets: `registry.Router.targets`, as the poller sees it
TargetsOf = Callable[[Event], Sequence[str]]
# told of every event a page made (routed or not), each with what the poll state remembered of its record before,
# and the keys already told in this slice: returns what to do once those events are durable (service/usage.py
# counts them). The poller calls what it returns only after the commit that makes a re-read yield them no more
MadeObserver = Callable[[Sequence[tuple[Event, Seen | None]], set[str]], Callable[[], None]]


@dataclass
class PreparedPage:
    """A page turned into what its transaction writes."""

    changed: list[RecordOutcome] = field(default_factory=list)
    routed: list[tuple[Event, Sequence[str]]] = field(default_factory=list)
    bad: list[tuple[Any, Exception]] = field(default_factory=list)
    # every event made, with its record's previous state: only when the poller has a MadeObserver
    made: list[tuple[Event, Seen | None]] = field(default_factory=list)


class PageGroup:
    """Consecutive pages of a slice written in one transaction, opened by the first of them.

    Each commit writes every B-tree page its inserts touched, and the event ids (by their hash) land at random
    places in their index: one commit per page rewrote most of that index's touched pages once per page. The
    slice's watermark still moves with its last page, so what a crash loses is the same.
    """

    def __init__(self, store: PollState, on_commit: Callable[[], None], *, hold: bool = False) -> None:
        self.store = store
        self.on_commit = on_commit
        # what to do once the pages' events are durable (see MadeObserver): after each commit, or, with `hold`
        # (a slice that keeps no dedup keys, whose re-read after a failure makes its events again), only once the
        # slice's last commit moved the watermark past it (`release`)
        self.hold = hold
        self._staged: list[Callable[[], None]] = []
        self._held: list[Callable[[], None]] = []
        self._open: contextlib.ExitStack | None = None
        self._tx: PollTransaction | None = None
        self._opened = 0.0
        self._pages = 0
        self._made = 0

    def transaction(self) -> PollTransaction:
        """The open transaction, opened now if there is none."""
        if self._open is None or self._tx is None:
            self._open = contextlib.ExitStack()
            self._tx = self._open.enter_context(self.store.write())
            self._opened, self._pages, self._made = time.monotonic(), 0, 0
        return self._tx

    def added(self, made: int, then: Callable[[], None] | None = None) -> None:
        """Count a page written into the open transaction, which made `made` new events; `then` runs once they
        are durable."""
        self._pages += 1
        self._made += made
        if then is not None:
            self._staged.append(then)

    def full(self) -> bool:
        # a webhook waiting to be stored goes first: its sender gives up within a second
        return (
            self._pages >= COMMIT_PAGES
            or time.monotonic() - self._opened >= COMMIT_SECONDS
            or self.store.writers_waiting()
        )

    def commit(self) -> None:
        """Commit the open transaction, if any, and tell the delivery of new events."""
        if self._open is None:
            return
        group, self._open, self._tx = self._open, None, None
        group.close()
        staged, self._staged = self._staged, []
        if self.hold:
            self._held.extend(staged)
        else:
            _run(staged)
        if self._made:
            self.on_commit()

    def release(self) -> None:
        """The slice's last page committed: what `hold` kept back runs now."""
        held, self._held = self._held, []
        _run(held)

    def abort(self) -> None:
        """Roll the open transaction back (the slice failed; its re-read comes later)."""
        # the re-read that follows makes these events again
        self._staged, self._held = [], []
        if self._open is None:
            return
        group, self._open, self._tx = self._open, None, None
        group.__exit__(*sys.exc_info())


def _run(actions: Sequence[Callable[[], None]]) -> None:
    for action in actions:
        try:
            action()
        except Exception:
            # the events are committed: an observer's failure must not fail the poll, which would read them again
            log.exception("an observer of the events made failed")


class Poller:
    """Reads every configured stream into the store; see the module docstring for the design."""

    def __init__(
        self,
        poll: PollConfig,
        store: PollState,
        reader: LangfuseReader,
        factory: EventFactory,
        router: TargetsOf,
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
        self.on_made: MadeObserver | None = None
        self.ages = tuple(age.total_seconds() for age in poll.sweep_ages)
        self._slice = {stream: poll.catchup_slice.total_seconds() for stream in poll.streams}
        # (start, end, records) of each stream's recent head reads, oldest first
        self._recent_reads: dict[str, collections.deque[tuple[float, float, int]]] = {}

    def start_streams(self, now: float | None = None) -> None:
        """Create the state of streams seen for the first time, starting where the config says."""
        from .util.durations import parse_start

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
        due = [age for age in self.ages if force_sweeps or self._sweep_due(stream, age, now)]
        head_end = quantize(now - self.poll.settle.total_seconds())
        start = self._merged_start(stream, state, due, head_end)
        if head_end > start:
            before = result.records
            self.read_window(stream, start, head_end, result, head=True)
            self._note_head_read(stream, start, head_end, result.records - before)
        for age in due:
            state = self.store.stream(stream)
            assert state is not None
            start = state.sweeps.get(age, state.head)
            end = quantize(min(state.head, now - age))
            if end > start:
                self.read_window(stream, start, end, result, head=False, age=age)
            else:
                # nothing left to re-read, for instance because the head's read covered this tier's window
                with self.store.write() as tx:
                    tx.set_sweep(stream, age, start, ran=True)
        floor = min([state.head, *state.sweeps.values()]) if (state := self.store.stream(stream)) else now
        self.store.prune_seen(stream, floor)

    def _sweep_due(self, stream: str, age: float, now: float) -> bool:
        last_run = self.store.sweep_last_run(stream, age)
        return last_run is None or now - last_run >= self.poll.sweep_interval.total_seconds()

    def _merged_start(self, stream: str, state: StreamState, due: Sequence[float], head_end: float) -> float:
        """Where the head read starts: at the head, or, on a quiet stream, at the oldest due sweep's watermark.

        On a stream that recent head reads found nearly empty, the due sweeps' windows and the head's fit one
        page together: one request from the oldest due watermark to the head's end reads all of them, and
        `_advance` moves the sweep watermarks it covered, so the sweeps then find nothing left to read. An idle
        project thus costs one request per stream per poll. On a busier stream the windows stay apart: merged,
        they would re-read the sweeps' older pages at every poll instead of every `sweep_interval`.
        """
        if not due or head_end <= state.head:
            return state.head
        start = min(state.sweeps.get(age, state.head) for age in due)
        recent = self._recent_reads.get(stream)
        if start >= state.head or not recent or recent[0][0] > start or head_end - start > self._slice[stream]:
            # nothing to merge, or no head reads known back to `start` (a fresh start): read apart
            return state.head
        found = sum(records for _, end, records in recent if end > start)
        return start if found <= QUIET_RECORDS else state.head

    def _note_head_read(self, stream: str, start: float, end: float, records: int) -> None:
        """Remember what a head read of [start, end) found, for `_merged_start`, as long as a sweep can need it."""
        recent = self._recent_reads.setdefault(stream, collections.deque(maxlen=RECENT_READS))
        if recent and recent[-1][1] != start:
            recent.clear()  # a read that failed half way: what came before no longer adjoins
        recent.append((start, end, records))
        state = self.store.stream(stream)
        oldest = min(state.sweeps.values(), default=end) if state is not None else end
        while len(recent) > 1 and recent[1][0] <= oldest:
            recent.popleft()

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
        state = self.store.stream(stream)
        # a slice that every tier will have passed once it is read (a catch-up, the lookback sweep) is never
        # read again, so its records need no dedup keys: they would only be written to be pruned. Should the
        # slice be cut short (a crash, an error), its re-read makes the same created events, which the outbox
        # ignores by id, and a record changed in between is missed as it would be without the crash: no read
        # of this slice comes after it
        keep_keys = state is None or any(
            _watermark_after(tier, watermark, start, end, read_at, age) < end
            for tier, watermark in state.sweeps.items()
        )
        # nor, when no key lies in the slice (its first read: no earlier read of it kept any), does it need to
        # look keys up
        look_up = keep_keys or self.store.any_seen(stream, start, end)
        pages = 0
        # consecutive pages share a write transaction (see PageGroup); it is committed when the slice ends, when
        # it holds COMMIT_PAGES pages or is COMMIT_SECONDS old, and before a wait for the next page
        group = PageGroup(self.store, self.on_commit, hold=not keep_keys)
        # the keys of the events told to `on_made` in this slice: a record served twice is told once
        told: set[str] = set()
        try:
            pages_read = self._pages(stream, utc_from_timestamp(start), utc_from_timestamp(end), group.commit)
            for page in pages_read:
                pages += 1
                if self.store.writers_waiting():
                    group.commit()  # before this page's work, not after it
                prepared = self._prepare_page(stream, page, keep_keys=keep_keys, look_up=look_up)
                tx = group.transaction()
                then = self.on_made(prepared.made, told) if self.on_made is not None and prepared.made else None
                made = self._commit_page(tx, stream, prepared, end)
                result.records += len(page.records)
                result.events += made
                if page.cursor is None:
                    self._advance(tx, stream, start, end, read_at, head=head, age=age)
                tx.count_poll(stream, 1, len(page.records), made)
                group.added(made, then)
                if page.cursor is None or group.full():
                    group.commit()
        except BaseException:
            group.abort()
            raise
        group.release()
        return pages

    def _pages(
        self, stream: str, start: datetime, end: datetime, on_wait: Callable[[], None] | None = None
    ) -> Iterator[Page]:
        pages = self.reader.observations(start, end) if stream == "observations" else self.reader.scores(start, end)
        return prefetched(pages, on_wait)

    def _prepare_page(self, stream: str, page: Page, *, keep_keys: bool = True, look_up: bool = True) -> PreparedPage:
        """The events of a page and their targets, what to remember (when `keep_keys`), and what cannot be
        parsed. `look_up` False: no record of the page has a dedup key."""
        keys = [record_key(stream, record) for record in page.records]
        # only this poller writes `seen`: what it reads is what its own transaction (if one is open) wrote
        previous = self.store.seen_states([key for key in keys if key]) if look_up else {}
        prepared = PreparedPage()
        factory, router = self.factory, self.router
        made = prepared.made if self.on_made is not None else None
        for record, key in zip(page.records, keys, strict=True):
            try:
                if key is None:
                    raise MalformedRecord("the record has no string 'id'")
                seen = previous.get(key)
                if keep_keys:
                    outcome = factory.from_record(stream, record, seen)
                    # a record that yields events always comes with a new version or level: one check covers both
                    if seen != outcome.seen:
                        prepared.changed.append(outcome)
                    events = outcome.events
                else:
                    # nothing of the record is remembered: most observations then cost no parse of their version
                    events = factory.events_of(stream, record, seen)
            except (MalformedRecord, TypeError, ValueError, KeyError, AttributeError) as exc:
                prepared.bad.append((record, exc))
                continue
            for event in events:
                targets = router(event)
                if targets:
                    prepared.routed.append((event, targets))
                if made is not None:
                    made.append((event, seen))
        return prepared

    def _commit_page(self, tx: PollTransaction, stream: str, prepared: PreparedPage, window_end: float) -> int:
        for record, exc in prepared.bad:
            self._keep_bad_record(tx, stream, record, exc, window_end)
        # one statement per table and page: per-row statements cost more than everything else in a catch-up
        if prepared.changed:
            tx.remember(stream, prepared.changed)
        return tx.enqueue_many(prepared.routed)

    def _keep_bad_record(
        self, tx: PollTransaction, stream: str, record: Any, exc: Exception, window_end: float
    ) -> None:
        raw = json.dumps(record, sort_keys=True, default=str, ensure_ascii=False)
        key = f"x:{stream}:{hashlib.sha256(raw.encode()).hexdigest()[:32]}"
        # a bad record is read again by every sweep: remember it so it becomes one dead letter, not several.
        # Its own time may be what is broken; the window's end is no earlier, so the key outlives every re-read.
        if tx.seen_states([key]):
            return
        tx.remember(stream, [RecordOutcome(key, utc_from_timestamp(window_end), Seen("bad"), ())])
        tx.add_bad_record(stream, raw, f"{type(exc).__name__}: {exc}")
        log.warning("a %s record could not be parsed (%s); kept as a dead letter", stream, exc)

    def _advance(
        self,
        tx: PollTransaction,
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
            elif (reach := _watermark_after(tier_age, watermark, start, end, read_at, age)) > watermark:
                tx.set_sweep(stream, tier_age, reach)


def _watermark_after(
    tier_age: float, watermark: float, start: float, end: float, read_at: float, age: float | None
) -> float:
    """Where a read of [start, end) at `read_at` (by the sweep tier `age`, or the head) leaves the watermark of
    the sweep tier `tier_age`."""
    if tier_age == age:
        return max(watermark, end)
    if watermark >= start:
        # this read already saw [start, end) at an age beyond the tier's: no need to read it again
        return max(watermark, min(end, quantize(read_at - tier_age)))
    return watermark
