"""Crash safety of the daemon, end to end: real processes, a loopback Langfuse stand-in and a real receiver.

The daemon (`python -m langfuse_poller run`) runs as a subprocess against a FakeLangfuse served from this
process, and delivers to a `webhook` notifier (a `LoopbackWebhook`, which records every event id it accepted)
and to a `jsonl` notifier. The tests kill it with SIGKILL at random moments, stop it with SIGTERM
and SIGINT while a poll or a delivery is in flight, and make Langfuse answer 429 and 5xx; then they check
the contract's delivery guarantees: every expected event arrives, nothing that should not exist arrives,
and a delivery is repeated at most once per crash (never after a clean stop).

Set CRASH_SEED to replay the random choices of a run (the seed is printed with the summary).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.testing.archive import read_archive, repeats
from langfuse_poller.testing.fake_langfuse import FakeLangfuse, parse_iso_us
from langfuse_poller.testing.loopback_webhook import Inbox, LoopbackWebhook

pytestmark = pytest.mark.timeout(180)

ROUTED = ["trace.*", "generation.*", "score.*"]  # not "*": that would subscribe to observation.created


# --- config, data, expectations ---------------------------------------------------------------------------


def write_config(tmp_path: Path, fake: FakeLangfuse, hook_url: str, *, lookback: str, start: str) -> Path:
    """A config with fast polls and retries, routing every event type under test to `hook` and `archive`."""
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[langfuse]
base_url = "{fake.url}"
public_key = "{fake.public_key}"
secret_key = "{fake.secret_key}"
timeout = "10s"

[poll]
interval = "250ms"
lookback = "{lookback}"
reread = []
sweep_interval = "1s"
settle = "0s"
start = "{start}"

[state]
path = "{tmp_path / "state.db"}"

[delivery]
backoff = "50ms"
max_backoff = "200ms"
max_attempts = 1000

[[rules]]
name = "everything"
events = {json.dumps(ROUTED)}
notify = ["hook", "archive"]

[notifiers.hook]
type = "webhook"
url = "{hook_url}"
timeout = "5s"

[notifiers.archive]
type = "jsonl"
path = "{tmp_path / "events.jsonl"}"
""",
        encoding="utf-8",
    )
    return path


@dataclass
class Held:
    """The records put into the fake, as it returned them (thread-safe appends)."""

    observations: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def add_trace(fake: FakeLangfuse, held: Held, rng: random.Random, start: datetime, visible_after: float = 0.0) -> None:
    """A trace of five observations (root, generation, two spans, one more of a random type and level)
    and zero to two scores; some roots and children are ERROR or WARNING."""
    level = rng.choices(["DEFAULT", "ERROR", "WARNING"], weights=[85, 10, 5])[0]
    records = fake.add_trace(start_time=start, observations=3, level=level, visible_after=visible_after)
    root = records[0]
    records.append(
        fake.add_observation(
            trace_id=root["traceId"],
            start_time=start,
            type=rng.choice(["SPAN", "EVENT", "GENERATION"]),
            name="tool",
            parent_observation_id=root["id"],
            level=rng.choices(["DEFAULT", "ERROR", "WARNING"], weights=[80, 12, 8])[0],
            visible_after=visible_after,
        )
    )
    scores = [
        fake.add_score(
            trace_id=root["traceId"],
            observation_id=rng.choice([None, records[1]["id"]]),
            timestamp=start,
            value=round(rng.random(), 3),
            visible_after=visible_after,
        )
        for _ in range(rng.randint(0, 2))
    ]
    with held.lock:
        held.observations.extend(records)
        held.scores.extend(scores)


def add_backlog(fake: FakeLangfuse, held: Held, rng: random.Random, traces: int, span: float) -> None:
    """`traces` traces with start times spread over the last `span` seconds (ending 5 s ago)."""
    now = datetime.now(UTC)
    for _ in range(traces):
        add_trace(fake, held, rng, now - timedelta(seconds=rng.uniform(5.0, span)))


def expected_ids(held: Held) -> set[str]:
    """The event ids the contract says these records yield (no updates happened, so no second versions)."""
    ids: set[str] = set()
    with held.lock:
        for rec in held.observations:
            if rec["isRootObservation"]:
                ids.add(f"trace.created:{rec['traceId']}")
            if rec["type"] == "GENERATION":
                ids.add(f"generation.created:{rec['id']}")
            if rec["level"] in ("ERROR", "WARNING"):
                ids.add(f"trace.updated:{rec['id']}:{parse_iso_us(rec['updatedAt']) // 1000}")
        for score in held.scores:
            ids.add(f"score.created:{score['id']}")
    return ids


def describe(ids: set[str], limit: int = 5) -> str:
    return f"{len(ids)} ids, e.g. {sorted(ids)[:limit]}"


# --- processes --------------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment without settings that could redirect the daemon elsewhere than the config says."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LANGFUSE_")}


def command(verb: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "langfuse_poller", verb, "--config", str(config)]


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_running(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "langfuse-poller running" in self.output():
                return
            assert self.proc.poll() is None, f"the daemon exited with {self.proc.returncode}:\n{self.output()}"
            time.sleep(0.02)
        raise AssertionError(f"the daemon did not start within {timeout}s:\n{self.output()}")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[Path], Daemon]]:
    """Starts `langfuse-poller run` subprocesses; whatever still runs at the end is killed."""
    started: list[Daemon] = []

    def start(config: Path) -> Daemon:
        log = tmp_path / f"run-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(command("run", config), stdout=out, stderr=subprocess.STDOUT, env=child_env())
        daemon = Daemon(proc, log)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
            daemon.proc.wait(timeout=10)


def run_once(config: Path, attempts: int = 10) -> list[subprocess.CompletedProcess[str]]:
    """`langfuse-poller once` until it exits 0 (a delivery that failed just before may still back off)."""
    runs: list[subprocess.CompletedProcess[str]] = []
    for _ in range(attempts):
        runs.append(
            subprocess.run(command("once", config), capture_output=True, text=True, timeout=90, env=child_env())
        )
        if runs[-1].returncode == 0:
            return runs
        time.sleep(0.4)
    last = runs[-1]
    raise AssertionError(f"`once` never exited 0 in {attempts} runs; last:\n{last.stdout}\n{last.stderr}")


def status(config: Path) -> dict[str, Any]:
    done = subprocess.run(
        [*command("status", config), "--json"], capture_output=True, text=True, timeout=30, env=child_env()
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def seeded(name: str) -> tuple[int, random.Random]:
    seed = int(os.environ.get("CRASH_SEED") or time.time_ns() % 1_000_000_007)
    print(f"{name}: CRASH_SEED={seed}")
    return seed, random.Random(seed)


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeLangfuse]:
    server = FakeLangfuse().start()
    try:
        yield server
    finally:
        server.stop()
    assert server.errors == [], server.errors


@pytest.fixture
def inbox() -> Iterator[Inbox]:
    with LoopbackWebhook() as box:
        yield box


def assert_everything_delivered(tmp_path: Path, inbox: Inbox, held: Held, max_repeats: int) -> dict[str, int]:
    """Every expected id reached the receiver and the archive, nothing else did, repeats within bounds."""
    expected = expected_ids(held)
    hook = inbox.snapshot()
    archive, torn = read_archive(tmp_path / "events.jsonl")
    assert inbox.problems == [], inbox.problems[:5]
    for name, got in (("webhook receiver", hook), ("jsonl archive", archive)):
        missing = expected - set(got)
        extra = set(got) - expected
        assert not missing, f"{name} is missing {describe(missing)}"
        assert not extra, f"{name} got ids that should not exist: {describe(extra)}"
        assert repeats(got) <= max_repeats, (
            f"{name}: {repeats(got)} repeated deliveries, at most {max_repeats} allowed; "
            f"e.g. {[(i, n) for i, n in got.items() if n > 1][:5]}"
        )
    return {"expected": len(expected), "hook_repeats": repeats(hook), "archive_repeats": repeats(archive), "torn": torn}


def assert_state_clean(config: Path) -> None:
    report = status(config)
    assert report["queue"]["pending"] == 0, report["queue"]
    assert report["dead_letters"] == 0, report


# --- 1. SIGKILL at random moments ---------------------------------------------------------------------------

KILLS = 22
LOOKBACK = 20.0
LIVE_FOR = 14.0  # seconds of new records at the start of the kill loop
LATE_AT_MOST = 15.0  # the largest visibility delay (start time in the past plus visible_after), < LOOKBACK


def test_sigkill_at_random_moments_loses_nothing_and_repeats_at_most_once_per_kill(
    tmp_path: Path, fake: FakeLangfuse, inbox: Inbox, spawn: Callable[[Path], Daemon]
) -> None:
    began = time.monotonic()
    seed, rng = seeded("sigkill")
    held = Held()
    add_backlog(fake, held, rng, traces=700, span=7000.0)
    inbox.rng = random.Random(seed + 1)
    inbox.fail_rate = 0.2
    config = write_config(tmp_path, fake, inbox.url, lookback=f"{LOOKBACK:g}s", start="-2h")

    live_rng = random.Random(seed + 2)
    stop_live = threading.Event()
    live_until = time.time() + LIVE_FOR

    def add_live() -> None:
        # new traces while the daemon runs: most visible at once, some late (start time in the past, and/or
        # visible_after), every delay within the lookback
        while not stop_live.is_set() and time.time() < live_until:
            past = live_rng.choice([0.0, 0.0, live_rng.uniform(0.0, 3.0)])
            delay = live_rng.uniform(0.3, LATE_AT_MOST - past) if live_rng.random() < 0.3 else 0.0
            add_trace(fake, held, live_rng, datetime.now(UTC) - timedelta(seconds=past), visible_after=delay)
            stop_live.wait(0.03)

    adder = threading.Thread(target=add_live, daemon=True)
    adder.start()
    kills = 0
    lifetimes = []
    try:
        for _ in range(KILLS):
            daemon = spawn(config)
            lifetime = rng.uniform(0.05, 1.5)
            time.sleep(lifetime)
            assert daemon.proc.poll() is None, f"the daemon exited on its own:\n{daemon.output()}"
            daemon.proc.send_signal(signal.SIGKILL)
            assert daemon.proc.wait(timeout=10) == -signal.SIGKILL
            kills += 1
            lifetimes.append(lifetime)
    finally:
        stop_live.set()
        adder.join(timeout=10)
    hook_before_final = sum(inbox.snapshot().values())
    archive_before_final = sum(read_archive(tmp_path / "events.jsonl")[0].values())
    assert hook_before_final > 0 and archive_before_final > 0, "the daemon delivered nothing between the kills"
    # every record is visible by now; a late one is read by the `lookback` sweep once it is that old
    time.sleep(max(0.0, live_until + LOOKBACK + 1.0 - time.time()))
    inbox.fail_rate = 0.0
    once_runs = run_once(config)
    stats = assert_everything_delivered(tmp_path, inbox, held, max_repeats=kills)
    assert_state_clean(config)
    assert fake.observation_count() == len(held.observations)
    print(
        f"sigkill: {kills} kills (lifetimes {min(lifetimes):.2f}-{max(lifetimes):.2f}s), "
        f"{len(held.observations)} observations and {len(held.scores)} scores -> {stats['expected']} events; "
        f"before the final `once` the archive had {archive_before_final} lines and the webhook had accepted "
        f"{hook_before_final} deliveries and refused {inbox.refused} (500); the final `once` needed "
        f"{len(once_runs)} run(s); repeats: webhook {stats['hook_repeats']}, "
        f"jsonl {stats['archive_repeats']}, torn jsonl lines {stats['torn']}, truncated webhook requests "
        f"{inbox.truncated}; "
        f"{time.monotonic() - began:.1f}s"
    )


# --- 2 and 3. SIGTERM / SIGINT with a poll, a delivery or a rate-limit wait in flight ----------------------

STOP_SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]
SLOW_POLL = 3.0


def data_requests(fake: FakeLangfuse) -> Counter[int]:
    """Requests to the data endpoints answered so far, by status."""
    records = list(fake.requests)  # a copy: the server appends meanwhile
    return Counter(r.status for r in records if r.path.endswith(("/v2/observations", "/v3/scores")))


def stop(daemon: Daemon, signum: int, timeout: float = 60.0) -> float:
    """Send `signum`, wait for the exit, check it was clean; the seconds it took."""
    signalled = time.monotonic()
    daemon.proc.send_signal(signum)
    code = daemon.proc.wait(timeout=timeout)
    took = time.monotonic() - signalled
    assert code == 0, f"exit {code} after {signal.Signals(signum).name}:\n{daemon.output()}"
    assert "Traceback" not in daemon.output(), daemon.output()
    return took


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_stop_signal_during_a_poll_exits_0_and_once_delivers_the_rest(
    tmp_path: Path, fake: FakeLangfuse, inbox: Inbox, spawn: Callable[[Path], Daemon], signum: int
) -> None:
    _, rng = seeded(f"poll-{signal.Signals(signum).name}")
    held = Held()
    add_backlog(fake, held, rng, traces=60, span=1800.0)
    config = write_config(tmp_path, fake, inbox.url, lookback="5s", start="-1h")
    fake.slow_next(1, seconds=SLOW_POLL)  # the first data request of the first poll hangs
    daemon = spawn(config)
    daemon.wait_running()
    time.sleep(0.8)
    assert sum(data_requests(fake).values()) == 0, "the slow request was answered already: no poll in flight"
    took = stop(daemon, signum)
    assert took < SLOW_POLL + 3.0, f"the daemon took {took:.1f}s to stop"
    assert sum(data_requests(fake).values()) >= 1, "the poll in flight never got its answer"

    run_once(config)
    stats = assert_everything_delivered(tmp_path, inbox, held, max_repeats=0)
    assert_state_clean(config)
    print(f"stop during a poll: exit 0 after {took:.2f}s; {stats}")


def test_sigterm_during_a_hanging_api_request_exits_within_a_few_seconds(
    tmp_path: Path, fake: FakeLangfuse, inbox: Inbox, spawn: Callable[[Path], Daemon]
) -> None:
    held = Held()
    add_backlog(fake, held, random.Random(3), traces=5, span=600.0)
    config = write_config(tmp_path, fake, inbox.url, lookback="5s", start="-1h")
    fake.slow_next(1, seconds=10.0)  # a slow page: well within the 10 s request timeout of this config
    daemon = spawn(config)
    daemon.wait_running()
    time.sleep(0.8)
    took = stop(daemon, signal.SIGTERM)
    assert took < 5.0, f"the daemon took {took:.1f}s to stop"


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_stop_signal_during_a_retry_after_wait_exits_at_once(
    tmp_path: Path, fake: FakeLangfuse, inbox: Inbox, spawn: Callable[[Path], Daemon], signum: int
) -> None:
    held = Held()
    add_backlog(fake, held, random.Random(5), traces=20, span=600.0)
    config = write_config(tmp_path, fake, inbox.url, lookback="5s", start="-1h")
    fake.rate_limit_next(2, retry_after=60)
    daemon = spawn(config)
    daemon.wait_running()
    wait_for(lambda: data_requests(fake)[429] >= 1, 10, "the first 429")
    time.sleep(0.3)
    took = stop(daemon, signum)
    assert took < 3.0, f"the daemon took {took:.1f}s to stop"
    fake.clear_faults()
    run_once(config)
    assert_everything_delivered(tmp_path, inbox, held, max_repeats=0)
    assert_state_clean(config)


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_stop_signal_during_deliveries_exits_0_without_repeats(
    tmp_path: Path, fake: FakeLangfuse, inbox: Inbox, spawn: Callable[[Path], Daemon], signum: int
) -> None:
    _, rng = seeded(f"deliveries-{signal.Signals(signum).name}")
    held = Held()
    add_backlog(fake, held, rng, traces=40, span=1800.0)
    inbox.delay = 0.4  # each webhook delivery takes 0.4 s: one is in flight most of the time
    config = write_config(tmp_path, fake, inbox.url, lookback="5s", start="-1h")
    daemon = spawn(config)
    daemon.wait_running()
    wait_for(lambda: sum(inbox.snapshot().values()) >= 3 and inbox.in_flight > 0, 20, "a delivery in flight")
    took = stop(daemon, signum)
    assert took < 3.0, f"the daemon took {took:.1f}s to stop"
    assert inbox.in_flight == 0
    delivered_by_daemon = sum(inbox.snapshot().values())
    assert delivered_by_daemon < len(expected_ids(held)), "everything was delivered before the signal"

    inbox.delay = 0.0
    run_once(config)
    # a clean stop is no crash: the delivery in flight was recorded, so nothing is sent twice
    stats = assert_everything_delivered(tmp_path, inbox, held, max_repeats=0)
    assert_state_clean(config)
    print(f"stop during deliveries: exit 0 after {took:.2f}s, {delivered_by_daemon} delivered before; {stats}")


def test_sigint_when_idle_exits_0(
    tmp_path: Path, fake: FakeLangfuse, inbox: Inbox, spawn: Callable[[Path], Daemon]
) -> None:
    held = Held()
    add_backlog(fake, held, random.Random(7), traces=5, span=600.0)
    config = write_config(tmp_path, fake, inbox.url, lookback="5s", start="-1h")
    daemon = spawn(config)
    daemon.wait_running()
    expected = expected_ids(held)
    wait_for(lambda: set(inbox.snapshot()) == expected, 20, "the backlog to be delivered")
    time.sleep(0.5)
    stop(daemon, signal.SIGINT, timeout=10)
    assert_everything_delivered(tmp_path, inbox, held, max_repeats=0)


# --- 4. 429 storms and 5xx bursts -----------------------------------------------------------------------------


def test_429_storm_and_5xx_bursts_everything_arrives(
    tmp_path: Path, fake: FakeLangfuse, inbox: Inbox, spawn: Callable[[Path], Daemon]
) -> None:
    began = time.monotonic()
    _, rng = seeded("storm")
    held = Held()
    add_backlog(fake, held, rng, traces=150, span=3000.0)
    config = write_config(tmp_path, fake, inbox.url, lookback="5s", start="-1h")
    # a storm longer than the reader's 6 attempts per request: the first poll of a stream fails as a whole
    fake.rate_limit_next(8, retry_after=1)
    daemon = spawn(config)
    daemon.wait_running()
    wait_for(lambda: data_requests(fake)[200] >= 1, 30, "a poll to get through the storm")

    bursts = [
        lambda: fake.fail_next(2, status=503),
        lambda: fake.rate_limit_next(4, retry_after=1),
        lambda: (fake.fail_next(1, status=500), fake.fail_next(1, status=502)),
    ]
    for inject in bursts:
        for _ in range(10):  # new records keep arriving
            add_trace(fake, held, rng, datetime.now(UTC) - timedelta(seconds=rng.uniform(0.0, 2.0)))
            time.sleep(0.05)
        ok_before = data_requests(fake)[200]
        inject()
        # one burst at a time: a burst that piled onto the last would only add to one request's backoff
        wait_for(lambda ok=ok_before: data_requests(fake)[200] > ok, 30, "a poll to get through the burst")
        assert daemon.proc.poll() is None, daemon.output()

    expected = expected_ids(held)
    wait_for(
        lambda: set(inbox.snapshot()) == expected and set(read_archive(tmp_path / "events.jsonl")[0]) == expected,
        30,
        "the daemon to deliver everything after the storm",
    )
    stop(daemon, signal.SIGTERM, timeout=15)

    statuses = data_requests(fake)
    assert statuses[429] >= 12 and sum(statuses[s] for s in (500, 502, 503)) >= 4, statuses
    assert "poll of observations failed" in daemon.output() or "poll of scores failed" in daemon.output()
    stats = assert_everything_delivered(tmp_path, inbox, held, max_repeats=0)
    assert_state_clean(config)
    print(f"storm: data requests by status {dict(statuses)}; {stats}; {time.monotonic() - began:.1f}s")
