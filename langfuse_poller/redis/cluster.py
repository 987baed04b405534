"""Clients for a Redis Cluster, named by a `redis+cluster://` URL (util/redis_url.py says why a URL).

Every key of one deployment carries one hash tag on a cluster (standby/keys.py), so every command, Lua script
and MULTI of this package goes to the one node that serves that slot; the client follows the cluster's
redirects when the slot moves or its node fails over. The seeds only serve to find the cluster.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..util.redis_url import parse_cluster_url


class _Utf8:
    @staticmethod
    def encode(value: str | bytes) -> bytes:
        return value.encode("utf-8") if isinstance(value, str) else value


class LazyRedisCluster:
    """A `redis.cluster.RedisCluster` made at its first command, not before.

    redis-py's synchronous cluster client asks the seeds for the map of slots in its constructor, and raises when
    none answers; a plain Redis client connects at its first command. The callers were built on the latter: a
    standby that starts while Redis is down must start and keep trying (its lease's next tick), and `silence`
    must turn a refused password into its one-line error, which it does around the commands. So the cluster
    client is made on the first command, and made again on the next one if that failed."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._client: Any = None
        self._lock = threading.Lock()

    def _real(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._factory()
            return self._client

    def register_script(self, script: str) -> Any:
        """A Lua script bound to this client: registering sends nothing to Redis, calling it does."""
        from redis.commands.core import Script

        return Script(self, script)  # type: ignore[arg-type]

    def get_encoder(self) -> _Utf8:
        """What Script encodes the script with to compute its SHA, without a connection: UTF-8, the encoding of
        the clients this package makes."""
        return _Utf8()

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def pipeline(self, transaction: bool = True) -> _LazyPipeline:
        """A pipeline whose commands are collected here and sent by `execute`, which makes the client if needed:
        the callers read their errors from `execute`, as they do on one server."""
        return _LazyPipeline(self, transaction)

    def __getattr__(self, name: str) -> Any:
        # every other attribute is a command of the real client, looked up when it is called: the callers catch
        # Redis's errors around the call, not around `client.hget`
        def command(*args: Any, **kwargs: Any) -> Any:
            return getattr(self._real(), name)(*args, **kwargs)

        return command


class _LazyPipeline:
    """The commands of one pipeline of a LazyRedisCluster, sent by `execute` in one MULTI (`transaction`) or not."""

    def __init__(self, owner: LazyRedisCluster, transaction: bool) -> None:
        self._owner = owner
        self._transaction = transaction
        self._commands: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def queue(*args: Any, **kwargs: Any) -> _LazyPipeline:
            self._commands.append((name, args, kwargs))
            return self

        return queue

    def execute(self) -> list[Any]:
        with self._owner._real().pipeline(transaction=self._transaction) as pipe:
            for name, args, kwargs in self._commands:
                getattr(pipe, name)(*args, **kwargs)
            self._commands = []
            return list(pipe.execute())

    def __enter__(self) -> _LazyPipeline:
        return self

    def __exit__(self, *_: object) -> None:
        self._commands = []


def sync_cluster_client(url: str, options: dict[str, Any]) -> LazyRedisCluster:
    """The synchronous cluster client of `url`, with the connection `options` of a single-server client.

    No retry on an error: a node that failed over makes this call fail and the client re-read the map of slots,
    and the caller's next try (the outbox's, the lease's next tick) goes to the new node, as with one server."""

    def make() -> Any:
        from redis.backoff import NoBackoff
        from redis.cluster import ClusterNode, RedisCluster
        from redis.retry import Retry

        found = parse_cluster_url(url)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in found.seeds],  # type: ignore[no-untyped-call]
            username=found.username,
            password=found.password,
            ssl=found.tls,
            retry=Retry(NoBackoff(), 0),
            **options,
        )

    return LazyRedisCluster(make)


def async_cluster_client(url: str, options: dict[str, Any]) -> Any:
    """An asyncio cluster client of `url` for bullmq (3.4 takes one as its connection); it connects at its first
    command, as the asyncio single-server client does."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    found = parse_cluster_url(url)
    nodes = [ClusterNode(host, port) for host, port in found.seeds]
    return RedisCluster(startup_nodes=nodes, username=found.username, password=found.password, ssl=found.tls, **options)


def kind_mismatch(client: Any, cluster: bool) -> str | None:
    """Why the Redis behind `client` is not what the URL says, or None. A cluster URL at a single server fails
    on its own (the client says cluster mode is not enabled); a plain URL at a node of a cluster would answer,
    then refuse every key of another node's slots with MOVED, so that is asked here."""
    if cluster:
        return None
    info = client.info("cluster")
    if str(info.get("cluster_enabled", 0)) == "1":
        return "this Redis is a node of a Redis Cluster: name the cluster as redis+cluster://host:port,..."
    return None


def node_count(client: Any) -> int:
    """How many primaries serve the cluster, as the client learnt it (asks Redis when it has not yet)."""
    return len(client.get_primaries())
