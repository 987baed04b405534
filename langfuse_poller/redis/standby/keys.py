"""The Redis keys of one deployment (one queue): the shared poller state, the silences, BullMQ's jobs.

On one Redis server: `<queue>:poller:...`, `<queue>:silences...`, and BullMQ's `bull:<queue>:...`, the names
of every release so far, kept so that an upgrade finds its watermarks and dedup keys (new names would re-poll
from `[poll] start` and send the events since then again). On a Redis Cluster every key carries one hash tag,
`{langfuse-poller:<queue>}`: `{langfuse-poller:<queue>}:poller:...`, `{langfuse-poller:<queue>}:silences...`,
and BullMQ's prefix is the tag itself (`{langfuse-poller:<queue>}:<queue>:...`, as BullMQ's docs ask for a
cluster), so all of them hash to one slot: the Lua scripts, which build keys from a prefix, and the MULTI
transactions may only touch keys of one slot there. A cluster was not supported before, so no key moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...config import QueueConfig


@dataclass(frozen=True)
class PollerKeys:
    """Key names for one queue's pollers. The queue name has no ":" (config checks it), so prefixes never nest.

    `namespace` is the one place that decides the layout; every key, a new one too, is built from it."""

    queue: str
    cluster: bool = False

    @classmethod
    def of(cls, config: QueueConfig) -> PollerKeys:
        """The keys of the queue `config` names, tagged when its URL names a cluster."""
        return cls(config.name, config.cluster)

    @property
    def namespace(self) -> str:
        """`<queue>` on one server; `{langfuse-poller:<queue>}` on a cluster, the hash tag of the deployment."""
        return f"{{langfuse-poller:{self.queue}}}" if self.cluster else self.queue

    @property
    def bullmq_prefix(self) -> str:
        """BullMQ's `prefix` option, which a Node.js worker must pass too: BullMQ's default `bull` on one server,
        the deployment's hash tag on a cluster."""
        return self.namespace if self.cluster else "bull"

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:poller"

    @property
    def silences(self) -> str:
        """Hash: silence id -> the silence as JSON; `<silences>:id` and `<silences>:matched` beside it."""
        return f"{self.namespace}:silences"

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
