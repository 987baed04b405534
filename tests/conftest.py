"""Shared fixtures: a loopback Langfuse stand-in, a controllable clock, config builders, a loopback
redis-server or three-node Redis Cluster, and the poll state a test's poller keeps (SQLite, or Redis as standby
pollers share it, on one server or on a cluster)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.config import Config, parse_config
from langfuse_poller.poll_state import PollState
from langfuse_poller.registry import Registry
from langfuse_poller.runtime import Runtime
from langfuse_poller.testing.fake_langfuse import FakeLangfuse
from tests.redis_cluster import RedisClusterServer, cluster_available


class Clock:
    """A clock that tests move by hand; shared by the fake server and the poller."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeLangfuse]:
    with FakeLangfuse(clock=clock) as server:
        yield server


def make_config(fake: FakeLangfuse, tmp_path: Path, **sections: Any) -> Config:
    """A Config pointing at `fake`, state in tmp_path; keyword sections update the TOML tables."""
    data: dict[str, Any] = {
        "langfuse": {"base_url": fake.url, "public_key": "pk-lf-test", "secret_key": "sk-lf-test"},
        "poll": {"start": "now", "settle": "0s", "lookback": "10m", "reread": ["1m"], "sweep_interval": "1m"},
        "state": {"path": str(tmp_path / "state.db")},
        "notifiers": {"file": {"type": "jsonl", "path": str(tmp_path / "events.jsonl")}},
        # not "*": that would subscribe to observation.created, one event per observation
        "rules": [{"name": "all", "events": ["trace.*", "generation.*", "score.*"], "notify": ["file"]}],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data, "test-config")


# the poll state a runtime's poller is to keep, made from that runtime (see the `poll_state` fixture)
PollStateFor = Callable[[Runtime], PollState]


@contextmanager
def runtime_for(
    config: Config, clock: Clock, handlers: Registry | None = None, *, poll_state: PollStateFor | None = None
) -> Iterator[Runtime]:
    """A Runtime on `clock` with its streams started; retries of 5xx and timeouts back off briefly. Its poller
    keeps its state where `poll_state` says (the `poll_state` fixture), by default in the runtime's store."""
    runtime = Runtime.build(config, handlers=handlers or Registry(), clock=clock)
    if poll_state is not None:
        runtime.poller.store = poll_state(runtime)
    runtime.reader.backoff_initial = 0.001
    runtime.reader.backoff_max = 0.01
    runtime.poller.start_streams()
    try:
        yield runtime
    finally:
        runtime.close()


def poll(runtime: Runtime, *, force_sweeps: bool = False) -> None:
    """One poll that must succeed, then its deliveries."""
    result = runtime.poller.poll_once(force_sweeps=force_sweeps)
    assert not result.errors, result.errors
    runtime.worker.run_until_idle()


def delivered(tmp_path: Path) -> Counter[str]:
    """How often each event id reached the `file` notifier of `make_config`."""
    path = tmp_path / "events.jsonl"
    if not path.exists():
        return Counter()
    return Counter(json.loads(line)["id"] for line in path.read_text().splitlines())


def at(clock: Clock, seconds_ago: float) -> datetime:
    return datetime.fromtimestamp(clock.now - seconds_ago, UTC)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server on a loopback port, in its own directory; `kill` and `start` again to test restarts."""

    def __init__(self, directory: Path, *, durable: bool, password: str | None = None) -> None:
        self.directory = directory
        self.port = free_port()
        self.durable = durable
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        where = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen(
            ["redis-server", *where, "--save", "", *persistence, *auth],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    # with a password, an unauthenticated PING is refused, which proves the server is up
                    if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        pytest.skip(f"redis-server did not start on 127.0.0.1:{self.port}")

    def kill(self) -> None:
        """kill -9: what an acknowledged write must survive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


def redis_server(tmp_path: Path, *, durable: bool, password: str | None = None) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, durable=durable, password=password)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# a Redis the Redis backend's tests run against: one server, or a cluster of three
AnyRedis = RedisServer | RedisClusterServer
# the password of the servers that want one (`locked_redis` in test_standby.py)
REDIS_PASSWORD = "hunter2-redis"


def _session_cluster(tmp_path_factory: pytest.TempPathFactory, password: str | None) -> Iterator[RedisClusterServer]:
    if not cluster_available():
        pytest.skip("redis-server and redis-cli are not installed (Debian: apt-get install redis-server)")
    server = RedisClusterServer(tmp_path_factory.mktemp("redis-cluster"), password=password)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def session_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    """One three-node cluster for the session (starting and joining the nodes takes about 2 s)."""
    yield from _session_cluster(tmp_path_factory, None)


@pytest.fixture(scope="session")
def session_locked_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    """One three-node cluster that wants `REDIS_PASSWORD`, for the session."""
    yield from _session_cluster(tmp_path_factory, REDIS_PASSWORD)


def redis_for_test(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str, *, password: str | None = None
) -> Iterator[AnyRedis]:
    """The Redis of one test: a new redis-server (`kind` "single"), or the session's cluster, emptied ("cluster");
    a test that killed the cluster left it for the next one to start again."""
    if kind == "single":
        yield from redis_server(tmp_path, durable=False, password=password)
        return
    name = "session_locked_redis_cluster" if password else "session_redis_cluster"
    cluster: RedisClusterServer = request.getfixturevalue(name)
    if any(proc.poll() is not None for proc in cluster.procs):
        cluster.kill()
        cluster.start()
    cluster.flush()
    yield cluster


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The config sections that choose the alert state: none (SQLite), or standby pollers on a redis-server.
    The alerting tests (test_alerting.py, test_measures.py) take it to run against each backend."""
    if request.param == "sqlite":
        yield {}
        return
    pytest.importorskip("redis", reason="the Python redis package is not installed (pip install -e '.[redis]')")
    with contextmanager(redis_server)(tmp_path, durable=False) as server:
        yield {"queue": {"backend": "redis", "url": server.url, "standby": True, "lease": "10m"}}


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def poll_state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PollStateFor]:
    """The poll state of a test's poller, once per implementation of PollState: the runtime's SQLite store, and
    a SharedPollState on a real redis-server and on a real three-node Redis Cluster, led by a replica that holds
    the lease (its token fences the writes), with the runtime's store as its local outbox. Pass it to
    `runtime_for`. The Redis cases are skipped when redis-server or the redis package is missing."""
    if request.param == "sqlite":
        yield lambda runtime: runtime.store
        return
    pytest.importorskip("redis", reason="the Python redis package is not installed (pip install -e '.[redis]')")
    from langfuse_poller.redis.queue import sync_client
    from langfuse_poller.redis.standby.keys import PollerKeys
    from langfuse_poller.redis.standby.replica import PollCancel, Replica
    from langfuse_poller.redis.standby.shared_state import SharedPollState

    def no_jobs(jobs: object) -> None:
        raise AssertionError("these tests route no event to the Redis queue")

    with ExitStack() as stack:
        kind = "single" if request.param == "redis" else "cluster"
        server = stack.enter_context(contextmanager(redis_for_test)(request, tmp_path, kind))

        def shared(runtime: Runtime) -> PollState:
            client = sync_client(server.url, 1.0)
            keys = PollerKeys("langfuse-events", cluster=server.url.startswith("redis+cluster://"))
            # a lease longer than any test, on the real clock, by which Redis expires it
            replica = Replica(client, keys, "r0", 600.0, PollCancel(threading.Event()))
            stack.callback(replica.close)
            replica.tick()
            assert replica.token() is not None
            return SharedPollState(
                client,
                keys,
                local=runtime.store,
                add_jobs=no_jobs,
                token=replica.token,
                on_deposed=replica.deposed,
                clock=runtime.poller.clock,
            )

        yield shared
