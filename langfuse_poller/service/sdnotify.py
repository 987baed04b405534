"""The service manager's notification protocol (`sd_notify(3)`), in a few lines and no dependency.

Under systemd with `Type=notify`, `$NOTIFY_SOCKET` names an AF_UNIX datagram socket (a path, or an abstract
name written with a leading "@"); each datagram holds newline-separated `KEY=VALUE` assignments: `READY=1`,
`STATUS=...`, `WATCHDOG=1`, `STOPPING=1`, `RELOADING=1` with `MONOTONIC_USEC=...`. `$WATCHDOG_USEC` (and
`$WATCHDOG_PID`, when set, naming this process) asks for `WATCHDOG=1` more often than that; half of it is the
customary period. Outside systemd nothing is set and every call does nothing.

Sending never raises: a service manager that went away must not take the daemon down with it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

# systemd truncates STATUS= at this length in `systemctl status`; a long error says enough before it
STATUS_MAX = 400


class ServiceManager:
    """Tells the service manager how the daemon is doing; every method is a no-op without `$NOTIFY_SOCKET`."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_usec = _watchdog_usec(env)
        self._socket: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens (`$NOTIFY_SOCKET` is set)."""
        return self.address is not None

    @property
    def watchdog_timeout(self) -> float | None:
        """Seconds without `WATCHDOG=1` after which the manager kills the service; None without a watchdog."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 1_000_000

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of assignments (`ready=1` becomes `READY=1`); whether it was sent."""
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")
            if key == "status" and len(text) > STATUS_MAX:
                text = text[: STATUS_MAX - 3] + "..."
            lines.append(f"{key.upper()}={text}")
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                # once: the manager may be restarting; the daemon itself is fine
                log.warning("cannot notify the service manager at %s: %s", _shown(self.address), exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status)

    def status(self, status: str) -> bool:
        return self.notify(status=status)

    def watchdog(self, status: str | None = None) -> bool:
        return self.notify(watchdog=1) if status is None else self.notify(watchdog=1, status=status)

    def stopping(self, status: str) -> bool:
        return self.notify(stopping=1, status=status)

    def reloading(self, status: str) -> bool:
        # systemd >= 253 (Type=notify-reload) wants the time the reload began on CLOCK_MONOTONIC
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(reloading=1, monotonic_usec=usec, status=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # the abstract namespace: a leading NUL byte instead of "@", and no terminating NUL
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # vsock: addresses (systemd >= 254, for virtual machines) are not supported: no notification is sent
    log.warning("NOTIFY_SOCKET=%s is not a path or an abstract socket name; not notifying", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    # the manager sets WATCHDOG_PID to the main process: a child that inherited the environment is not watched
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec


def _shown(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else address
