"""The poller lease: one Redis key with an expiry, and a fencing token that only grows.

Taking the lease issues a new token (INCR) and sets `<queue>:poller:lease` to `<replica>:<token>` with
`PX <lease>`, in one script, only when nobody holds it. The holder renews it (compare, then PEXPIRE) every
third of the lease; a holder that cannot renew in time stops polling. Expiry alone cannot stop a process that
was paused (SIGSTOP, a long GC, a VM migration) and wakes up still believing it leads: the token does. Every
write of the shared state checks that the writer's token is still the last one issued (`shared_state`), so a
deposed leader's writes are refused, whatever its clock says.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...langfuse.reader import Cancelled
from .keys import PollerKeys

log = logging.getLogger(__name__)

# KEYS: lease, token; ARGV: replica, lease in ms. Returns {token, value, lease in ms}, or {0, value of the
# holder, its time left in ms}: a standby then tries again right when it runs out
ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then return {0, held, redis.call('PTTL', KEYS[1])} end
local token = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. ':' .. token
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {token, value, tonumber(ARGV[2])}
"""
# KEYS: lease; ARGV: our value, lease in ms. 1 when still ours (and extended), else 0.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: lease; ARGV: our value. A clean stop hands over at once instead of after the expiry.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Deposed(Cancelled):
    """Raised when this replica's fencing token is no longer the newest: another replica took the lease.

    A Cancelled, so that the poll in flight ends the way a stopping daemon ends it: its committed pages stay,
    the page in hand is dropped, nothing is logged as a failure."""


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds the lease, with which token, and for how much longer (seconds)."""

    replica: str
    token: int
    expires_in: float


def parse_holder(value: str | None, ttl_ms: int) -> LeaseHolder | None:
    """The holder from the lease key's value `<replica>:<token>` (the replica itself may contain ":")."""
    if not value:
        return None
    replica, _, token = value.rpartition(":")
    try:
        return LeaseHolder(replica, int(token), max(0.0, ttl_ms / 1000))
    except ValueError:
        return LeaseHolder(value, 0, max(0.0, ttl_ms / 1000))


class Lease:
    """This replica's view of the lease. Thread-safe: the lease job renews while the poll job asks `held`."""

    def __init__(
        self,
        client: Any,
        keys: PollerKeys,
        replica: str,
        seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.keys = keys
        self.replica = replica
        self.seconds = seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._token: int | None = None
        self._value: str | None = None
        # until when this process may act as the holder, by its own clock: from the moment it *sent* the last
        # successful acquire or renew, so that Redis's expiry (counted from when it received it) is later still
        self._valid_until = 0.0
        # why the last acquire failed (Redis did not answer, or refused), None when it was answered: the next
        # failure is not worth a warning again, and a standby's status says why it cannot take over
        self.unanswered: str | None = None
        self._acquire = client.register_script(ACQUIRE)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)

    @property
    def token(self) -> int | None:
        """The fencing token while this replica holds the lease (by its own clock), else None."""
        with self._lock:
            if self._token is not None and self.clock() < self._valid_until:
                return self._token
            return None

    def held(self) -> bool:
        return self.token is not None

    def try_acquire(self) -> LeaseHolder | None:
        """Take the lease if nobody holds it. Returns the holder afterwards (this replica when it took it), or
        None when Redis did not answer. Raises nothing: a standby just tries again at its next tick."""
        sent = self.clock()
        try:
            token, value, ttl = self._acquire(keys=[self.keys.lease, self.keys.token], args=[self.replica, self._ms])
        except Exception as exc:
            # said once per outage, not every tick: a replica Redis refuses (a wrong password) can never take over,
            # and must not pass for a standby that waits on purpose
            level = logging.DEBUG if self.unanswered is not None else logging.WARNING
            log.log(level, "lease: Redis did not answer the acquire, this replica cannot take over: %s", exc)
            self.unanswered = str(exc) or type(exc).__name__
            return None
        if self.unanswered is not None:
            log.info("lease: Redis answers again")
            self.unanswered = None
        token = int(token)
        if token == 0:
            return parse_holder(str(value), int(ttl))
        with self._lock:
            self._token, self._value = token, str(value)
            self._valid_until = sent + self.seconds
        return LeaseHolder(self.replica, token, self.seconds)

    def renew(self) -> bool | None:
        """Extend the lease: True when still ours, False when it is gone (expired, or taken), None when Redis did
        not answer (the caller keeps leading until the lease would have run out, then steps down)."""
        with self._lock:
            value = self._value
        if value is None:
            return False
        sent = self.clock()
        try:
            kept = int(self._renew(keys=[self.keys.lease], args=[value, self._ms]))
        except Exception as exc:
            log.warning("lease: Redis did not answer the renewal: %s", exc)
            return None
        with self._lock:
            if kept and self._value == value:
                self._valid_until = sent + self.seconds
                return True
        return False

    def forget(self) -> None:
        """Stop acting as the holder, without touching Redis (it is no longer ours, or Redis is away)."""
        with self._lock:
            self._token = self._value = None
            self._valid_until = 0.0

    def release(self) -> None:
        """Give the lease up (a clean stop): a standby takes over at its next try instead of after the expiry."""
        with self._lock:
            value = self._value
        self.forget()
        if value is None:
            return
        try:
            self._release(keys=[self.keys.lease], args=[value])
        except Exception as exc:
            log.warning("lease: could not release it (it expires by itself): %s", exc)

    def holder(self) -> LeaseHolder | None:
        """Who holds the lease now, read from Redis (raises what the client raises when Redis is away)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.keys.lease)
        pipe.pttl(self.keys.lease)
        value, ttl = pipe.execute()
        return parse_holder(value, int(ttl))

    @property
    def _ms(self) -> int:
        return int(self.seconds * 1000)
