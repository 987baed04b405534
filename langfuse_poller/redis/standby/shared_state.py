"""The poll state in Redis, shared by every replica: watermarks, sweep runs, dedup keys, read paths.

`SharedPollState` is a `PollState` (poll_state.py), as the SQLite `Store` is, so the poll algorithm is the same
code with one replica or several; it also keeps the read paths (`set_read_path`). A transaction collects the
page's writes, then commits in three steps:

1. the events for local targets and the records that cannot be parsed go to this replica's SQLite outbox and
   dead letters, as without standby; with the alert state in Redis (`alert_matches`, what `run` wires), the
   matches of alerting rules (`rule:*`) go instead into the fenced write of step 3 (`alert_state.py`);
2. the events for handlers and notifiers are added as BullMQ jobs in one MULTI, job id = event id, so that
   a re-add (after a crash, or by a deposed leader racing its successor) is a no-op while the job is kept;
3. one Lua script checks the fencing token, then writes the dedup keys (and the alerting matches) and moves
   the watermarks (never backwards). It refuses the whole write when a later token was issued: the replica is deposed.

The heads this replica committed, and its polls' outcomes, are copied into its SQLite afterwards (a copy
only: the alert groups' progress and the service's status line read it there).

The watermark therefore moves only once its events are durably queued; a crash or a takeover between the
steps makes the next leader read the page again, and the dedup keys, or BullMQ's job ids, absorb it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ...errors import StateError
from ...events import Event, RecordOutcome, Seen
from ...poll_state import PollState, PollTransaction, StreamState
from ...store import Store, StoredEvent
from ..queue import QUEUE_TARGET
from .alert_script import match_entry
from .keys import PollerKeys
from .lease import Deposed

log = logging.getLogger(__name__)

# KEYS: token; ARGV: our token, key prefix, JSON list of operations. {1, token} when written, {0, token} when
# a later token was issued (nothing written). Numbers travel as strings: Lua's own number-to-string keeps
# 14 digits, too few for a millisecond timestamp of a far date.
# On a Redis Cluster the keys built from the prefix share the token's slot (keys.py: one hash tag), which is the
# slot Redis routes the script by and the only one it lets the script touch without declaring a key.
COMMIT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then return {0, current} end
local p = ARGV[2]
local function raise(key, field, value)
  local old = redis.call('HGET', key, field)
  if not old or tonumber(old) < tonumber(value) then redis.call('HSET', key, field, value) end
end
for _, op in ipairs(cjson.decode(ARGV[3])) do
  if op.op == 'seen' then
    for i, k in ipairs(op.k) do
      redis.call('HSET', p .. ':seen', k, op.v[i])
      redis.call('ZADD', p .. ':seen-ts:' .. op.s, op.t[i], k)
    end
  elseif op.op == 'match' then
    -- a match of an alerting rule, for the leader's alerter (alert_state.AlertKeys.matches)
    redis.call('RPUSH', p .. ':alert-matches', op.v)
  elseif op.op == 'head' then
    raise(p .. ':stream:' .. op.s, 'head', op.w)
  elseif op.op == 'sweep' then
    raise(p .. ':sweeps:' .. op.s, op.a, op.w)
    if op.ran then redis.call('HSET', p .. ':sweep-runs:' .. op.s, op.a, op.now) end
  elseif op.op == 'count' then
    local key = p .. ':stream:' .. op.s
    redis.call('HINCRBY', key, 'api_requests', op.r)
    redis.call('HINCRBY', key, 'records', op.n)
    redis.call('HINCRBY', key, 'events', op.e)
  elseif op.op == 'poll' then
    local key = p .. ':stream:' .. op.s
    redis.call('HSET', key, 'last_poll_at', op.now)
    if op.error == '' then
      redis.call('HSET', key, 'last_success_at', op.now)
      redis.call('HDEL', key, 'last_error')
    else
      redis.call('HSET', key, 'last_error', op.error, 'last_error_at', op.now)
    end
  end
end
return {1, current}
"""
# KEYS: streams set, stream hash, sweeps hash, token; ARGV: stream, start, our token, ages... Creates what is
# missing, drops tiers no longer configured; a new tier starts at the head (it re-reads what comes from now on).
# Fenced like a commit (0 when a later token was issued): the tiers are the leader's, whose config they follow;
# a standby with other ages must not drop a tier the leader still reads.
ENSURE = """
if redis.call('GET', KEYS[4]) ~= ARGV[3] then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HSETNX', KEYS[2], 'head', ARGV[2])
local head = redis.call('HGET', KEYS[2], 'head')
local wanted = {}
for i = 4, #ARGV do
  wanted[ARGV[i]] = true
  redis.call('HSETNX', KEYS[3], ARGV[i], head)
end
for _, age in ipairs(redis.call('HKEYS', KEYS[3])) do
  if not wanted[age] then redis.call('HDEL', KEYS[3], age) end
end
return 1
"""
# KEYS: seen hash, seen-times zset; ARGV: before, batch. How many were dropped (at most a batch per call).
PRUNE = """
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #old == 0 then return 0 end
redis.call('HDEL', KEYS[1], unpack(old))
redis.call('ZREM', KEYS[2], unpack(old))
return #old
"""
PRUNE_BATCH = 2000
PRUNE_ROUNDS = 50  # 100,000 keys a poll at most; what is left goes at the next poll


def age_field(age: float) -> str:
    """A sweep age as a hash field: one spelling for 60, 60.0 and 6e1."""
    return repr(float(age))


def number(value: float) -> str:
    return repr(float(value))


def _seen_value(seen: Seen) -> str:
    return f"{seen.version}\t{seen.level}"


def _parse_seen(value: str) -> Seen:
    version, _, level = value.partition("\t")
    return Seen(version, level)


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


class SharedTransaction:
    """The writes of one page, collected; `SharedPollState.write` commits them (see the module docstring)."""

    def __init__(self, state: SharedPollState, now: float) -> None:
        self.state = state
        self.now = now
        self.enqueued = 0
        self.ops: list[dict[str, Any]] = []
        self.remembered: dict[str, Seen] = {}
        self.queued: dict[str, Event] = {}
        self.local: list[tuple[Event, list[str]]] = []
        self.bad: list[tuple[str, Any, str]] = []
        self.sweeps: dict[str, dict[float, float]] = {}

    def seen_states(self, keys: Sequence[str]) -> dict[str, Seen]:
        found = self.state.seen_states([key for key in keys if key not in self.remembered])
        found.update({key: self.remembered[key] for key in keys if key in self.remembered})
        return found

    def remember(self, stream: str, outcomes: Iterable[RecordOutcome]) -> None:
        items = list(outcomes)
        if not items:
            return
        self.remembered.update({s.key: s.seen for s in items})
        self.ops.append(
            {
                "op": "seen",
                "s": stream,
                "k": [s.key for s in items],
                "v": [_seen_value(s.seen) for s in items],
                "t": [number(s.timestamp.timestamp()) for s in items],
            }
        )

    def enqueue(self, event: Event, targets: Iterable[str]) -> bool:
        return self.enqueue_many([(event, list(targets))]) == 1

    def enqueue_many(self, routed: Sequence[tuple[Event, Sequence[str]]]) -> int:
        """Collect events: those for the queue become jobs, the rest go to the local outbox. Returns how many
        events this page made (a job id already in the queue is counted too: BullMQ does not say)."""
        added = 0
        for event, targets in routed:
            local = [target for target in dict.fromkeys(targets) if target != QUEUE_TARGET]
            if self.state.alert_matches:
                # with the alert state in Redis, a page's matches are written with its watermark, under the token
                self.ops.extend({"op": "match", "v": match_entry(t, event)} for t in local if t.startswith("rule:"))
                local = [target for target in local if not target.startswith("rule:")]
            if QUEUE_TARGET in targets and event.id not in self.queued:
                self.queued[event.id] = event
            if local:
                self.local.append((event, local))
            added += 1
        self.enqueued += added
        return added

    def add_bad_record(self, stream: str, raw: Any, error: str) -> None:
        self.bad.append((stream, raw, error))

    def sweep_watermarks(self, stream: str) -> dict[float, float]:
        current = self.state.sweep_watermarks(stream)
        for age, watermark in self.sweeps.get(stream, {}).items():
            current[age] = max(current.get(age, watermark), watermark)
        return current

    def set_head(self, stream: str, head: float) -> None:
        self.ops.append({"op": "head", "s": stream, "w": number(head)})

    def set_sweep(self, stream: str, age: float, watermark: float, ran: bool = False) -> None:
        self.sweeps.setdefault(stream, {})[age] = watermark
        op = {"op": "sweep", "s": stream, "a": age_field(age), "w": number(watermark), "ran": ran}
        self.ops.append({**op, "now": number(self.now)})

    def count_poll(self, stream: str, requests: int, records: int, events: int) -> None:
        self.ops.append({"op": "count", "s": stream, "r": requests, "n": records, "e": events})


class SharedPollState:
    """The poll state in Redis, shared by every replica (see the module docstring)."""

    def __init__(
        self,
        client: Any,
        keys: PollerKeys,
        *,
        local: Store | None,
        add_jobs: Callable[[Sequence[tuple[str, str]]], None],
        token: Callable[[], int | None],
        on_deposed: Callable[[int], None] = lambda token: None,
        clock: Callable[[], float] = time.time,
        where: str = "Redis",
        alert_matches: bool = False,
    ) -> None:
        self.client = client
        # the alert state lives in Redis too (alert_state.py): matches of alerting rules go there, not to `local`
        self.alert_matches = alert_matches
        self.keys = keys
        self.local = local
        self.add_jobs = add_jobs
        self.token = token
        self.on_deposed = on_deposed
        self.clock = clock
        self.where = where
        # the token a poll began under (`term`): its pages commit under that token or not at all
        self._term: int | None = None
        self._commit = client.register_script(COMMIT)
        self._ensure = client.register_script(ENSURE)
        self._prune = client.register_script(PRUNE)

    # reads

    def seen_states(self, keys: Sequence[str]) -> dict[str, Seen]:
        if not keys:
            return {}
        values = self._call("read the dedup keys", self.client.hmget, self.keys.seen, list(keys))
        return {key: _parse_seen(value) for key, value in zip(keys, values, strict=True) if value is not None}

    def sweep_watermarks(self, stream: str) -> dict[float, float]:
        raw = self._call("read the sweep watermarks", self.client.hgetall, self.keys.sweeps(stream))
        return {float(age): float(watermark) for age, watermark in raw.items()}

    def stream(self, name: str) -> StreamState | None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(self.keys.stream(name))
        pipe.hgetall(self.keys.sweeps(name))
        fields, sweeps = self._call("read the stream state", pipe.execute)
        if not fields or "head" not in fields:
            return None
        return StreamState(
            name=name,
            head=float(fields["head"]),
            sweeps={float(age): float(watermark) for age, watermark in sweeps.items()},
            last_poll_at=_float(fields.get("last_poll_at")),
            last_success_at=_float(fields.get("last_success_at")),
            last_error=fields.get("last_error"),
            last_error_at=_float(fields.get("last_error_at")),
            api_requests=int(fields.get("api_requests", 0)),
            records=int(fields.get("records", 0)),
            events=int(fields.get("events", 0)),
        )

    def streams(self) -> list[StreamState]:
        names = sorted(self._call("read the streams", self.client.smembers, self.keys.streams))
        return [state for name in names if (state := self.stream(name)) is not None]

    def sweep_last_run(self, stream: str, age: float) -> float | None:
        value = self._call("read a sweep's last run", self.client.hget, self.keys.sweep_runs(stream), age_field(age))
        return _float(value)

    def any_seen(self, stream: str, start: float, end: float) -> bool:
        """Whether any dedup key of `stream` has its record time in [start, end), from the sorted set of the
        stream's keys by time that pruning reads too."""
        count = self._call(
            "read the dedup keys' times",
            self.client.zcount,
            self.keys.seen_times(stream),
            number(start),
            f"({number(end)}",
        )
        return int(count) > 0

    def read_paths(self) -> dict[str, tuple[str, float]]:
        raw = self._call("read the read paths", self.client.hgetall, self.keys.read_paths)
        found: dict[str, tuple[str, float]] = {}
        for stream, text in raw.items():
            path, since = json.loads(text)
            found[stream] = (str(path), float(since))
        return found

    # writes that need no fencing: they only create, or only drop what every watermark has passed

    def ensure_stream(self, name: str, start: float, ages: Sequence[float]) -> None:
        """As the leader: create the shared stream and shape its sweep tiers by this config, under the token. As a
        standby: only seed the local copy of the head (the alert groups' progress), and leave the shared state
        alone, whose tiers follow the leader's config."""
        try:
            token = self._check_token()
        except Deposed:
            if self.local is not None:
                state = self.stream(name)
                self.local.ensure_stream(name, state.head if state is not None else start, ages)
            return
        local = self.local.stream(name) if self.local is not None else None
        if local is not None and local.last_poll_at is not None and self.stream(name) is None:
            # this replica polled the stream before (as leader, or on the SQLite backend), yet Redis has no state
            # for it: Redis lost its data, or the state moves there now. Going on from the head this replica last
            # committed re-reads rather than skips; starting at `[poll] start` could skip records or repeat all
            log.error(
                "%s has no poll state for %s, which this replica last committed up to %s: going on from there",
                self.where,
                name,
                datetime.fromtimestamp(local.head, UTC).isoformat(),
            )
            start = local.head
        keys = [self.keys.streams, self.keys.stream(name), self.keys.sweeps(name), self.keys.token]
        args = [name, number(start), token, *(age_field(age) for age in ages)]
        if not int(self._call("create the stream state", self._ensure, keys=keys, args=args)):
            self.on_deposed(token)
            raise Deposed()
        state = self.stream(name)
        if self.local is not None and state is not None:
            self.local.ensure_stream(name, state.head, ages)

    def prune_seen(self, stream: str, before: float) -> int:
        removed = 0
        for _ in range(PRUNE_ROUNDS):
            keys = [self.keys.seen, self.keys.seen_times(stream)]
            args = [number(before), PRUNE_BATCH]
            dropped = int(self._call("prune the dedup keys", self._prune, keys=keys, args=args))
            removed += dropped
            if dropped < PRUNE_BATCH:
                break
        return removed

    def set_read_path(self, stream: str, path: str, now: float | None = None) -> None:
        since = self.clock() if now is None else now
        self._call("record the read path", self.client.hset, self.keys.read_paths, stream, json.dumps([path, since]))

    # fenced writes

    def record_poll(self, stream: str, *, error: str | None, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        try:
            self._fenced_commit([{"op": "poll", "s": stream, "error": error or "", "now": number(now)}])
        except StateError as exc:
            # what a poll did is for `status`; when Redis is away the poll's own error already says so
            log.warning("the outcome of the poll of %s was not recorded: %s", stream, exc)
            return
        if self.local is not None:
            self.local.record_poll(stream, error=error, now=now)

    @contextmanager
    def leader_term(self) -> Iterator[int]:
        """Pin the token this replica leads under for one poll: what the poll read (dedup keys, watermarks)
        belongs to that term, so if the replica loses the lease and takes it again meanwhile (a new token), the
        rest of the poll is refused rather than committed under the new token over another leader's writes."""
        self._term = self._check_token()
        try:
            yield self._term
        finally:
            self._term = None

    def writers_waiting(self) -> bool:
        # a page's writes are collected, then committed at once: an open transaction holds no lock
        return False

    @contextmanager
    def write(self, now: float | None = None) -> Iterator[SharedTransaction]:
        """Collect a page's writes; on a clean exit, commit them in the order of the module docstring."""
        opened_under = self._check_token()
        tx = SharedTransaction(self, self.clock() if now is None else now)
        yield tx
        # a cheap refusal before anything is written on behalf of a deposed leader, or of an older term
        if self._check_token() != opened_under:
            raise Deposed()
        if tx.local or tx.bad:
            if self.local is None:
                raise StateError("this shared poll state is read-only: it has no local outbox")
            with self.local.write(tx.now) as local:
                local.enqueue_many(tx.local)
                for stream, raw, error in tx.bad:
                    local.add_bad_record(stream, raw, error)
        if tx.queued:
            # raises a retryable DeliveryError when Redis refuses: the poll of this stream fails, the watermark
            # stays, the next poll reads the page again
            self.add_jobs([(event.id, event.to_json()) for event in tx.queued.values()])
        if tx.ops:
            self._fenced_commit(tx.ops)
        self._tell_stored(tx)
        heads = [(op["s"], float(op["w"])) for op in tx.ops if op["op"] == "head"]
        if heads and self.local is not None:
            # the local SQLite keeps a copy of the heads this replica committed: the alert groups measure their
            # progress by it (so a standby's absence rules stand still instead of firing for want of matches),
            # and so does the service's status line
            with self.local.write(tx.now) as local:
                for stream, head in heads:
                    local.set_head(stream, head)

    def _tell_stored(self, tx: SharedTransaction) -> None:
        """The local store's observer (the metrics' event counters) hears of the events queued as jobs too; those
        that also went to the local outbox it heard of from that write."""
        observer = self.local.on_stored if self.local is not None else None
        if observer is None or not tx.queued:
            return
        stored_locally = {event.id for event, _ in tx.local}
        told = [StoredEvent(e.type, e.source, None) for e in tx.queued.values() if e.id not in stored_locally]
        if not told:
            return
        try:
            observer(told)
        except Exception:
            log.exception("an observer of stored events failed")

    def _check_token(self) -> int:
        token = self.token()
        if token is None or (self._term is not None and token != self._term):
            raise Deposed()
        return token

    def _fenced_commit(self, ops: list[dict[str, Any]]) -> None:
        token = self._check_token()
        written, current = self._call(
            "commit the page", self._commit, keys=[self.keys.token], args=[token, self.keys.prefix, json.dumps(ops)]
        )
        if not int(written):
            log.warning("fencing token %d refused: replica with token %s took over; stepping down", token, current)
            self.on_deposed(token)
            raise Deposed()

    def _call(self, what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if isinstance(exc, Deposed):
                raise
            # the poller records this as the stream's error and tries again at the next poll
            raise StateError(f"cannot {what} in {self.where}: {exc or type(exc).__name__}") from None


if TYPE_CHECKING:
    # mypy proves here that this is the poll state the poller reads and writes, as store.Store is
    _state: type[PollState] = SharedPollState
    _transaction: type[PollTransaction] = SharedTransaction
