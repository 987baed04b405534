"""The webhook receiver, over real HTTP on loopback, with a real SQLite state: what Langfuse sends goes in once.

A sender signs exactly as Langfuse's own code does (`t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
"<t>.<body>")>`, the whole `lf-whsec_...` string as the key); nothing here is mocked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import select
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from langfuse_poller.config import Config, parse_config
from langfuse_poller.events import Event
from langfuse_poller.registry import Registry
from langfuse_poller.runtime import Runtime
from langfuse_poller.testing.fake_langfuse import FakeLangfuse
from langfuse_poller.webhooks.payloads import event_from_webhook

from .conftest import Clock, make_config

pytestmark = pytest.mark.timeout(60)

SECRET = "lf-whsec_3f9d2c7a41e84b0f9a6c5d2e1b7f8a90"
OLD_SECRET = "lf-whsec_0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e"
WRONG_SECRET = "lf-whsec_ffffffffffffffffffffffffffffffff"
SECRETS = (SECRET, OLD_SECRET)
MAX_BODY = 4096
SCRIPT = Path(sys.executable).parent / "langfuse-poller"
NOWHERE = "http://127.0.0.1:9"


# --- a sender that signs like Langfuse ---------------------------------------------------------------------


def langfuse_signature(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """What Langfuse's webhook dispatcher puts in x-langfuse-signature (written here from its description,
    not with the code under test)."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode("utf-8"), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def langfuse_headers(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": "Langfuse/1.0",
        "x-langfuse-signature": langfuse_signature(secret, body, timestamp),
    }


def encode(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def prompt_payload(payload_id: str, action: str = "created", name: str = "support-agent") -> dict[str, Any]:
    return {
        "id": payload_id,
        "timestamp": "2026-11-27T07:37:16.522Z",
        "type": "prompt-version",
        "apiVersion": "v1",
        "action": action,
        "user": {"id": "u-1", "email": "ada@example.com"},
        "prompt": {
            "id": "prompt-id-1",
            "name": name,
            "version": 4,
            "projectId": "proj-test",
            "labels": ["production", "latest"],
            "tags": ["support"],
            "type": "chat",
            "commitMessage": "shorter greeting",
            "prompt": [{"role": "system", "content": "You are helpful."}],
            "config": {"temperature": 0.2},
        },
    }


ALERT = {
    "id": "alert-delivery-1",
    "timestamp": "2026-11-27T08:00:00+01:00",
    "type": "monitor-alert",
    "apiVersion": "v1",
    "payload": {
        "monitorId": "mon-1",
        "projectId": "proj-test",
        "permalink": "https://cloud.langfuse.com/project/proj-test/monitors/mon-1",
        "message": {"title": "Error rate above 5%", "body": "12% of traces failed in the last 10 minutes"},
        "severity": "HIGH",
        "value": 0.12,
    },
}
NOTIFICATION = {
    "id": "notification-1",
    "timestamp": "2026-11-27T07:40:00.000Z",
    "type": "project-notification",
    "apiVersion": "v1",
    "event": {
        "eventType": "usage-threshold",
        "severity": "warning",
        "projectId": "proj-test",
        "message": "80% of the monthly units are used",
        "url": "https://cloud.langfuse.com/project/proj-test/settings/billing",
    },
}


# --- a receiver in this process ----------------------------------------------------------------------------


@dataclass
class Calls:
    """What a registered handler received, by event id."""

    ids: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, event: Event) -> None:
        with self.lock:
            self.ids[event.id] += 1


@dataclass
class Receiving:
    runtime: Runtime
    calls: Calls
    tmp_path: Path

    @property
    def url(self) -> str:
        assert self.runtime.receiver is not None
        return self.runtime.receiver.url

    @property
    def base(self) -> str:
        return self.url.removesuffix(self.runtime.config.webhook.path)

    @property
    def address(self) -> tuple[str, int]:
        assert self.runtime.receiver is not None and self.runtime.receiver.address is not None
        return self.runtime.receiver.address

    def post(self, body: bytes, headers: dict[str, Any], client: httpx.Client | None = None) -> httpx.Response:
        if client is not None:
            return client.post(self.url, content=body, headers=headers)
        return httpx.post(self.url, content=body, headers=headers, timeout=10)

    def send(self, payload: Any, secret: str = SECRET) -> httpx.Response:
        body = encode(payload)
        return self.post(body, langfuse_headers(body, secret))

    def stored(self) -> dict[str, tuple[str, str, int]]:
        """Event id -> (type, source, number of deliveries), straight from the SQLite file."""
        with sqlite3.connect(self.runtime.config.state_path) as conn:
            rows = conn.execute(
                "SELECT e.id, e.type, e.source, COUNT(d.id) FROM events e "
                "LEFT JOIN deliveries d ON d.event_seq = e.seq GROUP BY e.seq"
            ).fetchall()
        return {row[0]: (row[1], row[2], row[3]) for row in rows}

    def delivered(self, name: str = "file") -> list[dict[str, Any]]:
        self.runtime.worker.run_until_idle()
        path = self.tmp_path / f"{name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def receiver_config(tmp_path: Path, base_url: str = NOWHERE, **webhook: Any) -> Config:
    settings = {
        "enabled": True,
        "listen": "127.0.0.1:0",
        "secret": SECRET,
        "max_body": MAX_BODY,
        "timeout": "5s",
        **webhook,
    }
    data = {
        "langfuse": {"base_url": base_url, "public_key": "pk-lf-test", "secret_key": "sk-lf-test"},
        "state": {"path": str(tmp_path / "state.db")},
        "webhook": {key: value for key, value in settings.items() if value is not None},
        "notifiers": {"file": {"type": "jsonl", "path": str(tmp_path / "file.jsonl")}},
        "rules": [{"name": "prompts-and-alerts", "events": ["prompt.*", "alert.*"], "notify": ["file"]}],
    }
    return parse_config(data, "test-config")


@contextmanager
def receiving(config: Config, tmp_path: Path, clock: Clock | None = None) -> Iterator[Receiving]:
    handlers = Registry()
    calls = Calls()
    handlers.register(calls.add, ["prompt.*", "alert.*", "webhook.*", "trace.*"], name="count")
    runtime = Runtime.build(config, handlers=handlers, **({"clock": clock} if clock else {}))
    try:
        runtime.start_receiver()
        yield Receiving(runtime, calls, tmp_path)
    finally:
        runtime.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiving]:
    with receiving(receiver_config(tmp_path), tmp_path) as server:
        yield server


# --- accepted ----------------------------------------------------------------------------------------------


def test_a_signed_langfuse_webhook_is_stored_answered_fast_and_delivered(receiver: Receiving) -> None:
    started = time.monotonic()
    response = receiver.send(prompt_payload("delivery-1", "updated"))
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "stored", "id": "prompt.updated:delivery-1", "event": "prompt.updated"}
    assert elapsed < 2.0
    assert receiver.stored() == {"prompt.updated:delivery-1": ("prompt.updated", "webhook", 2)}

    [event] = receiver.delivered()
    assert event["id"] == "prompt.updated:delivery-1" and event["source"] == "webhook"
    assert event["timestamp"] == "2026-11-27T07:37:16.522Z"
    assert event["data"]["name"] == "support-agent" and event["data"]["version"] == 4
    assert receiver.calls.ids == Counter({"prompt.updated:delivery-1": 1})


def test_an_event_nobody_subscribes_to_is_stored_all_the_same(receiver: Receiving) -> None:
    assert receiver.send(NOTIFICATION).status_code == 200
    assert receiver.send({"id": "x-1", "type": "dataset-run-item"}).status_code == 200
    assert receiver.stored() == {
        "project.notification:notification-1": ("project.notification", "webhook", 0),
        "webhook.unknown:x-1": ("webhook.unknown", "webhook", 1),  # the handler takes webhook.*
    }


def test_a_retried_delivery_is_answered_200_and_stored_and_handled_once(receiver: Receiving) -> None:
    payload = prompt_payload("delivery-retried")
    first = receiver.send(payload)
    # Langfuse signs each attempt anew: another timestamp, the same body
    body = encode(payload)
    again = receiver.post(body, langfuse_headers(body, timestamp=int(time.time()) - 30))
    assert first.status_code == 200 and first.json()["status"] == "stored"
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert again.json()["id"] == first.json()["id"] == "prompt.created:delivery-retried"
    assert len(receiver.stored()) == 1
    assert [e["id"] for e in receiver.delivered()] == ["prompt.created:delivery-retried"]
    assert receiver.calls.ids == Counter({"prompt.created:delivery-retried": 1})


def test_timestamps_just_inside_the_tolerance_are_accepted(tmp_path: Path) -> None:
    with receiving(receiver_config(tmp_path, tolerance="60s"), tmp_path) as receiver:
        for index, skew in enumerate((-50, 50)):
            body = encode(prompt_payload(f"skew-{index}"))
            response = receiver.post(body, langfuse_headers(body, timestamp=int(time.time()) + skew))
            assert response.status_code == 200, (skew, response.text)
        assert len(receiver.stored()) == 2


# --- refused -----------------------------------------------------------------------------------------------


def bad_requests() -> list[tuple[str, bytes, dict[str, Any], int]]:
    """(case, body, headers, expected status) of requests that must store nothing."""
    good = encode(prompt_payload("must-not-be-stored"))
    now = int(time.time())
    digest = langfuse_signature(SECRET, good).split("v1=")[1]

    def signed_as(value: str | bytes) -> dict[str, Any]:
        return {**langfuse_headers(good), "x-langfuse-signature": value}

    def typed(content_type: str) -> dict[str, Any]:
        return {**langfuse_headers(good), "content-type": content_type}

    cases: list[tuple[str, bytes, dict[str, Any], int]] = [
        ("wrong secret", good, langfuse_headers(good, WRONG_SECRET), 401),
        ("stale timestamp", good, langfuse_headers(good, timestamp=now - 400), 401),
        ("timestamp from the future", good, langfuse_headers(good, timestamp=now + 400), 401),
        ("tampered body", good.replace(b"support-agent", b"support-agenT"), langfuse_headers(good), 401),
        ("missing header", good, {"content-type": "application/json"}, 401),
        ("garbage header", good, signed_as("garbage"), 401),
        ("no v1", good, signed_as(f"t={now}"), 401),
        ("no t", good, signed_as(f"v1={digest}"), 401),
        ("t not a number", good, signed_as(f"t=1_0,v1={digest}"), 401),
        ("short digest", good, signed_as(f"t={now},v1={digest[:-2]}"), 401),
        ("non-ascii", good, signed_as(f"t={now},v1=é{digest[1:]}".encode("latin-1")), 401),
        ("plain body digest", good, signed_as(plain_signature(good)), 401),
        ("too large", b"{" + b" " * MAX_BODY + b"}", {}, 413),
        ("non-JSON content type", good, typed("text/plain"), 415),
        ("form content type", good, typed("application/x-www-form-urlencoded"), 415),
        ("no content type", good, {"x-langfuse-signature": langfuse_signature(SECRET, good)}, 415),
        ("invalid JSON", b'{"id": "x", ', {}, 400),
        ("JSON array", b'[{"id": "x"}]', {}, 400),
        ("JSON string", b'"hello"', {}, 400),
        ("deeply nested", b"[" * 2000 + b"]" * 2000, {}, 400),
    ]
    # the cases without headers are signed correctly: only their body is wrong
    return [(case, body, headers or langfuse_headers(body), status) for case, body, headers, status in cases]


def plain_signature(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_bad_requests_are_refused_with_the_right_status_and_store_nothing(tmp_path: Path) -> None:
    with receiving(receiver_config(tmp_path, max_body=MAX_BODY), tmp_path) as receiver:
        with httpx.Client(timeout=10) as client:
            for case, body, headers, status in bad_requests():
                response = receiver.post(body, headers, client)
                assert response.status_code == status, (case, response.text)
                assert "error" in response.json(), case
                assert SECRET not in response.text and OLD_SECRET not in response.text
            # a body too large without a declared length (chunked) is cut off at the limit
            chunked = client.post(receiver.url, content=iter([b"{" + b" " * 1024] * 8), headers=langfuse_headers(b""))
            assert chunked.status_code == 413, chunked.text
        assert receiver.stored() == {}
        assert receiver.delivered() == [] and receiver.calls.ids == Counter()


def test_signature_reasons_are_told_and_no_secret_is_logged(receiver: Receiving, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    body = encode(prompt_payload("reasons"))
    stale = receiver.post(body, langfuse_headers(body, timestamp=int(time.time()) - 3600))
    wrong = receiver.post(body, langfuse_headers(body, WRONG_SECRET))
    missing = receiver.post(body, {"content-type": "application/json"})
    assert stale.json()["error"] == "signature timestamp outside the tolerance"
    assert wrong.json()["error"] == "signature does not match the body"
    assert missing.json()["error"] == "missing x-langfuse-signature header"
    assert receiver.send(prompt_payload("good")).status_code == 200
    assert "refused: HTTP 401" in caplog.text
    for secret in SECRETS:
        assert secret not in caplog.text
    # nor the digests: one could be replayed within the tolerance
    assert langfuse_signature(SECRET, body).split("v1=")[1] not in caplog.text


def test_other_paths_and_methods_and_the_health_check(receiver: Receiving) -> None:
    with httpx.Client(timeout=10) as client:
        health = client.get(f"{receiver.base}/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert client.head(f"{receiver.base}/healthz").status_code == 200
        assert client.post(f"{receiver.base}/healthz").status_code == 405
        wrong_method = client.get(receiver.url)
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        body = encode(prompt_payload("elsewhere"))
        assert (
            client.post(f"{receiver.base}/api/webhooks/other", content=body, headers=langfuse_headers(body)).status_code
            == 404
        )
        assert client.get(f"{receiver.base}/").status_code == 404
    assert receiver.stored() == {}


# --- rotation and the plain scheme -------------------------------------------------------------------------


def test_during_a_rotation_both_secrets_are_accepted(tmp_path: Path) -> None:
    with receiving(receiver_config(tmp_path, secret=[SECRET, OLD_SECRET]), tmp_path) as receiver:
        assert receiver.send(prompt_payload("new-secret"), SECRET).status_code == 200
        assert receiver.send(prompt_payload("old-secret"), OLD_SECRET).status_code == 200
        assert receiver.send(prompt_payload("wrong-secret"), WRONG_SECRET).status_code == 401
        body = encode(prompt_payload("plain"))
        plain = receiver.post(body, {"content-type": "application/json", "x-langfuse-signature": plain_signature(body)})
        assert plain.status_code == 401
        assert "without a timestamp" in plain.json()["error"]
        assert set(receiver.stored()) == {"prompt.created:new-secret", "prompt.created:old-secret"}


def test_the_plain_body_hmac_is_accepted_only_when_configured(tmp_path: Path) -> None:
    config = receiver_config(tmp_path, secret=[SECRET, OLD_SECRET], accept_unsigned_timestamp=True)
    with receiving(config, tmp_path) as receiver:
        for index, secret in enumerate((SECRET, OLD_SECRET, WRONG_SECRET)):
            body = encode(prompt_payload(f"plain-{index}"))
            headers = {"content-type": "application/json", "x-langfuse-signature": plain_signature(body, secret)}
            assert receiver.post(body, headers).status_code == (401 if secret == WRONG_SECRET else 200)
        # the timestamped form is still checked in full
        assert receiver.send(prompt_payload("timestamped")).status_code == 200
        body = encode(prompt_payload("stale"))
        assert receiver.post(body, langfuse_headers(body, timestamp=int(time.time()) - 3600)).status_code == 401
        assert set(receiver.stored()) == {
            "prompt.created:plain-0",
            "prompt.created:plain-1",
            "prompt.created:timestamped",
        }


# --- concurrency and hostile clients -----------------------------------------------------------------------


def test_fifty_concurrent_senders_each_valid_event_once_each_bad_one_refused(tmp_path: Path) -> None:
    bad = bad_requests()
    outcomes: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def sender(index: int, receiver: Receiving) -> None:
        payload = prompt_payload(f"concurrent-{index}", name=f"prompt-{index}")
        body = encode(payload)
        case, bad_body, bad_headers, expected = bad[index % len(bad)]
        with httpx.Client(timeout=20) as client:
            # the delivery, a bad request, and Langfuse's retry of the same delivery
            for label, request_body, headers, status in (
                ("valid", body, langfuse_headers(body), 200),
                (case, bad_body, bad_headers, expected),
                ("retry", body, langfuse_headers(body), 200),
            ):
                response = receiver.post(request_body, headers, client)
                with lock:
                    outcomes.append((label, response.status_code, status))

    with receiving(receiver_config(tmp_path), tmp_path) as receiver:
        threads = [threading.Thread(target=sender, args=(index, receiver)) for index in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(40)
        assert len(outcomes) == 150
        wrong = [outcome for outcome in outcomes if outcome[1] != outcome[2]]
        assert wrong == []
        expected = {f"prompt.created:concurrent-{index}" for index in range(50)}
        assert set(receiver.stored()) == expected
        delivered = Counter(event["id"] for event in receiver.delivered())
        assert delivered == Counter(dict.fromkeys(expected, 1))
        assert receiver.calls.ids == Counter(dict.fromkeys(expected, 1))


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closes `sock` within `seconds` (reading what it says first)."""
    deadline = time.monotonic() + seconds
    received = b""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return True, received
            if not chunk:
                return True, received
            received += chunk
    return False, received


def test_slow_clients_do_not_block_others_and_are_cut_off_after_the_timeout(tmp_path: Path) -> None:
    with receiving(receiver_config(tmp_path, timeout="1s"), tmp_path) as receiver:
        address = receiver.address
        silent = socket.create_connection(address, timeout=5)
        trickling_headers = socket.create_connection(address, timeout=5)
        trickling_headers.sendall(b"POST /api/webhooks/langfuse HTTP/1.1\r\nHost: x\r\n")
        trickling_body = socket.create_connection(address, timeout=5)
        trickling_body.sendall(
            b"POST /api/webhooks/langfuse HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        opened = time.monotonic()

        # a valid request meanwhile is answered at once
        response = receiver.send(prompt_payload("while-slow-clients-wait"))
        assert response.status_code == 200
        assert time.monotonic() - opened < 0.9  # well before the 1 s timeout frees anything

        # the tricklers go on sending a byte every 0.1 s, which must not keep them alive
        def trickle() -> None:
            for _ in range(30):
                time.sleep(0.1)
                for sock, byte in ((trickling_headers, b"X"), (trickling_body, b" ")):
                    with suppress(OSError):
                        sock.send(byte)

        threading.Thread(target=trickle, daemon=True).start()
        results = {
            name: _closed_within(sock, 3.0)
            for name, sock in (("silent", silent), ("headers", trickling_headers), ("body", trickling_body))
        }
        elapsed = time.monotonic() - opened
        for sock in (silent, trickling_headers, trickling_body):
            sock.close()
        assert all(closed for closed, _ in results.values()), results
        assert 0.9 < elapsed < 3.5
        assert results["body"][1].startswith(b"HTTP/1.1 408"), results["body"]
        assert set(receiver.stored()) == {"prompt.created:while-slow-clients-wait"}


def test_a_declared_huge_body_is_refused_before_it_is_sent(receiver: Receiving) -> None:
    sock = socket.create_connection(receiver.address, timeout=5)
    try:
        sock.sendall(
            b"POST /api/webhooks/langfuse HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n"
        )
        closed, answer = _closed_within(sock, 3.0)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert closed
    assert receiver.stored() == {}


def test_tls_from_a_certificate_and_key(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make a test certificate: {exc}")
    config = receiver_config(tmp_path, tls_cert=str(cert), tls_key=str(key))
    with receiving(config, tmp_path) as receiver:
        assert receiver.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        body = encode(prompt_payload("over-tls"))
        with httpx.Client(verify=context, timeout=10) as client:
            assert client.post(receiver.url, content=body, headers=langfuse_headers(body)).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.post(receiver.url.replace("https://", "http://"), content=body, timeout=3)
        assert set(receiver.stored()) == {"prompt.created:over-tls"}


def test_a_bad_certificate_and_a_port_in_use_are_reported_at_start(tmp_path: Path) -> None:
    from langfuse_poller.errors import ConfigError, LangfusePollerError

    not_a_cert = tmp_path / "cert.pem"
    not_a_cert.write_text("not a certificate", encoding="utf-8")
    config = receiver_config(tmp_path, tls_cert=str(not_a_cert), tls_key=str(not_a_cert))
    runtime = Runtime.build(config, handlers=Registry())
    try:
        with pytest.raises(ConfigError, match=r"webhook\.tls_cert"):
            runtime.start_receiver()
    finally:
        runtime.close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        runtime = Runtime.build(receiver_config(tmp_path, listen=f"127.0.0.1:{port}"), handlers=Registry())
        try:
            with pytest.raises(LangfusePollerError, match=f"cannot listen on 127.0.0.1:{port}"):
                runtime.start_receiver()
        finally:
            runtime.close()


# --- mapping -----------------------------------------------------------------------------------------------

RECEIVED_AT = datetime(2026, 11, 27, 9, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("action", ["created", "updated", "deleted"])
def test_prompt_versions_map_to_prompt_events(action: str) -> None:
    event = event_from_webhook(prompt_payload("d-1", action), received_at=RECEIVED_AT, base_url="https://lf.example")
    assert event.type == f"prompt.{action}" and event.id == f"prompt.{action}:d-1" and event.source == "webhook"
    envelope = event.envelope()
    assert envelope["timestamp"] == "2026-11-27T07:37:16.522Z"
    data = envelope["data"]
    assert data["projectId"] == "proj-test" and data["promptId"] == "prompt-id-1"
    assert data["name"] == "support-agent" and data["version"] == 4
    assert data["labels"] == ["production", "latest"] and data["tags"] == ["support"]
    assert data["commitMessage"] == "shorter greeting" and data["action"] == action
    assert data["url"] == "https://lf.example/project/proj-test/prompts/support-agent?version=4"
    assert data["payload"] == prompt_payload("d-1", action)


@pytest.mark.parametrize(
    ("severity", "event_type"),
    [
        ("HIGH", "alert.high"),
        ("Critical", "alert.critical"),
        ("low", "alert.low"),
        (None, "alert.unknown"),
        ("not a/severity", "alert.unknown"),
    ],
)
def test_monitor_alerts_map_to_alert_events_by_severity(severity: str | None, event_type: str) -> None:
    payload = json.loads(json.dumps(ALERT))
    payload["payload"]["severity"] = severity
    event = event_from_webhook(payload, received_at=RECEIVED_AT)
    assert event.type == event_type and event.id == f"{event_type}:alert-delivery-1"
    # +01:00 is turned into UTC
    assert event.envelope()["timestamp"] == "2026-11-27T07:00:00.000Z"
    assert event.data["title"] == "Error rate above 5%"
    assert event.data["body"] == "12% of traces failed in the last 10 minutes"
    assert event.data["url"] == "https://cloud.langfuse.com/project/proj-test/monitors/mon-1"
    assert event.data["projectId"] == "proj-test" and event.data["monitorId"] == "mon-1"
    assert event.data["severity"] == severity and event.data["payload"] == payload


def test_project_notifications_map_to_project_notification() -> None:
    event = event_from_webhook(NOTIFICATION, received_at=RECEIVED_AT)
    assert event.type == "project.notification" and event.id == "project.notification:notification-1"
    assert event.data["eventType"] == "usage-threshold" and event.data["severity"] == "warning"
    assert event.data["message"] == "80% of the monthly units are used"
    assert event.data["url"] == "https://cloud.langfuse.com/project/proj-test/settings/billing"
    assert event.data["projectId"] == "proj-test"


def test_an_envelope_passes_through_with_its_own_id() -> None:
    envelope = {
        "id": "trace.updated:obs-1:1764230236522",
        "event": "trace.updated",
        "timestamp": "2026-11-27T07:37:16.522Z",
        "source": "poll",
        "data": {"projectId": "proj-test", "traceId": "t-1", "level": "ERROR"},
    }
    event = event_from_webhook(envelope, received_at=RECEIVED_AT)
    assert event.envelope() == {**envelope, "source": "webhook"}
    without_id = {key: value for key, value in envelope.items() if key != "id"}
    first = event_from_webhook(without_id, received_at=RECEIVED_AT)
    again = event_from_webhook(dict(reversed(list(without_id.items()))), received_at=datetime.now(UTC))
    assert first.id == again.id and first.id.startswith("trace.updated:sha256-")
    assert first.data == envelope["data"]


@pytest.mark.parametrize(
    "payload",
    [
        {"id": "u-1", "type": "dataset-run", "apiVersion": "v1", "run": {"id": "r"}},
        {"id": "u-1", "type": "prompt-version", "action": "archived", "prompt": {}},
        {"id": "u-1", "hello": "world"},
        {"id": "u-1", "event": "not a type!", "timestamp": "2026-11-27T07:37:16.522Z", "data": {}},
    ],
    ids=["unknown-type", "unknown-action", "no-type", "bad-envelope"],
)
def test_anything_else_is_kept_as_webhook_unknown(payload: dict[str, Any]) -> None:
    event = event_from_webhook(payload, received_at=RECEIVED_AT)
    assert event.type == "webhook.unknown" and event.id == "webhook.unknown:u-1"
    assert event.data["payload"] == payload
    assert event.timestamp == (
        RECEIVED_AT if "timestamp" not in payload else datetime(2026, 11, 27, 7, 37, 16, 522000, tzinfo=UTC)
    )


def test_each_payload_type_through_http_to_its_event(receiver: Receiving) -> None:
    for payload in (prompt_payload("p-1", "deleted"), ALERT, NOTIFICATION, {"id": "z-1", "type": "new-thing"}):
        assert receiver.send(payload).status_code == 200
    assert receiver.stored() == {
        "prompt.deleted:p-1": ("prompt.deleted", "webhook", 2),
        "alert.high:alert-delivery-1": ("alert.high", "webhook", 2),
        "project.notification:notification-1": ("project.notification", "webhook", 0),
        "webhook.unknown:z-1": ("webhook.unknown", "webhook", 1),
    }


# --- one registry, whatever the source ---------------------------------------------------------------------


def test_the_same_rules_route_polled_and_received_events(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    rules = [
        {"name": "errors", "events": ["trace.updated"], "when": 'data.level == "ERROR"', "notify": ["errors"]},
        {"name": "prompts", "events": ["prompt.*"], "notify": ["prompts"]},
    ]
    config = make_config(
        fake,
        tmp_path,
        webhook={"enabled": True, "listen": "127.0.0.1:0", "secret": SECRET},
        notifiers={
            "errors": {"type": "jsonl", "path": str(tmp_path / "errors.jsonl")},
            "prompts": {"type": "jsonl", "path": str(tmp_path / "prompts.jsonl")},
        },
        rules=rules,
    )
    with receiving(config, tmp_path, clock) as receiver:
        receiver.runtime.poller.start_streams()
        clock.advance(1)
        [root] = fake.add_trace(level="ERROR", start_time=datetime.fromtimestamp(clock.now - 0.5, UTC))
        clock.advance(1)
        assert not receiver.runtime.poller.poll_once().errors
        envelope = {
            "id": "trace.updated:from-elsewhere:1",
            "event": "trace.updated",
            "timestamp": "2026-11-27T07:37:16.522Z",
            "data": {"projectId": "proj-test", "traceId": "t-9", "level": "ERROR"},
        }
        warning = {**envelope, "id": "trace.updated:from-elsewhere:2", "data": {"level": "WARNING"}}
        for payload in (envelope, warning, prompt_payload("rule-1")):
            assert receiver.send(payload).status_code == 200
        errors = receiver.delivered("errors")
        prompts = receiver.delivered("prompts")
    by_source = {event["source"]: event["id"] for event in errors}
    assert by_source == {
        "poll": f"trace.updated:{root['id']}:{by_source['poll'].rsplit(':', 1)[1]}",
        "webhook": "trace.updated:from-elsewhere:1",
    }
    assert [event["id"] for event in prompts] == ["prompt.created:rule-1"]
    # the handler registered for trace.* got both, and the WARNING one the rule's condition kept from `errors`
    assert set(receiver.calls.ids) == {
        f"trace.created:{root['traceId']}",
        by_source["poll"],
        "trace.updated:from-elsewhere:1",
        "trace.updated:from-elsewhere:2",
        "prompt.created:rule-1",
    }


# --- the command line --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGFUSE_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg-config"), XDG_STATE_HOME=str(tmp_path / "xdg-state"))
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def assert_clean(output: str) -> None:
    assert "Traceback (most recent call last)" not in output, output
    for secret in SECRETS:
        assert secret not in output, f"secret printed:\n{output}"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def base_config(tmp_path: Path, langfuse_url: str = NOWHERE) -> str:
    return (
        f'[langfuse]\nbase_url = "{langfuse_url}"\npublic_key = "pk-lf-test"\nsecret_key = "sk-lf-test"\n\n'
        f'[poll]\nstart = "-1h"\n\n[state]\npath = "{tmp_path / "state.db"}"\n\n'
        f'[notifiers.file]\ntype = "jsonl"\npath = "{tmp_path / "events.jsonl"}"\n\n'
        '[[rules]]\nname = "all"\nevents = ["prompt.*", "trace.*"]\nnotify = ["file"]\n\n'
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def wait_for(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def running(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [str(SCRIPT), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"did not stop within 20 s after SIGTERM\n{out}\n{err}")
    assert_clean(out + err)
    return proc.returncode, err


def test_serve_webhooks_receives_delivers_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    secret_file = write(tmp_path / "webhook-secret", f"{SECRET}\n{OLD_SECRET}\n")
    config = write(
        tmp_path / "config.toml",
        base_config(tmp_path) + f'[webhook]\nlisten = "127.0.0.1:{port}"\nsecret_file = "{secret_file}"\n',
    )
    base = f"http://127.0.0.1:{port}"
    env = cli_env(tmp_path)
    with running(["serve-webhooks", "--config", str(config)], env) as proc:
        assert wait_for(lambda: healthy(base) or proc.poll() is not None), "serve-webhooks did not come up"
        assert proc.poll() is None, proc.communicate()
        url = f"{base}/api/webhooks/langfuse"
        for index, secret in enumerate((SECRET, OLD_SECRET, WRONG_SECRET)):
            body = encode(prompt_payload(f"cli-{index}"))
            response = httpx.post(url, content=body, headers=langfuse_headers(body, secret), timeout=10)
            assert response.status_code == (401 if secret == WRONG_SECRET else 200), response.text
        events = tmp_path / "events.jsonl"
        assert wait_for(lambda: len(read_jsonl(events)) == 2), read_jsonl(events)

        # the state's lock: a second process on the same state refuses to start
        second = subprocess.run(
            [str(SCRIPT), "serve-webhooks", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1 and "another langfuse-poller" in second.stderr, second.stderr
        code, stderr = stop(proc)
    assert code == 0, stderr
    assert f"receiving Langfuse webhooks on {url}" in stderr
    assert "refused: HTTP 401" in stderr and "stopped" in stderr
    assert [event["id"] for event in read_jsonl(events)] == ["prompt.created:cli-0", "prompt.created:cli-1"]
    assert not healthy(base)


def test_run_with_webhooks_enabled_polls_and_receives_in_one_process(tmp_path: Path) -> None:
    port = free_port()
    with FakeLangfuse() as langfuse:
        [root, *_] = langfuse.add_trace(start_time=datetime.fromtimestamp(time.time() - 30, UTC))
        config = write(
            tmp_path / "config.toml",
            base_config(tmp_path, langfuse.url) + f'[webhook]\nenabled = true\nlisten = "127.0.0.1:{port}"\n',
        )
        base = f"http://127.0.0.1:{port}"
        with running(["run", "--config", str(config)], cli_env(tmp_path, LANGFUSE_WEBHOOK_SECRET=SECRET)) as proc:
            assert wait_for(lambda: healthy(base) or proc.poll() is not None), "run did not serve webhooks"
            assert proc.poll() is None, proc.communicate()
            body = encode(prompt_payload("from-run"))
            response = httpx.post(f"{base}/api/webhooks/langfuse", content=body, headers=langfuse_headers(body))
            assert response.status_code == 200, response.text
            events = tmp_path / "events.jsonl"
            expected = {f"trace.created:{root['traceId']}", "prompt.created:from-run"}
            assert wait_for(lambda: expected <= {event["id"] for event in read_jsonl(events)}), read_jsonl(events)
            code, stderr = stop(proc)
    assert code == 0, stderr
    sources = {event["id"]: event["source"] for event in read_jsonl(events)}
    assert sources[f"trace.created:{root['traceId']}"] == "poll" and sources["prompt.created:from-run"] == "webhook"


def test_serve_webhooks_has_help() -> None:
    result = subprocess.run([str(SCRIPT), "serve-webhooks", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("usage: langfuse-poller serve-webhooks")
    assert "--config" in result.stdout
    top = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert "serve-webhooks" in top.stdout


BAD_WEBHOOK_CONFIGS = {
    "enabled-without-secret": ("enabled = true\n", "webhook.secret", "found None", "a webhook secret (lf-whsec_...)"),
    "listen-without-port": (
        f'enabled = true\nsecret = "{SECRET}"\nlisten = "127.0.0.1"\n',
        "webhook.listen",
        "found '127.0.0.1'",
        "an address and port",
    ),
    "listen-port-too-big": (
        f'enabled = true\nsecret = "{SECRET}"\nlisten = "localhost:99999"\n',
        "webhook.listen",
        "found 'localhost:99999'",
        "an address and port",
    ),
    "listen-hostname": (
        f'enabled = true\nsecret = "{SECRET}"\nlisten = "example.com:443"\n',
        "webhook.listen",
        "found 'example.com:443'",
        "an address and port",
    ),
    "bad-tolerance": (
        f'enabled = true\nsecret = "{SECRET}"\ntolerance = "five minutes"\n',
        "webhook.tolerance",
        "found 'five minutes'",
        'a duration such as "250ms"',
    ),
    "zero-tolerance": (
        f'enabled = true\nsecret = "{SECRET}"\ntolerance = 0\n',
        "webhook.tolerance",
        "found 0",
        "greater than zero",
    ),
    "bad-max-body": (
        f'enabled = true\nsecret = "{SECRET}"\nmax_body = "lots"\n',
        "webhook.max_body",
        "found 'lots'",
        "a size between 1 KiB and 1 GiB",
    ),
    "secret-list-with-a-number": (
        f'enabled = true\nsecret = ["{SECRET}", 3]\n',
        "webhook.secret",
        "found '<hidden>'",
        "a list of non-empty strings",
    ),
    "misspelt-secret": (
        f'enabled = true\nsecert = "{SECRET}"\n',
        "webhook.secert",
        "found 'secert'",
        "a known key of [webhook]",
    ),
    "cert-without-key": (
        f'enabled = true\nsecret = "{SECRET}"\ntls_cert = "{__file__}"\n',
        "webhook.tls_key",
        "found None",
        "both tls_cert and tls_key",
    ),
}


def test_webhook_config_errors_exit_2_and_name_the_key(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    started = []
    for case, (section, *_) in BAD_WEBHOOK_CONFIGS.items():
        path = write(tmp_path / f"{case}.toml", base_config(tmp_path) + "[webhook]\n" + section)
        for command in ("run", "serve-webhooks"):
            proc = subprocess.Popen(
                [sys.executable, "-m", "langfuse_poller", command, "--config", str(path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            started.append((case, command, path, proc))
    # serve-webhooks needs a secret even when `enabled` is false (or the section is missing)
    no_section = write(tmp_path / "no-section.toml", base_config(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "langfuse_poller", "serve-webhooks", "--config", str(no_section)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    started.append(("enabled-without-secret", "serve-webhooks", no_section, proc))
    for case, command, path, proc in started:
        out, err = proc.communicate(timeout=30)
        _, key, found, expected = BAD_WEBHOOK_CONFIGS[case]
        assert proc.returncode == 2, (case, command, out, err)
        assert err.startswith(f"config error: {path}: {key}: expected "), (case, command, err)
        assert found in err and expected in err, (case, command, err)
        assert_clean(out + err)


def test_the_example_config_describes_the_webhook_section() -> None:
    from datetime import timedelta

    from langfuse_poller.config import load_config

    webhook = load_config(str(Path(__file__).resolve().parent.parent / "config.example.toml")).webhook
    assert webhook.enabled is False and (webhook.host, webhook.port) == ("127.0.0.1", 8787)
    assert webhook.path == "/api/webhooks/langfuse" and webhook.tolerance == timedelta(minutes=5)
    assert webhook.max_body == 1 << 20 and webhook.timeout == timedelta(seconds=10)
    assert webhook.accept_unsigned_timestamp is False and webhook.tls_cert is None
    assert [secret.reveal() for secret in webhook.secrets] == ["lf-whsec_change-me"]
    assert "change-me" not in repr(webhook)


def test_webhook_secrets_from_a_list_a_file_or_the_environment(tmp_path: Path, monkeypatch: Any) -> None:
    from langfuse_poller.errors import ConfigError

    def secrets(**webhook: Any) -> list[str]:
        config = parse_config({"langfuse": {"public_key": "pk", "secret_key": "sk"}, "webhook": webhook}, "t")
        return [secret.reveal() for secret in config.webhook.secrets]

    monkeypatch.delenv("LANGFUSE_WEBHOOK_SECRET", raising=False)
    assert secrets() == []
    assert secrets(secret=SECRET) == [SECRET]
    assert secrets(secret=[SECRET, OLD_SECRET]) == [SECRET, OLD_SECRET]
    path = write(tmp_path / "secrets", f"{SECRET}\n\n{OLD_SECRET}\n")
    assert secrets(secret_file=str(path)) == [SECRET, OLD_SECRET]
    monkeypatch.setenv("LANGFUSE_WEBHOOK_SECRET", f"{SECRET}, {OLD_SECRET}")
    assert secrets(enabled=True) == [SECRET, OLD_SECRET]
    assert secrets(secret=SECRET) == [SECRET]  # the key in the config wins over the environment
    with pytest.raises(ConfigError, match=r"webhook\.secret_file") as both:
        secrets(secret=[SECRET], secret_file=str(path))
    assert SECRET not in str(both.value)
