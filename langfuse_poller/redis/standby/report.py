"""What `status` and the metrics say about the standby pollers and the Redis queue.

Read from Redis each time, never from this process's memory, so that `status` (another process) and any
replica's `/metrics` say the same: who holds the lease (replica, token, time left), what each replica last
said of itself, the shared watermarks, the BullMQ job counts and the workers connected to the queue. The
Redis password never appears: the URL is shown redacted, and nothing else carries it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from ...config import QueueConfig
from ...poll_state import StreamState
from ..cluster import node_count
from .keys import PollerKeys
from .lease import LeaseHolder, parse_holder

# the job states a depth is made of, and the failed set (this backend's dead letters); `completed` is kept
# an hour for deduplication and says nothing about the backlog
JOB_STATES = ("waiting", "active", "delayed", "prioritized", "failed")
# a replica that has not said anything for this many leases is shown as gone
GONE_AFTER_LEASES = 3


@dataclass(frozen=True)
class ReplicaSeen:
    """What one replica last wrote of itself, and how long ago."""

    name: str
    role: str
    token: int | None
    seen_ago: float
    gone: bool


@dataclass(frozen=True)
class WorkerSeen:
    """A BullMQ worker connected to the queue: its name (`langfuse-poller worker` names itself), its address."""

    name: str
    addr: str
    age: int


@dataclass
class QueueReport:
    """The standby and queue view of one Redis queue; `error` says why parts are missing."""

    url: str
    queue: str
    lease_seconds: float
    holder: LeaseHolder | None = None
    replicas: list[ReplicaSeen] = field(default_factory=list)
    streams: list[StreamState] = field(default_factory=list)
    read_paths: dict[str, tuple[str, float]] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    workers: list[WorkerSeen] = field(default_factory=list)
    # on a Redis Cluster: how many primaries serve it, and the hash tag every key of this deployment carries
    cluster_nodes: int | None = None
    hash_tag: str | None = None
    error: str | None = None

    @property
    def depth(self) -> int:
        """Jobs not yet processed: waiting, active, delayed, prioritized (the failed set is counted apart)."""
        return sum(count for state, count in self.jobs.items() if state != "failed")


def read_report(config: QueueConfig, *, now: float, timeout: float = 3.0) -> QueueReport:
    """Everything `status` shows about the queue; a Redis that does not answer is an `error`, not an exception."""
    from ..queue import sync_client

    report = QueueReport(config.display_url, config.name, config.lease.total_seconds())
    client = sync_client(config.url, timeout)
    try:
        if config.cluster:
            report.cluster_nodes, report.hash_tag = node_count(client), PollerKeys.of(config).namespace
        if config.standby:
            read_lease(client, PollerKeys.of(config), report, now)
        report.jobs, report.workers = queue_counts(config, timeout)
    except Exception as exc:
        report.error = f"Redis at {config.display_url} did not answer: {_describe(exc)}"
    finally:
        client.close()
    return report


def read_lease(client: Any, keys: PollerKeys, report: QueueReport, now: float) -> None:
    """The lease holder, the replicas and the shared streams, into `report`."""
    from .shared_state import SharedPollState

    pipe = client.pipeline(transaction=True)
    pipe.get(keys.lease)
    pipe.pttl(keys.lease)
    pipe.hgetall(keys.replicas)
    value, ttl, replicas = pipe.execute()
    report.holder = parse_holder(value, int(ttl))
    for name, text in sorted(replicas.items()):
        try:
            entry = json.loads(text)
            ago = max(0.0, now - float(entry["seen_at"]))
            token = entry.get("token")
            report.replicas.append(
                ReplicaSeen(
                    name,
                    str(entry.get("role", "?")),
                    None if token is None else int(token),
                    ago,
                    ago > GONE_AFTER_LEASES * report.lease_seconds,
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    # read-only: no local outbox, no job adder, no token
    report.streams = SharedPollState(
        client, keys, local=None, add_jobs=lambda items: None, token=lambda: None
    ).streams()


def queue_counts(config: QueueConfig, timeout: float) -> tuple[dict[str, int], list[WorkerSeen]]:
    """BullMQ's job counts by state, and the workers connected (CLIENT LIST, as BullMQ's getWorkers reads it)."""

    async def read() -> tuple[dict[str, int], list[WorkerSeen]]:
        from bullmq import Queue

        from ..queue import bullmq_options, redis_client

        queue = Queue(config.name, bullmq_options(config, redis_client(config.url, timeout)))
        try:
            counts = await queue.getJobCounts(*JOB_STATES)
            clients = await queue.get_workers()
        finally:
            await queue.close()
        workers: dict[str, WorkerSeen] = {}
        for client in clients:
            raw = str(client.get("rawname", ""))
            addr = str(client.get("addr", "?"))
            # a worker holds two connections (commands, blocking fetch) under one name; an unnamed BullMQ
            # worker (Node.js) is told apart by its address
            name = raw.split(":w:", 1)[1] if ":w:" in raw else f"unnamed {addr}"
            workers.setdefault(name, WorkerSeen(name, addr, int(client.get("age", 0) or 0)))
        return {state: int(counts.get(state, 0)) for state in JOB_STATES}, sorted(
            workers.values(), key=lambda w: w.name
        )

    return asyncio.run(asyncio.wait_for(read(), timeout * 2))


def report_json(report: QueueReport) -> dict[str, Any]:
    holder = report.holder
    return {
        "url": report.url,
        "name": report.queue,
        "depth": report.depth,
        "jobs": report.jobs,
        "workers": [{"name": w.name, "addr": w.addr, "connected_seconds": w.age} for w in report.workers],
        "lease": None
        if holder is None
        else {"holder": holder.replica, "token": holder.token, "expires_in_seconds": round(holder.expires_in, 3)},
        "lease_seconds": report.lease_seconds,
        "replicas": [
            {"name": r.name, "role": r.role, "token": r.token, "seen_seconds_ago": round(r.seen_ago, 1), "gone": r.gone}
            for r in report.replicas
        ],
        "cluster": None
        if report.cluster_nodes is None
        else {"nodes": report.cluster_nodes, "hash_tag": report.hash_tag},
        "error": report.error,
    }


def check_redis(config: QueueConfig, timeout: float) -> tuple[bool, str]:
    """`check`'s line about Redis: whether it answers and, on a cluster, how many nodes serve it and where this
    deployment's keys go. Never raises, never shows the password."""
    from ..cluster import kind_mismatch
    from ..queue import sync_client

    client = sync_client(config.url, timeout)
    try:
        client.ping()
        if (mismatch := kind_mismatch(client, config.cluster)) is not None:
            return False, f"Redis at {config.display_url}: {mismatch}"
        if not config.cluster:
            return True, f"Redis at {config.display_url} answers"
        tag = PollerKeys.of(config).namespace
        return True, f"Redis Cluster at {config.display_url} answers: {node_count(client)} nodes; keys tagged {tag}"
    except Exception as exc:
        return False, f"Redis at {config.display_url} did not answer: {_describe(exc)}"
    finally:
        client.close()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
