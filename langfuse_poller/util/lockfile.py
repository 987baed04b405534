"""The state's lock file, `<state>.lock`: the process that runs on a state holds an flock on it and writes its
pid into it, so that a second process refused the lock, and `check` finding a port taken, can say who holds it.

store.py takes and writes the lock; service/check.py only asks who holds it. The format is shared with older
and newer releases running on the same state: the holder's pid in decimal, nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path


def lock_path(state_path: Path) -> Path:
    """The lock file of a state file: `<path>.lock`, beside it."""
    return state_path.with_name(state_path.name + ".lock")


def write_holder(fd: int) -> None:
    """Write this process's pid into the lock file `fd`, which it has just locked."""
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())


def read_holder(fd: int) -> str:
    """The pid the holder of the lock file `fd` wrote, as text; "unknown" while it has written none."""
    return os.read(fd, 32).decode(errors="replace").strip() or "unknown"


def lock_holder(state_path: Path) -> str | None:
    """The pid written by the langfuse-poller that holds the state's lock (a `run` in progress), if one does."""
    import fcntl

    try:
        fd = os.open(lock_path(state_path), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
