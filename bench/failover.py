"""Failover: kill -9 the polling replica again and again; how long until a standby has polled in its place, and
taken over the alert groups?

    python bench/failover.py                          # 10 kills, lease 5 s, about two minutes
    python bench/failover.py --kills 5 --lease 15     # the default lease

Real processes on real time: a redis-server on a loopback port (in a temporary directory, nothing persisted),
a FakeLangfuse served from this process with `--rate` new traces per second, two `langfuse-poller run`
replicas with `[queue] standby = true` sharing the lease, and one `langfuse-poller worker` writing every event
to a jsonl file. Each round kills the replica that holds the lease (SIGKILL), then measures, from the kill:

* **lease left**: what the dead leader's lease still had to run (read just before the kill);
* **lease taken**: until the lease key names the standby (it polls Redis every 10 ms), and how long that was
  **after expiry** of the dead leader's lease: the part a standby controls;
* **first poll committed**: until the shared state records a poll finished after the kill (`last_poll_at`
  of a stream): the moment the new leader's first poll is durable, the failover's end.

An alert group is open at every kill: before it, an ERROR trace of its own name opens a group of the rule
`errors` (group_wait 0 s, `--resolve-after`, twice the lease by default), and the kill waits until the leader
has told a jsonl notifier. Right after the kill a second ERROR trace of that name arrives, and the round
measures, from the kill:

* **alert write**: until the group in Redis counts that second match: the new leader's first write of the
  alert state (its poll read the trace, its alerter took the match), under its own fencing token;
* **resolved**: until the group's `rule.resolved` reaches the notifier, and **resolve late**: how long after
  it was due. A group resolves `resolve_after` after the alerter recorded its last match, here the new
  leader's first write, so this is the delay of the resolve itself once the new leader holds the group; the
  same delay without a takeover (a group opened and resolved by one leader before the first kill) is printed
  beside it.

Every group must fire once and resolve once (a repeat allowed per kill).

The killed replica is started again (as the new standby) and the next round waits `--pause` seconds. At the
end, the traffic stops and the worker must deliver every expected event; repeats must stay within the
contract (at most one per kill).

What bounds it: a kill -9 leaves the lease in Redis until it expires, between 2/3 and all of the lease after
the last renewal; a standby tries every third of the lease, and also right when the holder's lease runs out
(read at its last try) if that comes first; the new leader polls at once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import child_env, command, machine, percentile, table, wait_for_output

from langfuse_poller.testing.archive import read_archive, repeats
from langfuse_poller.testing.fake_langfuse import FakeLangfuse

QUEUE = "failover-bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Redis:
    """A throwaway redis-server on 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        self.client: Any = redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client.ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise SystemExit(f"redis-server did not start on port {self.port}")

    def holder(self) -> str | None:
        value = self.client.get(f"{QUEUE}:poller:lease")
        return None if value is None else str(value).rpartition(":")[0]

    def lease_left(self) -> float:
        """Seconds until the lease key expires (0 when absent)."""
        return max(0.0, int(self.client.pttl(f"{QUEUE}:poller:lease")) / 1000)

    def last_poll(self) -> float:
        """The latest `last_poll_at` of any stream in the shared state (0 when none)."""
        found = [self.client.hget(f"{QUEUE}:poller:stream:{s}", "last_poll_at") for s in ("observations", "scores")]
        return max((float(value) for value in found if value), default=0.0)

    def alert_count(self, name: str) -> int:
        """How many matches the alert group of this trace name counts in Redis (0: no such group)."""
        for text in self.client.hvals(f"{QUEUE}:poller:alert-groups"):
            group = json.loads(text)
            if group["labels"].get("data.traceName") == name:
                return int(group["count"])
        return 0

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class Round:
    """One kill: who died, who took over, and when (seconds after the kill)."""

    killed: str
    heir: str
    lease_left: float  # what the dead leader's lease still had to run at the kill
    lease_taken: float
    first_poll: float
    alert_write: float = 0.0
    resolved: float = 0.0
    resolve_late: float = 0.0

    @property
    def after_expiry(self) -> float:
        """How long after the dead leader's lease expired the standby took it: the part the standby controls."""
        return self.lease_taken - self.lease_left


@dataclass
class Figures:
    rounds: list[Round] = field(default_factory=list)
    expected: int = 0
    delivered: int = 0
    repeats: int = 0
    lease: float = 0.0
    interval: float = 0.0
    problems: list[str] = field(default_factory=list)
    # alert notifications of the groups open at the kills: (event, reason, group name) as the notifier got them
    alerts: list[tuple[str, str, str]] = field(default_factory=list)
    # how late the resolve of a group came with no takeover, for comparison (the poller's settle and interval)
    calm_late: float = 0.0

    @property
    def alert_repeats(self) -> int:
        """Notifications beyond one new firing and one resolve per group (the update that tells the second match
        before the resolve is no repeat)."""
        once = [(event, name) for event, reason, name in self.alerts if reason in ("new", "resolved", "repeat")]
        return len(once) - len(set(once))

    @property
    def bound(self) -> float:
        """Lease + a standby's try interval (a third of it) + a poll interval: the documented worst case."""
        return self.lease + self.lease / 3 + self.interval


def write_config(directory: Path, fake: FakeLangfuse, redis_url: str, name: str, args: argparse.Namespace) -> Path:
    def toml(value: Any) -> str:
        return json.dumps(value)

    path = directory / f"{name}.toml"
    path.write_text(
        "\n".join(
            [
                "[langfuse]",
                f"base_url = {toml(fake.url)}",
                f"public_key = {toml(fake.public_key)}",
                f"secret_key = {toml(fake.secret_key)}",
                "[poll]",
                'start = "-1m"',
                f'interval = "{args.interval:g}s"',
                'settle = "1s"',
                "[state]",
                f"path = {toml(str(directory / f'{name}.db'))}",
                "[queue]",
                'backend = "redis"',
                f"url = {toml(redis_url)}",
                f"name = {toml(QUEUE)}",
                "standby = true",
                f'lease = "{args.lease:g}s"',
                f"replica = {toml(name)}",
                "[[rules]]",
                'name = "everything"',
                'events = ["trace.*"]',
                'notify = ["archive"]',
                "[[rules]]",
                'name = "errors"',
                'events = ["trace.updated"]',
                "when = 'data.level == \"ERROR\"'",
                'group_by = ["data.traceName"]',
                'group_wait = "0s"',
                f'resolve_after = "{args.resolve_after:g}s"',
                'notify = ["alerts"]',
                "[notifiers.archive]",
                'type = "jsonl"',
                f"path = {toml(str(directory / 'archive.jsonl'))}",
                "[notifiers.alerts]",
                'type = "jsonl"',
                f"path = {toml(str(directory / 'alerts.jsonl'))}",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    return path


class Process:
    """A `langfuse-poller` subprocess with its log in a file."""

    def __init__(self, directory: Path, verb: str, config: Path, name: str) -> None:
        self.name = name
        self.log = directory / f"{name}.{time.monotonic_ns()}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                command(verb, config), stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, env=child_env()
            )

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait(predicate: Any, timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def told(path: Path, event: str, name: str) -> bool:
    """Whether the jsonl notifier got `event` (rule.firing, rule.resolved) for the group of this trace name."""
    return any((e, n) == (event, name) for e, _, n in alerts_in(path))


def alerts_in(path: Path) -> list[tuple[str, str, str]]:
    """(event, reason, trace name of the group) of every alert notification, in the order sent."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            notice = json.loads(line)
            data = notice["data"]
            found.append((notice["event"], data["reason"], data["group"].get("data.traceName", "")))
    return found


def failover(args: argparse.Namespace, directory: Path) -> Figures:
    figures = Figures(lease=args.lease, interval=args.interval)
    redis = Redis(directory)
    ids: list[str] = []
    stop = threading.Event()
    procs: dict[str, Process] = {}
    try:
        with FakeLangfuse() as fake:

            def traffic() -> None:
                while not stop.wait(1 / args.rate):
                    ids.append(f"trace.created:{fake.add_trace()[0]['traceId']}")

            def start(name: str) -> Process:
                proc = Process(directory, "run", write_config(directory, fake, redis.url, name, args), name)
                if not wait_for_output(proc.proc, proc.log, "standby poller", 30):
                    raise SystemExit(f"replica {name} did not start:\n{proc.log.read_text()}")
                procs[name] = proc
                return proc

            start("r0")
            if not wait(lambda: redis.holder() == "r0", 30):
                raise SystemExit("the first replica did not take the lease")
            start("r1")
            worker_config = directory / "r0.toml"
            procs["worker"] = Process(directory, "worker", worker_config, "worker")
            feeder = threading.Thread(target=traffic, daemon=True)
            feeder.start()
            spare = 2
            time.sleep(args.pause)
            alerts = directory / "alerts.jsonl"
            # a group resolved by the leader that opened it: how late a resolve is without a takeover
            fake.add_trace(name="calm", level="ERROR")
            if not wait(lambda: redis.alert_count("calm") >= 1, 30):
                raise SystemExit("the first alert group was not opened")
            recorded = time.time()
            if not wait(lambda: told(alerts, "rule.resolved", "calm"), args.resolve_after + 30):
                raise SystemExit("the first alert group did not resolve")
            figures.calm_late = time.time() - recorded - args.resolve_after
            for kill in range(args.kills):
                leader = redis.holder()
                if leader is None or leader not in procs:
                    figures.problems.append(f"no live leader before a kill (lease: {leader})")
                    break
                # an alert group open at the kill, told by the leader
                name = f"boom-{kill}"
                fake.add_trace(name=name, level="ERROR")
                if not wait(lambda name=name: told(alerts, "rule.firing", name), 30):
                    figures.problems.append(f"the group {name} did not fire before the kill")
                    break
                left = redis.lease_left()
                procs.pop(leader).kill9()
                killed_wall, killed = time.time(), time.monotonic()
                fake.add_trace(name=name, level="ERROR")
                limit = args.lease * 3 + 10
                heir = None
                if wait(lambda dead=leader: (holder := redis.holder()) is not None and holder != dead, limit):
                    heir = redis.holder()
                taken = time.monotonic() - killed
                if heir is None or not wait(lambda since=killed_wall: redis.last_poll() > since, limit):
                    figures.problems.append(f"nobody took over within {limit:.0f} s after {leader} was killed")
                    break
                first_poll = redis.last_poll() - killed_wall
                if not wait(lambda name=name: redis.alert_count(name) >= 2, limit):
                    figures.problems.append(f"the new leader did not count the match of {name} within {limit:.0f} s")
                    break
                written = time.monotonic() - killed
                if not wait(lambda name=name: told(alerts, "rule.resolved", name), args.resolve_after + limit):
                    figures.problems.append(f"the group {name} did not resolve")
                    break
                resolved = time.monotonic() - killed
                late = resolved - written - args.resolve_after
                figures.rounds.append(Round(leader, heir, left, taken, first_poll, written, resolved, late))
                start(f"r{spare}")
                spare += 1
                time.sleep(args.pause)
            stop.set()
            feeder.join(5)
            expected = set(ids)
            archive = directory / "archive.jsonl"
            wait(lambda: read_archive(archive)[0].keys() >= expected, 60, step=0.2)
            time.sleep(1.0)  # a late repeat would land now
            got, _ = read_archive(archive)
            figures.expected = len(expected)
            figures.delivered = len(expected & set(got))
            figures.repeats = repeats(got)
            figures.alerts = alerts_in(alerts)
    finally:
        stop.set()
        for proc in procs.values():
            proc.stop()
        redis.close()
    return figures


def main(argv: Sequence[str] | None = None) -> Figures:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="how many times the leader is killed (default 10)")
    parser.add_argument("--lease", type=float, default=5.0, help="[queue] lease, seconds (default 5)")
    parser.add_argument("--interval", type=float, default=1.0, help="[poll] interval, seconds (default 1)")
    parser.add_argument("--rate", type=float, default=10.0, help="new traces per second (default 10)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between a takeover and the next kill")
    parser.add_argument(
        "--resolve-after", type=float, help="resolve_after of the alert rule, seconds (default: twice the lease)"
    )
    args = parser.parse_args(argv)
    if args.resolve_after is None:
        args.resolve_after = 2 * args.lease
    print(f"failover: {machine()}")
    print(
        f"{args.kills} SIGKILLs of the leader of 2 replicas; lease {args.lease:g} s, poll interval "
        f"{args.interval:g} s, {args.rate:g} traces/s\n"
    )
    with tempfile.TemporaryDirectory(prefix="failover-") as tmp:
        figures = failover(args, Path(tmp))
    rows = [
        (i + 1, r.lease_left, r.lease_taken, r.after_expiry, r.first_poll, r.alert_write, r.resolved, r.resolve_late)
        for i, r in enumerate(figures.rounds)
    ]
    headers = (
        "kill",
        "lease left (s)",
        "lease taken (s)",
        "after expiry (s)",
        "first poll (s)",
        "alert write (s)",
        "resolved (s)",
        "resolve late (s)",
    )
    print(table(headers, rows))
    polls = [r.first_poll for r in figures.rounds]
    writes, lates = [r.alert_write for r in figures.rounds], [r.resolve_late for r in figures.rounds]
    print(
        f"\nfirst poll committed after a kill: p50 {percentile(polls, 50):.2f} s, max {max(polls, default=0):.2f} s "
        f"(bound: lease + lease/3 + interval = {figures.bound:.2f} s); events delivered {figures.delivered}/"
        f"{figures.expected}, repeats {figures.repeats} (allowed <= {len(figures.rounds)})"
    )
    print(
        f"alert state: the new leader's first write p50 {percentile(writes, 50):.2f} s, max "
        f"{max(writes, default=0):.2f} s after the kill; resolves late by p50 {percentile(lates, 50):.2f} s, max "
        f"{max(lates, default=0):.2f} s (without a takeover: {figures.calm_late:.2f} s); "
        f"{len(figures.alerts)} alert notifications for {len({n for *_, n in figures.alerts})} groups, repeats "
        f"{figures.alert_repeats} (allowed <= {len(figures.rounds)})"
    )
    for problem in figures.problems:
        print(f"problem: {problem}")
    met = (
        not figures.problems
        and figures.delivered == figures.expected
        and figures.repeats <= len(figures.rounds)
        and all(p <= figures.bound for p in polls)
        and figures.alert_repeats <= len(figures.rounds)
    )
    print(
        "target every failover within the bound, nothing lost, repeats <= kills (events and alerts): "
        f"{'met' if met else 'missed'}"
    )
    return figures


if __name__ == "__main__":
    main()
