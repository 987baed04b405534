"""The webhook receiver: Langfuse's signed webhooks in, events in the SQLite outbox, answered at once.

A request is checked in this order, each refusal stores nothing: the path and method (404, 405), the
declared length against `max_body` (413, before a byte of the body is read), the content type (415), the
body read within `timeout` (408) and `max_body` (413), the signature (401), a JSON object (400). The event
(see payloads.py) is then stored with its deliveries in one write transaction, the delivery worker is
kicked, and the answer is 200; handlers and notifiers run later, in the worker, never on the request. The
event id comes from the payload id, so a retried delivery stores nothing new and is answered 200 again.
An event that no rule or handler wants is stored all the same, with no delivery.

Hypercorn serves the app, in a thread of its own with its own asyncio loop, chosen over waitress, cheroot
and uvicorn by bench/webhook_servers.py: it serves TLS itself; a client that connects and sends nothing,
or trickles its headers, is cut off after `timeout` whatever it sends (uvicorn never cuts those; waitress
lets header tricklers hold its connection slots; cheroot's worker threads were all held by 200 idle
connections); and on asyncio a slow client costs a socket, never a thread. The body's own deadline is
enforced here, since hypercorn restarts its read timeout on every byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from ..config import DEFAULT_BASE_URL, WEBHOOK_SECRET_EXPECTED, WebhookConfig
from ..errors import ConfigError, LangfusePollerError
from ..events import Event
from ..registry import Router
from ..store import SqliteError, Store
from . import signing
from .activation import inherited_listener
from .payloads import event_from_webhook

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
# bodies being read at once: bounds the memory a flood of large requests can take (64 x max_body)
BODIES_IN_FLIGHT = 64
# threads that write to SQLite; writes take the one write lock in turn anyway
STORE_THREADS = 4
BACKLOG = 128
# how long a stop waits for the requests in flight (hypercorn's graceful timeout), then for the thread
STOP_GRACE = 3.0
START_TIMEOUT = 10.0

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class _TooLarge(Exception):
    """The body grew past max_body while it was read."""


class WebhookApp:
    """The ASGI application: /healthz, and the webhook path. See the module docstring for the checks."""

    def __init__(
        self,
        config: WebhookConfig,
        store_event: Callable[[Event], Awaitable[bool]],
        *,
        base_url: str = DEFAULT_BASE_URL,
        clock: Callable[[], float] = time.time,
        on_startup: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.store_event = store_event
        self.base_url = base_url
        self.clock = clock
        self.on_startup = on_startup
        self.secrets = [secret.reveal() for secret in config.secrets]
        self._bodies: asyncio.Semaphore | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # websockets and anything else: returning without accepting makes the server refuse them

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._bodies = asyncio.Semaphore(BODIES_IN_FLIGHT)
                self.on_startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == HEALTH_PATH:
            if method in ("GET", "HEAD"):
                await _answer(send, 200, {"status": "ok"}, head=method == "HEAD")
            else:
                await _answer(send, 405, {"error": "method not allowed"}, [(b"allow", b"GET, HEAD")])
        elif path == self.config.path:
            if method == "POST":
                await self._webhook(scope, receive, send)
            else:
                await _answer(send, 405, {"error": "method not allowed"}, [(b"allow", b"POST")])
        else:
            await _answer(send, 404, {"error": "not found"})

    async def _webhook(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        headers = _headers(scope["headers"])
        client = "{}:{}".format(*scope["client"]) if scope.get("client") else "unknown client"

        async def refuse(status: int, error: str) -> None:
            # say why to the sender and the log, never what was expected: no secret, no digest
            log.warning("webhook from %s refused: HTTP %d, %s", client, status, error)
            await _answer(send, status, {"error": error})

        length = headers.get("content-length", [""])[0]
        if length.isdigit() and int(length) > self.config.max_body:
            return await refuse(413, f"body larger than {self.config.max_body} bytes")
        media_type = headers.get("content-type", [""])[0].split(";")[0].strip().lower()
        if media_type != "application/json":
            return await refuse(415, "content-type must be application/json")
        assert self._bodies is not None, "lifespan startup ran"
        try:
            async with asyncio.timeout(self.config.timeout.total_seconds()):
                async with self._bodies:
                    body = await self._read_body(receive)
        except TimeoutError:
            return await refuse(408, f"body not received within {self.config.timeout.total_seconds():g}s")
        except _TooLarge:
            return await refuse(413, f"body larger than {self.config.max_body} bytes")
        if body is None:
            return  # the client went away
        signatures = headers.get(signing.HEADER, [])
        reason = (
            signing.MALFORMED
            if len(signatures) > 1
            else signing.check(
                self.secrets,
                signatures[0] if signatures else None,
                body,
                tolerance=self.config.tolerance.total_seconds(),
                now=self.clock(),
                accept_plain=self.config.accept_unsigned_timestamp,
            )
        )
        if reason is not None:
            return await refuse(401, reason)
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return await refuse(400, "body is not valid JSON")
        if not isinstance(payload, dict):
            return await refuse(400, f"body must be a JSON object, found {_json_kind(payload)}")
        received_at = datetime.fromtimestamp(self.clock(), UTC)
        event = event_from_webhook(payload, received_at=received_at, base_url=self.base_url)
        try:
            stored = await self.store_event(event)
        except (LangfusePollerError, SqliteError) as exc:
            # not a 2xx: Langfuse delivers it again later
            log.error("webhook %s could not be stored: %s", event.id, exc)
            await _answer(send, 503, {"error": "the event could not be stored; try again later"})
            return
        if stored:
            log.info("webhook from %s stored as %s", client, event.id)
        else:
            log.info("webhook from %s: %s was already stored", client, event.id)
        await _answer(send, 200, {"status": "stored" if stored else "duplicate", "id": event.id, "event": event.type})

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.max_body:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _json_kind(value: object) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in raw:
        headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return headers


async def _answer(
    send: Send,
    status: int,
    body: dict[str, Any],
    extra: Iterable[tuple[bytes, bytes]] = (),
    *,
    head: bool = False,
) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *extra]
    if status >= 400:
        # the rest of a refused request is not read: the connection cannot carry another one
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else payload})


class WebhookReceiver:
    """Serves `WebhookApp` on `[webhook] listen` in a background thread; `start` and `stop` it.

    Each stored event kicks `kick` (the delivery worker). Binding happens in `start`, so a port in use or a
    bad certificate is reported there, before anything runs. A listening socket handed over by systemd
    (activation.py: `LISTEN_FDS`, `LISTEN_PID`) is served instead of binding `listen`: it stays open across
    restarts, so that connections wait in its queue rather than being refused.
    """

    def __init__(
        self,
        config: WebhookConfig,
        store: Store,
        router: Router,
        *,
        kick: Callable[[], None] = lambda: None,
        base_url: str = DEFAULT_BASE_URL,
        source: str = "config",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not config.secrets:
            # the receiver never accepts unsigned input
            raise ConfigError(source, "webhook.secret", None, WEBHOOK_SECRET_EXPECTED)
        self.config = config
        self.store = store
        self.router = router
        self.kick = kick
        self.source = source
        self._ready = threading.Event()
        self.app = WebhookApp(config, self._store_event, base_url=base_url, clock=clock, on_startup=self._ready.set)
        self.address: tuple[str, int] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._stop_soon: Callable[[], None] | None = None
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        """Where the webhooks go, e.g. http://127.0.0.1:8787/api/webhooks/langfuse (the bound port)."""
        host, port = self.address or (self.config.host, self.config.port)
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}{self.config.path}"

    def start(self) -> None:
        """Bind the address, then serve in a background thread; raises when it cannot."""
        from hypercorn.config import Config as HypercornConfig

        inherited = inherited_listener()
        sock = self._bind() if inherited is None else self._adopt(inherited)
        timeout = self.config.timeout.total_seconds()
        server = HypercornConfig()
        # hypercorn takes the bound socket over: a bind error was ours to report, in the caller's thread
        server.bind = [f"fd://{sock.fileno()}"]
        server.backlog = BACKLOG
        # a connection without a whole request (nothing sent, or headers trickling) is closed after this
        server.keep_alive_timeout = timeout
        server.read_timeout = max(1, math.ceil(timeout))
        server.ssl_handshake_timeout = timeout
        server.graceful_timeout = STOP_GRACE
        server.alpn_protocols = ["http/1.1"]
        server.include_server_header = False
        server.accesslog = None
        http_log = logging.getLogger(f"{__name__}.http")
        if http_log.level == logging.NOTSET:
            # hypercorn's own "Running on ..." says less than our line below
            http_log.setLevel(logging.WARNING)
        server.errorlog = http_log
        if self.config.tls_cert and self.config.tls_key:
            server.certfile, server.keyfile = str(self.config.tls_cert), str(self.config.tls_key)
            try:
                server.create_ssl_context()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                sock.close()
                raise ConfigError(
                    self.source,
                    "webhook.tls_cert",
                    str(self.config.tls_cert),
                    f"a PEM certificate matching the key in webhook.tls_key ({exc})",
                ) from None
        sock.detach()
        self._executor = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="webhook-store")
        self._thread = threading.Thread(target=self._serve, args=(server,), name="webhook-receiver", daemon=True)
        self._thread.start()
        # the socket already listens: requests queue in the backlog until the loop accepts them
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise LangfusePollerError(
                    f"the webhook receiver on {self.url} did not start: {self._failure or 'timed out'}"
                )
        log.info(
            "receiving Langfuse webhooks on %s%s", self.url, " (a socket handed over by systemd)" if inherited else ""
        )

    def _bind(self) -> socket.socket:
        host = "127.0.0.1" if self.config.host == "localhost" else self.config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self.config.port))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise LangfusePollerError(
                f"the webhook receiver cannot listen on {host}:{self.config.port}: {exc.strerror}; "
                "stop what uses it, or change [webhook] listen"
            ) from None
        self.address = (host, int(sock.getsockname()[1]))
        return sock

    def _adopt(self, sock: socket.socket) -> socket.socket:
        """Serve a listening socket handed over by socket activation; `[webhook] listen` is not bound then."""
        host, port = sock.getsockname()[:2]
        if (host, port) != (self.config.host, self.config.port):
            log.info("[webhook] listen (%s:%d) is not used: systemd handed over %s:%d", self.config.host,
                     self.config.port, host, port)  # fmt: skip
        self.address = (host, int(port))
        return sock

    def _serve(self, server: Any) -> None:
        from hypercorn.asyncio import serve

        async def main() -> None:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            with self._lock:
                if self._stopping:
                    return

                def stop_soon() -> None:
                    loop.call_soon_threadsafe(stop.set)

                self._stop_soon = stop_soon
            await serve(self.app, server, shutdown_trigger=stop.wait, mode="asgi")

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._failure = exc
            log.exception("the webhook receiver stopped on an unexpected error")

    async def _store_event(self, event: Event) -> bool:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._store_now, event)

    def _store_now(self, event: Event) -> bool:
        targets = self.router.targets(event)
        # urgent: the poller's page group and the delivery worker let it by (Langfuse gives up within a second)
        with self.store.write(urgent=True) as tx:
            stored = tx.enqueue(event, targets)
        if stored:
            if not targets:
                log.info("no rule or handler wants %s; stored without deliveries", event.type)
            try:
                self.kick()
            except Exception:  # the worker is closing: the next start delivers what is pending
                log.debug("could not kick the delivery worker", exc_info=True)
        return stored

    def stop(self) -> None:
        """Stop accepting, let the requests in flight finish (up to STOP_GRACE), and wait for the thread."""
        with self._lock:
            self._stopping = True
            stop_soon = self._stop_soon
        if stop_soon is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                stop_soon()
        if self._thread is not None:
            self._thread.join(STOP_GRACE + 2.0)
            if self._thread.is_alive():
                log.warning("the webhook receiver did not stop within %.0fs; leaving it", STOP_GRACE + 2.0)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> WebhookReceiver:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
