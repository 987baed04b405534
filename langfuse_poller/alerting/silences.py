"""Silences: a rule's matches, or those meeting a condition, are counted but not sent until a time.

Silences live in the state file, or in Redis with the Redis backend (every poller replica and queue worker then
applies the same ones), so `silence add` works while the daemon runs: the daemon re-reads them at most every
`REFRESH` seconds. A silenced match of an alerting rule is counted in its group (durably); a
silenced match of a forwarding rule is counted on the silence.
"""

from __future__ import annotations

import getpass
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..store import Store
from .silence_book import Silence, SilenceBook

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

REFRESH = 1.0


def compile_condition(condition: str, where: str = "--when") -> Any:
    """A compiled CEL program; ConfigError naming `where` when the expression does not compile."""
    import cel

    try:
        return cel.compile(condition)
    except ValueError as exc:
        raise ConfigError("command line", where, condition, f"a CEL expression ({exc})") from None


class SqliteSilenceBook:
    """Silences in the state file's `silences` table."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, silence: Silence) -> Silence:
        silence_id = self.store.add_silence(
            silence.rule,
            silence.condition,
            starts_at=silence.starts_at,
            ends_at=silence.ends_at,
            comment=silence.comment,
            created_by=silence.created_by,
            created_at=silence.created_at,
        )
        return replace(silence, id=silence_id)

    def list(self, *, now: float | None = None, ids: Sequence[int] | None = None) -> list[Silence]:
        return self.store.silences(now=now, ids=ids)

    def expire(self, silence_id: int, now: float) -> bool:
        return self.store.expire_silence(silence_id, now)

    def close(self) -> None:
        pass  # the store is the runtime's, closed with it

    def count(self, matched: Mapping[int, int]) -> None:
        self.store.count_silenced(matched)


def silence_book(config: Config, store: Store | None) -> SilenceBook:
    """The book `config` keeps its silences in: Redis with the Redis backend, else the state file (`store`)."""
    if config.queue.backend == "redis":
        from ..redis.silences import RedisSilenceBook

        return RedisSilenceBook(config.queue, config.delivery.timeout.total_seconds())
    assert store is not None, "the SQLite silence book needs the state"
    return SqliteSilenceBook(store)


def add_silence(
    book: SilenceBook, rule: str, *, duration: float, condition: str | None = None, comment: str = "", now: float
) -> Silence:
    if condition:
        compile_condition(condition)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    return book.add(Silence(0, rule, condition or None, now, now + duration, comment, user, now, 0))


class Silences:
    """The active silences, re-read at most every REFRESH seconds, with their conditions compiled."""

    def __init__(self, book: SilenceBook, *, clock: Callable[[], float] = time.time) -> None:
        self.book = book
        self.clock = clock
        self._loaded_at = float("-inf")
        self._active: dict[str, list[tuple[Silence, Any]]] = {}
        self._counts: Counter[int] = Counter()
        self._lock = threading.Lock()

    def _refresh(self, now: float) -> None:
        if now - self._loaded_at < REFRESH and now >= self._loaded_at:
            return
        try:
            current = self.book.list(now=now)
        except Exception as exc:
            # Redis unreachable: the silences known keep applying, and the next check tries again
            log.warning("cannot read the silences: %s", exc)
            self._loaded_at = now
            return
        active: dict[str, list[tuple[Silence, Any]]] = {}
        for silence in current:
            program = None
            if silence.condition:
                try:
                    program = compile_condition(silence.condition)
                except ConfigError as exc:
                    log.warning("silence %d ignored: %s", silence.id, exc)
                    continue
            active.setdefault(silence.rule, []).append((silence, program))
        self._active = active
        self._loaded_at = now

    def match(self, rule: str, envelope: Mapping[str, Any], now: float | None = None) -> Silence | None:
        """The active silence covering this match of `rule`, if any; counted on the silence."""
        silence = self._find(rule, envelope, self.clock() if now is None else now)
        if silence is not None:
            with self._lock:
                self._counts[silence.id] += 1
        return silence

    def mutes(self, rule: str, now: float | None = None) -> bool:
        """Whether any silence of `rule` is active: the cheap check, made for every match, before `match`."""
        now = self.clock() if now is None else now
        if not 0 <= now - self._loaded_at < REFRESH:
            with self._lock:
                self._refresh(now)
        # the dict is replaced whole on refresh, never changed in place: reading it needs no lock
        silences = self._active.get(rule)
        # most rules have no silence: they cost no generator (every forwarded match asks)
        return silences is not None and any(silence.active(now) for silence, _ in silences)

    def covers(self, rule: str, envelope: Mapping[str, Any], now: float | None = None) -> bool:
        """Whether an active silence of `rule` covers this envelope (a group's latest match), not counting it."""
        return self._find(rule, envelope, self.clock() if now is None else now) is not None

    def _find(self, rule: str, envelope: Mapping[str, Any], now: float) -> Silence | None:
        with self._lock:
            self._refresh(now)
            candidates = self._active.get(rule)
        for silence, program in candidates or ():
            if not silence.active(now):
                continue
            if program is not None:
                try:
                    if program.execute(dict(envelope)) is not True:
                        continue
                except Exception:
                    continue
            return silence
        return None

    def close(self) -> None:
        """Count what is left, and release the book."""
        self.flush_counts()
        self.book.close()

    def flush_counts(self) -> None:
        """Add what was silenced since the last flush to each silence's `matched`."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if counts:
            try:
                self.book.count(counts)
            except Exception as exc:
                log.warning("cannot count %d silenced matches: %s", sum(counts.values()), exc)
