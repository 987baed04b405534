"""One `run` process among several: standby until it takes the lease, leader until it loses it.

`tick` runs every third of the lease, in a thread of its own (`start`): the leader renews, a standby tries to
take over, also right when the holder's lease runs out. A leader that learns it lost the lease (or cannot
renew it before it would run out) stops polling at once: the poll in flight is interrupted at its next
request or wait (`PollCancel`), and any write it still attempts is refused by the fencing token. Each tick
also writes what this replica is (role, token, when) into a hash that `status` reads, so the replicas that
wait are visible too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .keys import PollerKeys
from .lease import Lease, LeaseHolder

log = logging.getLogger(__name__)

LEADER = "leader"
STANDBY = "standby"
# a standby's try at the moment the holder's lease expires comes this much later: Redis expires keys on its
# own clock, and a try a moment early would find the key still there and wait a whole tick
EXPIRY_SLACK = 0.02
# entries of replicas silent this long leave the list `status` shows (a restart gets a new pid, a new name)
FORGET_AFTER = 24 * 3600.0
FORGET_EVERY = 100  # ticks


def default_replica() -> str:
    """`<hostname>:<pid>`: unique among the processes of a deployment, and says where to look."""
    return f"{socket.gethostname()}:{os.getpid()}"


class PollCancel(threading.Event):
    """The reader's cancel: set when the daemon stops (`stop`) or when this replica was deposed.

    The reader only asks `is_set` and `wait`; the daemon's stop event stays the one the delivery worker and a
    reload use, and being deposed does not stop deliveries."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__()
        self.stop = stop
        self.deposed = threading.Event()

    def is_set(self) -> bool:
        return super().is_set() or self.stop.is_set() or self.deposed.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        # bounded steps over both events: no thread to link them, and a wait ends within 0.1 s of either
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                return False
            self.stop.wait(left)
        return True


class Replica:
    """This process's role in the lease; see the module docstring."""

    def __init__(
        self,
        client: Any,
        keys: PollerKeys,
        replica: str,
        lease_seconds: float,
        cancel: PollCancel,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.keys = keys
        self.name = replica
        self.lease = Lease(client, keys, replica, lease_seconds)
        self.cancel = cancel
        self.clock = clock
        self.on_acquired: Callable[[], None] = lambda: None
        self.acquired_at: float | None = None
        self.takeovers = 0
        # the replica that held the lease when this standby last tried to take it
        self.last_holder: LeaseHolder | None = None
        self._lock = threading.Lock()
        self._leading = False
        self._ticks = 0
        self._thread: threading.Thread | None = None

    @property
    def holder_expires_in(self) -> float | None:
        """Seconds until the lease another replica holds runs out, as this standby last read it (None: unknown)."""
        holder = self.last_holder
        return None if holder is None else holder.expires_in

    @property
    def role(self) -> str:
        return LEADER if self.lease.held() else STANDBY

    def token(self) -> int | None:
        """The fencing token of this replica while it leads, else None."""
        return self.lease.token

    def may_poll(self) -> bool:
        return self.lease.held() and not self.cancel.deposed.is_set()

    def tick(self) -> None:
        """Renew the lease (leader) or try to take it (standby); step down when it is lost."""
        with self._lock:
            if self._leading:
                kept = self.lease.renew()
                if kept is False or (kept is None and not self.lease.held()):
                    self._step_down("the lease was lost" if kept is False else "Redis did not answer in time")
            if not self._leading:
                self._try_lead()
        self._heartbeat()

    def next_tick_in(self) -> float:
        """Seconds to the next tick: a third of the lease, or sooner when the holder's lease runs out before.

        A dead leader's lease lasts until it expires, so its expiry is the earliest a takeover can be; waiting
        for the regular tick would add up to a third of the lease to every failover."""
        every = self.lease.seconds / 3
        expires_in = self.holder_expires_in
        if expires_in is not None and expires_in + EXPIRY_SLACK < every:
            return expires_in + EXPIRY_SLACK
        return every

    def start(self, stop: threading.Event) -> None:
        """Tick in a thread of its own until `stop` is set; the first tick is now."""

        def loop() -> None:
            delay = 0.0
            while not stop.wait(delay):
                try:
                    self.tick()
                except Exception:
                    log.exception("the poller lease could not be renewed or taken; the next tick tries again")
                delay = self.next_tick_in()

        self._thread = threading.Thread(target=loop, name="lease", daemon=True)
        self._thread.start()

    def try_lead(self) -> bool:
        """Take the lease now if nobody holds it (`once` does this); True when this replica leads."""
        with self._lock:
            if not self._leading:
                self._try_lead()
            return self._leading

    def deposed(self, token: int) -> None:
        """A write was refused for `token`: another replica took over (called by the shared state)."""
        with self._lock:
            if self._leading and self.lease.token in (token, None):
                self._step_down(f"token {token} was refused")

    def _try_lead(self) -> None:
        holder = self.lease.try_acquire()
        if holder is None or holder.replica != self.name or not self.lease.held():
            self.last_holder = holder
            return
        self.last_holder = None
        self._leading = True
        self.acquired_at = self.clock()
        self.takeovers += 1
        self.cancel.deposed.clear()
        log.info("took the poller lease (token %d): this replica polls now", holder.token)
        try:
            self.on_acquired()
        except Exception:
            log.exception("starting the first poll after the takeover failed; the next interval starts it")

    def _step_down(self, why: str) -> None:
        self._leading = False
        # whoever took over is known at the next try, not before
        self.last_holder = None
        self.cancel.deposed.set()  # the poll in flight stops at its next request or wait
        self.lease.forget()
        log.warning("stepping down to standby: %s; polling stops", why)

    def holder(self) -> LeaseHolder | None:
        return self.lease.holder()

    def standing_by(self) -> str:
        """What this replica does while it does not poll, for the service status (asks Redis nothing): whom it
        waits for, or why it cannot take over."""
        # one read of each: the lease thread may change them meanwhile
        problem, holder = self.lease.unanswered, self.last_holder
        if problem is not None:
            return f"standby that cannot take over: Redis failed ({problem})"
        if holder is None:
            return "standby: waiting for the poller lease"
        if holder.replica == self.name:
            # a restart under a fixed `replica` name finds the lease of its previous run until it expires
            return f"standby: this replica's previous run still holds the lease (token {holder.token}) until it expires"
        return f"standby: replica {holder.replica} leads (token {holder.token})"

    def describe_holder(self) -> str:
        """Who holds the lease, in words for a message; never raises."""
        try:
            holder = self.lease.holder()
        except Exception as exc:
            return f"an unknown replica (Redis did not answer: {exc or type(exc).__name__})"
        if holder is None:
            return "nobody now (it was held a moment ago)"
        return f"replica {holder.replica} (token {holder.token}, {holder.expires_in:.1f}s left)"

    def _heartbeat(self) -> None:
        now = self.clock()
        entry = {"role": self.role, "token": self.lease.token, "seen_at": now, "pid": os.getpid()}
        self._ticks += 1
        try:
            self.client.hset(self.keys.replicas, self.name, json.dumps(entry))
            if self._ticks % FORGET_EVERY == 1:
                self._forget_silent(now)
        except Exception as exc:
            log.debug("could not record this replica's role: %s", exc)

    def _forget_silent(self, now: float) -> None:
        silent = []
        for name, text in self.client.hgetall(self.keys.replicas).items():
            try:
                if now - float(json.loads(text)["seen_at"]) > FORGET_AFTER:
                    silent.append(name)
            except (ValueError, KeyError, TypeError):
                silent.append(name)
        if silent:
            self.client.hdel(self.keys.replicas, *silent)

    def close(self) -> None:
        """A clean stop: give the lease up so that a standby takes over at its next tick, and leave the list.
        The thread's `stop` must be set first."""
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._leading = False
            self.lease.release()
        if not self._ticks:
            return  # never listed (a command that does not poll): no need to reach Redis at all
        try:
            self.client.hdel(self.keys.replicas, self.name)
        except Exception as exc:
            log.debug("could not remove this replica from the list: %s", exc)
