"""The loopback HTTP server that carries the stand-in's answers.

Langfuse answers over HTTP/1.1 with keep-alive; so does this server, on a free port of 127.0.0.1, one thread
per connection. It knows nothing of the API: each request goes to ``_handle``, which ``FakeLangfuse``
routes. ``stop()`` drops open keep-alive connections, so clients see the server as gone, as after a crash.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from .query import Query
from .wire import Response


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: LoopbackServer) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name with getfqdn(), which can stall on some resolvers.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without this, Nagle plus delayed ACKs add ~40 ms per response.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        split = urlsplit(self.path)
        query = parse_qs(split.query, keep_blank_values=True)
        response = self.server.fake._handle(method, split.path, query, self.headers.get("Authorization"))
        try:
            self.send_response(response.status)
            if not any(name.lower() == "content-type" for name, _ in response.headers):
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(response.body)))
            for name, value in response.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(response.body)
        except OSError:
            # The client gave up (timeout tests) or stop() closed the socket.
            self.close_connection = True


class LoopbackServer:
    """Starting and stopping the server of ``FakeLangfuse``, and the connections it holds open.

    A mixin; ``FakeLangfuse.__init__`` sets the state declared here.
    """

    _lock: threading.RLock
    _server: _Server | None
    _thread: threading.Thread | None
    _port: int
    _stopping: threading.Event
    _connections: set[socket.socket]

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``; only valid once started."""
        if self._server is None:
            raise RuntimeError("FakeLangfuse is not started")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> Self:
        """Start serving on a free loopback port (the same port again after a stop()); returns self."""
        if self._server is not None:
            raise RuntimeError("FakeLangfuse is already started")
        self._stopping.clear()
        server = _Server(("127.0.0.1", self._port), self)
        self._port = server.server_address[1]
        self._server = server
        # A short poll interval keeps stop() fast; serve_forever only polls to notice shutdown().
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-langfuse", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections, so clients see the server as gone."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _track(self, conn: socket.socket, active: bool) -> None:
        with self._lock:
            if active:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _handle(self, method: str, path: str, query: Query, auth: str | None) -> Response:
        """Answer one request; ``FakeLangfuse`` routes it to an endpoint family."""
        raise NotImplementedError
