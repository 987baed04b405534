"""Webhook answers during a catch-up: how fast a signed webhook is stored and answered while `run` writes a
large backlog into the same state.

    python bench/webhook_load.py --observations 40000 --rate 20

Langfuse gives a webhook 4 attempts within about a second and never sends it again (the Langfuse worker's
`backOff(..., {numOfAttempts: 4})` in `worker/src/queues/webhooks.ts`): an answer that takes too long, or a
503, is a lost event. Here `langfuse-poller run` (a subprocess) polls a backlog of `--observations` from a
FakeLangfuse in this process, with the receiver on and a jsonl notifier, while a sender (another subprocess,
so that the stand-in's work does not delay its clock) posts signed prompt-version webhooks at `--rate` per
second, each on a new connection, until the catch-up has delivered every polled event. Prints the answer time
p50/p99/max, the answers that were not 2xx, and the catch-up's events per second (from the daemon's start to
its last polled event in the jsonl file). `--rate 0` measures the catch-up alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROUTED, Traffic, child_env, command, machine, percentile, table, wait_for_output

from langfuse_poller.testing.fake_langfuse import FakeLangfuse
from langfuse_poller.webhooks import signing

SECRET = "lf-whsec_" + "5" * 64
PATH = "/api/webhooks/langfuse"
SENDERS = 16


@dataclass
class Figures:
    observations: int
    polled: int  # polled events delivered to the jsonl file
    catchup_seconds: float
    sent: int = 0
    answers: list[float] = field(default_factory=list)  # seconds, 2xx answers
    failed: int = 0  # not 2xx, or no answer
    stored: int = 0  # webhook events delivered to the jsonl file

    @property
    def events_per_second(self) -> float:
        return self.polled / self.catchup_seconds if self.catchup_seconds else float("nan")

    @property
    def p50(self) -> float:
        return percentile(self.answers, 50)

    @property
    def p99(self) -> float:
        return percentile(self.answers, 99)

    @property
    def max(self) -> float:
        return max(self.answers, default=float("nan"))


def payload(n: int) -> bytes:
    """A prompt-version webhook as Langfuse sends it (`packages/shared/src/domain/webhooks.ts`), id `load-<n>`."""
    return json.dumps(
        {
            "id": f"load-{n}",
            "timestamp": "2026-12-01T00:00:00.000Z",
            "type": "prompt-version",
            "apiVersion": "v1",
            "action": "created",
            "prompt": {"id": f"prompt-{n}", "name": "load", "version": n, "projectId": "proj-test", "labels": []},
        }
    ).encode()


def send(port: int, n: int) -> tuple[float, int]:
    """Post webhook `n` on a new connection: (seconds to the whole answer, HTTP status or 0 for none)."""
    body = payload(n)
    began = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST",
            PATH,
            body=body,
            headers={
                "content-type": "application/json",
                "user-agent": "Langfuse/1.0",
                signing.HEADER: signing.sign(SECRET, body),
            },
        )
        response = conn.getresponse()
        response.read()
        conn.close()
        status = response.status
    except OSError:
        status = 0
    return time.perf_counter() - began, status


def sender(port: int, rate: float) -> None:
    """The sender subprocess: webhooks at `rate` per second until stdin closes; prints one JSON line of results."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    results: list[tuple[float, int]] = []
    began = time.monotonic()
    n = 0
    with ThreadPoolExecutor(SENDERS) as pool:
        futures = []
        while not stop.is_set():
            # each send is due at its own moment: a late one does not shift those after it
            stop.wait(max(0.0, began + n / rate - time.monotonic()))
            if stop.is_set():
                break
            futures.append(pool.submit(send, port, n))
            n += 1
        results = [f.result() for f in futures]
    print(json.dumps({"sent": n, "results": results}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class JsonlTail:
    """Counts the lines of a growing jsonl file by `source`, reading only what was added since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.ids: dict[str, set[str]] = {"poll": set(), "webhook": set()}

    def read(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            event = json.loads(line)
            self.ids.setdefault(event["source"], set()).add(event["id"])


def measure(observations: int, rate: float, hours: float, timeout: float) -> Figures:
    traffic = Traffic()
    with FakeLangfuse() as fake, tempfile.TemporaryDirectory(prefix="bench-webhook-load-") as tmp:
        # the backlog ends before the head's settle (30 s): its last records are read at once, not after the wait
        now = time.time() - 60
        traces = max(1, observations // 2)
        step = hours * 3600 / traces
        for index in range(traces):
            traffic.add_trace(
                fake, now - hours * 3600 + index * step, score=True, level="ERROR" if index % 10 == 0 else "DEFAULT"
            )
        expected = traffic.expected
        port = free_port()
        events = Path(tmp) / "events.jsonl"
        config = Path(tmp) / "config.toml"
        config.write_text(
            f"""
[langfuse]
base_url = "{fake.url}"
public_key = "{fake.public_key}"
secret_key = "{fake.secret_key}"
[poll]
start = "-{hours + 1}h"
interval = "1s"
[state]
path = "{tmp}/state.db"
[webhook]
enabled = true
listen = "127.0.0.1:{port}"
secret = "{SECRET}"
[[rules]]
name = "all"
events = {json.dumps([*ROUTED, "prompt.*"])}
notify = ["file"]
[notifiers.file]
type = "jsonl"
path = "{events}"
""",
            encoding="utf-8",
        )
        log = Path(tmp) / "run.log"
        tail = JsonlTail(events)
        sending: subprocess.Popen[str] | None = None
        with log.open("wb") as out:
            began = time.monotonic()
            proc = subprocess.Popen(command("run", config), stdout=out, stderr=subprocess.STDOUT, env=child_env())
        try:
            if not wait_for_output(proc, log, "receiving Langfuse webhooks on", 30):
                raise RuntimeError(f"the daemon did not start:\n{log.read_text()}")
            if rate > 0:
                sending = subprocess.Popen(
                    [sys.executable, __file__, "--sender", str(port), "--rate", str(rate)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            deadline = began + timeout
            while not expected <= tail.ids["poll"]:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(
                        f"the catch-up did not finish ({len(tail.ids['poll'])}/{len(expected)}):\n"
                        f"{log.read_text()[-3000:]}"
                    )
                time.sleep(0.05)
                tail.read()
            figures = Figures(observations=traffic.observations, polled=len(expected), catchup_seconds=0.0)
            figures.catchup_seconds = time.monotonic() - began
            if sending is not None:
                report, _ = sending.communicate("", timeout=60)
                done = json.loads(report)
                figures.sent = done["sent"]
                figures.answers = [seconds for seconds, status in done["results"] if 200 <= status < 300]
                figures.failed = figures.sent - len(figures.answers)
                # every answered webhook reaches the notifier too
                deadline = time.monotonic() + 30
                while len(tail.ids["webhook"]) < len(figures.answers) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    tail.read()
                figures.stored = len(tail.ids["webhook"])
            proc.terminate()
            proc.wait(timeout=30)
        finally:
            for child in (sending, proc):
                if child is not None and child.poll() is None:
                    child.kill()
                    child.wait(timeout=10)
    return figures


def main(argv: Sequence[str] | None = None) -> Figures:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--observations", type=int, default=40_000, help="the backlog: 2 per trace, one score each")
    parser.add_argument("--rate", type=float, default=20.0, help="webhooks per second during the catch-up")
    parser.add_argument("--hours", type=float, default=24.0, help="how far back the backlog spreads")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on a catch-up after this long")
    parser.add_argument("--sender", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sender:
        sender(args.sender, args.rate)
        sys.exit(0)
    print(f"webhook_load: {machine()}")
    f = measure(args.observations, args.rate, args.hours, args.timeout)
    print(
        table(
            ("observations", "polled events", "catch-up s", "events/s", "webhooks", "not 2xx", "stored",
             "answer p50 s", "p99 s", "max s"),
            [(f.observations, f.polled, f.catchup_seconds, f.events_per_second, f.sent, f.failed, f.stored,
              f.p50, f.p99, f.max)],
        )
    )  # fmt: skip
    return f


if __name__ == "__main__":
    main()
