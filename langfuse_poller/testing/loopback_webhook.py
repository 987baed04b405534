"""A webhook endpoint on loopback that fails on purpose: what delivery tests and benchmarks send to.

    with LoopbackWebhook() as inbox:            # inbox.url is http://127.0.0.1:<free port>/hook
        inbox.fail_rate = 0.3                   # answer 500 to 30% of requests (changeable while it serves)
        ...
        assert set(inbox.snapshot()) == expected_ids

It records each `webhook-id` answered 200 (how often, and when it first arrived), counts refusals and
requests whose sender died mid-body, and notes any request whose `webhook-id` does not match its body.
"""

from __future__ import annotations

import json
import random
import socketserver
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Inbox:
    """What the endpoint saw. `fail_rate` and `delay` may be changed while it serves."""

    url: str = ""
    fail_rate: float = 0.0
    delay: float = 0.0  # seconds each answer takes
    rng: random.Random = field(default_factory=random.Random)
    accepted: Counter[str] = field(default_factory=Counter)  # event id -> requests answered 200
    first_at: dict[str, float] = field(default_factory=dict)  # event id -> when it first arrived
    refused: int = 0  # requests answered 500
    truncated: int = 0  # requests whose sender died before the whole body arrived
    in_flight: int = 0
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.accepted)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name with getfqdn(), which can stall on some resolvers
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a killed sender resets its connections: expected here, not worth a traceback
        pass


class LoopbackWebhook:
    """Serves an `Inbox` on 127.0.0.1:<free port> while the `with` block runs."""

    def __init__(self, inbox: Inbox | None = None) -> None:
        self.inbox = inbox or Inbox()
        box = self.inbox

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in two writes: without this, Nagle plus delayed ACKs add ~40 ms per answer
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                arrived = time.time()
                event_id = self.headers.get("webhook-id") or ""
                if len(body) < length:
                    # the sender died mid-request: nothing arrived, as for any receiver
                    with box.lock:
                        box.truncated += 1
                    self.close_connection = True
                    return
                with box.lock:
                    box.in_flight += 1
                    fail = box.rng.random() < box.fail_rate
                    delay = box.delay
                try:
                    if delay:
                        time.sleep(delay)
                    try:
                        envelope = json.loads(body)
                    except ValueError:
                        envelope = {}
                    with box.lock:
                        if not event_id or not isinstance(envelope, dict) or envelope.get("id") != event_id:
                            box.problems.append(f"webhook-id {event_id!r} with body {body[:200]!r}")
                        if fail:
                            box.refused += 1
                        else:
                            box.accepted[event_id] += 1
                            box.first_at.setdefault(event_id, arrived)
                    answer = b'{"error":"try again"}' if fail else b"{}"
                    self.send_response(500 if fail else 200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                finally:
                    with box.lock:
                        box.in_flight -= 1

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.inbox.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> Inbox:
        self._thread.start()
        return self.inbox

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
