"""Chaos: kill -9 the daemon again and again while Langfuse and the webhook misbehave; count what arrives.

    python bench/chaos.py                            # 50 kills, a few minutes
    python bench/chaos.py --kills 50 --seed 1

Real processes on real time, as tests/test_crash_safety.py does it: `langfuse-poller run` runs as a
subprocess against a FakeLangfuse served from this process, and delivers every event to a `webhook`
notifier (a loopback receiver here that answers 500 to `--webhook-failures` of the requests, 30% by default)
and to a `jsonl` notifier. Meanwhile:

* `--api-failures` (10%) of the API's data requests are answered 500, 502 or 503 (a hook on each request);
* the API allows `--rate-limit` (100) requests per minute, Langfuse Cloud's Core plan, in fixed one-minute
  windows, and answers 429 with Retry-After past it (`FakeLangfuse.set_rate_limit`);
* the daemon is killed with SIGKILL `--kills` times, each time after a random lifetime (0.2-3 s after it
  was started, start-up included), and started again on the same state;
* a backlog of `--backlog` traces from the last hour waits at the first start, and new traces arrive
  while the kills go on, a third of them visible late (up to `--late-max` seconds, within the lookback).

The config is the defaults scaled down to the run: interval 1s, lookback `--lookback` (30s), one re-read at
a third of it, sweeps every sixth, settle 0s; deliveries retry from 50 ms to 1 s, up to 1000 attempts (a 30%
failing receiver would dead-letter now and then at the default 10).

After the last kill, the daemon runs once more, faults still on, until both targets have every expected
event (or `--final-timeout`; "complete after" says when each target had them all), then gets SIGTERM (it
must exit 0) and `status --json` must show an empty queue and no dead letters. Target: 100% delivered to
each target, repeats per target at most the number of kills (the contract: at most one repeat per crash).
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import Traffic, child_env, command, machine, status, table, write_config

from langfuse_poller.testing.archive import read_archive, repeats
from langfuse_poller.testing.fake_langfuse import FakeLangfuse
from langfuse_poller.testing.loopback_webhook import LoopbackWebhook


@dataclass
class Figures:
    kills: int
    kills_before_running: int  # kills that landed before the daemon said it was running
    expected: int
    hook: Counter[str]
    archive: Counter[str]
    torn: int
    api_statuses: Counter[int]
    webhook_refused: int
    webhook_truncated: int
    problems: list[str]
    final_seconds: float
    completed: dict[str, float]  # target -> seconds into the last run when it had every expected event
    rate_waits: int  # pauses for X-RateLimit-Remaining: 0, from the daemons' logs
    clean_exit: bool
    pending: int
    dead_letters: int
    elapsed: float
    seed: int

    def delivered(self, got: Counter[str], expected: set[str]) -> int:
        return len(expected & set(got))

    @property
    def met(self) -> bool:
        return (
            self.clean_exit
            and self.pending == 0
            and self.dead_letters == 0
            and not self.problems
            and all(repeats(got) <= self.kills for got in (self.hook, self.archive))
        )


def chaos(args: argparse.Namespace) -> tuple[Figures, set[str]]:
    seed = args.seed if args.seed is not None else time.time_ns() % 1_000_000_007
    rng = random.Random(seed)
    faults = random.Random(seed + 1)
    traffic = Traffic()
    began = time.monotonic()
    lookback = args.lookback
    with (
        FakeLangfuse() as fake,
        LoopbackWebhook() as inbox,
        tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp_name,
    ):
        tmp = Path(tmp_name)
        inbox.rng = random.Random(seed + 2)
        inbox.fail_rate = args.webhook_failures
        fault_lock = threading.Lock()

        def flaky(path: str, query: dict[str, list[str]]) -> None:
            # runs before the fake looks at its fault queue: a fault queued here answers this very request
            with fault_lock:
                if faults.random() < args.api_failures:
                    fake.fail_next(1, status=faults.choice([500, 502, 503]))

        fake.on_data_request = flaky
        # a killed daemon resets its connections; the stand-in's server would print a traceback for each
        server = getattr(fake, "_server", None)
        if server is not None:
            server.handle_error = lambda request, client_address: None
        fake.set_rate_limit(args.rate_limit)
        config = write_config(
            tmp / "config.toml",
            fake,
            poll={
                "interval": "1s",
                "lookback": f"{lookback:g}s",
                "reread": [f"{lookback / 3:g}s"],
                "sweep_interval": f"{max(1.0, lookback / 6):g}s",
                "settle": "0s",
                "start": "-2h",
            },
            notifiers={
                "hook": {"type": "webhook", "url": inbox.url, "timeout": "5s"},
                "archive": {"type": "jsonl", "path": str(tmp / "events.jsonl")},
            },
            delivery={"backoff": "50ms", "max_backoff": "1s", "max_attempts": 1000},
        )
        now = time.time()
        for _ in range(args.backlog):
            add(traffic, fake, rng, now - rng.uniform(5.0, 3600.0))

        stop_live = threading.Event()
        live_rng = random.Random(seed + 3)

        def add_live() -> None:
            # new traces during the kills: most visible at once, a third late, all within the lookback
            while not stop_live.is_set():
                past = live_rng.choice([0.0, 0.0, live_rng.uniform(0.0, 2.0)])
                late = live_rng.uniform(0.3, args.late_max - past) if live_rng.random() < 1 / 3 else 0.0
                add(traffic, fake, live_rng, time.time() - past, visible_after=late)
                stop_live.wait(1 / args.live_rate)

        adder = threading.Thread(target=add_live, daemon=True)
        adder.start()
        kills = before_running = 0
        try:
            for index in range(args.kills):
                log = tmp / f"run-{index}.log"
                with log.open("wb") as out:
                    proc = subprocess.Popen(
                        command("run", config), stdout=out, stderr=subprocess.STDOUT, env=child_env()
                    )
                try:
                    time.sleep(rng.uniform(args.min_life, args.max_life))
                    if proc.poll() is not None:
                        raise RuntimeError(f"the daemon exited on its own ({proc.returncode}):\n{log.read_text()}")
                    running = "langfuse-poller running" in log.read_text(errors="replace")
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=10)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(timeout=10)
                kills += 1
                before_running += not running
        finally:
            stop_live.set()
            adder.join(timeout=10)

        # the last run: faults still on, until every expected event reached both targets
        expected = traffic.expected
        final_began = time.monotonic()
        log = tmp / "final.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(command("run", config), stdout=out, stderr=subprocess.STDOUT, env=child_env())
        completed: dict[str, float] = {}
        try:
            deadline = time.monotonic() + args.final_timeout
            while time.monotonic() < deadline and proc.poll() is None and len(completed) < 2:
                for name, got in (("hook", inbox.snapshot()), ("archive", read_archive(tmp / "events.jsonl")[0])):
                    if name not in completed and expected <= set(got):
                        completed[name] = time.monotonic() - final_began
                time.sleep(0.1)
            final_seconds = time.monotonic() - final_began
            # the deliveries that were in flight get recorded before the stop
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        final_log = log.read_text(errors="replace")
        rate_waits = sum(path.read_text(errors="replace").count("Langfuse rate limit") for path in tmp.glob("*.log"))
        clean_exit = code == 0 and "Traceback" not in final_log
        report = status(config)
        archive, torn = read_archive(tmp / "events.jsonl")
        statuses = Counter(r.status for r in list(fake.requests) if r.path.endswith(("/v2/observations", "/v3/scores")))
        with inbox.lock:
            hook = Counter(inbox.accepted)
            refused, truncated, problems = inbox.refused, inbox.truncated, list(inbox.problems)
        if fake.errors:
            problems.append(f"the stand-in failed: {fake.errors[:3]}")
        if not clean_exit:
            problems.append(f"the last run exited {code}: {final_log[-2000:]}")
    return (
        Figures(
            kills=kills,
            kills_before_running=before_running,
            expected=len(expected),
            hook=hook,
            archive=archive,
            torn=torn,
            api_statuses=statuses,
            webhook_refused=refused,
            webhook_truncated=truncated,
            problems=problems,
            final_seconds=final_seconds,
            completed=completed,
            rate_waits=rate_waits,
            clean_exit=clean_exit,
            pending=int(report["queue"]["pending"]),
            dead_letters=int(report["dead_letters"]),
            elapsed=time.monotonic() - began,
            seed=seed,
        ),
        expected,
    )


def add(traffic: Traffic, fake: FakeLangfuse, rng: random.Random, start: float, visible_after: float = 0.0) -> None:
    """A trace (root and generation), 10% ERROR and 5% WARNING (trace.updated), scored 3 times in 10."""
    level = rng.choices(["DEFAULT", "ERROR", "WARNING"], weights=[85, 10, 5])[0]
    traffic.add_trace(fake, start, visible_after=visible_after, score=rng.random() < 0.3, level=level)


def main(argv: Sequence[str] | None = None) -> Figures:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--min-life", type=float, default=0.2, help="shortest life before a kill, seconds")
    parser.add_argument("--max-life", type=float, default=3.0, help="longest life before a kill, seconds")
    parser.add_argument("--backlog", type=int, default=300, help="traces from the last hour at the first start")
    parser.add_argument("--live-rate", type=float, default=3.0, help="new traces per second during the kills")
    parser.add_argument("--lookback", type=float, default=30.0, help="seconds")
    parser.add_argument("--late-max", type=float, default=20.0, help="latest visibility of a record, < lookback")
    parser.add_argument("--api-failures", type=float, default=0.10, help="share of API requests answered 5xx")
    parser.add_argument("--rate-limit", type=int, default=100, help="API requests allowed per minute")
    parser.add_argument("--webhook-failures", type=float, default=0.30, help="share of webhook requests refused")
    parser.add_argument("--final-timeout", type=float, default=600.0, help="seconds the last run may take")
    parser.add_argument("--seed", type=int, default=None, help="replay the random choices of a run")
    args = parser.parse_args(argv)
    if args.late_max >= args.lookback:
        parser.error("--late-max must be below --lookback: later records are out of the contract")
    print(f"chaos: {machine()}")
    print(
        f"{args.kills} SIGKILLs after {args.min_life:g}-{args.max_life:g} s each; API: {args.api_failures:.0%} 5xx, "
        f"{args.rate_limit}/min then 429; webhook: {args.webhook_failures:.0%} answered 500; backlog "
        f"{args.backlog} traces, {args.live_rate:g} new traces/s during the kills, late up to {args.late_max:g} s "
        f"(lookback {args.lookback:g} s)\n"
    )
    figures, expected = chaos(args)
    rows = [
        (
            name,
            f"{figures.delivered(got, expected)}/{figures.expected}",
            f"{figures.delivered(got, expected) / max(1, figures.expected):.1%}",
            repeats(got),
            f"<= {figures.kills}",
            len(set(got) - expected),
            f"{figures.completed[key]:.1f}" if key in figures.completed else "never",
        )
        for name, key, got in (
            (f"webhook ({args.webhook_failures:.0%} failing)", "hook", figures.hook),
            ("jsonl", "archive", figures.archive),
        )
    ]
    headers = ("target", "events delivered", "share", "repeats", "allowed", "unexpected ids", "complete after (s)")
    print(table(headers, rows))
    api = ", ".join(f"{code}: {n}" for code, n in sorted(figures.api_statuses.items()))
    print(
        f"\nkills {figures.kills} ({figures.kills_before_running} before the daemon was up); API answers {api}; "
        f"pauses at X-RateLimit-Remaining 0: {figures.rate_waits}; "
        f"webhook refused {figures.webhook_refused}, truncated by a kill {figures.webhook_truncated}; torn jsonl "
        f"lines {figures.torn}; the last run took {figures.final_seconds:.1f} s and exited "
        f"{'cleanly' if figures.clean_exit else 'NOT cleanly'}; queue {figures.pending}, dead letters "
        f"{figures.dead_letters}; {figures.elapsed:.0f} s in all; seed {figures.seed}"
    )
    for problem in figures.problems[:5]:
        print(f"problem: {problem}")
    everything = all(figures.delivered(got, expected) == figures.expected for got in (figures.hook, figures.archive))
    print(f"target 100% delivered, repeats <= kills: {'met' if everything and figures.met else 'missed'}")
    return figures


if __name__ == "__main__":
    main()
