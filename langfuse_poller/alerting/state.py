"""The alert state's contract: every read and write the alerter makes of its groups, whatever keeps them.

Two backends keep it. SQLite (`store/alerts.py`, `SqliteAlertState` inside the store's transaction): the groups
change in the transaction that marks the match delivered and enqueues the notifications. Redis, with standby
pollers (`redis/standby/alert_state.py`): the groups live beside the shared watermarks, written under the lease's
fencing token, so that a new leader goes on where the old one stopped. The alerter is typed against these
protocols only; `tests/test_alerting.py` runs against both.

A group is serialised generically, over its dataclass fields (`group_to_json`, `group_from_json`), so a field a
rule type adds to `Group` is kept by every backend without a list to update.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from functools import cache
from typing import Any, Protocol

import orjson

from ..events import Event
from ..notifiers.base import Notifier
from .groups import Group


class AlertState(Protocol):
    """The alert groups of the grouping rules, as one transaction (or one read) sees them.

    Groups come ordered by rule and key. Every method raises StateError (or SqliteError) when the backend
    cannot be read or written."""

    def group(self, rule: str, key: str) -> Group | None:
        """The group of `rule` with this key, None when it has none open."""
        ...

    def groups(self) -> list[Group]:
        """Every stored group, of every rule."""
        ...

    def due(self, now: float) -> list[Group]:
        """The groups whose next look (`next_at`) has come by `now`."""
        ...

    def open_groups(self) -> list[Group]:
        """The groups that are firing or pending (not watching, not resolved)."""
        ...

    def any_due(self, now: float) -> bool:
        """Whether any group's next look has come by `now` (cheaper than `due`: nothing is loaded)."""
        ...

    def next_due_after(self, now: float) -> float | None:
        """The earliest next look later than `now`, None when no group has one."""
        ...

    def firing_count(self) -> int:
        """How many groups are firing."""
        ...

    def counts(self) -> list[tuple[str, str, int]]:
        """(rule, state, how many groups) for each rule and state that has groups, ordered by rule and state."""
        ...

    def save(self, group: Group) -> None:
        """Keep the group's new state; a resolved group is dropped (its next match opens a new one)."""
        ...

    def delete(self, rule: str, key: str) -> None:
        """Drop the group of `rule` with this key, if there is one."""
        ...

    def group_count(self, rule: str) -> int:
        """How many groups `rule` keeps, in any state (what `max_groups` caps)."""
        ...

    def rule_started(self, rule: str) -> float | None:
        """When (event time) a new_value rule first ran, None before it has."""
        ...

    def start_rule(self, rule: str, at: float) -> None:
        """Record that `rule` first ran at `at` (event time); a rule that ran before keeps its first run."""
        ...

    def seen_values(self, rule: str, keys: Sequence[str]) -> dict[str, float]:
        """Of these value keys of a new_value rule, those it knows, with when (event time) each was last seen."""
        ...

    def see_values(self, rule: str, seen: Mapping[str, float]) -> None:
        """Keep when each value key of a new_value rule was last seen (the later of the stored time and this)."""
        ...

    def forget_values(self, rule: str, before: float) -> int:
        """Forget the values of a new_value rule last seen before `before` (event time); how many were."""
        ...

    def kept_rules(self) -> list[str]:
        """The rules that keep state beyond their groups (a new_value rule's first run and known values), sorted."""
        ...

    def forget_rule(self, rule: str) -> None:
        """Forget what `rule` keeps beyond its groups: its first run and every value it knows (a rule gone from the
        config, or no longer a new_value rule). Its groups are not touched."""
        ...


class AlertTransaction(Protocol):
    """One change of the alert state: group writes and the notifications they send, kept together or not at all."""

    now: float

    @property
    def alert_state(self) -> AlertState:
        """The alert groups as this transaction sees them (its own writes included)."""
        ...

    def enqueue(self, event: Event, targets: Iterable[str]) -> bool:
        """Send `event` to `targets` once this transaction is kept; False when that event id is queued already."""
        ...

    def heads(self) -> list[tuple[str, float]]:
        """(stream, head watermark) of every polled stream: how far the poller has read."""
        ...

    def oldest_pending_ts(self, target: str) -> float | None:
        """The timestamp of the oldest match still waiting for `target` (`rule:<name>`), None when none waits."""
        ...

    def matches(self) -> list[tuple[str, list[Event]]]:
        """Matches that wait in the state itself for the alerter, by target, taken (gone once this transaction is
        kept). The SQLite backend has none: its matches reach the alerter through the delivery of the outbox."""
        ...


class AlertStore(Protocol):
    """Where the alert state lives: transactions on it, reads outside them, and who may write it."""

    def write(self, now: float | None = None) -> AbstractContextManager[AlertTransaction]:
        """A transaction on the alert state; kept on a clean exit, dropped on an exception. Raises Deposed (the
        Redis backend) when this replica no longer holds the newest fencing token."""
        ...

    def alert_state(self) -> AlertState:
        """The alert groups, for reads outside a transaction (status, metrics, the dry run)."""
        ...

    def alert_term(self) -> int | None:
        """The term this process may change the alert state in: a constant for a state of its own (SQLite), the
        fencing token while this replica leads (Redis), None while it stands by (it then ticks nothing)."""
        ...

    def keep_matches(self, target: str, events: Sequence[Event]) -> bool:
        """Matches that came through this process's own outbox (the webhook receiver's): True when they were
        handed to the state for the leader's alerter; False when the caller records them in its transaction."""
        ...

    def use_targets(self, targets: Mapping[str, Notifier]) -> None:
        """The delivery targets by name (`notifier:<name>`) that the state's own notifications go to; the SQLite
        backend has none of its own (its delivery worker has the targets)."""
        ...

    def send_notices(self, now: float) -> int:
        """Send the notifications the state holds itself, that are due by `now`; how many were sent. The SQLite
        backend holds none (its outbox's delivery worker sends them): 0."""
        ...


def group_to_json(group: Group) -> str:
    """A group as JSON, every dataclass field of it (nested dataclasses as objects)."""
    return json.dumps(dataclasses.asdict(group), ensure_ascii=False, default=str, separators=(",", ":"))


def group_from_json(text: str) -> Group:
    """A group from `group_to_json`; a field missing from the text (written before the field existed) gets its
    default, a field the text has that Group no longer has is dropped."""
    # orjson: a measuring group's window is tens of kB of numbers, which json.loads reads three times slower
    data = orjson.loads(text)
    hints = _hints(Group)
    values = {f.name: _revive(hints[f.name], data[f.name]) for f in dataclasses.fields(Group) if f.name in data}
    return Group(**values)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _revive(hint: Any, value: Any) -> Any:
    """A JSON value back into the field's type where that type is a dataclass (or holds one)."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _revive(options[0], value) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type) and isinstance(value, dict):
        fields = _hints(hint)
        return hint(**{k: _revive(fields[k], v) for k, v in value.items() if k in fields})
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(hint) or (Any,)
        return [_revive(item, v) for v in value]
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(hint) or (Any, Any)
        return {k: _revive(item, v) for k, v in value.items()}
    return value
