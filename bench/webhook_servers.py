"""Which HTTP server should receive webhooks: slow clients, huge bodies, many connections, throughput, TLS.

    pip install waitress uvicorn hypercorn cheroot trustme
    python bench/webhook_servers.py [--servers waitress,cheroot,uvicorn,hypercorn,langfuse-poller] [--slow 200]

Each server runs in its own subprocess on 127.0.0.1 with the same small app (read the body, answer 200 JSON;
413 above 1 MiB), a 2 s connection timeout where the server has one, and 4 worker threads where it has a
pool. `langfuse-poller` is the receiver itself (hypercorn, with the body deadline and the signature check,
storing each event in a fresh SQLite state); every request is signed for it. The driver measures, per server:

* idle: `--slow` connections that send nothing; the latency of a valid POST meanwhile; how many of the idle
  connections the server closed, and after how long;
* trickle-headers: `--slow` connections that send a request line and then one header byte every 0.5 s;
* trickle-body: 50 connections that send full headers (Content-Length 1000) and then one body byte every 0.5 s;
* huge body: Content-Length 1 GiB, and a chunked body without length: the answer, the bytes the client could
  push before it, and the server's peak RSS;
* throughput: 50 threads x 20 POSTs of 1 KiB on keep-alive connections: requests/s, p50 and p99 latency;
* TLS: whether the server serves HTTPS from a certificate and key file.

Only loopback addresses are used; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

LIMIT = 1 << 20
TIMEOUT = 2
THREADS = 4
SERVERS = ("waitress", "cheroot", "uvicorn", "hypercorn", "langfuse-poller")
SECRET = "lf-whsec_bench"


def signed(body: bytes) -> dict[str, str]:
    t = int(time.time())
    digest = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"content-type": "application/json", "x-langfuse-signature": f"t={t},v1={digest}"}


# --- the app, in both flavours -----------------------------------------------------------------------------


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length > LIMIT:
        start_response("413 Payload Too Large", [("content-type", "application/json"), ("connection", "close")])
        return [b'{"error":"too large"}']
    if length:
        body = environ["wsgi.input"].read(length)
    else:  # chunked: read up to one byte past the limit
        body = b""
        while len(body) <= LIMIT and (piece := environ["wsgi.input"].read(65536)):
            body += piece
        if len(body) > LIMIT:
            start_response("413 Payload Too Large", [("content-type", "application/json"), ("connection", "close")])
            return [b'{"error":"too large"}']
    payload = json.dumps({"ok": True, "bytes": len(body)}).encode()
    start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(payload)))])
    return [payload]


async def asgi_app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    headers = dict(scope["headers"])

    async def answer(status: int, payload: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    if int(headers.get(b"content-length", b"0") or 0) > LIMIT:
        await answer(413, b'{"error":"too large"}')
        return
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        total += len(message.get("body", b""))
        if total > LIMIT:
            await answer(413, b'{"error":"too large"}')
            return
        if not message.get("more_body"):
            break
    await answer(200, json.dumps({"ok": True, "bytes": total}).encode())


def serve(name: str, port: int, cert: str | None, key: str | None) -> None:
    """Run one server in this process until killed."""
    if name == "waitress":
        import waitress

        waitress.serve(
            wsgi_app,
            host="127.0.0.1",
            port=port,
            threads=THREADS,
            channel_timeout=TIMEOUT,
            cleanup_interval=1,
            max_request_body_size=LIMIT,
            _quiet=True,
        )
    elif name == "cheroot":
        from cheroot import wsgi

        server = wsgi.Server(("127.0.0.1", port), wsgi_app, numthreads=THREADS, timeout=TIMEOUT)
        server.max_request_body_size = LIMIT
        if cert and key:
            from cheroot.ssl.builtin import BuiltinSSLAdapter

            server.ssl_adapter = BuiltinSSLAdapter(cert, key)
        server.safe_start()
    elif name == "uvicorn":
        import uvicorn

        uvicorn.run(
            asgi_app,
            host="127.0.0.1",
            port=port,
            http="h11",
            timeout_keep_alive=TIMEOUT,
            log_level="error",
            ssl_certfile=cert,
            ssl_keyfile=key,
        )
    elif name == "hypercorn":
        import asyncio

        from hypercorn.asyncio import serve as hypercorn_serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.keep_alive_timeout = TIMEOUT
        config.read_timeout = TIMEOUT
        config.loglevel = "ERROR"
        if cert and key:
            config.certfile, config.keyfile = cert, key
        asyncio.run(hypercorn_serve(asgi_app, config))  # type: ignore[arg-type]
    elif name == "langfuse-poller":
        from langfuse_poller.config import parse_config
        from langfuse_poller.registry import Registry, Router
        from langfuse_poller.store import Store
        from langfuse_poller.webhooks.receiver import WebhookReceiver

        state = Path(tempfile.mkdtemp()) / "state.db"
        webhook = {"listen": f"127.0.0.1:{port}", "path": "/", "secret": SECRET, "timeout": TIMEOUT, "max_body": LIMIT}
        if cert and key:
            webhook.update(tls_cert=cert, tls_key=key)
        config = parse_config({"langfuse": {"public_key": "pk", "secret_key": "sk"}, "webhook": webhook}, "bench")
        WebhookReceiver(config.webhook, Store(state), Router([], Registry())).start()
        threading.Event().wait()
    else:
        raise SystemExit(f"unknown server {name}")


# --- the driver --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, name: str, cert: str | None = None, key: str | None = None) -> None:
        self.name = name
        self.port = free_port()
        args = [sys.executable, __file__, "--serve", name, "--port", str(self.port)]
        if cert and key:
            args += ["--cert", cert, "--key", key]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{name} did not start")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def post(port: int, timeout: float = 15.0, scheme: str = "http") -> tuple[int, float]:
    import httpx

    body = json.dumps({"id": uuid.uuid4().hex}).encode()
    start = time.monotonic()
    try:
        with httpx.Client(verify=False, timeout=timeout) as client:
            response = client.post(f"{scheme}://127.0.0.1:{port}/", content=body, headers=signed(body))
        return response.status_code, time.monotonic() - start
    except httpx.HTTPError:
        return 0, time.monotonic() - start


def slow_clients(port: int, count: int, prefix: bytes, trickle: bytes | None, duration: float) -> dict[str, Any]:
    """Open `count` connections, send `prefix`, then `trickle` every 0.5 s; a valid POST at 0.5 s and 3 s."""
    socks: list[socket.socket] = []
    refused = 0
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            sock.setblocking(False)
            if prefix:
                sock.send(prefix)
            socks.append(sock)
        except OSError:
            refused += 1
    opened = time.monotonic()
    closed_at: dict[int, float] = {}
    results: list[tuple[int, float]] = []
    probes = [threading.Thread(target=lambda d=d: (time.sleep(d), results.append(post(port)))) for d in (0.5, 3.0)]
    for probe in probes:
        probe.start()
    next_trickle = opened + 0.5
    while time.monotonic() - opened < duration and len(closed_at) < len(socks):
        live = [s for s in socks if s.fileno() not in closed_at]
        readable, _, _ = select.select(live, [], [], 0.1)
        for sock in readable:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                closed_at[sock.fileno()] = time.monotonic() - opened
        if trickle and time.monotonic() >= next_trickle:
            next_trickle += 0.5
            for sock in live:
                if sock.fileno() in closed_at:
                    continue
                try:
                    sock.send(trickle)
                except OSError:
                    closed_at[sock.fileno()] = time.monotonic() - opened
    for probe in probes:
        probe.join(20)
    for sock in socks:
        sock.close()
    times = sorted(closed_at.values())
    return {
        "opened": len(socks),
        "refused": refused,
        "closed_by_server": len(times),
        "median_close_s": round(statistics.median(times), 1) if times else None,
        "probe": [f"{status} in {latency:.2f}s" for status, latency in sorted(results, key=lambda r: r[1])],
    }


def huge_body(port: int, chunked: bool, duration: float = 5.0) -> dict[str, Any]:
    """Push a body far beyond the limit; what the server answers, and how much it let the client send."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Content-Length: 1073741824\r\n\r\n"
    sock.sendall(head)
    sock.setblocking(False)
    piece = b"x" * 65536
    chunk = b"10000\r\n" + piece + b"\r\n" if chunked else piece
    sent = 0
    answer = b""
    start = time.monotonic()
    while time.monotonic() - start < duration and sent < (1 << 30):
        readable, writable, _ = select.select([sock], [sock], [], 0.2)
        if readable:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            answer += data
            if not data or b"\r\n\r\n" in answer:
                break
        if writable:
            try:
                sent += sock.send(chunk)
            except OSError:
                break
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace") if answer else "(connection closed, no answer)"
    sock.close()
    return {"answer": status, "client_pushed_mib": round(sent / (1 << 20), 1), "s": round(time.monotonic() - start, 2)}


def throughput(port: int, threads: int = 50, each: int = 20) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal failures
        with httpx.Client(timeout=30) as client:
            for _ in range(each):
                body = json.dumps({"id": uuid.uuid4().hex, "pad": "x" * 1000}).encode()
                start = time.monotonic()
                try:
                    ok = client.post(f"http://127.0.0.1:{port}/", content=body, headers=signed(body)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    latencies.append(time.monotonic() - start)
                    failures += 0 if ok else 1

    start = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(120)
    wall = time.monotonic() - start
    latencies.sort()
    return {
        "req_s": round(len(latencies) / wall),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
        "failed": failures,
    }


def tls(name: str) -> str:
    try:
        import trustme
    except ImportError:
        return "skipped (pip install trustme)"
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        try:
            server = Server(name, str(cert_path), str(key_path))
        except RuntimeError:
            return "no (did not start with a certificate)"
        try:
            status, _ = post(server.port, scheme="https", timeout=5)
        finally:
            server.stop()
    return "yes" if status == 200 else "no (cannot serve HTTPS itself)"


def measure(name: str, slow: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    scenarios: list[tuple[str, Callable[[int], Any]]] = [
        ("idle", lambda port: slow_clients(port, slow, b"", None, 6.0)),
        ("trickle_headers", lambda port: slow_clients(port, slow, b"POST / HTTP/1.1\r\nHost: x\r\n", b"X", 6.0)),
        (
            "trickle_body",
            lambda port: slow_clients(
                port,
                50,
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
                b"x",
                6.0,
            ),
        ),
        ("huge_length", lambda port: huge_body(port, chunked=False)),
        ("huge_chunked", lambda port: huge_body(port, chunked=True)),
        ("throughput", throughput),
    ]
    for scenario, run in scenarios:
        server = Server(name)  # a fresh server each time: one scenario's leftovers must not skew the next
        try:
            before = server.peak_rss_mib()
            outcome = run(server.port)
            if scenario.startswith("huge"):
                outcome["server_peak_rss_mib"] = f"{before:.0f} -> {server.peak_rss_mib():.0f}"
            results[scenario] = outcome
        finally:
            server.stop()
    results["tls"] = tls(name)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--slow", type=int, default=200, help="slow connections in the idle and trickle tests")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.cert, args.key)
        return
    for name in args.servers.split(","):
        print(f"== {name}", flush=True)
        for scenario, outcome in measure(name, args.slow).items():
            print(f"  {scenario:16} {outcome}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
