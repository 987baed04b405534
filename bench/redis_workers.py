"""Events per second through Redis: 1, 2 and 4 `langfuse-poller worker` processes draining a backlog of jobs.

    python bench/redis_workers.py                    # ~3 minutes (4 on a busy machine)
    python bench/redis_workers.py --events 2000 --webhook-events 100 --workers 1,2
    python bench/redis_workers.py --dir /dev/shm     # Redis's append-only file and the archive on tmpfs

Real processes, real Redis: each row gets a private redis-server on a free loopback port (`appendonly yes`,
`appendfsync always`, as README's "Scaling out" recommends for the queue) and a fresh poller state. The jobs
are made the way the poller makes them: `langfuse-poller once` with `[queue] backend = "redis"` reads a
backlog from a FakeLangfuse served from this process (traces of a root span and a generation, each with a
score: trace.created, generation.created and score.created) and its outbox hands them to `queue:redis` in
batches. The queue is paused meanwhile, so that no job starts before the workers do. Then the row's worker
processes (the installed console script, with the row's `--concurrency`) are started; once every one of them
is connected to Redis the queue is resumed, and the clock runs until BullMQ's job counts say that every job
is completed (or failed).

Two targets, one per kind of row:

* `jsonl`: a jsonl notifier (one line per event, fsync'd), one file shared by the workers. Nothing to wait
  for but the disk: the figure is what BullMQ, the worker and Redis cost per job on this machine.
* `webhook`: a webhook notifier to a loopback receiver in this process that answers after `--delay` (50 ms):
  a slow downstream, where more workers and more concurrency should help.

Each row checks that every event arrived exactly once (distinct event ids against jsonl lines, or against
requests answered 200, and against the expected ids) and reports the CPU time the workers and redis-server
used while draining, per job and as cores kept busy. The enqueue rate is reported twice: `once` as a whole
(process start, API reads, SQLite, events, outbox and Redis) in each row, and the queue target alone
(`RedisQueueTarget.send_raw` in the outbox's batches of 500) on the envelopes of a jsonl backlog.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import child_env, machine, table, write_config

from langfuse_poller.config import DeliveryConfig, QueueConfig
from langfuse_poller.delivery import BATCH
from langfuse_poller.redis.queue import RedisQueueTarget
from langfuse_poller.testing.archive import read_archive
from langfuse_poller.testing.fake_langfuse import FakeLangfuse
from langfuse_poller.testing.loopback_webhook import Inbox, LoopbackWebhook

QUEUE = "langfuse-events"
# the installed console script next to this Python, as a user runs it; `python -m` where there is none
SCRIPT = Path(sys.executable).parent / "langfuse-poller"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Settings:
    delay: float  # seconds the webhook receiver takes to answer
    appendfsync: str
    directory: str | None  # where the rows' files go (None: the system's temporary directory)
    timeout: float  # seconds a row may take to drain
    seed: int


@dataclass
class Row:
    kind: str  # "jsonl" or "webhook"
    workers: int
    concurrency: int
    events: int
    enqueue_seconds: float  # the `once` process, start to exit
    seconds: float  # resume -> every job completed or failed
    completed: int
    failed: int
    deliveries: int  # jsonl lines, or webhook requests answered 200
    distinct: int  # distinct event ids among them
    missing: int  # expected ids that never arrived
    worker_cpu: float  # CPU seconds of the worker processes while draining
    redis_cpu: float  # CPU seconds of redis-server while draining

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else float("nan")

    @property
    def exactly_once(self) -> bool:
        return self.deliveries == self.distinct == self.events and self.missing == 0 and self.failed == 0


@dataclass
class Figures:
    rows: list[Row]
    enqueue_jobs: int  # envelopes given to RedisQueueTarget.send_raw
    enqueue_seconds: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]

    @property
    def enqueue_rate(self) -> float:
        return self.enqueue_jobs / self.enqueue_seconds if self.enqueue_seconds > 0 else float("nan")

    def row(self, kind: str, workers: int, concurrency: int = 1) -> Row:
        return next(r for r in self.rows if (r.kind, r.workers, r.concurrency) == (kind, workers, concurrency))


# --- Redis ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server(directory: Path, appendfsync: str) -> Iterator[tuple[str, int]]:
    """A redis-server on 127.0.0.1:<free port> with its append-only file in `directory`: (url, pid)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    options = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", ""]
    options += ["--appendonly", "yes", "--appendfsync", appendfsync]
    proc = subprocess.Popen(["redis-server", *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on 127.0.0.1:{port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class QueueProbe:
    """The queue as BullMQ sees it, from this process: pause, resume, job counts, connected workers."""

    def __init__(self, url: str) -> None:
        self._runner = asyncio.Runner()
        self._queue: Any = self._runner.run(self._open(url))

    @staticmethod
    async def _open(url: str) -> Any:
        from bullmq import Queue

        return Queue(QUEUE, {"connection": url})

    def pause(self) -> None:
        self._runner.run(self._queue.pause())

    def resume(self) -> None:
        self._runner.run(self._queue.resume())

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = self._runner.run(self._queue.getJobCounts("wait", "active", "completed", "failed"))
        return counts

    def workers(self) -> int:
        """Worker connections BullMQ knows of (CLIENT LIST, by connection name)."""
        return int(self._runner.run(self._queue.get_workers_count()))

    def close(self) -> None:
        try:
            self._runner.run(self._queue.close())
        finally:
            self._runner.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a live process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# --- the backlog ----------------------------------------------------------------------------------------


def fill(fake: FakeLangfuse, events: int, rng: random.Random) -> set[str]:
    """Traces of a root span and a generation, each with a score, spread over the last hour, until they make
    `events` events (the last trace has fewer parts when `events` is not a multiple of 3); their event ids."""
    ids: set[str] = set()
    now = datetime.now(UTC)
    traces = (events + 2) // 3
    for index in range(traces):
        parts = min(3, events - 3 * index)
        start = now - timedelta(hours=1) + timedelta(seconds=3000 * index / traces)
        trace_id = rng.randbytes(16).hex()
        root, *children = fake.add_trace(trace_id=trace_id, start_time=start, observations=int(parts >= 2))
        ids.add(f"trace.created:{root['traceId']}")
        if children:
            ids.add(f"generation.created:{children[0]['id']}")
        if parts == 3:
            score = fake.add_score(id=rng.randbytes(16).hex(), trace_id=trace_id, timestamp=start, value=0.5)
            ids.add(f"score.created:{score['id']}")
    if len(ids) != events:
        raise RuntimeError(f"the backlog makes {len(ids)} events, not {events}")
    return ids


def poller(verb: str, config: Path, *extra: str) -> list[str]:
    exe = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "langfuse_poller"]
    return [*exe, verb, "--config", str(config), *extra]


def once(config: Path, timeout: float) -> str:
    """`langfuse-poller once`; its output."""
    done = subprocess.run(poller("once", config), capture_output=True, text=True, timeout=timeout, env=child_env())
    if done.returncode != 0:
        raise RuntimeError(f"once failed ({done.returncode}):\n{done.stdout}{done.stderr[-3000:]}")
    return done.stdout


# --- one row --------------------------------------------------------------------------------------------


def measure(kind: str, workers: int, concurrency: int, fake: FakeLangfuse, expected: set[str], s: Settings) -> Row:
    """One row: a fresh Redis and state, `once` into the paused queue, then `workers` workers drain it."""
    events = len(expected)
    with (
        tempfile.TemporaryDirectory(prefix="bench-redis-", dir=s.directory) as tmp_name,
        LoopbackWebhook(Inbox(delay=s.delay, rng=random.Random(s.seed))) as inbox,
    ):
        tmp = Path(tmp_name)
        archive = tmp / "events.jsonl"
        with redis_server(tmp / "redis", s.appendfsync) as (url, redis_pid):
            notifier = (
                {"type": "jsonl", "path": str(archive)}
                if kind == "jsonl"
                else {"type": "webhook", "url": inbox.url, "timeout": "30s"}
            )
            config = write_config(
                tmp / "config.toml",
                fake,
                poll={"start": "-2h"},
                notifiers={"out": notifier},
                delivery={"max_attempts": 3, "backoff": "1s"},
            )
            with config.open("a", encoding="utf-8") as out:
                out.write(f'[queue]\nbackend = "redis"\nurl = {json.dumps(url)}\nname = "{QUEUE}"\n')
            probe = QueueProbe(url)
            procs: list[tuple[subprocess.Popen[bytes], Path]] = []
            try:
                probe.pause()
                began = time.perf_counter()
                output = once(config, s.timeout)
                enqueue_seconds = time.perf_counter() - began
                waiting = probe.counts()["wait"]
                if f"{events} new events" not in output or waiting != events:
                    raise RuntimeError(f"{waiting} jobs waiting after once, expected {events}: {output}")

                for index in range(workers):
                    log = tmp / f"worker{index}.log"
                    with log.open("wb") as err:
                        proc = subprocess.Popen(
                            poller("worker", config, "--concurrency", str(concurrency)),
                            stdout=subprocess.DEVNULL,
                            stderr=err,
                            stdin=subprocess.DEVNULL,
                            env=child_env(),
                        )
                    procs.append((proc, log))
                deadline = time.monotonic() + 60
                while probe.workers() < workers:
                    for proc, log in procs:
                        if proc.poll() is not None:
                            raise RuntimeError(f"a worker exited {proc.returncode}:\n{log.read_text()[-3000:]}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{probe.workers()} of {workers} workers connected within 60 s")
                    time.sleep(0.05)

                pids = [proc.pid for proc, _ in procs]
                worker_cpu, redis_cpu = sum(cpu_seconds(pid) for pid in pids), cpu_seconds(redis_pid)
                began = time.perf_counter()
                probe.resume()
                deadline = time.monotonic() + s.timeout
                while True:
                    counts = probe.counts()
                    if counts["completed"] + counts["failed"] >= events:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"not drained within {s.timeout:.0f} s: {counts}")
                    time.sleep(0.01)
                seconds = time.perf_counter() - began
                worker_cpu = sum(cpu_seconds(pid) for pid in pids) - worker_cpu
                redis_cpu = cpu_seconds(redis_pid) - redis_cpu
            finally:
                stop_workers(procs)
                probe.close()
        if kind == "jsonl":
            seen, torn = read_archive(archive)
            if torn:
                raise RuntimeError(f"{torn} torn lines in the jsonl archive")
        else:
            seen = inbox.snapshot()
            if inbox.problems:
                raise RuntimeError(f"the receiver saw malformed requests: {inbox.problems[:3]}")
    return Row(
        kind=kind,
        workers=workers,
        concurrency=concurrency,
        events=events,
        enqueue_seconds=enqueue_seconds,
        seconds=seconds,
        completed=counts["completed"],
        failed=counts["failed"],
        deliveries=sum(seen.values()),
        distinct=len(seen),
        missing=len(expected - set(seen)),
        worker_cpu=worker_cpu,
        redis_cpu=redis_cpu,
    )


def stop_workers(procs: Sequence[tuple[subprocess.Popen[bytes], Path]]) -> None:
    """SIGTERM to all at once (each finishes its jobs in flight), then each must exit 0."""
    for proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    failures = []
    for proc, log in procs:
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        if code != 0:
            failures.append(f"a worker exited {code} on SIGTERM:\n{log.read_text()[-3000:]}")
    if failures:
        raise RuntimeError("\n".join(failures))


def enqueue_alone(events: int, rng: random.Random, s: Settings) -> tuple[int, float]:
    """Jobs and seconds of `RedisQueueTarget.send_raw` alone, in the outbox's batches, on a fresh server, for
    the envelopes of a backlog of `events` events as the poller stores them (taken from a jsonl archive)."""
    with FakeLangfuse() as fake, tempfile.TemporaryDirectory(prefix="bench-redis-", dir=s.directory) as tmp:
        fill(fake, events, rng)
        archive = Path(tmp) / "events.jsonl"
        config = write_config(
            Path(tmp) / "config.toml",
            fake,
            poll={"start": "-2h"},
            notifiers={"out": {"type": "jsonl", "path": str(archive)}},
        )
        once(config, s.timeout)
        envelopes = [(json.loads(line)["id"], line) for line in archive.read_text(encoding="utf-8").splitlines()]
        with redis_server(Path(tmp) / "redis", s.appendfsync) as (url, _):
            target = RedisQueueTarget(QueueConfig(backend="redis", url=url, name=QUEUE), DeliveryConfig())
            try:
                # the connection and bullmq's scripts first: the poller keeps them from batch to batch
                target.send_raw(envelopes[:1])
                began = time.perf_counter()
                for start in range(1, len(envelopes), BATCH):
                    target.send_raw(envelopes[start : start + BATCH])
                return len(envelopes) - 1, time.perf_counter() - began
            finally:
                target.close()


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main(argv: Sequence[str] | None = None) -> Figures:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000, help="jobs of each jsonl row (default 10000)")
    parser.add_argument("--webhook-events", type=int, default=300, help="jobs of each webhook row (default 300)")
    parser.add_argument("--workers", type=ints, default=[1, 2, 4], help="worker processes per row (default 1,2,4)")
    parser.add_argument("--concurrency", type=ints, default=[1], help="--concurrency of the jsonl rows (default 1)")
    parser.add_argument(
        "--webhook-concurrency", type=ints, default=[1, 4], help="--concurrency of the webhook rows (default 1,4)"
    )
    parser.add_argument("--kinds", default="jsonl,webhook", help="comma-separated: jsonl, webhook")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds the webhook receiver takes to answer")
    parser.add_argument("--appendfsync", default="always", choices=["always", "everysec", "no"])
    parser.add_argument("--dir", help="where Redis's append-only file and the archive go (default: $TMPDIR)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a row may take to drain")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - {"jsonl", "webhook"}:
        parser.error(f"--kinds: unknown {', '.join(sorted(unknown))}")
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (Debian: apt-get install redis-server)")
    settings = Settings(
        delay=args.delay, appendfsync=args.appendfsync, directory=args.dir, timeout=args.timeout, seed=args.seed
    )
    answer = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    redis_version = next((word[2:] for word in answer if word.startswith("v=")), "?")
    load_before = os.getloadavg()
    print(f"redis_workers: {machine()}, load average {' '.join(f'{v:.2f}' for v in load_before)}")
    print(
        f"redis-server {redis_version} (appendonly yes, appendfsync {args.appendfsync}, files in "
        f"{args.dir or tempfile.gettempdir()}), bullmq {version('bullmq')}; jsonl rows: {args.events} jobs; "
        f"webhook rows: {args.webhook_events} jobs, answered after {args.delay * 1000:.0f} ms\n"
    )
    rng = random.Random(args.seed)
    rows: list[Row] = []
    for kind in kinds:
        events = args.events if kind == "jsonl" else args.webhook_events
        with FakeLangfuse() as fake:
            expected = fill(fake, events, rng)
            for concurrency in args.concurrency if kind == "jsonl" else args.webhook_concurrency:
                for workers in args.workers:
                    row = measure(kind, workers, concurrency, fake, expected, settings)
                    rows.append(row)
                    print(f"  {kind}, {workers} x concurrency {concurrency}: {row.rate:.0f} events/s", flush=True)
    enqueue_jobs, enqueue_seconds = enqueue_alone(args.events, rng, settings)
    figures = Figures(rows, enqueue_jobs, enqueue_seconds, load_before, os.getloadavg())
    print()
    report(figures)
    return figures


def report(figures: Figures) -> None:
    headers = (
        "target",
        "workers",
        "concurrency",
        "jobs",
        "drain s",
        "events/s",
        "exactly once (distinct ids / deliveries)",
        "worker CPU ms/job",
        "Redis CPU ms/job",
        "cores busy",
        "enqueue by `once` s (events/s)",
    )
    rows = [
        (
            r.kind,
            r.workers,
            r.concurrency,
            r.events,
            f"{r.seconds:.2f}",
            f"{r.rate:.0f}",
            f"{'yes' if r.exactly_once else 'NO'} ({r.distinct} / {r.deliveries}"
            + (f", {r.failed} failed" if r.failed else "")
            + (f", {r.missing} missing" if r.missing else "")
            + ")",
            f"{r.worker_cpu / r.events * 1000:.2f}",
            f"{r.redis_cpu / r.events * 1000:.2f}",
            f"{(r.worker_cpu + r.redis_cpu) / r.seconds:.2f}",
            f"{r.enqueue_seconds:.1f} ({r.events / r.enqueue_seconds:.0f})",
        )
        for r in figures.rows
    ]
    print(table(headers, rows))
    print()
    print(
        f"enqueue, the queue target alone (RedisQueueTarget.send_raw, batches of {BATCH}): "
        f"{figures.enqueue_jobs} jobs in {figures.enqueue_seconds:.2f} s = {figures.enqueue_rate:.0f} jobs/s"
    )
    exact = sum(r.exactly_once for r in figures.rows)
    print(f"every event delivered exactly once in {exact} of {len(figures.rows)} rows")
    after = figures.load_after
    print(f"load average at the end {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}")


if __name__ == "__main__":
    main()
