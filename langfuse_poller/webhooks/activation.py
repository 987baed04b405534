"""systemd socket activation: the listening socket that systemd (or any supervisor doing the same) hands over.

The protocol is sd_listen_fds(3): `LISTEN_PID` is the pid of the process the sockets are meant for, `LISTEN_FDS`
how many there are, starting at file descriptor 3, and `LISTEN_FDNAMES` (optional) their names, separated by
colons (a socket unit's `FileDescriptorName=`, else its unit name). The socket outlives the process: while the
service restarts, the kernel queues the connections that arrive, and the next process accepts them. For
Langfuse, whose 4 attempts at a webhook last about a second, a restart then loses nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
# the FileDescriptorName= of systemd/langfuse-poller-webhooks.socket: with several sockets, this one is ours
WEBHOOK_FD_NAME = "webhooks"
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(environ: MutableMapping[str, str] | None = None) -> dict[int, str]:
    """The descriptors handed to this process, with their names ("" when unnamed); {} when none were.

    Like sd_listen_fds(unset_environment=1): the variables are removed once read, so that a child process
    does not take the sockets for its own, and the descriptors are made close-on-exec.
    """
    env = os.environ if environ is None else environ
    pid, count, names = (env.get(name) for name in VARIABLES)
    for name in VARIABLES:
        env.pop(name, None)
    if pid is None or count is None:
        return {}
    if not pid.isdigit() or int(pid) != os.getpid():
        # meant for another process (a parent that exec'd without unsetting them, or a fork)
        log.debug("LISTEN_PID=%s is not this process (%d): no socket taken", pid, os.getpid())
        return {}
    if not count.isdigit() or int(count) == 0:
        return {}
    labels = names.split(":") if names else []
    found = {}
    for index in range(int(count)):
        fd = LISTEN_FDS_START + index
        with contextlib.suppress(OSError):  # a descriptor that is not open
            os.set_inheritable(fd, False)
            found[fd] = labels[index] if index < len(labels) else ""
    return found


def inherited_listener(environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening TCP socket handed over for the webhooks: the one named `webhooks`, else the first stream
    socket; None when there is none (the receiver then binds `[webhook] listen` itself)."""
    fds = listen_fds(environ)
    ordered = sorted(fds, key=lambda fd: (fds[fd] != WEBHOOK_FD_NAME, fd))
    for fd in ordered:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
            if len(fds) > 1:
                log.info("socket activation: %d sockets handed over; serving fd %d (%s)", len(fds), fd, fds[fd])
            return sock
        # not ours to close: another part of the service may use it
        sock.detach()
    if fds:
        log.warning("socket activation: no TCP socket among the %d handed over; binding [webhook] listen", len(fds))
    return None
