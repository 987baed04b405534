"""A three-node Redis Cluster on loopback ports, for the tests that run the Redis backend against a cluster.

Three `redis-server` processes in cluster mode, no replicas, joined by `redis-cli --cluster create`: every slot
is served, as a managed cluster serves them. Started once per test session (see `cluster_server` in
conftest.py) and emptied between tests (`flush`), since starting and joining three nodes takes longer than most
of the tests that use them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

NODES = 3
# redis-cli --cluster create needs the nodes' cluster bus (port + 10000) as well: ports above 55535 cannot be used
MAX_PORT = 55535


def free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port > MAX_PORT:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port with a free cluster bus port")


def _ask(port: int, password: str | None, *command: str) -> str:
    auth = ["-a", password, "--no-auth-warning"] if password else []
    result = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *auth, *command],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return result.stdout


class RedisClusterServer:
    """Three loopback redis-server processes joined into one cluster; `url` is how the poller's config names it.

    It stands where a `RedisServer` stands in the tests: `url`, `start`, `kill`, `stop`. A kill stops every
    node; `start` brings them back with the cluster's own memory of itself (the nodes files in `directory`)."""

    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.ports = [free_cluster_port() for _ in range(NODES)]
        while len(set(self.ports)) < NODES:
            self.ports = [free_cluster_port() for _ in range(NODES)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.created = False
        self.started_in = 0.0

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self) -> None:
        started = time.monotonic()
        auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        self.procs = []
        for port in self.ports:
            where = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
            cluster = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
            self.procs.append(
                subprocess.Popen(
                    ["redis-server", *where, *cluster, "--save", "", "--appendonly", "no", *auth],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        if not all(self._wait(lambda port=port: "PONG" in _ask(port, self.password, "PING"), 5) for port in self.ports):
            self.stop()
            pytest.skip(f"redis-server did not start in cluster mode on 127.0.0.1:{self.ports}")
        if not self.created:
            auth_args = ["-a", self.password, "--no-auth-warning"] if self.password else []
            nodes = [f"127.0.0.1:{p}" for p in self.ports]
            created = subprocess.run(
                ["redis-cli", *auth_args, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if created.returncode != 0:
                self.stop()
                pytest.fail(f"redis-cli --cluster create failed: {created.stdout[-500:]} {created.stderr[-500:]}")
            self.created = True
        if not self._wait(self.ready, 15):
            self.stop()
            pytest.fail(f"the cluster on {self.ports} did not reach cluster_state:ok")
        self.started_in = time.monotonic() - started

    def ready(self) -> bool:
        """Every node says cluster_state:ok and knows all three: a client may be sent to any of them."""
        for port in self.ports:
            info = _ask(port, self.password, "CLUSTER", "INFO")
            if "cluster_state:ok" not in info or f"cluster_known_nodes:{NODES}" not in info:
                return False
        return True

    @staticmethod
    def _wait(condition: object, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():  # type: ignore[operator]
                return True
            time.sleep(0.05)
        return False

    def flush(self) -> None:
        """Empty every node: each test starts on an empty cluster, as it starts on a new single server."""
        for port in self.ports:
            _ask(port, self.password, "FLUSHALL")
            _ask(port, self.password, "SCRIPT", "FLUSH")

    def keys(self) -> dict[str, int]:
        """Every key on every node -> the slot it hashes to."""
        found: dict[str, int] = {}
        for port in self.ports:
            for key in _ask(port, self.password, "--scan").splitlines():
                if key:
                    found[key] = int(_ask(port, self.password, "CLUSTER", "KEYSLOT", key).strip())
        return found

    def kill(self) -> None:
        """kill -9 of every node."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def cluster_available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None
