"""The Redis backend end to end: a real redis-server on loopback, the real bullmq package, and (for the Node.js
test) the real `bullmq` npm package.

Skipped, with the reason, when redis-server cannot be started, the Python bullmq package is missing, or (Node.js
test only) node/npm or the npm package are unavailable.
"""

# the fixtures `cli` and `langfuse` come from test_cli, and each test names them as parameters
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.config import DeliveryConfig, QueueConfig, load_config, parse_config, redacted_url
from langfuse_poller.errors import ConfigError, DeliveryError
from langfuse_poller.events import Event
from langfuse_poller.events import test_event as make_test_event
from langfuse_poller.redis.queue import QUEUE_TARGET, RedisQueueTarget, job_options, longest_backoff
from langfuse_poller.redis.standby.keys import PollerKeys
from langfuse_poller.redis.worker import run_worker
from langfuse_poller.registry import Registry, Router
from langfuse_poller.testing.fake_langfuse import FakeLangfuse
from langfuse_poller.util.redis_url import ClusterUrl, parse_cluster_url
from tests.conftest import AnyRedis, RedisServer, free_port, redis_for_test, redis_server
from tests.receivers import receiver
from tests.redis_cluster import RedisClusterServer
from tests.test_cli import PROJECT_ID, Cli, ago, cli, jsonl, langfuse, q, rule, wait_for, write_config  # noqa: F401

pytest.importorskip("bullmq", reason="the Python bullmq package is not installed (pip install -e '.[redis]')")

pytestmark = pytest.mark.timeout(60)

QUEUE = "langfuse-events"
NODE_BULLMQ = "bullmq@5"


@pytest.fixture(params=["single", "cluster"])
def redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyRedis]:
    """A Redis for one test, once a single server and once the three-node cluster: every test that names this
    fixture runs against both."""
    yield from redis_for_test(request, tmp_path, request.param)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """appendonly yes, appendfsync always: a job Redis acknowledged is on disk."""
    yield from redis_server(tmp_path, durable=True)


def queue_section(server: AnyRedis, name: str = QUEUE) -> str:
    return f'[queue]\nbackend = "redis"\nurl = {q(server.url)}\nname = {q(name)}\n\n'


def delivery_section(max_attempts: int = 3, backoff: str = "100ms") -> str:
    return f"[delivery]\nmax_attempts = {max_attempts}\nbackoff = {q(backoff)}\n\n"


def bullmq_queue(server: AnyRedis, name: str = QUEUE) -> Any:
    """A bullmq Queue on the queue of `server`, with the client and the prefix the poller uses there."""
    from bullmq import Queue

    from langfuse_poller.redis.queue import bullmq_options, redis_client

    config = QueueConfig(backend="redis", url=server.url, name=name)
    return Queue(name, bullmq_options(config, redis_client(server.url, 5.0)))


def jobs_in(server: AnyRedis, name: str = QUEUE) -> dict[str, dict[str, Any]]:
    """Every job of the queue, whatever its state: id -> {name, data, opts, state}."""

    async def read() -> dict[str, dict[str, Any]]:
        queue = bullmq_queue(server, name)
        try:
            found: dict[str, dict[str, Any]] = {}
            for state in ("waiting", "active", "delayed", "completed", "failed"):
                for job in await queue.getJobs([state]):
                    found[job.id] = {"name": job.name, "data": job.data, "opts": job.opts, "state": state}
            return found
        finally:
            await queue.close()

    return asyncio.run(read())


def add_traffic(langfuse: FakeLangfuse, traces: int, scores: int = 0, age: float = 30) -> set[str]:
    """Traces (one trace.created each) and scores (one score.created each), `age` seconds ago; their event ids."""
    ids = set()
    for _ in range(traces):
        ids.add(f"trace.created:{langfuse.add_trace(start_time=ago(age))[0]['traceId']}")
    for _ in range(scores):
        ids.add(f"score.created:{langfuse.add_score(value=0.5, timestamp=ago(age))['id']}")
    return ids


def poller_config(tmp_path: Path, langfuse: FakeLangfuse, server: AnyRedis, extra: str = "") -> Path:
    return write_config(
        tmp_path / "poller.toml",
        langfuse.url,
        queue_section(server)
        + delivery_section()
        + jsonl("archive", tmp_path / "archive.jsonl")
        + rule("all", ["trace.*", "score.*"], ["archive"])
        + extra,
    )


# --- config and routing, in process ------------------------------------------------------------------------


KEYS = {"langfuse": {"public_key": "pk-lf-1", "secret_key": "sk-lf-1"}}


def test_queue_config_defaults_and_errors() -> None:
    assert parse_config(KEYS, "t").queue == QueueConfig()
    parsed = parse_config({**KEYS, "queue": {"backend": "redis", "url": "redis://h:1/2", "name": "jobs"}}, "t").queue
    assert parsed == QueueConfig(backend="redis", url="redis://h:1/2", name="jobs")
    for table, key in (
        ({"backend": "kafka"}, "queue.backend"),
        ({"url": "http://x"}, "queue.url"),
        ({"name": "a:b"}, "queue.name"),
        ({"nmae": "x"}, "queue.nmae"),
    ):
        with pytest.raises(ConfigError) as error:
            parse_config({**KEYS, "queue": table}, "t.toml")
        assert error.value.key == key and "t.toml" in str(error.value)
    with pytest.raises(ConfigError) as error:
        parse_config({**KEYS, "queue": {"url": "http://user:hunter2@x"}}, "t.toml")
    assert "hunter2" not in str(error.value)
    assert redacted_url("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert redacted_url("redis://h:6379/0") == "redis://h:6379/0"


def test_a_cluster_is_named_by_its_url_and_a_wrong_cluster_url_names_the_key_and_the_form() -> None:
    url = "redis+cluster://app:s3cret@10.0.0.1:7000,10.0.0.2:7001"
    queue = parse_config({**KEYS, "queue": {"backend": "redis", "url": url}}, "t").queue
    assert queue.cluster and not QueueConfig(backend="redis").cluster
    assert queue.display_url == "redis+cluster://app:***@10.0.0.1:7000,10.0.0.2:7001"
    assert parse_cluster_url(url) == ClusterUrl((("10.0.0.1", 7000), ("10.0.0.2", 7001)), "app", "s3cret")
    assert parse_cluster_url("rediss+cluster://h:1/0").tls
    for url, problem in (
        ("redis+cluster://:s3cret@10.0.0.1", "each seed must be host:port, got '10.0.0.1'"),
        ("redis+cluster://10.0.0.1:7000,", "each seed must be host:port, got ''"),
        ("redis+cluster://10.0.0.1:99999", "each seed must be host:port"),
        ("redis+cluster://:s3cret@10.0.0.1:7000/2", "only database 0, not /2"),
        ("redis+cluster://10.0.0.1:7000?timeout=1", "query options"),
    ):
        with pytest.raises(ConfigError) as error:
            parse_config({**KEYS, "queue": {"backend": "redis", "url": url}}, "t.toml")
        assert error.value.key == "queue.url", url
        assert "redis+cluster://[user:password@]host:port[,host:port...]" in error.value.expected
        assert problem in error.value.expected, (url, error.value.expected)
        assert "s3cret" not in str(error.value)
    with pytest.raises(ConfigError) as error:
        parse_config({**KEYS, "queue": {"url": "cluster://10.0.0.1:7000"}}, "t.toml")
    assert error.value.key == "queue.url" and "redis+cluster://" in error.value.expected


def test_with_a_queue_handlers_and_notifiers_become_one_target_and_alert_groups_stay() -> None:
    handlers = Registry()
    handlers.register(lambda event: None, ["trace.*"], name="h")
    config = parse_config(
        {
            **KEYS,
            "notifiers": {"file": {"type": "jsonl", "path": "/tmp/never.jsonl"}},
            "rules": [
                {"name": "fwd", "events": ["trace.*"], "notify": ["file"]},
                {"name": "grouped", "events": ["trace.*"], "notify": ["file"], "group_by": ["data.name"]},
            ],
        },
        "t",
    )
    router = Router(config.rules, handlers)
    event = make_test_event("trace.created")
    assert router.targets(event) == ["handler:h", "notifier:file", "rule:grouped"]
    router.queue = QUEUE_TARGET
    assert router.targets(event) == ["rule:grouped", QUEUE_TARGET]
    assert router.direct_targets(event) == ["handler:h", "notifier:file"]
    assert router.targets(make_test_event("score.created")) == []


def test_bullmq_backoff_has_no_cap_so_a_long_one_is_said(caplog: pytest.LogCaptureFixture) -> None:
    defaults = DeliveryConfig()
    assert job_options(defaults)["backoff"] == {"type": "exponential", "delay": 1000}
    assert longest_backoff(defaults) == 256 <= defaults.max_backoff.total_seconds()
    RedisQueueTarget(QueueConfig(backend="redis"), defaults).close()
    assert "no cap" not in caplog.text
    many = DeliveryConfig(max_attempts=20)
    assert longest_backoff(many) == 2**18
    RedisQueueTarget(QueueConfig(backend="redis"), many).close()
    assert "up to 262144s between attempts, beyond max_backoff (600s)" in caplog.text


def test_redis_down_is_a_retryable_delivery_error() -> None:
    target = RedisQueueTarget(
        QueueConfig(backend="redis", url=f"redis://127.0.0.1:{free_port()}/0"),
        DeliveryConfig(timeout=timedelta(seconds=2)),
    )
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryError) as error:
            target.send(make_test_event("trace.created"))
        assert error.value.retryable and "did not accept 1 jobs" in str(error.value)
        assert time.monotonic() - started < 3
    finally:
        target.close()


# --- the poller -> Redis ----------------------------------------------------------------------------------


def test_once_queues_each_event_once_and_a_redis_outage_or_crash_loses_nothing(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, durable_redis: AnyRedis
) -> None:
    expected = add_traffic(langfuse, traces=3, scores=2)
    path = poller_config(tmp_path, langfuse, durable_redis)

    first = cli("once", "--config", path)
    assert first.returncode == 0, str(first)
    assert "5 new events; delivered 5, pending 0" in first.stdout, str(first)
    jobs = jobs_in(durable_redis)
    assert set(jobs) == expected
    for job_id, job in jobs.items():
        assert job["state"] == "waiting"
        assert job["name"] == job["data"]["event"] == job_id.split(":")[0]
        assert job["data"]["id"] == job_id and job["data"]["source"] == "poll"
        assert job["data"]["data"]["projectId"] == PROJECT_ID
        assert job["opts"]["attempts"] == 3
        assert job["opts"]["backoff"] == {"type": "exponential", "delay": 100}
    assert not (tmp_path / "archive.jsonl").exists(), "the poller left the notifier to the workers"

    again = cli("once", "--config", path)
    assert again.returncode == 0 and "0 new events" in again.stdout, str(again)
    assert set(jobs_in(durable_redis)) == expected

    # Redis down: once fails, the new events wait in SQLite
    durable_redis.kill()
    late = add_traffic(langfuse, traces=2, scores=1, age=0)
    time.sleep(2.1)  # the default `settle`: the head reads up to 2 s ago
    down = cli("once", "--config", path)
    assert down.returncode != 0, str(down)
    assert "3 new events" in down.stdout and "pending 3" in down.stdout, str(down)
    status = json.loads(cli("status", "--json", "--config", path).stdout)
    assert status["queue"]["by_target"] == {QUEUE_TARGET: 3}

    # back (after a kill -9): what Redis acknowledged is still there, and the next once queues the rest
    durable_redis.start()
    assert set(jobs_in(durable_redis)) == expected
    # what failed while Redis was down is retried on its backoff, up to 7 s out by the end of that run (100 ms,
    # doubling, until the next retry is over 5 s away): a run delivers what falls due within 5 s, a later run
    # the rest, as a timer that runs `once` would
    delivered = 0
    for _ in range(10):
        back = cli("once", "--config", path)
        delivered += int(back.stdout.split("delivered ")[1].split(",")[0])
        if "pending 0" in back.stdout:
            break
    assert back.returncode == 0, str(back)
    assert delivered == 3, str(back)
    jobs = jobs_in(durable_redis)
    assert set(jobs) == expected | late and len(jobs) == 8


def test_a_job_added_again_after_a_crash_is_not_queued_twice(redis: AnyRedis) -> None:
    target = RedisQueueTarget(QueueConfig(backend="redis", url=redis.url), DeliveryConfig())
    try:
        event = make_test_event("score.created")
        target.send(event)
        # a crash between Redis's answer and the SQLite record: the outbox sends it again
        target.send_raw([(event.id, event.to_json())])
    finally:
        target.close()
    assert list(jobs_in(redis)) == [event.id]


# --- workers -----------------------------------------------------------------------------------------------


def worker_config(tmp_path: Path, langfuse: FakeLangfuse, server: AnyRedis, hook_url: str) -> Path:
    return write_config(
        tmp_path / "worker.toml",
        langfuse.url,
        queue_section(server)
        + delivery_section()
        + f'[notifiers.hook]\ntype = "webhook"\nurl = {q(hook_url)}\n\n'
        + rule("all", ["trace.*", "score.*"], ["hook"]),
    )


def start_worker(cli: Cli, path: Path, tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen[str], Path]:
    """A `worker` process whose stderr goes to a file, so that it can be read while it runs."""
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "langfuse_poller", "worker", "--config", str(path), *args],
        env=cli.env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        stdin=subprocess.DEVNULL,
        text=True,
    )
    return proc, log


def stop_worker(proc: subprocess.Popen[str], log: Path) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"worker did not stop on SIGTERM\n{log.read_text()}")
    text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text, text
    return text


def test_two_workers_share_the_jobs_without_double_delivery(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis: AnyRedis
) -> None:
    with receiver(delay=0.01) as hook:
        path = worker_config(tmp_path, langfuse, redis, hook.url)
        workers = [start_worker(cli, path, tmp_path, f"worker{i}") for i in range(2)]
        try:
            assert wait_for(lambda: all("concurrency 1" in log.read_text() for _, log in workers), 15)
            expected = add_traffic(langfuse, traces=60, scores=60)
            produced = cli("once", "--config", path)
            assert produced.returncode == 0 and "120 new events" in produced.stdout, str(produced)
            assert wait_for(lambda: len(hook.received) >= 120, 30), len(hook.received)
            time.sleep(0.3)  # a double delivery would land now
        finally:
            logs = [stop_worker(proc, log) for proc, log in workers]
        ids = [received.headers["webhook-id"] for received in hook.received]
        assert sorted(ids) == sorted(expected), "each event once, none twice"
        counts = [int(text.rsplit("stopped after ", 1)[1].split()[0]) for text in logs]
        assert sum(counts) == 120 and all(count > 0 for count in counts), counts
    assert {job["state"] for job in jobs_in(redis).values()} == {"completed"}


def test_a_failing_notifier_is_retried_then_the_job_waits_in_the_failed_set(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis: AnyRedis
) -> None:
    # the first answer fails, then the endpoint works: retried by BullMQ; a 500 forever: failed after 3 attempts
    with receiver(respond=lambda n: 500 if n == 0 else 200) as flaky, receiver(respond=lambda n: 500) as broken:
        path = write_config(
            tmp_path / "worker.toml",
            langfuse.url,
            queue_section(redis)
            + delivery_section(max_attempts=3, backoff="100ms")
            + f'[notifiers.flaky]\ntype = "webhook"\nurl = {q(flaky.url)}\n\n'
            + f'[notifiers.broken]\ntype = "webhook"\nurl = {q(broken.url)}\n\n'
            + rule("traces", ["trace.*"], ["flaky"])
            + rule("scores", ["score.*"], ["flaky", "broken"]),
        )
        trace_id = next(iter(add_traffic(langfuse, traces=1)))
        score_id = next(iter(add_traffic(langfuse, traces=0, scores=1)))
        assert cli("once", "--config", path).returncode == 0
        proc, log = start_worker(cli, path, tmp_path, "worker")
        try:
            assert wait_for(lambda: len(broken.statuses) >= 3, 20), log.read_text()
            assert wait_for(lambda: jobs_in(redis)[score_id]["state"] == "failed", 10)
        finally:
            stop_worker(proc, log)
    jobs = jobs_in(redis)
    assert jobs[trace_id]["state"] == "completed" and jobs[score_id]["state"] == "failed"
    # `flaky` got each event once: the retries of the score's job skipped the target it had reached
    assert sorted(r.headers["webhook-id"] for r in flaky.received) == sorted([trace_id, score_id])
    assert len(broken.statuses) == 3

    # the README's way to retry the failed set
    async def retry() -> None:
        queue = bullmq_queue(redis)
        failed = await queue.getJobs(["failed"])
        assert [job.id for job in failed] == [score_id] and "500" in failed[0].failedReason
        await queue.retryJobs({"state": "failed"})
        await queue.close()

    asyncio.run(retry())
    assert jobs_in(redis)[score_id]["state"] == "waiting"


def test_concurrency_sends_to_http_notifiers_and_handlers_in_parallel(tmp_path: Path, redis: AnyRedis) -> None:
    # 16 jobs, each answered after 0.4 s: with --concurrency 8 the webhook and the handler each see 8 at once
    # (a lock per notifier, or asyncio's default pool of cpu_count + 4 threads, would cap them at 1 and 6)
    handlers = Registry()
    lock = threading.Lock()
    running = {"now": 0, "peak": 0}

    @handlers.on("trace.*")
    def slow(event: Event) -> None:
        with lock:
            running["now"] += 1
            running["peak"] = max(running["peak"], running["now"])
        time.sleep(0.4)
        with lock:
            running["now"] -= 1

    with receiver(delay=0.4) as hook:
        config = parse_config(
            {
                **KEYS,
                "queue": {"backend": "redis", "url": redis.url},
                "notifiers": {"hook": {"type": "webhook", "url": hook.url}},
                "rules": [{"name": "all", "events": ["trace.*"], "notify": ["hook"]}],
            },
            "t",
        )
        events = [make_test_event("trace.created") for _ in range(16)]
        target = RedisQueueTarget(config.queue, config.delivery)
        try:
            target.send_raw([(event.id, event.to_json()) for event in events])
        finally:
            target.close()
        stop = threading.Event()
        options = {"concurrency": 8, "handlers": handlers, "stop": stop, "install_signals": False}
        worker = threading.Thread(target=run_worker, args=(config,), kwargs=options)
        worker.start()
        try:
            assert wait_for(lambda: len(hook.received) == 16 and running["now"] == 0, 20), len(hook.received)
        finally:
            stop.set()
            worker.join(15)
    assert hook.peak == 8 and running["peak"] == 8, (hook.peak, running["peak"])


def test_silences_live_in_redis_where_the_poller_and_the_workers_apply_them(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis: AnyRedis
) -> None:
    # `silence add` on any machine reaches every process: the worker skips the silenced rule's notifier and
    # counts what it silenced; the other rule's notifier still gets every event
    with receiver() as kept, receiver() as muted:
        path = write_config(
            tmp_path / "config.toml",
            langfuse.url,
            queue_section(redis)
            + f'[notifiers.kept]\ntype = "webhook"\nurl = {q(kept.url)}\n\n'
            + f'[notifiers.muted]\ntype = "webhook"\nurl = {q(muted.url)}\n\n'
            + rule("archive", ["trace.*"], ["kept"])
            + rule("noisy", ["trace.*"], ["muted"], when='data.name == "chatty"'),
        )
        added = cli("silence", "add", "--rule", "noisy", "--for", "1h", "--comment", "deploy", "--config", path)
        assert added.returncode == 0 and "silence 1: rule noisy" in added.stdout, str(added)
        for index in range(6):
            langfuse.add_trace(name="chatty", start_time=ago(30 - index))
        assert cli("once", "--config", path).returncode == 0
        stop = threading.Event()
        config = load_config(str(path))
        worker = threading.Thread(target=run_worker, args=(config,), kwargs={"stop": stop, "install_signals": False})
        worker.start()
        try:
            assert wait_for(lambda: len(kept.received) == 6, 15), len(kept.received)
            time.sleep(0.3)  # a delivery to the silenced notifier would land now
        finally:
            stop.set()
            worker.join(15)
        assert muted.received == []
        listed = cli("silence", "list", "--json", "--config", path)
        (silence,) = [json.loads(line) for line in listed.stdout.splitlines()]
        assert silence["rule"] == "noisy" and silence["matched"] == 6 and silence["comment"] == "deploy"
        status = cli("status", "--config", path)
        assert "silence 1: rule noisy" in status.stdout, status.stdout

        # expired: the next events reach the notifier again (the poller routes them to the queue once more)
        assert cli("silence", "expire", "1", "--config", path).returncode == 0
        assert cli("silence", "list", "--config", path).stdout.count("rule noisy") == 0
        langfuse.add_trace(name="chatty", start_time=ago(0))
        assert cli("once", "--config", path).returncode == 0
        worker = threading.Thread(target=run_worker, args=(config,), kwargs={"stop": stop, "install_signals": False})
        stop.clear()
        worker.start()
        try:
            assert wait_for(lambda: len(muted.received) == 1 and len(kept.received) == 7, 15)
        finally:
            stop.set()
            worker.join(15)


# --- a Node.js BullMQ worker -------------------------------------------------------------------------------

# on a cluster, a Node.js worker needs an ioredis Cluster and the queue's hash-tagged prefix (README, Scaling out)
NODE_WORKER = """
const { Worker } = require("bullmq");
const { Cluster } = require("ioredis");
const [url, expected, prefix] = [process.argv[2], Number(process.argv[3]), process.argv[4]];
let connection;
if (url.startsWith("redis+cluster://")) {
  const seeds = url.slice("redis+cluster://".length).split(",").map(seed => {
    const [host, port] = seed.split(":");
    return { host, port: Number(port) };
  });
  connection = new Cluster(seeds);
} else {
  const { hostname, port } = new URL(url);
  connection = { host: hostname, port: Number(port) };
}
let seen = 0;
const worker = new Worker("langfuse-events", async job => {
  console.log(JSON.stringify({ id: job.id, name: job.name, dataId: job.data.id, event: job.data.event,
                               projectId: job.data.data.projectId }));
  if (++seen >= expected) setImmediate(() => worker.close().then(() => process.exit(0)));
}, { connection, prefix });
"""


@pytest.fixture(scope="session")
def node_bullmq() -> Path:
    """A directory whose node_modules holds bullmq@5 from npm (installed once, cached across runs)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    cache = Path(os.environ.get("LANGFUSE_POLLER_NODE_CACHE", Path(tempfile.gettempdir()) / "langfuse-poller-node"))
    if not (cache / "node_modules" / "bullmq" / "package.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", NODE_BULLMQ],
            cwd=cache,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            pytest.skip(f"npm install {NODE_BULLMQ} failed: {result.stderr[-500:]}")
    return cache


def test_a_nodejs_bullmq_worker_consumes_the_jobs_unchanged(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis: AnyRedis, node_bullmq: Path
) -> None:
    expected = add_traffic(langfuse, traces=3, scores=3)
    produced = cli("once", "--config", poller_config(tmp_path, langfuse, redis))
    assert produced.returncode == 0, str(produced)
    redis_is_cluster = isinstance(redis, RedisClusterServer)
    assert PollerKeys(QUEUE, cluster=redis_is_cluster).bullmq_prefix == (
        "{langfuse-poller:langfuse-events}" if redis_is_cluster else "bull"
    ), "the prefix README tells a Node.js worker to use"
    script = tmp_path / "consume.js"
    script.write_text(NODE_WORKER, encoding="utf-8")
    result = subprocess.run(
        ["node", str(script), redis.url, str(len(expected)), PollerKeys(QUEUE, cluster=redis_is_cluster).bullmq_prefix],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "NODE_PATH": str(node_bullmq / "node_modules")},
    )
    assert result.returncode == 0, result.stderr
    seen = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(job["id"] for job in seen) == sorted(expected)
    for job in seen:
        assert job["dataId"] == job["id"] and job["name"] == job["event"] == job["id"].split(":")[0]
        assert job["projectId"] == PROJECT_ID
    assert {job["state"] for job in jobs_in(redis).values()} == {"completed"}


def test_a_retried_job_counts_its_silenced_match_once(redis: AnyRedis) -> None:
    # one event, a silenced rule and a notifier that fails twice: BullMQ runs the job three times, and the silence
    # silenced one match, not three
    from langfuse_poller.alerting.silences import Silences, add_silence, silence_book
    from langfuse_poller.redis.worker import Dispatcher, JobProcessor, TargetFailed

    config = parse_config(
        {
            **KEYS,
            "queue": {"backend": "redis", "url": redis.url},
            "rules": [
                {"name": "noisy", "events": ["trace.*"], "notify": ["muted"]},
                {"name": "archive", "events": ["trace.*"], "notify": ["flaky"]},
            ],
            "notifiers": {
                "muted": {"type": "webhook", "url": "http://127.0.0.1:9/muted"},
                "flaky": {"type": "webhook", "url": "http://127.0.0.1:9/flaky"},
            },
        },
        "t",
    )
    book = silence_book(config, None)
    add_silence(book, "noisy", duration=3600, now=time.time())
    silences = Silences(book)
    router = Router(config.rules, Registry(), "t", silences=silences)

    class Flaky:
        concurrent = True

        def __init__(self) -> None:
            self.calls = 0

        def send(self, event: Event) -> None:
            self.calls += 1
            if self.calls < 3:
                raise DeliveryError("503 from the receiver")

        def close(self) -> None:
            pass

    flaky = Flaky()
    processor = JobProcessor(router, Dispatcher({"notifier:flaky": flaky}))  # type: ignore[dict-item]
    event = make_test_event("trace.created")

    class Job:
        """What the processor reads of a bullmq Job, which counts the attempts that failed (`attemptsMade`)."""

        id = event.id
        data = event.envelope()
        progress: Any = 0
        attemptsMade = 0

        async def updateProgress(self, progress: Any) -> None:
            self.progress = progress

    job = Job()
    for _attempt in range(3):
        try:
            asyncio.run(processor(job, "token"))
        except TargetFailed:
            job.attemptsMade += 1
    assert flaky.calls == 3
    silences.flush_counts()
    (silence,) = book.list()
    assert silence.matched == 1, f"one event silenced, counted {silence.matched} times"


def test_redis_silences_that_ended_a_week_ago_are_dropped_when_one_is_added(redis: AnyRedis) -> None:
    from langfuse_poller.alerting.silences import add_silence
    from langfuse_poller.redis.silences import KEEP_ENDED, RedisSilenceBook

    book = RedisSilenceBook(QueueConfig(backend="redis", url=redis.url), 2.0)
    try:
        now = time.time()
        old = add_silence(book, "noisy", duration=60, now=now - KEEP_ENDED - 120)
        recent = add_silence(book, "noisy", duration=60, now=now - 3600)
        book.count({old.id: 2, recent.id: 3})
        assert [s.id for s in book.list()] == [old.id, recent.id], "kept until the next add"
        assert book.list(now=now) == [], "both ended"
        current = add_silence(book, "noisy", duration=60, now=now)
        assert [(s.id, s.matched) for s in book.list()] == [(recent.id, 3), (current.id, 0)]
    finally:
        book.close()
