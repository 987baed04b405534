"""Shared fixtures: a loopback Langfuse stand-in, a controllable clock, config builders, a loopback
redis-server."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.config import Config, parse_config
from langfuse_poller.registry import Registry
from langfuse_poller.runtime import Runtime
from langfuse_poller.testing.fake_langfuse import FakeLangfuse


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


@contextmanager
def runtime_for(config: Config, clock: Clock, handlers: Registry | None = None) -> Iterator[Runtime]:
    """A Runtime on `clock` with its streams started; retries of 5xx and timeouts back off briefly."""
    runtime = Runtime.build(config, handlers=handlers or Registry(), clock=clock)
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
