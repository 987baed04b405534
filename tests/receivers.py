"""Loopback HTTP receivers standing in for webhook endpoints: they record requests and answer as told."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Records every POST; `respond(n)` decides the status of the n-th request (from 0)."""

    def __init__(self, respond: Callable[[int], int] = lambda n: 200, delay: float = 0.0) -> None:
        self.respond = respond
        self.delay = delay
        self.received: list[Received] = []
        self.statuses: list[int] = []
        # requests being answered at once, and the most seen
        self.in_flight = 0
        self.peak = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    receiver.in_flight += 1
                    receiver.peak = max(receiver.peak, receiver.in_flight)
                if receiver.delay:
                    time.sleep(receiver.delay)
                with receiver._lock:
                    receiver.in_flight -= 1
                    status = receiver.respond(len(receiver.statuses))
                    receiver.statuses.append(status)
                    if status < 300:
                        receiver.received.append(Received({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def ids(self) -> list[str]:
        return [r.json["id"] for r in self.received]


@contextmanager
def receiver(respond: Callable[[int], int] = lambda n: 200, delay: float = 0.0) -> Iterator[Receiver]:
    server = Receiver(respond, delay)
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
