"""The alert state in Redis, for standby pollers: groups, their matches and their notifications survive the leader.

With `[queue] standby = true` the alerter's `AlertStore` (alerting/state.py) is `RedisAlertStore`, beside the shared
watermarks. What lives where, under `<prefix>` = `PollerKeys.prefix`:

* `<prefix>:alert-groups` (hash: JSON [rule, key] -> the group, every dataclass field of it) and
  `<prefix>:alert-due` (sorted set: the same field by `next_at`, so a tick finds the due groups in one range read),
  `<prefix>:alert-states` (hash: the same field -> the group's state, so counting them for status and the metrics
  parses no window of a measuring group). The keys and the fenced script that writes them: `alert_script.py`.
* `<prefix>:alert-matches` (list of {target, event}): the matches of alerting rules. The poller pushes a page's
  matches in the fenced script that moves its watermark (`shared_state.COMMIT`), so a page's matches exist exactly
  when its watermark moved; the webhook receiver of any replica appends its own. The leader's `tick` takes them
  and records them into their groups in one fenced write.
* `<prefix>:alert-outbox` (hash: event id -> {event, targets not yet reached, attempts, error}) with
  `<prefix>:alert-outbox-due` (sorted set by when to try next), and `<prefix>:alert-dead` (list): the
  notifications. They are written in the same fenced script as the group state that sends them, and the
  leader's notifiers send them from there (`send_notices`), with the backoff and `max_attempts` of `[delivery]`;
  a notification that keeps failing ends in the dead list.

Why a fenced outbox in Redis rather than BullMQ jobs for the notifications: a job's id and data are the event
alone, the queue's workers route it again by the rules (an alert goes to the notifiers its rule named, and a
resolve to those that were told, which the worker cannot know), and Node.js consumers of the queue would start
receiving alerts. The outbox keeps the notifiers where they are today with the Redis backend (in the poller),
and keeps the one guarantee that matters across a takeover: the group and its notification are written
together, under the token, so a notification is never lost with a dead leader nor made by a deposed one.

Every write checks the fencing token first, as COMMIT does (`APPLY`): a replica paused past its lease that
wakes up has its write refused whole, and nothing in Redis changes. Sending is not fenced (an HTTP request
cannot be): a leader killed between a send and its record sends that notification again from the next leader,
so a takeover repeats at most one notification per group, never more.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...alerting.groups import Group
from ...alerting.state import AlertState, AlertStore, AlertTransaction, group_from_json, group_to_json
from ...config import DeliveryConfig, QueueConfig
from ...errors import DeliveryError, StateError
from ...events import Event
from ...notifiers.base import Notifier
from ...store import Store
from .alert_script import APPLY, AlertKeys, first_of_each_group, group_field, match_entry, notice_group, number
from .keys import PollerKeys
from .lease import Deposed

log = logging.getLogger(__name__)

# matches taken by one tick at most; the rest wait for the next
MATCH_BATCH = 5000
# notifications sent by one tick at most
NOTICE_BATCH = 100


# the states of an open group: what status shows and a standby would take over
OPEN = ("firing", "pending")


def _order(groups: Iterable[Group]) -> list[Group]:
    return sorted(groups, key=lambda g: (g.rule, g.key))


class RedisAlertState:
    """The alert groups in Redis, as one transaction sees them: Redis, overlaid with that transaction's own writes
    (`pending`: field -> the group, None when deleted). Without a transaction, a plain read."""

    def __init__(self, store: RedisAlertStore, tx: RedisAlertTransaction | None = None) -> None:
        self._store = store
        self._keys = store.keys
        self._tx = tx
        self._pending: dict[str, Group | None] = tx.pending if tx is not None else {}
        self._writable = tx is not None

    def _all(self) -> dict[str, Group]:
        raw: dict[str, str] = self._store.call("read the alert groups", self._store.client.hgetall, self._keys.groups)
        found = {field: group_from_json(text) for field, text in raw.items()}
        for field, group in self._pending.items():
            if group is None:
                found.pop(field, None)
            else:
                found[field] = group
        return found

    def _states(self) -> dict[str, str]:
        """Field -> state of every group, from the small states index (a group's window is not parsed)."""
        pipe = self._store.client.pipeline(transaction=False)
        pipe.hgetall(self._keys.states)
        pipe.hlen(self._keys.groups)
        states, stored = self._store.call("read the alert groups' states", pipe.execute)
        if len(states) < int(stored):
            # groups written before the index existed: read whole, until each is written again
            return {field: group.state for field, group in self._all().items()}
        for field, group in self._pending.items():
            if group is None:
                states.pop(field, None)
            else:
                states[field] = group.state
        return dict(states)

    def _read(self, fields: Sequence[str]) -> dict[str, Group]:
        """These groups, this transaction's writes included; a field with no group is left out."""
        found = {f: g for f in fields if f in self._pending and (g := self._pending[f]) is not None}
        stored = [field for field in fields if field not in self._pending]
        if stored:
            client = self._store.client
            texts = self._store.call("read alert groups", client.hmget, self._keys.groups, stored)
            found.update({f: group_from_json(t) for f, t in zip(stored, texts, strict=True) if t is not None})
        return found

    def group(self, rule: str, key: str) -> Group | None:
        field = group_field(rule, key)
        if field in self._pending:
            return self._pending[field]
        text = self._store.call("read an alert group", self._store.client.hget, self._keys.groups, field)
        return None if text is None else group_from_json(text)

    def groups(self) -> list[Group]:
        return _order(self._all().values())

    def due(self, now: float) -> list[Group]:
        client = self._store.client
        fields = self._store.call("read the due alert groups", client.zrangebyscore, self._keys.due, "-inf", now)
        found = self._read([field for field in fields if field not in self._pending])
        for field, group in self._pending.items():
            if group is not None and group.next_at is not None and group.next_at <= now:
                found[field] = group
        return _order(found.values())

    def open_groups(self) -> list[Group]:
        fields = [field for field, state in self._states().items() if state in OPEN]
        return _order(group for group in self._read(fields).values() if group.state in OPEN)

    def any_due(self, now: float) -> bool:
        if self._pending:
            return bool(self.due(now))
        count = self._store.call("read the due alert groups", self._store.client.zcount, self._keys.due, "-inf", now)
        return int(count) > 0

    def next_due_after(self, now: float) -> float | None:
        # the stored earliest, past those this transaction changed (their next look is the one it holds)
        client, pending = self._store.client, self._pending
        stored = self._store.call(
            "read the due alert groups",
            client.zrangebyscore,
            self._keys.due,
            f"({now!r}",
            "+inf",
            start=0,
            num=len(pending) + 1,
            withscores=True,
        )
        later = [float(at) for field, at in stored if field not in pending]
        later += [g.next_at for g in pending.values() if g is not None and g.next_at is not None and g.next_at > now]
        return min(later) if later else None

    def firing_count(self) -> int:
        return sum(1 for state in self._states().values() if state == "firing")

    def counts(self) -> list[tuple[str, str, int]]:
        tally: dict[tuple[str, str], int] = {}
        for field, state in self._states().items():
            rule = json.loads(field)[0]
            tally[(rule, state)] = tally.get((rule, state), 0) + 1
        return [(rule, state, count) for (rule, state), count in sorted(tally.items())]

    def save(self, group: Group) -> None:
        if not self._writable:
            raise StateError("the alert groups read outside a transaction cannot be written")
        if group.state == "resolved":
            self.delete(group.rule, group.key)
            return
        self._pending[group_field(group.rule, group.key)] = group

    def delete(self, rule: str, key: str) -> None:
        if not self._writable:
            raise StateError("the alert groups read outside a transaction cannot be written")
        self._pending[group_field(rule, key)] = None

    def group_count(self, rule: str) -> int:
        client, where = self._store.client, self._keys.rule_groups(rule)
        count = int(self._store.call("count a rule's alert groups", client.scard, where))
        mine = [(field, group) for field, group in self._pending.items() if json.loads(field)[0] == rule]
        if mine:
            stored = self._store.call("count a rule's alert groups", client.smismember, where, [f for f, _ in mine])
            for (_, group), there in zip(mine, stored, strict=True):
                count += (group is not None) - bool(there)
        return count

    def rule_started(self, rule: str) -> float | None:
        if self._tx is not None and rule in self._tx.started:
            return self._tx.started[rule]
        if self._tx is not None and rule in self._tx.dropped:
            return None
        found = self._store.call("read when a rule first ran", self._store.client.hget, self._keys.rules, rule)
        return None if found is None else float(found)

    def start_rule(self, rule: str, at: float) -> None:
        tx = self._writer()
        if self.rule_started(rule) is None:
            tx.started[rule] = at
            tx.rule_ops.append({"op": "start", "r": rule, "at": number(at)})

    def seen_values(self, rule: str, keys: Sequence[str]) -> dict[str, float]:
        seen: dict[str, float] = {}
        if keys and (self._tx is None or rule not in self._tx.dropped):
            found = self._store.call(
                "read a rule's known values", self._store.client.hmget, self._keys.values(rule), list(keys)
            )
            seen = {key: float(ts) for key, ts in zip(keys, found, strict=True) if ts is not None}
        mine = self._tx.seen.get(rule, {}) if self._tx is not None else {}
        for key in keys:
            if key in mine:
                seen[key] = max(seen.get(key, mine[key]), mine[key])
        return seen

    def see_values(self, rule: str, seen: Mapping[str, float]) -> None:
        tx = self._writer()
        if seen:
            mine = tx.seen.setdefault(rule, {})
            for key, ts in seen.items():
                mine[key] = max(mine.get(key, ts), ts)
            tx.rule_ops.append({"op": "see", "r": rule, "k": list(seen), "v": [number(ts) for ts in seen.values()]})

    def forget_values(self, rule: str, before: float) -> int:
        tx = self._writer()
        where = self._keys.values(rule) + ":by-time"
        count = int(
            self._store.call("read a rule's known values", self._store.client.zcount, where, "-inf", f"({before!r}")
        )
        tx.rule_ops.append({"op": "forget", "r": rule, "before": number(before)})
        return count

    def kept_rules(self) -> list[str]:
        # every rule that knows values has its first run recorded first (`start_rule`)
        kept = set(self._store.call("read the rules' state", self._store.client.hkeys, self._keys.rules))
        if self._tx is not None:
            kept = (kept - self._tx.dropped) | set(self._tx.started)
        return sorted(kept)

    def forget_rule(self, rule: str) -> None:
        tx = self._writer()
        tx.started.pop(rule, None)
        tx.seen.pop(rule, None)
        tx.dropped.add(rule)
        tx.rule_ops.append({"op": "drop", "r": rule})

    def _writer(self) -> RedisAlertTransaction:
        if self._tx is None:
            raise StateError("the alert state read outside a transaction cannot be written")
        return self._tx


class RedisAlertTransaction:
    """One change of the alert state in Redis, collected, then written by `APPLY` under the token."""

    def __init__(self, store: RedisAlertStore, now: float) -> None:
        self.store = store
        self.now = now
        self.pending: dict[str, Group | None] = {}
        self.notices: dict[str, tuple[Event, list[str]]] = {}
        self.taken = 0
        self._oldest: dict[str, float] | None = None
        # new_value rules' state: first runs and sightings this transaction wrote, and its writes, in order
        self.started: dict[str, float] = {}
        self.seen: dict[str, dict[str, float]] = {}
        self.dropped: set[str] = set()  # rules forgotten: what Redis still holds of them is not read
        self.rule_ops: list[dict[str, Any]] = []
        self._state = RedisAlertState(store, self)

    @property
    def alert_state(self) -> AlertState:
        return self._state

    def enqueue(self, event: Event, targets: Iterable[str]) -> bool:
        # an id already in the outbox is kept as it is (HSETNX): the same notification is not sent twice
        if event.id in self.notices:
            return False
        self.notices[event.id] = (event, list(dict.fromkeys(targets)))
        return True

    def heads(self) -> list[tuple[str, float]]:
        keys, client = self.store.keys.poller, self.store.client
        names = sorted(self.store.call("read the streams", client.smembers, keys.streams))
        found = []
        for name in names:
            head = self.store.call("read a stream's head", client.hget, keys.stream(name), "head")
            if head is not None:
                found.append((name, float(head)))
        return found

    def oldest_pending_ts(self, target: str) -> float | None:
        if self._oldest is None:
            # once per transaction, and of one batch at most: past it, progress is held back by the batch anyway
            rest = self.store.call(
                "read the waiting matches",
                self.store.client.lrange,
                self.store.keys.matches,
                self.taken,
                self.taken + MATCH_BATCH - 1,
            )
            self._oldest = {}
            for item in map(json.loads, rest):
                ts = Event.from_json(item["e"]).timestamp.timestamp()
                self._oldest[item["t"]] = min(self._oldest.get(item["t"], ts), ts)
        return self._oldest.get(target)

    def matches(self) -> list[tuple[str, list[Event]]]:
        items = self.store.call(
            "read the waiting matches", self.store.client.lrange, self.store.keys.matches, 0, MATCH_BATCH - 1
        )
        self.taken = len(items)
        self._oldest = None
        by_target: dict[str, list[Event]] = {}
        for text in items:
            item = json.loads(text)
            by_target.setdefault(item["t"], []).append(Event.from_json(item["e"]))
        return list(by_target.items())

    def ops(self) -> list[dict[str, Any]]:
        """What `APPLY` writes: the groups, the matches taken, the notifications (in the order they were made)."""
        ops: list[dict[str, Any]] = []
        for field, group in self.pending.items():
            rule = json.loads(field)[0]
            if group is None:
                ops.append({"op": "del", "f": field, "r": rule})
            else:
                due = "" if group.next_at is None else number(group.next_at)
                ops.append(
                    {"op": "save", "f": field, "r": rule, "v": group_to_json(group), "s": group.state, "due": due}
                )
        ops.extend(self.rule_ops)
        if self.taken:
            ops.append({"op": "take", "n": self.taken})
        for event, targets in self.notices.values():
            entry = {"e": event.to_json(), "t": targets, "n": 0, "err": None}
            # due at once; equal times are sent in the order of their ids, which puts a group's `rule.firing`
            # before the `rule.resolved` made with it
            ops.append({"op": "notice", "id": event.id, "v": json.dumps(entry), "at": number(self.now)})
        return ops


class RedisAlertStore:
    """The `AlertStore` of standby pollers (see the module docstring). `token` is the replica's fencing token
    (None while it stands by); `on_deposed` is told when a write was refused for a later token."""

    def __init__(
        self,
        client: Any,
        keys: PollerKeys,
        *,
        token: Callable[[], int | None],
        delivery: DeliveryConfig,
        on_deposed: Callable[[int], None] = lambda token: None,
        clock: Callable[[], float] = time.time,
        where: str = "Redis",
        local: Store | None = None,
    ) -> None:
        self.client = client
        self.keys = AlertKeys(keys)
        # this replica's SQLite, whose groups (kept there before the alert state moved to Redis) it hands over
        self.local = local
        self._adopted_in: int | None = None
        self.token = token
        self.delivery = delivery
        self.on_deposed = on_deposed
        self.clock = clock
        self.where = where
        self.targets: Mapping[str, Notifier] = {}
        self._apply = client.register_script(APPLY)

    def call(self, what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A Redis call; its failure as a StateError that says what could not be done, and where."""
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            raise StateError(f"cannot {what} in {self.where}: {exc or type(exc).__name__}") from None

    # AlertStore

    @contextmanager
    def write(self, now: float | None = None) -> Iterator[AlertTransaction]:
        token = self.token()
        if token is None:
            raise Deposed()
        if self.local is not None and self._adopted_in != token:
            self._adopt(token)
            self._adopted_in = token
        tx = RedisAlertTransaction(self, self.clock() if now is None else now)
        yield tx
        ops = tx.ops()
        if ops:
            self._fenced(token, ops)

    def alert_state(self) -> AlertState:
        return RedisAlertState(self)

    def alert_term(self) -> int | None:
        return self.token()

    def keep_matches(self, target: str, events: Sequence[Event]) -> bool:
        # an append, not a change of state: any replica's receiver may add matches, the leader records them
        if events:
            items = [match_entry(target, event) for event in events]
            self.call("keep the matches", self.client.rpush, self.keys.matches, *items)
        return True

    def use_targets(self, targets: Mapping[str, Notifier]) -> None:
        self.targets = targets

    def send_notices(self, now: float) -> int:
        token = self.token()
        if token is None:
            return 0
        ids = self.call(
            "read the due notifications",
            self.client.zrangebyscore,
            self.keys.outbox_due,
            "-inf",
            now,
            start=0,
            num=NOTICE_BATCH,
        )
        if not ids:
            return 0
        # a group's notifications go out in the order made: one waits while an earlier one of its group is retried
        waiting = set(self.call("read the waiting notifications", self.client.hkeys, self.keys.outbox))
        sent = 0
        for notice_id in ids:
            life, seq = notice_group(notice_id)
            if first_of_each_group(waiting).get(life, (seq, notice_id)) < (seq, notice_id):
                continue
            text = self.call("read a notification", self.client.hget, self.keys.outbox, notice_id)
            if text is None:
                continue
            if self.token() != token:
                raise Deposed()
            op, reached = self._send(notice_id, json.loads(text), now)
            # recorded one by one: a kill between a send and its record repeats that one notification only
            self._fenced(token, [op])
            if op["op"] != "retry":
                waiting.discard(notice_id)
            sent += reached
        return sent

    def _send(self, notice_id: str, entry: dict[str, Any], now: float) -> tuple[dict[str, Any], int]:
        """Send one notification to the targets it has not reached; the outbox operation that records it."""
        event = Event.from_json(entry["e"])
        left: list[str] = []
        errors: list[str] = []
        final = True
        for name in entry["t"]:
            target = self.targets.get(name)
            try:
                if target is None:
                    raise DeliveryError(f"{name} is not configured", retryable=False)
                target.send(event)
            except Exception as exc:
                left.append(name)
                errors.append(f"{name}: {exc}")
                final = final and isinstance(exc, DeliveryError) and not exc.retryable
                continue
        reached = len(entry["t"]) - len(left)
        if not left:
            return {"op": "sent", "id": notice_id}, reached
        attempts = int(entry["n"]) + 1
        entry = {**entry, "t": left, "n": attempts, "err": "; ".join(errors)}
        if final or attempts >= self.delivery.max_attempts:
            log.error("alert notification %s failed for good: %s", notice_id, entry["err"])
            return {"op": "dead", "id": notice_id, "v": json.dumps({**entry, "at": now})}, reached
        wait = min(
            self.delivery.max_backoff.total_seconds(), self.delivery.backoff.total_seconds() * 2 ** (attempts - 1)
        )
        log.warning(
            "alert notification %s failed (attempt %d), again in %.0fs: %s", notice_id, attempts, wait, entry["err"]
        )
        return {"op": "retry", "id": notice_id, "v": json.dumps(entry), "at": number(now + wait)}, reached

    def _adopt(self, token: int) -> None:
        """Hand the groups this replica's SQLite still holds (from before the alert state moved to Redis) over to
        Redis, where a group of the same key is not replaced; then drop them locally. Without this, the incidents
        they opened would stay open for good. Twice (a crash between the two steps) changes nothing."""
        assert self.local is not None
        groups = self.local.alert_state().groups()
        if not groups:
            return
        ops = [
            {
                "op": "adopt",
                "f": group_field(group.rule, group.key),
                "r": group.rule,
                "v": group_to_json(group),
                "s": group.state,
                "due": "" if group.next_at is None else number(group.next_at),
            }
            for group in groups
        ]
        self._fenced(token, ops)
        with self.local.write() as tx:
            for group in groups:
                tx.alert_state.delete(group.rule, group.key)
        log.info("handed %d alert groups from this replica's SQLite over to %s", len(groups), self.where)

    def _fenced(self, token: int, ops: list[dict[str, Any]]) -> None:
        written, current = self.call(
            "write the alert state",
            self._apply,
            keys=[self.keys.poller.token],
            args=[token, self.keys.prefix, json.dumps(ops)],
        )
        if not int(written):
            log.warning("fencing token %d refused for the alert state: token %s took over", token, current)
            self.on_deposed(token)
            raise Deposed()

    # what status and the metrics show

    def outbox_size(self) -> tuple[int, int]:
        """(notifications waiting to be sent, notifications that failed for good)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hlen(self.keys.outbox)
        pipe.llen(self.keys.dead)
        waiting, dead = self.call("read the alert outbox", pipe.execute)
        return int(waiting), int(dead)


def read_alert_state(config: QueueConfig, delivery: DeliveryConfig, *, timeout: float = 3.0) -> AlertStateReport:
    """What `status` shows of the alert state in Redis (from another process: it writes nothing); a Redis that
    does not answer is an `error`, not an exception."""
    from ..queue import sync_client

    client = sync_client(config.url, timeout)
    store = RedisAlertStore(
        client, PollerKeys.of(config), token=lambda: None, delivery=delivery, where=f"Redis at {config.display_url}"
    )
    report = AlertStateReport(config.display_url)
    try:
        report.groups = store.alert_state().open_groups()
        report.waiting, report.dead = store.outbox_size()
    except StateError as exc:
        report.error = str(exc)
    finally:
        client.close()
    return report


@dataclass
class AlertStateReport:
    """The open groups in Redis, and the notifications waiting in its outbox or failed for good."""

    url: str
    groups: list[Group] = dataclasses.field(default_factory=list)
    waiting: int = 0
    dead: int = 0
    error: str | None = None


if TYPE_CHECKING:
    # mypy proves here that this is the alert state the alerter reads and writes, as the SQLite store is
    _store: type[AlertStore] = RedisAlertStore
    _transaction: type[AlertTransaction] = RedisAlertTransaction
    _state: type[AlertState] = RedisAlertState
