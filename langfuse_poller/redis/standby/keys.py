"""The Redis keys of the shared poller state: `<queue>:poller:...`, beside BullMQ's `bull:<queue>:...`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PollerKeys:
    """Key names for one queue's pollers. The queue name has no ":" (config checks it), so prefixes never nest."""

    queue: str

    @property
    def prefix(self) -> str:
        return f"{self.queue}:poller"

    @property
    def lease(self) -> str:
        """`<replica>:<token>` of the holder, with an expiry (PX); absent when nobody holds it."""
        return f"{self.prefix}:lease"

    @property
    def token(self) -> str:
        """The last fencing token issued (INCR); a holder whose token is no longer this one is deposed."""
        return f"{self.prefix}:token"

    @property
    def streams(self) -> str:
        """The set of stream names that have state."""
        return f"{self.prefix}:streams"

    def stream(self, name: str) -> str:
        """Hash: head, last poll, last success, last error and the counters of one stream."""
        return f"{self.prefix}:stream:{name}"

    def sweeps(self, name: str) -> str:
        """Hash: sweep age (seconds) -> watermark."""
        return f"{self.prefix}:sweeps:{name}"

    def sweep_runs(self, name: str) -> str:
        """Hash: sweep age (seconds) -> when that sweep last ran."""
        return f"{self.prefix}:sweep-runs:{name}"

    @property
    def seen(self) -> str:
        """Hash: dedup key -> "version<TAB>level"; record keys carry their stream's prefix already."""
        return f"{self.prefix}:seen"

    def seen_times(self, name: str) -> str:
        """Sorted set: dedup keys of one stream by record time, to prune those no window reads again."""
        return f"{self.prefix}:seen-ts:{name}"

    @property
    def read_paths(self) -> str:
        """Hash: stream -> JSON [read path, since]."""
        return f"{self.prefix}:read-paths"

    @property
    def replicas(self) -> str:
        """Hash: replica -> JSON {role, token, seen_at}, what each `run` last said of itself."""
        return f"{self.prefix}:replicas"
