"""Standby pollers: several `run` processes share one Redis; one holds the lease and polls, the others wait.

A real redis-server on loopback (the fixtures of test_queue_redis), the real console script in subprocesses,
FakeLangfuse producing traces while they run, and a `langfuse-poller worker` with a jsonl notifier that
collects what is delivered.
"""

# the fixtures `cli`, `langfuse` and `redis` come from other test modules, and each test names them
# ruff: noqa: F811

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.config import parse_config
from langfuse_poller.errors import ConfigError
from langfuse_poller.events import RecordOutcome, Seen
from langfuse_poller.events import test_event as make_test_event
from langfuse_poller.redis.queue import QUEUE_TARGET, RedisQueueTarget, sync_client
from langfuse_poller.redis.standby.keys import PollerKeys
from langfuse_poller.redis.standby.lease import Deposed
from langfuse_poller.redis.standby.replica import PollCancel, Replica
from langfuse_poller.redis.standby.shared_state import SharedPollState
from langfuse_poller.store import Store
from langfuse_poller.testing.archive import read_archive
from langfuse_poller.testing.fake_langfuse import FakeLangfuse
from tests.conftest import REDIS_PASSWORD, AnyRedis, Clock, make_config, redis_for_test, redis_server, runtime_for
from tests.redis_cluster import RedisClusterServer
from tests.test_cli import Cli, cli, jsonl, langfuse, q, read_jsonl, rule, wait_for, write_config  # noqa: F401
from tests.test_queue_redis import (  # noqa: F401
    QUEUE,
    add_traffic,
    delivery_section,
    free_port,
    jobs_in,
    redis,
)

pytest.importorskip("bullmq", reason="the Python bullmq package is not installed (pip install -e '.[redis]')")

pytestmark = pytest.mark.timeout(60)

LEASE = 2.0
INTERVAL = 0.5
# a kill -9 leaves the lease in Redis until it expires; a standby tries every third of the lease, then polls at
# once; a second of slack for process scheduling on a small shared machine
TAKEOVER_BOUND = LEASE + LEASE / 3 + INTERVAL + 1.5
KEYS = {"langfuse": {"public_key": "pk-lf-1", "secret_key": "sk-lf-1"}}


# --- config ------------------------------------------------------------------------------------------------


def test_standby_config_defaults_and_errors_name_the_key() -> None:
    queue = parse_config(KEYS, "t").queue
    assert (queue.standby, queue.lease.total_seconds(), queue.replica) == (False, 15.0, "")
    parsed = parse_config(
        {**KEYS, "queue": {"backend": "redis", "standby": True, "lease": "5s", "replica": "eu-1"}}, "t"
    ).queue
    assert (parsed.standby, parsed.lease.total_seconds(), parsed.replica) == (True, 5.0, "eu-1")
    for table, key, expected in (
        ({"standby": True}, "queue.standby", 'backend = "redis"'),
        ({"backend": "redis", "standby": "yes"}, "queue.standby", "true or false"),
        ({"backend": "redis", "standby": True, "lease": "500ms"}, "queue.lease", "between 1s and 10m"),
        ({"backend": "redis", "standby": True, "lease": "1h"}, "queue.lease", "between 1s and 10m"),
        ({"backend": "redis", "standby": True, "lease": "soon"}, "queue.lease", "a duration such as"),
        ({"backend": "redis", "standby": True, "replica": "a b"}, "queue.replica", "<hostname>:<pid>"),
    ):
        with pytest.raises(ConfigError) as error:
            parse_config({**KEYS, "queue": table}, "t.toml")
        assert error.value.key == key and expected in error.value.expected, (table, error.value)
        assert "t.toml" in str(error.value)


# --- the lease and the fenced shared state, in process -----------------------------------------------------


@dataclass
class Member:
    replica: Replica
    state: SharedPollState
    jobs: RedisQueueTarget
    store: Store


@contextmanager
def members(server: AnyRedis, tmp_path: Path, count: int, lease: float = 5.0) -> Iterator[list[Member]]:
    """`count` replicas of one queue, each with its own SQLite outbox, as `run` builds them."""
    config = parse_config({**KEYS, "queue": {"backend": "redis", "url": server.url, "standby": True}}, "t")
    made: list[Member] = []
    try:
        for index in range(count):
            client = sync_client(server.url, 1.0)
            keys = PollerKeys.of(config.queue)
            replica = Replica(client, keys, f"r{index}", lease, PollCancel(threading.Event()))
            jobs = RedisQueueTarget(config.queue, config.delivery)
            store = Store(tmp_path / f"r{index}.db")
            state = SharedPollState(
                client, keys, local=store, add_jobs=jobs.send_raw, token=replica.token, on_deposed=replica.deposed
            )
            made.append(Member(replica, state, jobs, store))
        yield made
    finally:
        for member in made:
            member.replica.close()
            member.jobs.close()
            member.store.close()


def keys_for(server: AnyRedis) -> PollerKeys:
    """The keys of the test queue on `server`: tagged on a cluster, as `run` makes them from the URL."""
    return PollerKeys(QUEUE, cluster=isinstance(server, RedisClusterServer))


def outcome(key: str, version: str = "1") -> RecordOutcome:
    return RecordOutcome(key, datetime.fromtimestamp(1000, UTC), Seen(version), ())


def test_a_deposed_leader_cannot_write_and_steps_down(redis: AnyRedis, tmp_path: Path) -> None:
    with members(redis, tmp_path, 2) as (a, b):
        a.replica.tick()
        b.replica.tick()
        assert (a.replica.role, b.replica.role) == ("leader", "standby")
        assert not b.replica.may_poll()
        a.state.ensure_stream("scores", 100.0, [60.0])
        first = make_test_event("score.created")
        with a.state.write() as tx:
            tx.remember("scores", [outcome("s:1")])
            tx.enqueue_many([(first, [QUEUE_TARGET, "rule:grouped"])])
            tx.set_head("scores", 200.0)
            tx.set_sweep("scores", 60.0, 150.0, ran=True)
        assert set(jobs_in(redis)) == {first.id}
        assert a.store.event(first.id) is not None, "the alert group's delivery stays in the leader's outbox"
        assert b.state.seen_states(["s:1"]) == {"s:1": Seen("1")}
        state = b.state.stream("scores")
        assert state is not None and state.head == 200.0 and state.sweeps == {60.0: 150.0}

        # the leader pauses past its lease (its key is gone) while its own clock says it still holds it
        sync_client(redis.url, 1.0).delete(keys_for(redis).lease)
        b.replica.tick()
        assert b.replica.role == "leader" and a.replica.token() is not None
        late = make_test_event("trace.created")
        with pytest.raises(Deposed), a.state.write() as tx:
            tx.remember("scores", [outcome("s:2")])
            tx.enqueue_many([(late, [QUEUE_TARGET])])
            tx.set_head("scores", 300.0)
        # refused as a whole: no dedup key, no watermark; its job (a re-add of the same id by the new leader is a
        # no-op) is the one thing a deposed leader can still leave, which is why jobs go first
        assert b.state.seen_states(["s:2"]) == {}
        assert (state := b.state.stream("scores")) is not None and state.head == 200.0
        assert a.replica.role == "standby" and not a.replica.may_poll() and a.replica.cancel.is_set()
        with pytest.raises(Deposed):
            a.state.record_poll("scores", error=None)

        # the new leader writes; watermarks never move back
        with b.state.write() as tx:
            tx.set_head("scores", 150.0)
            tx.count_poll("scores", 1, 2, 3)
        state = b.state.stream("scores")
        assert state is not None and state.head == 200.0 and (state.api_requests, state.events) == (1, 3)
        a.replica.tick()
        assert a.replica.role == "standby", "the old leader waits while the new one renews"


def test_a_clean_stop_hands_the_lease_over_at_once(redis: AnyRedis, tmp_path: Path) -> None:
    with members(redis, tmp_path, 2, lease=30.0) as (a, b):
        a.replica.tick()
        b.replica.tick()
        assert b.replica.role == "standby"
        # the standby knows when the holder's lease runs out: the daemon tries again right then
        assert b.replica.holder_expires_in is not None and 29 < b.replica.holder_expires_in <= 30
        assert b.replica.standing_by() == "standby: replica r0 leads (token 1)"
        # a restart of r0 under its fixed name, while its previous run's lease lasts
        again = Replica(sync_client(redis.url, 1.0), keys_for(redis), "r0", 30.0, PollCancel(threading.Event()))
        again.tick()
        assert again.role == "standby"
        assert again.standing_by().startswith("standby: this replica's previous run still holds the lease (token 1)")
        a.replica.close()
        b.replica.tick()
        assert b.replica.role == "leader", "no wait for the 30 s lease to expire"
        holder = b.replica.holder()
        assert holder is not None and holder.replica == "r1" and holder.token == 2


def test_dedup_keys_are_pruned_below_every_watermark(redis: AnyRedis, tmp_path: Path) -> None:
    with members(redis, tmp_path, 1) as (a,):
        a.replica.tick()
        a.state.ensure_stream("scores", 0.0, [60.0])
        old = RecordOutcome("s:old", datetime.fromtimestamp(10, UTC), Seen("1"), ())
        new = RecordOutcome("s:new", datetime.fromtimestamp(500, UTC), Seen("2", "ERROR"), ())
        with a.state.write() as tx:
            tx.remember("scores", [old, new])
            assert tx.seen_states(["s:old", "s:new", "s:none"]) == {"s:old": Seen("1"), "s:new": Seen("2", "ERROR")}
        assert a.state.prune_seen("scores", 100.0) == 1
        assert a.state.seen_states(["s:old", "s:new"]) == {"s:new": Seen("2", "ERROR")}


# --- replicas in subprocesses ------------------------------------------------------------------------------


def console_script() -> list[str]:
    """The installed `langfuse-poller`, as users run it; `python -m` where the venv has no scripts dir."""
    script = Path(sys.executable).with_name("langfuse-poller")
    found = str(script) if script.exists() else shutil.which("langfuse-poller")
    return [found] if found else [sys.executable, "-m", "langfuse_poller"]


def standby_config(tmp_path: Path, langfuse: FakeLangfuse, server: AnyRedis, name: str, extra: str = "") -> Path:
    """One replica's config: the shared [queue], its own SQLite state, a fast poll and a short lease."""
    body = (
        f'[queue]\nbackend = "redis"\nurl = {q(server.url)}\nname = {q(QUEUE)}\nstandby = true\n'
        f'lease = "{LEASE:g}s"\nreplica = {q(name)}\n\n'
        + delivery_section()
        + jsonl("archive", tmp_path / "archive.jsonl")
        + rule("all", ["trace.*", "score.*"], ["archive"])
        + extra
    )
    path = write_config(tmp_path / f"{name}.toml", langfuse.url, body, state=tmp_path / f"{name}.db")
    # the poll table of write_config, made faster: records are read by the head a second after they start
    text = path.read_text().replace('settle = "0s"', f'settle = "1s"\ninterval = "{INTERVAL:g}s"')
    path.write_text(text)
    return path


class Proc:
    """A long-running CLI process whose stderr goes to a file, read while it runs."""

    def __init__(self, cli: Cli, tmp_path: Path, name: str, *args: str) -> None:
        self.name = name
        self.log = tmp_path / f"{name}.{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [*console_script(), *args],
            env=cli.env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
            stdin=subprocess.DEVNULL,
        )

    def text(self) -> str:
        return self.log.read_text()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def replica(cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, server: AnyRedis, name: str) -> Proc:
    return Proc(cli, tmp_path, name, "run", "--config", str(standby_config(tmp_path, langfuse, server, name)))


def leads(proc: Proc) -> bool:
    return "took the poller lease" in proc.text()


class Traffic:
    """FakeLangfuse gets a trace every `every` seconds, started now, until `stop`; `ids` their event ids."""

    def __init__(self, langfuse: FakeLangfuse, every: float = 0.05) -> None:
        self.langfuse = langfuse
        self.every = every
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.ids.append(f"trace.created:{self.langfuse.add_trace()[0]['traceId']}")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def delivered(tmp_path: Path) -> Counter[str]:
    """Event ids the worker wrote so far; a line it is still writing (no newline yet) is left for later."""
    return read_archive(tmp_path / "archive.jsonl")[0]


def took_over_within(proc: Proc, since: float, bound: float) -> float:
    """Seconds from `since` until `proc` logs that it took the lease; fails past `bound`."""
    assert wait_for(lambda: leads(proc), bound + 5), proc.text()
    took = time.monotonic() - since
    assert took <= bound, f"{proc.name} took over after {took:.1f}s, bound {bound:.1f}s"
    return took


def leader_standby_and_worker(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis: AnyRedis, procs: list[Proc]
) -> tuple[Proc, Proc, Proc]:
    """Replica a, once it leads; replica b, standing by; a worker writing the events to a jsonl file. Each is
    added to `procs` as it starts, for the caller to stop."""
    a = replica(cli, tmp_path, langfuse, redis, "a")
    procs.append(a)
    assert wait_for(lambda: leads(a), 15), a.text()
    b = replica(cli, tmp_path, langfuse, redis, "b")
    worker = Proc(cli, tmp_path, "worker", "worker", "--config", str(tmp_path / "a.toml"))
    procs += [b, worker]
    assert wait_for(lambda: "standby poller" in b.text() and "concurrency" in worker.text(), 15)
    return a, b, worker


def test_kill_9_of_the_leader_while_events_flow_loses_nothing(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis: AnyRedis
) -> None:
    procs: list[Proc] = []
    try:
        a, b, _worker = leader_standby_and_worker(cli, tmp_path, langfuse, redis, procs)
        kills = 0
        with Traffic(langfuse) as traffic:
            time.sleep(1.5)
            # a dies: b takes over; a comes back as a standby; b dies: a takes over
            for dead, heir in ((a, b), (b, None)):
                assert wait_for(lambda: delivered(tmp_path).keys() >= set(traffic.ids[:5]), 15)
                dead.kill9()
                kills += 1
                killed_at = time.monotonic()
                if heir is None:
                    heir = next(p for p in procs if p.name == "a2")
                took_over_within(heir, killed_at, TAKEOVER_BOUND)
                if dead is a:
                    procs.append(replica(cli, tmp_path, langfuse, redis, "a2"))
                    assert wait_for(lambda: "standby poller" in procs[-1].text(), 15)
                time.sleep(1.0)
        expected = set(traffic.ids)
        assert len(expected) > 50
        assert wait_for(lambda: delivered(tmp_path).keys() >= expected, 20), expected - delivered(tmp_path).keys()
        time.sleep(1.0)  # a late repeat would land now
        counts = delivered(tmp_path)
        assert set(counts) == expected, set(counts) ^ expected
        repeats = sum(count - 1 for count in counts.values())
        assert repeats <= kills, {event_id: n for event_id, n in counts.items() if n > 1}
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.text(), proc.text()


def test_a_paused_leader_is_fenced_off_when_it_wakes(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis: AnyRedis
) -> None:
    procs: list[Proc] = []
    try:
        a, b, _worker = leader_standby_and_worker(cli, tmp_path, langfuse, redis, procs)
        with Traffic(langfuse) as traffic:
            time.sleep(1.0)
            a.proc.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            took_over_within(b, stopped_at, TAKEOVER_BOUND)
            time.sleep(1.0)
            a.proc.send_signal(signal.SIGCONT)
            # it wakes believing nothing happened: its lease ran out by its own clock, or its renewal or its
            # next write is refused; either way it stops polling and stays a standby
            assert wait_for(lambda: "stepping down to standby" in a.text(), 10), a.text()
            time.sleep(2.0)
        expected = set(traffic.ids)
        assert wait_for(lambda: delivered(tmp_path).keys() >= expected, 20), expected - delivered(tmp_path).keys()
        time.sleep(1.0)
        counts = delivered(tmp_path)
        assert set(counts) == expected
        assert sum(count - 1 for count in counts.values()) <= 1, counts.most_common(3)
        assert a.text().count("took the poller lease") == 1, "the old leader did not take the lease back"
        holder = json.loads(cli("status", "--json", "--config", tmp_path / "b.toml").stdout)["redis"]["lease"]
        assert holder["holder"] == "b" and holder["token"] == 2
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.text(), proc.text()


@pytest.fixture
def redis_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyRedis]:
    """The session's three-node cluster alone, emptied, for the tests about a cluster only."""
    yield from redis_for_test(request, tmp_path, "cluster")


def test_on_a_cluster_every_key_of_the_deployment_hashes_to_its_one_slot(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis_cluster: RedisClusterServer
) -> None:
    # the Lua scripts build keys from a prefix and the MULTIs span several keys: on a cluster, both only work
    # when every key shares one slot, and a key outside it would fail there, or on another deployment's node
    from redis.crc import key_slot

    expected = add_traffic(langfuse, traces=3, scores=2)
    procs = [replica(cli, tmp_path, langfuse, redis_cluster, "a")]
    try:
        assert wait_for(lambda: leads(procs[0]) and set(jobs_in(redis_cluster)) == expected, 15), procs[0].text()
        added = cli("silence", "add", "--rule", "all", "--for", "1m", "--config", tmp_path / "a.toml")
        assert added.returncode == 0, str(added)
        assert cli("silence", "expire", "1", "--config", tmp_path / "a.toml").returncode == 0
        procs.append(Proc(cli, tmp_path, "worker", "worker", "--config", str(tmp_path / "a.toml")))
        assert wait_for(lambda: delivered(tmp_path).keys() == expected, 15), procs[-1].text()
        assert wait_for(lambda: "silences" in " ".join(redis_cluster.keys()), 10)
    finally:
        for proc in procs:
            proc.stop()
    keys = redis_cluster.keys()
    tag = "{langfuse-poller:langfuse-events}"
    for key in (f"{tag}:poller:token", f"{tag}:poller:seen", f"{tag}:silences", f"{tag}:langfuse-events:completed"):
        assert key in keys, sorted(keys)
    outside = {key: slot for key, slot in keys.items() if slot != key_slot(tag.encode())}
    assert not outside, f"keys outside the deployment's slot {key_slot(tag.encode())}: {outside}"
    for proc in procs:
        assert "Traceback" not in proc.text(), proc.text()


def test_a_url_that_names_the_wrong_kind_of_redis_is_a_clear_error(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis_cluster: RedisClusterServer
) -> None:
    with contextmanager(redis_server)(tmp_path, durable=False) as single:
        # a cluster URL at a single server, and a plain URL at a node of the cluster (which would answer, then
        # refuse the keys of the other nodes' slots with MOVED)
        as_cluster = standby_config(tmp_path, langfuse, single, "as-cluster")
        as_cluster.write_text(as_cluster.read_text().replace(single.url, f"redis+cluster://127.0.0.1:{single.port}"))
        as_single = standby_config(tmp_path, langfuse, single, "as-single")
        as_single.write_text(as_single.read_text().replace(single.url, f"redis://127.0.0.1:{redis_cluster.port}/0"))
        checked = cli("check", "--config", as_cluster)
        assert "FAIL Redis at redis+cluster://127.0.0.1:" in checked.stdout, str(checked)
        assert "Cluster mode is not enabled on this node" in checked.stdout, str(checked)
        checked = cli("check", "--config", as_single)
        expected = "is a node of a Redis Cluster: name the cluster as redis+cluster://"
        assert "FAIL Redis at redis://127.0.0.1:" in checked.stdout and expected in checked.stdout, str(checked)
        for path, said in ((as_cluster, "Cluster mode is not enabled"), (as_single, expected)):
            result = cli("worker", "--config", path)
            assert result.returncode == 1 and said in result.stderr, str(result)
            assert "Traceback" not in result.stderr, result.stderr


PASSWORD = REDIS_PASSWORD


@pytest.fixture(params=["single", "cluster"])
def locked_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyRedis]:
    """A Redis that wants a password, one server or a cluster: `status` and `/metrics` must never show it."""
    yield from redis_for_test(request, tmp_path, request.param, password=PASSWORD)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def test_status_and_metrics_show_the_lease_the_replicas_the_queue_and_the_workers(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, locked_redis: AnyRedis
) -> None:
    expected = add_traffic(langfuse, traces=3)
    metrics_port = free_port()
    procs: list[Proc] = []
    try:
        path = standby_config(
            tmp_path, langfuse, locked_redis, "a", f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        )
        a = Proc(cli, tmp_path, "a", "run", "--config", str(path))
        procs.append(a)
        assert wait_for(lambda: leads(a), 15), a.text()
        b = replica(cli, tmp_path, langfuse, locked_redis, "b")
        procs.append(b)
        assert wait_for(lambda: "standby poller" in b.text() and set(jobs_in(locked_redis)) == expected, 15)
        time.sleep(LEASE / 3 + 0.2)  # b's first tick has written its role

        status = cli("status", "--json", "--config", tmp_path / "b.toml")
        assert status.returncode == 0, str(status)
        report = json.loads(status.stdout)
        redis_part = report["redis"]
        assert redis_part["error"] is None, redis_part
        assert redis_part["lease"]["holder"] == "a" and redis_part["lease"]["token"] == 1
        assert 0 < redis_part["lease"]["expires_in_seconds"] <= LEASE
        assert {(r["name"], r["role"]) for r in redis_part["replicas"]} == {("a", "leader"), ("b", "standby")}
        assert redis_part["jobs"]["waiting"] == 3 and redis_part["depth"] == 3 and redis_part["workers"] == []
        assert {s["name"] for s in report["streams"]} == {"observations", "scores"}, "the shared watermarks"
        assert all(s["last_success"] for s in report["streams"])
        text = scrape(metrics_port)
        assert 'langfuse_poller_leader{replica="a"} 1.0' in text
        assert 'langfuse_poller_lease_holder{replica="a",token="1"} 1.0' in text
        assert 'langfuse_poller_redis_jobs{state="waiting"} 3.0' in text
        assert 'langfuse_poller_replicas{role="standby"} 1.0' in text
        assert 'langfuse_poller_events_total{source="poll",type="trace.created"} 3.0' in text, "jobs are counted"

        worker = Proc(cli, tmp_path, "worker", "worker", "--config", str(tmp_path / "b.toml"))
        procs.append(worker)
        assert wait_for(lambda: delivered(tmp_path).keys() == expected, 15), worker.text()
        shown = cli("status", "--config", tmp_path / "b.toml")
        assert shown.returncode == 0, str(shown)
        assert "lease: held by a (token 1)" in shown.stdout, shown.stdout
        assert "replica a: leader (token 1)" in shown.stdout and "replica b: standby" in shown.stdout
        assert f"workers seen: 1: {socket.gethostname()}:{worker.proc.pid}" in shown.stdout, shown.stdout
        assert "depth 0 jobs" in shown.stdout, shown.stdout
        assert "langfuse_poller_redis_workers 1.0" in scrape(metrics_port)
        checked = cli("check", "--config", tmp_path / "b.toml")
        # the Redis is shown as what it is: a cluster with its nodes and the hash tag of the deployment's keys
        shown_url = locked_redis.url.replace(PASSWORD, "***")
        if isinstance(locked_redis, RedisClusterServer):
            tag = "{langfuse-poller:langfuse-events}"
            assert redis_part["cluster"] == {"nodes": 3, "hash_tag": tag}, redis_part
            assert f"at {shown_url} (cluster of 3 nodes, keys tagged {tag})" in shown.stdout, shown.stdout
            assert "langfuse_poller_redis_cluster_nodes 3.0" in scrape(metrics_port)
            assert f"ok   Redis Cluster at {shown_url} answers: 3 nodes; keys tagged {tag}" in checked.stdout, str(
                checked
            )
        else:
            assert redis_part["cluster"] is None and "(cluster of" not in shown.stdout
            assert "redis_cluster_nodes" not in scrape(metrics_port)
            assert f"ok   Redis at {shown_url} answers" in checked.stdout, str(checked)
        for output in (status.stdout, status.stderr, shown.stdout, shown.stderr, scrape(metrics_port), checked.stdout):
            assert PASSWORD not in output
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert PASSWORD not in proc.text() and "Traceback" not in proc.text(), proc.text()


def test_once_refuses_to_poll_while_a_replica_holds_the_lease(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis: AnyRedis
) -> None:
    add_traffic(langfuse, traces=2)
    alone = cli("once", "--config", standby_config(tmp_path, langfuse, redis, "solo"))
    assert alone.returncode == 0 and "2 new events" in alone.stdout, str(alone)
    a = replica(cli, tmp_path, langfuse, redis, "a")
    try:
        assert wait_for(lambda: leads(a), 15), a.text()
        refused = cli("once", "--config", tmp_path / "solo.toml")
        assert refused.returncode != 0 and "held by replica a (token 2, " in refused.stderr, str(refused)
    finally:
        a.stop()
    # a `once` longer than the lease renews it meanwhile (a stop released it: no wait for the expiry)
    add_traffic(langfuse, traces=1, age=0)
    time.sleep(1.2)  # `settle`: the head reads up to a second ago
    langfuse.slow_next(6, seconds=0.5)
    started = time.monotonic()
    slow = cli("once", "--config", tmp_path / "solo.toml")
    assert time.monotonic() - started > LEASE
    assert slow.returncode == 0 and "1 new events" in slow.stdout, str(slow)


def test_absence_rules_follow_the_leader_and_stand_still_on_a_standby(redis: AnyRedis, tmp_path: Path) -> None:
    """A standby sees no matches: were its absence rules to measure progress by the clock, they would fire."""
    clock = Clock()
    rule_table = {
        "name": "silent-app",
        "type": "absence",
        "events": ["trace.created"],
        "window": "5m",
        "notify": ["alerts"],
    }
    with FakeLangfuse(clock=clock) as fake, ExitStack() as stack:
        runtimes = {}
        for name in ("a", "b"):
            config = make_config(
                fake,
                tmp_path / name,
                queue={"backend": "redis", "url": redis.url, "name": QUEUE, "standby": True, "replica": name},
                notifiers={"alerts": {"type": "jsonl", "path": str(tmp_path / f"{name}-alerts.jsonl")}},
                rules=[rule_table],
            )
            runtimes[name] = stack.enter_context(runtime_for(config, clock))
        a, b = runtimes["a"], runtimes["b"]
        assert a.replica is not None and b.replica is not None
        a.replica.tick()
        b.replica.tick()
        assert (a.replica.role, b.replica.role) == ("leader", "standby")
        for rt in (a, b):
            rt.alerter.start()

        def minute(traffic: bool) -> None:
            clock.advance(60)
            if traffic:
                fake.add_trace(start_time=datetime.fromtimestamp(clock.now - 1, UTC))
            assert not a.poller.poll_once().errors
            for rt in (a, b):
                rt.worker.run_until_idle()
                rt.alerter.tick()
                rt.worker.run_until_idle()

        for _ in range(8):
            minute(traffic=True)
        assert read_jsonl(tmp_path / "a-alerts.jsonl") == [] and read_jsonl(tmp_path / "b-alerts.jsonl") == []
        for _ in range(7):
            minute(traffic=False)
        fired = [n["event"] for n in read_jsonl(tmp_path / "a-alerts.jsonl")]
        assert fired == ["rule.firing"], "the leader measures progress by the shared watermark"
        assert read_jsonl(tmp_path / "b-alerts.jsonl") == [], "the standby's absence rule stood still"


@pytest.mark.parametrize("standby_lookback", ["10m", "2m"])
def test_a_standby_with_other_poll_ages_leaves_the_leaders_sweeps_alone(
    redis: AnyRedis, tmp_path: Path, standby_lookback: str
) -> None:
    """A replica that only waits must not rewrite the shared sweep watermarks: in a rolling deploy that shortens
    `lookback`, the new standby's start used to drop the leader's 10m sweep, which then restarted at the head and
    never read a record that became visible five minutes late."""
    clock = Clock()
    with FakeLangfuse(clock=clock) as fake, ExitStack() as stack:

        def start(name: str, lookback: str, role: str) -> Any:
            """A replica's runtime after its first lease tick, which gave it `role`."""
            config = make_config(
                fake,
                tmp_path / name,
                poll={"lookback": lookback},
                queue={"backend": "redis", "url": redis.url, "name": QUEUE, "standby": True, "replica": name},
            )
            runtime = stack.enter_context(runtime_for(config, clock))
            assert runtime.replica is not None
            runtime.replica.tick()
            assert runtime.replica.role == role
            return runtime

        a = start("a", "10m", "leader")
        for _ in range(3):
            clock.advance(60)
            assert not a.poller.poll_once().errors
        late = fake.add_trace(start_time=datetime.fromtimestamp(clock.now - 30, UTC), visible_after=300)
        late_id = f"trace.created:{late[0]['traceId']}"
        start("b", standby_lookback, "standby")
        for _ in range(12):
            clock.advance(60)
            assert not a.poller.poll_once().errors
        assert late_id in jobs_in(redis), "the leader's 10m sweep never read the late record"


def test_silence_commands_with_a_wrong_redis_password_fail_with_a_message(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, locked_redis: AnyRedis
) -> None:
    path = standby_config(tmp_path, langfuse, locked_redis, "a")
    path.write_text(path.read_text().replace(PASSWORD, "not-" + PASSWORD))
    for args in (("list",), ("add", "--rule", "all", "--for", "1h"), ("expire", "1")):
        result = cli("silence", *args, "--config", path)
        assert result.returncode == 1, str(result)
        assert "Traceback" not in result.stderr and "error:" in result.stderr, result.stderr
        assert PASSWORD not in result.stderr + result.stdout


def test_a_replica_that_redis_refuses_says_so_instead_of_standing_by_quietly(
    locked_redis: AnyRedis, caplog: pytest.LogCaptureFixture
) -> None:
    # a wrong password (or any refusal) makes every try to take the lease fail: the replica must not look like a
    # healthy standby that waits for a leader, which may not exist
    wrong_url = locked_redis.url.replace(PASSWORD, "not-" + PASSWORD)
    replica = Replica(sync_client(wrong_url, 1.0), keys_for(locked_redis), "r0", 3.0, PollCancel(threading.Event()))
    with caplog.at_level("DEBUG"):
        for _ in range(3):
            replica.tick()
    assert replica.role == "standby"
    assert replica.standing_by().startswith("standby that cannot take over: Redis failed")
    loud = [r for r in caplog.records if r.levelno >= 30]
    assert loud, "only debug lines: " + "; ".join(r.getMessage() for r in caplog.records)
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)


def test_a_standby_says_in_its_service_status_whom_it_waits_for_or_why_it_cannot_take_over(
    cli: Cli, langfuse: FakeLangfuse, locked_redis: AnyRedis, tmp_path: Path
) -> None:
    from tests.test_service import NotifySocket

    sockets = [NotifySocket(str(tmp_path / f"notify-{name}.sock")) for name in ("b", "c")]
    refused = standby_config(tmp_path, langfuse, locked_redis, "c")
    refused.write_text(refused.read_text().replace(PASSWORD, "not-" + PASSWORD))
    procs = [replica(cli, tmp_path, langfuse, locked_redis, "a")]
    try:
        assert wait_for(lambda: leads(procs[0])), procs[0].text()
        configs = [standby_config(tmp_path, langfuse, locked_redis, "b"), refused]
        for notify, config in zip(sockets, configs, strict=True):
            env = Cli({**cli.env, "NOTIFY_SOCKET": notify.address})
            procs.append(Proc(env, tmp_path, config.stem, "run", "--config", str(config)))
        # READY=1 comes with the first (empty) poll of a standby; its STATUS says what the standby is doing
        for notify in sockets:
            ready = notify.wait_for("READY").fields["STATUS"]
            assert ready.startswith("standby") and "last poll ok" not in ready, ready
        waiting = sockets[0].wait_for("STATUS", where=lambda n: "leads" in n.fields["STATUS"]).fields["STATUS"]
        assert waiting.startswith("standby: replica a leads (token "), waiting
        stuck = sockets[1].wait_for("STATUS", where=lambda n: "cannot" in n.fields["STATUS"]).fields["STATUS"]
        assert stuck.startswith("standby that cannot take over: Redis failed ("), stuck
        assert all(PASSWORD not in n.fields.get("STATUS", "") for notify in sockets for n in notify.notices())
    finally:
        for proc in procs:
            proc.stop()
        for notify in sockets:
            notify.close()


def test_a_poll_begun_under_an_old_token_cannot_commit_under_a_new_one(redis: AnyRedis, tmp_path: Path) -> None:
    # a pauses past its lease mid-page; b takes over (token 2) and stops; a wakes, its lease thread steps down and
    # takes the lease again at once (token 3) and clears the cancel, all in one tick, before the poll thread looks.
    # The page a read under token 1 must not be committed under token 3: b moved the dedup keys meanwhile
    with members(redis, tmp_path, 2) as (a, b):
        a.replica.tick()
        a.state.ensure_stream("scores", 100.0, [60.0])
        with pytest.raises(Deposed), a.state.write() as tx:
            tx.remember("scores", [outcome("s:1", version="1")])
            tx.set_head("scores", 200.0)
            sync_client(redis.url, 1.0).delete(keys_for(redis).lease)
            b.replica.tick()
            with b.state.write() as newer:
                newer.remember("scores", [outcome("s:1", version="2")])
            b.replica.close()
            a.replica.tick()
            assert a.replica.token() == 3 and not a.replica.cancel.is_set()
        assert b.state.seen_states(["s:1"]) == {"s:1": Seen("2")}, "the stale page overwrote the newer dedup key"


def test_a_redis_that_lost_the_poll_state_resumes_from_the_leaders_last_head(
    redis: AnyRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis restarted without its data: starting again at `[poll] start` ("now") would skip what came meanwhile
    clock = Clock()
    with FakeLangfuse(clock=clock) as fake, ExitStack() as stack:
        config = make_config(
            fake,
            tmp_path / "a",
            queue={"backend": "redis", "url": redis.url, "name": QUEUE, "standby": True, "replica": "a"},
            notifiers={"file": {"type": "jsonl", "path": str(tmp_path / "events.jsonl")}},
            rules=[{"name": "all", "events": ["trace.*"], "notify": ["file"]}],
        )
        a = stack.enter_context(runtime_for(config, clock))
        assert a.replica is not None and a.shared is not None
        a.replica.tick()
        clock.advance(60)
        with a.leader_term():
            a.poller.start_streams()
            assert not a.poller.poll_once().errors
        head = a.shared.stream("observations")
        assert head is not None and abs(head.head - clock.now) < 0.001
        assert "has no poll state" not in caplog.text, "a first start is no loss"
        sync_client(redis.url, 1.0).flushall()
        clock.advance(60)
        (late,) = fake.add_trace(start_time=datetime.fromtimestamp(clock.now - 30, UTC))
        a.replica.tick()  # the lease went with the data: lost, then taken again
        assert a.replica.role == "leader"
        with a.leader_term():
            a.poller.start_streams()
            assert not a.poller.poll_once().errors
        assert "has no poll state for observations" in caplog.text
        jobs = list(jobs_in(redis))
        assert f"trace.created:{late['traceId']}" in jobs, f"the trace that came meanwhile was read: {jobs}"


def test_a_worker_that_redis_refuses_stops_with_a_message(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, locked_redis: AnyRedis
) -> None:
    # bullmq would wait for a Redis that refuses it without a word: the worker looked idle, not broken
    path = standby_config(tmp_path, langfuse, locked_redis, "a")
    path.write_text(path.read_text().replace(PASSWORD, "not-" + PASSWORD))
    result = cli("worker", "--config", path)
    assert result.returncode == 1, str(result)
    assert "did not let the worker in" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert PASSWORD not in result.stderr + result.stdout and "***" in result.stderr


def test_a_worker_says_when_redis_goes_away_and_comes_back(
    tmp_path: Path, redis: AnyRedis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langfuse_poller.redis import worker as queue_worker

    monkeypatch.setattr(queue_worker, "WATCH_INTERVAL", 0.2)
    config = parse_config({**KEYS, "queue": {"backend": "redis", "url": redis.url}}, "t")
    stop = threading.Event()
    worker = threading.Thread(
        target=queue_worker.run_worker, args=(config,), kwargs={"stop": stop, "install_signals": False}
    )
    with caplog.at_level("INFO"):
        worker.start()
        try:
            assert wait_for(lambda: "langfuse-poller worker on queue" in caplog.text, 10)
            redis.kill()
            assert wait_for(lambda: "does not answer" in caplog.text, 10), caplog.text
            redis.start()
            assert wait_for(lambda: "answers again" in caplog.text, 10), caplog.text
        finally:
            stop.set()
            worker.join(15)
    assert not worker.is_alive()
    assert caplog.text.count("does not answer") == 1, "said once per outage"
