"""Loopback stand-ins for Slack (incoming webhooks and the Web API) and PagerDuty (Events API v2).

Each is a stdlib ThreadingHTTPServer on 127.0.0.1:0, started and stopped as a context manager. It records every
request (path, headers lower-cased, parsed body, and the status it answered), answers as the real service does
(status codes, bodies and `Retry-After` as documented by Slack and PagerDuty), checks what the real service
checks (minimally: Block Kit limits, the fields of an Events API v2 event), and can be told to fail the next
requests with `fail_next(status, count=1, retry_after=None, error=None)`.
"""

from __future__ import annotations

import contextlib
import json
import socketserver
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs

# what a real incoming webhook answers, by status, when no error text is given
SLACK_WEBHOOK_ERRORS = {
    400: "invalid_payload",
    403: "invalid_token",
    404: "channel_not_found",
    410: "channel_is_archived",
    429: "rate_limited",
    500: "rollup_error",
    503: "service_unavailable",
}
# Block Kit limits that Slack enforces (https://api.slack.com/reference/block-kit/blocks)
MAX_BLOCKS = 50
MAX_HEADER_CHARS = 150
MAX_SECTION_FIELDS = 10
MAX_FIELD_CHARS = 2000
MAX_SECTION_TEXT_CHARS = 3000
MAX_ACTION_ELEMENTS = 25
MAX_BUTTON_TEXT_CHARS = 75
MAX_BUTTON_URL_CHARS = 3000
MAX_CONTEXT_ELEMENTS = 10
TEXT_TYPES = ("plain_text", "mrkdwn")

PAGERDUTY_SEVERITIES = ("critical", "error", "warning", "info")
PAGERDUTY_ACTIONS = ("trigger", "acknowledge", "resolve")


@dataclass(frozen=True)
class Recorded:
    """One request as the stand-in saw it, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    body: Any  # the parsed JSON (or form) body; None when it could not be parsed
    status: int


@dataclass
class Failure:
    """A scripted answer for the next request."""

    status: int
    retry_after: float | None
    error: str | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:  # skip HTTPServer's getfqdn(), slow on some resolvers
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])


class Answer:
    def __init__(self, status: int, body: Any, *, retry_after: float | None = None, text: bool = False) -> None:
        self.status = status
        self.payload = (body if text else json.dumps(body)).encode()
        self.content_type = "text/plain; charset=utf-8" if text else "application/json; charset=utf-8"
        self.retry_after = retry_after


class LoopbackService:
    """The common part: the server, the record of requests and the script of failures."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._failures: list[Failure] = []
        self._lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                body = _parse_body(headers.get("content-type", ""), raw)
                with service._lock:
                    failure = service._failures.pop(0) if service._failures else None
                answer = service.scripted(self.path, failure) if failure else service.answer(self.path, headers, body)
                with service._lock:
                    service.requests.append(Recorded("POST", self.path, headers, raw, body, answer.status))
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.payload)))
                if answer.retry_after is not None:
                    self.send_header("Retry-After", f"{answer.retry_after:g}")
                self.end_headers()
                self.wfile.write(answer.payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread: threading.Thread | None = None

    # lifecycle

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT, without a trailing slash."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # scripting and inspection

    def fail_next(
        self, status: int, count: int = 1, retry_after: float | None = None, error: str | None = None
    ) -> None:
        """Answer the next `count` requests with `status` (and `Retry-After`, and this error text) instead."""
        with self._lock:
            self._failures.extend(Failure(status, retry_after, error) for _ in range(count))

    def received(self, path: str | None = None) -> list[Recorded]:
        """What came in so far (to `path` only, if given)."""
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Recorded]:
        """Wait until at least `count` requests came in (bounded); what came in."""
        deadline = time.monotonic() + timeout
        while len(self.received()) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.received()

    # what subclasses decide

    def answer(self, path: str, headers: dict[str, str], body: Any) -> Answer:
        raise NotImplementedError

    def scripted(self, path: str, failure: Failure) -> Answer:
        raise NotImplementedError


def _parse_body(content_type: str, raw: bytes) -> Any:
    """JSON, or a form body (the Web API accepts both; its `blocks` parameter is JSON text within the form)."""
    if not raw:
        return None
    if "application/x-www-form-urlencoded" in content_type:
        form: dict[str, Any] = {k: v[-1] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
        if isinstance(form.get("blocks"), str):
            with contextlib.suppress(ValueError):
                form["blocks"] = json.loads(form["blocks"])
        return form
    try:
        return json.loads(raw)
    except ValueError:
        return None


# --- Slack -------------------------------------------------------------------------------------------------


def block_kit_error(blocks: Any) -> str | None:
    """Why Slack would refuse these blocks (a short reason), or None when they pass the checks made here."""
    if not isinstance(blocks, list):
        return "blocks must be an array"
    if len(blocks) > MAX_BLOCKS:
        return f"{len(blocks)} blocks, more than {MAX_BLOCKS}"
    for index, block in enumerate(blocks):
        where = f"blocks[{index}]"
        if not isinstance(block, dict):
            return f"{where} is not an object"
        kind = block.get("type")
        text: Any = block.get("text")
        if kind == "header":
            if not _is_text(text, ("plain_text",)) or not text["text"]:
                return f"{where}.text must be a non-empty plain_text object"
            if len(text["text"]) > MAX_HEADER_CHARS:
                return f"{where}.text is longer than {MAX_HEADER_CHARS} characters"
        elif kind == "section":
            fields = block.get("fields")
            if text is None and fields is None:
                return f"{where} needs text or fields"
            if text is not None and (not _is_text(text) or len(text["text"]) > MAX_SECTION_TEXT_CHARS):
                return f"{where}.text must be a text object of at most {MAX_SECTION_TEXT_CHARS} characters"
            if fields is not None:
                if not isinstance(fields, list) or not fields or len(fields) > MAX_SECTION_FIELDS:
                    return f"{where}.fields must hold 1 to {MAX_SECTION_FIELDS} text objects"
                for field in fields:
                    if not _is_text(field) or not field["text"] or len(field["text"]) > MAX_FIELD_CHARS:
                        return f"{where}.fields: a non-empty text object of at most {MAX_FIELD_CHARS} characters"
        elif kind == "actions":
            elements = block.get("elements")
            if not isinstance(elements, list) or not elements or len(elements) > MAX_ACTION_ELEMENTS:
                return f"{where}.elements must hold 1 to {MAX_ACTION_ELEMENTS} elements"
            for element in elements:
                if not isinstance(element, dict) or element.get("type") != "button":
                    continue
                label: Any = element.get("text")
                url = element.get("url")
                if not _is_text(label, ("plain_text",)) or len(label["text"]) > MAX_BUTTON_TEXT_CHARS:
                    return f"{where}: a button's text must be plain_text of at most {MAX_BUTTON_TEXT_CHARS} characters"
                if url is not None and (not isinstance(url, str) or len(url) > MAX_BUTTON_URL_CHARS):
                    return f"{where}: a button's url must be at most {MAX_BUTTON_URL_CHARS} characters"
        elif kind == "context":
            elements = block.get("elements")
            if not isinstance(elements, list) or not elements or len(elements) > MAX_CONTEXT_ELEMENTS:
                return f"{where}.elements must hold 1 to {MAX_CONTEXT_ELEMENTS} elements"
        elif kind not in ("divider", "image", "rich_text", "input", "file", "video"):
            return f"{where}: unknown block type {kind!r}"
    return None


def _is_text(value: Any, types: Iterable[str] = TEXT_TYPES) -> bool:
    return isinstance(value, dict) and value.get("type") in tuple(types) and isinstance(value.get("text"), str)


class FakeSlack(LoopbackService):
    """Slack: an incoming webhook at `webhook_url` and `chat.postMessage` under `api_url`.

    The webhook answers 200 "ok", or an HTTP error with Slack's error text ("invalid_blocks", "no_text", ...).
    The Web API answers HTTP 200 with {"ok": true, "channel", "ts"} or {"ok": false, "error"}: "not_authed"
    without a token, "invalid_auth" with another one than `token`, "channel_not_found" for a channel not in
    `channels`, "invalid_blocks"; a scripted 429 comes with {"ok": false, "error": "ratelimited"}.
    """

    WEBHOOK_PATH = "/services/T000/B000/XXXXhookSECRET0123456789"
    API_PATH = "/api/"

    def __init__(self, *, token: str = "xoxb-0000-fake-bot-token", channels: Iterable[str] = ("#alerts",)) -> None:
        super().__init__()
        self.token = token
        self.channels = set(channels)
        self._ts = 0
        self.refusals: list[str] = []  # why invalid blocks were refused, for a test that wants to know

    @property
    def webhook_url(self) -> str:
        return self.url + self.WEBHOOK_PATH

    @property
    def api_url(self) -> str:
        return self.url + self.API_PATH

    def webhook_posts(self) -> list[Recorded]:
        return self.received(self.WEBHOOK_PATH)

    def api_posts(self) -> list[Recorded]:
        return self.received(self.API_PATH + "chat.postMessage")

    def answer(self, path: str, headers: dict[str, str], body: Any) -> Answer:
        if path == self.WEBHOOK_PATH:
            return self._webhook(body)
        if path == self.API_PATH + "chat.postMessage":
            return self._post_message(headers, body)
        if path.startswith(self.API_PATH):
            return Answer(200, {"ok": False, "error": "unknown_method"})
        # a webhook URL that does not exist (a revoked one, a typo)
        return Answer(404, "no_service", text=True)

    def scripted(self, path: str, failure: Failure) -> Answer:
        if path.startswith(self.API_PATH):
            error = failure.error or ("ratelimited" if failure.status == 429 else "internal_error")
            return Answer(failure.status, {"ok": False, "error": error}, retry_after=failure.retry_after)
        error = failure.error or SLACK_WEBHOOK_ERRORS.get(failure.status, "error")
        return Answer(failure.status, error, retry_after=failure.retry_after, text=True)

    def _webhook(self, body: Any) -> Answer:
        if not isinstance(body, dict):
            return Answer(400, "invalid_payload", text=True)
        if not body.get("text") and not body.get("blocks"):
            return Answer(400, "no_text", text=True)
        if "blocks" in body and (why := block_kit_error(body["blocks"])):
            self.refusals.append(why)
            return Answer(400, "invalid_blocks", text=True)
        return Answer(200, "ok", text=True)

    def _post_message(self, headers: dict[str, str], body: Any) -> Answer:
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return Answer(200, {"ok": False, "error": "not_authed"})
        if auth.removeprefix("Bearer ") != self.token:
            return Answer(200, {"ok": False, "error": "invalid_auth"})
        if not isinstance(body, dict):
            return Answer(200, {"ok": False, "error": "invalid_arguments"})
        channel = body.get("channel")
        if not channel:
            return Answer(200, {"ok": False, "error": "channel_not_found"})
        if channel not in self.channels:
            return Answer(200, {"ok": False, "error": "channel_not_found"})
        if not body.get("text") and not body.get("blocks"):
            return Answer(200, {"ok": False, "error": "no_text"})
        if "blocks" in body and (why := block_kit_error(body["blocks"])):
            self.refusals.append(why)
            return Answer(200, {"ok": False, "error": "invalid_blocks", "errors": [why]})
        with self._lock:
            self._ts += 1
            ts = f"{1_800_000_000 + self._ts}.{self._ts:06d}"
        return Answer(200, {"ok": True, "channel": "C0ALERTS", "ts": ts, "message": {"text": body.get("text")}})


# --- PagerDuty ---------------------------------------------------------------------------------------------


class FakePagerDuty(LoopbackService):
    """PagerDuty Events API v2 at `events_url` (POST /v2/enqueue).

    202 {"status": "success", "message": "Event processed", "dedup_key"} for a valid event; 400
    {"status": "invalid event", "message": "Event object is invalid", "errors": [...]} otherwise. With
    `routing_keys`, only those keys are known (a real integration key is 32 characters; the check here is
    loose: present, a string, and known if a set was given).
    """

    PATH = "/v2/enqueue"

    def __init__(self, *, routing_keys: Iterable[str] | None = None) -> None:
        super().__init__()
        self.routing_keys = None if routing_keys is None else set(routing_keys)
        self._generated = 0

    @property
    def events_url(self) -> str:
        return self.url + self.PATH

    def events(self) -> list[Any]:
        """The bodies of the events it accepted, in order."""
        return [r.body for r in self.received(self.PATH) if r.status == 202]

    def answer(self, path: str, headers: dict[str, str], body: Any) -> Answer:
        if path != self.PATH:
            return Answer(404, {"status": "not found", "message": "Not Found"})
        errors = self._errors(body)
        if errors:
            return Answer(400, {"status": "invalid event", "message": "Event object is invalid", "errors": errors})
        dedup_key = body.get("dedup_key")
        if not dedup_key:
            with self._lock:
                self._generated += 1
                dedup_key = f"{self._generated:032x}"
        return Answer(202, {"status": "success", "message": "Event processed", "dedup_key": dedup_key})

    def scripted(self, path: str, failure: Failure) -> Answer:
        body: dict[str, Any]
        if failure.status == 429:
            body = {"status": "throttle event", "message": failure.error or "Requests for this service are too fast"}
        elif failure.status == 400:
            errors = [failure.error or "Event object is invalid"]
            body = {"status": "invalid event", "message": "Event object is invalid", "errors": errors}
        else:
            body = {"status": "error", "message": failure.error or "Internal Server Error"}
        return Answer(failure.status, body, retry_after=failure.retry_after)

    def _errors(self, body: Any) -> list[str]:
        if not isinstance(body, dict):
            return ["Event object is not a JSON object"]
        errors: list[str] = []
        routing_key = body.get("routing_key")
        if not isinstance(routing_key, str) or not routing_key:
            errors.append("'routing_key' is missing or blank")
        elif self.routing_keys is not None and routing_key not in self.routing_keys:
            # PagerDuty does not echo the key back, and neither does this
            errors.append("Invalid routing key")
        action = body.get("event_action")
        if action not in PAGERDUTY_ACTIONS:
            errors.append("'event_action' must be one of trigger, acknowledge, resolve")
        dedup_key = body.get("dedup_key")
        if dedup_key is not None and (not isinstance(dedup_key, str) or len(dedup_key) > 255):
            errors.append("'dedup_key' must be a string of at most 255 characters")
        if action in ("acknowledge", "resolve") and not dedup_key:
            errors.append(f"'dedup_key' is required to {action}")
        if action == "trigger":
            payload = body.get("payload")
            if not isinstance(payload, dict):
                errors.append("'payload' is missing")
            else:
                summary = payload.get("summary")
                if not isinstance(summary, str) or not summary:
                    errors.append("'payload.summary' is missing or blank")
                elif len(summary) > 1024:
                    errors.append("'payload.summary' is longer than 1024 characters")
                if not isinstance(payload.get("source"), str) or not payload.get("source"):
                    errors.append("'payload.source' is missing or blank")
                if payload.get("severity") not in PAGERDUTY_SEVERITIES:
                    errors.append("'payload.severity' must be one of critical, error, warning, info")
            links = body.get("links")
            if links is not None and (
                not isinstance(links, list) or any(not isinstance(x, dict) or "href" not in x for x in links)
            ):
                errors.append("'links' must be an array of objects with href")
        return errors
