"""The daemon as a systemd service, end to end: `langfuse-poller run` in a subprocess, a loopback Langfuse
stand-in, and a real AF_UNIX datagram socket bound here as the service manager's $NOTIFY_SOCKET.

READY=1 after the first poll, WATCHDOG=1 at half of $WATCHDOG_USEC and none while a poll hangs, STATUS=,
STOPPING=1 on SIGTERM, RELOADING=1 then READY=1 around a SIGHUP reload (a good config takes effect and keeps
the state and the pending deliveries; a broken one changes nothing), and the Prometheus endpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from langfuse_poller.testing.fake_langfuse import FakeLangfuse

from . import test_cli
from .test_cli import (
    SECRETS,
    Receiver,
    ago,
    closed_port,
    jsonl,
    langfuse_section,
    q,
    read_jsonl,
    rule,
    wait_for,
    webhook,
)

pytestmark = pytest.mark.timeout(90)

# the CLI tests' fixtures: a Langfuse stand-in on the real clock, and a webhook receiver
langfuse = test_cli.langfuse
receiver = test_cli.receiver

MODULE = [sys.executable, "-m", "langfuse_poller"]


# --- the service manager's side: a datagram socket that records every notification -------------------------


@dataclass(frozen=True)
class Notice:
    """One datagram: when it arrived (monotonic and wall clock) and its assignments."""

    at: float
    wall: float
    fields: dict[str, str]

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def get(self, key: str) -> str | None:
        return self.fields.get(key)


class NotifySocket:
    """An AF_UNIX SOCK_DGRAM socket bound at a path or, for "@name", in the abstract namespace."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self._notices: list[Notice] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            pairs = (line.partition("=") for line in data.decode().splitlines() if line)
            notice = Notice(time.monotonic(), time.time(), {key: value for key, _, value in pairs})
            with self._lock:
                self._notices.append(notice)

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address}

    def notices(self, key: str | None = None) -> list[Notice]:
        with self._lock:
            found = list(self._notices)
        return [n for n in found if key is None or key in n.fields]

    def wait_for(
        self, key: str, timeout: float = 20.0, after: float = 0.0, where: Callable[[Notice], bool] = lambda n: True
    ) -> Notice:
        """The first notice carrying `key` that arrived after `after` (monotonic) and meets `where`."""
        deadline = time.monotonic() + timeout
        while True:
            for notice in self.notices(key):
                if notice.at > after and where(notice):
                    return notice
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key} within {timeout}s; got {[n.fields for n in self.notices()]}")
            time.sleep(0.02)

    def close(self) -> None:
        self._closed.set()
        self.sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


# --- the daemon ---------------------------------------------------------------------------------------------


@dataclass
class Running:
    """A `langfuse-poller run` subprocess whose stderr goes to a file."""

    proc: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def send(self, signum: int) -> float:
        sent = time.monotonic()
        self.proc.send_signal(signum)
        return sent

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> str:
        """Stop it with `signum`; it must exit 0, with no traceback and no secret in its log."""
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(
                f"no exit within {timeout}s after {signal.Signals(signum).name}:\n{self.output()}"
            ) from None
        output = self.output()
        assert code == 0, f"exit {code}:\n{output}"
        assert_clean_log(output)
        return output

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        assert wait_for(lambda: text in self.output() or self.proc.poll() is not None, timeout)
        assert text in self.output(), f"{text!r} not logged within {timeout}s:\n{self.output()}"


def assert_clean_log(output: str) -> None:
    assert "Traceback (most recent call last)" not in output, output
    for secret in SECRETS:
        assert secret not in output, f"secret {secret!r} logged:\n{output}"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Starts `run --config PATH` with extra environment; whatever still runs at the end is killed."""
    started: list[Running] = []

    def start(config: Path, env: Mapping[str, str] | None = None, *args: str, command: str = "run") -> Running:
        log = tmp_path / f"run-{len(started)}.log"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "NOTIFY_", "WATCHDOG_"))}
        child_env.update({"XDG_STATE_HOME": str(tmp_path / "xdg-state"), **(env or {})})
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*MODULE, command, "--config", str(config), *args],
                stdout=subprocess.DEVNULL,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env=child_env,
            )
        running = Running(proc, log)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            running.proc.kill()
        running.proc.wait(timeout=10)


def config_file(path: Path, url: str, body: str = "", *, interval: str = "250ms", extra: str = "") -> Path:
    """A config polling fast from an hour ago (late records within 5 s are re-read every second), retrying
    deliveries fast and long, with its state next to it; `extra` and `body` are appended."""
    path.write_text(
        f"""{langfuse_section(url)}timeout = "10s"

[poll]
interval = "{interval}"
start = "-1h"
settle = "0s"
reread = []
lookback = "5s"
sweep_interval = "1s"

[state]
path = {q(path.with_suffix(".db"))}

[delivery]
backoff = "100ms"
max_backoff = "300ms"
max_attempts = 1000

{extra}{body}""",
        encoding="utf-8",
    )
    return path


def data_requests(fake: FakeLangfuse, before: float | None = None) -> int:
    """Data requests the stand-in answered (before `before`, wall clock)."""
    return sum(
        1
        for r in list(fake.requests)
        if r.path.endswith(("/v2/observations", "/v3/scores")) and (before is None or r.at <= before)
    )


# --- the protocol, in this process --------------------------------------------------------------------------


def test_the_notification_protocol_on_a_path_and_in_the_abstract_namespace(tmp_path: Path) -> None:
    from langfuse_poller.service.sdnotify import STATUS_MAX, ServiceManager

    for address in (str(tmp_path / "manager.sock"), f"@langfuse-poller-unit-{os.getpid()}-{time.monotonic_ns()}"):
        sock = NotifySocket(address)
        try:
            manager = ServiceManager({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000"})
            assert manager.enabled and manager.watchdog_timeout == 3.0
            assert manager.ready("first line\nsecond line")
            assert manager.status("x" * 1000)
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert manager.reloading("reloading")
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            ready = sock.wait_for("READY", timeout=5)
            assert ready.fields == {"READY": "1", "STATUS": "first line second line"}
            status = sock.wait_for("STATUS", timeout=5, where=lambda n: n.fields["STATUS"].startswith("x"))
            assert len(status["STATUS"]) == STATUS_MAX and status["STATUS"].endswith("...")
            reloading = sock.wait_for("RELOADING", timeout=5)
            assert before <= int(reloading["MONOTONIC_USEC"]) <= after
            manager.close()
        finally:
            sock.close()

    outside = ServiceManager({})
    assert not outside.enabled and outside.watchdog_timeout is None and not outside.ready("ready")
    # the watchdog is the main process's: a child that inherited the variables is not watched
    assert ServiceManager({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_timeout is None
    assert ServiceManager({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_timeout == 1.0
    # a manager that went away: nothing is sent, nothing is raised
    gone = ServiceManager({"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    assert gone.enabled and not gone.watchdog() and not gone.stopping("stopping")


# --- READY, STATUS, STOPPING ---------------------------------------------------------------------------------


def test_ready_after_the_first_poll_then_status_and_stopping_on_sigterm(
    tmp_path: Path, langfuse: FakeLangfuse, notify: NotifySocket, daemon: Callable[..., Running]
) -> None:
    trace = langfuse.add_trace(start_time=ago(30))
    events = tmp_path / "events.jsonl"
    config = config_file(
        tmp_path / "config.toml", langfuse.url, jsonl("file", events) + rule("new", ["trace.*"], ["file"])
    )
    langfuse.slow_next(1, seconds=1.5)  # the first poll's first request takes its time
    began = time.time()
    running = daemon(config, notify.env)

    ready = notify.wait_for("READY")
    assert ready["READY"] == "1"
    # the first poll had both streams answered before READY: it followed the first poll, not the start
    assert ready.wall - began >= 1.5, f"READY after {ready.wall - began:.2f}s, before the slow first request ended"
    assert data_requests(langfuse, before=ready.wall) >= 2
    status = ready.get("STATUS") or ""
    assert status.startswith("first poll: last poll ok, 1 new events"), status
    assert "lag observations" in status and "queue" in status and "dead letters 0" in status, status
    assert wait_for(lambda: [e["id"] for e in read_jsonl(events)] == [f"trace.created:{trace[0]['traceId']}"])
    assert notify.notices("WATCHDOG") == [], "no watchdog was asked for"

    stopping_after = running.send(signal.SIGTERM)
    code = running.proc.wait(timeout=20)
    stopping = notify.wait_for("STOPPING", timeout=5, after=stopping_after)
    assert stopping["STOPPING"] == "1" and "stopping" in (stopping.get("STATUS") or "")
    assert code == 0, running.output()
    assert "stopped" in running.output()
    assert_clean_log(running.output())
    assert len(notify.notices("READY")) == 1


def test_abstract_socket_ready_with_the_error_when_langfuse_fails_at_start(
    tmp_path: Path, langfuse: FakeLangfuse, daemon: Callable[..., Running]
) -> None:
    name = f"@langfuse-poller-test-{os.getpid()}-{time.monotonic_ns()}"
    notify = NotifySocket(name)
    try:
        # not retryable: the first poll ends at once, failed; the daemon is ready anyway and says why
        langfuse.fail_next(1000, status=404)
        config = config_file(tmp_path / "config.toml", langfuse.url, interval="1s")
        running = daemon(config, notify.env)
        ready = notify.wait_for("READY")
        status = ready.get("STATUS") or ""
        assert "last poll failed: observations: " in status and "has neither" in status, status
        assert running.proc.poll() is None, running.output()
        sent = running.send(signal.SIGINT)
        assert running.proc.wait(timeout=20) == 0, running.output()
        notify.wait_for("STOPPING", timeout=5, after=sent)
    finally:
        notify.close()
        langfuse.clear_faults()


# --- the watchdog --------------------------------------------------------------------------------------------


def test_watchdog_pings_at_half_the_timeout_and_stops_while_a_poll_hangs(
    tmp_path: Path, langfuse: FakeLangfuse, notify: NotifySocket, daemon: Callable[..., Running]
) -> None:
    config = config_file(tmp_path / "config.toml", langfuse.url)
    running = daemon(config, {**notify.env, "WATCHDOG_USEC": "1000000"})
    ready = notify.wait_for("READY")
    time.sleep(2.6)
    pings = [n.at for n in notify.notices("WATCHDOG") if n.at > ready.at]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(gaps) >= 3, pings
    assert 0.35 <= statistics.median(gaps) <= 0.7, f"pings every {gaps}, expected every 0.5 s"
    assert max(gaps) < 1.4, gaps

    # the next poll's first request hangs 4 s: a whole watchdog timeout (1 s) without a sign of life
    hang = 4.0
    langfuse.slow_next(1, seconds=hang)
    hung_from = time.monotonic()
    wait_for(lambda: time.monotonic() - hung_from > hang + 1.5, hang + 3)
    pings = [n.at for n in notify.notices("WATCHDOG") if n.at > hung_from]
    silences = [b - a for a, b in zip([hung_from, *pings], pings, strict=False)]
    assert silences and max(silences) >= 2.0, f"the watchdog kept pinging through the hang: {silences}"
    assert pings and pings[-1] > hung_from + hang, "pings did not resume once the poll went on"
    assert any("hung" in (n.get("STATUS") or "") for n in notify.notices("STATUS") if n.at > hung_from)
    output = running.stop()
    assert "the poll in flight has shown no sign of life for" in output, output
    assert "polling is alive again" in output


# --- SIGTERM during a poll and during deliveries, under systemd --------------------------------------------


@pytest.mark.parametrize("moment", ["poll", "delivery"])
def test_sigterm_during_a_poll_or_a_delivery_exits_0_and_loses_nothing(
    tmp_path: Path, notify: NotifySocket, daemon: Callable[..., Running], moment: str
) -> None:
    import random

    from langfuse_poller.testing.loopback_webhook import LoopbackWebhook

    from .test_crash_safety import (
        Held,
        add_backlog,
        assert_everything_delivered,
        assert_state_clean,
        expected_ids,
        run_once,
        write_config,
    )

    with LoopbackWebhook() as inbox, FakeLangfuse() as fake:
        held = Held()
        add_backlog(fake, held, random.Random(11), traces=30, span=1800.0)
        config = write_config(tmp_path, fake, inbox.url, lookback="5s", start="-1h")
        if moment == "poll":
            fake.slow_next(1, seconds=2.0)
        else:
            inbox.delay = 0.4
        running = daemon(config, notify.env)
        if moment == "poll":
            wait_for(lambda: "langfuse-poller running" in running.output(), 15)
            time.sleep(0.6)
            assert data_requests(fake) == 0, "the slow request was answered already: no poll in flight"
        else:
            assert wait_for(lambda: sum(inbox.snapshot().values()) >= 2 and inbox.in_flight > 0, 20)
        sent = running.send(signal.SIGTERM)
        assert running.proc.wait(timeout=20) == 0, running.output()
        assert time.monotonic() - sent < 5.0
        notify.wait_for("STOPPING", timeout=5, after=sent)
        assert inbox.in_flight == 0
        assert_clean_log(running.output())
        if moment == "delivery":
            assert sum(inbox.snapshot().values()) < len(expected_ids(held)), "everything was delivered before"
        inbox.delay = 0.0
        run_once(config)
        assert_everything_delivered(tmp_path, inbox, held, max_repeats=0)
        assert_state_clean(config)


# --- SIGHUP --------------------------------------------------------------------------------------------------


def reload_and_wait(running: Running, notify: NotifySocket) -> tuple[Notice, Notice]:
    """SIGHUP; the RELOADING=1 and the READY=1 that follow it."""
    sent = running.send(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", after=sent)
    ready = notify.wait_for("READY", after=reloading.at)
    return reloading, ready


RELOADED_HANDLERS = """
import json
import os

from langfuse_poller import on


@on("score.*", name="reloaded")
def reloaded(event):
    with open(os.environ["HANDLED"], "a", encoding="utf-8") as out:
        out.write(json.dumps({"id": event.id}) + "\\n")
"""


def test_sighup_applies_new_rules_and_notifiers_and_keeps_state_and_pending_deliveries(
    tmp_path: Path,
    langfuse: FakeLangfuse,
    receiver: Receiver,
    notify: NotifySocket,
    daemon: Callable[..., Running],
) -> None:
    receiver.status = 500  # the webhook's deliveries stay pending, retried
    first = langfuse.add_trace(start_time=ago(30))[0]["traceId"]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    routes = jsonl("a", a) + webhook("hook", receiver.url) + rule("a", ["trace.created"], ["a", "hook"])
    config = config_file(tmp_path / "config.toml", langfuse.url, routes)
    modules = tmp_path / "modules"
    modules.mkdir()
    env = {**notify.env, "PYTHONPATH": str(modules), "HANDLED": str(tmp_path / "handled.jsonl")}
    running = daemon(config, env)
    notify.wait_for("READY")
    assert wait_for(lambda: len(read_jsonl(a)) == 1 and len(receiver.requests()) >= 1)

    # a new notifier, a new rule and a new handler module, the rest as it was
    (modules / "reloaded_handlers.py").write_text(RELOADED_HANDLERS, encoding="utf-8")
    more = jsonl("b", b) + rule("b", ["trace.*", "score.*"], ["b"])
    handlers = '[handlers]\nmodules = ["reloaded_handlers"]\n'
    config_file(tmp_path / "config.toml", langfuse.url, routes + more, extra=handlers)
    reloading, ready = reload_and_wait(running, notify)
    usec = int(reloading["MONOTONIC_USEC"])
    assert abs(usec / 1e6 - reloading.at) < 5.0, "MONOTONIC_USEC is not CLOCK_MONOTONIC"
    assert (ready.get("STATUS") or "").startswith("reloaded; "), ready.fields

    second = langfuse.add_trace()[0]["traceId"]
    score = langfuse.add_score(trace_id=second, value=0.3)["id"]
    want_b = {f"trace.created:{second}", f"score.created:{score}"}
    assert wait_for(lambda: want_b <= {e["id"] for e in read_jsonl(b)}), read_jsonl(b)
    # the state was kept: nothing read again, nothing sent twice; the new rule sees new events only
    want_a = [f"trace.created:{first}", f"trace.created:{second}"]
    assert wait_for(lambda: [e["id"] for e in read_jsonl(a)] == want_a), read_jsonl(a)
    assert {e["id"] for e in read_jsonl(b)} == want_b
    assert wait_for(lambda: read_jsonl(tmp_path / "handled.jsonl") == [{"id": f"score.created:{score}"}])

    # the deliveries pending for the webhook before the reload were kept, and go out once it answers
    refused = len(receiver.requests())
    receiver.status = 200
    want_hook = {f"trace.created:{first}", f"trace.created:{second}"}
    assert wait_for(lambda: {r.json()["id"] for r in receiver.requests()[refused:]} >= want_hook, 15)
    output = running.stop()
    assert "config reloaded: 2 rules, 3 notifiers, 1 handlers" in output, output
    status = json.loads(
        subprocess.run(
            [*MODULE, "status", "--json", "--config", str(config)], capture_output=True, text=True, timeout=30
        ).stdout
    )
    assert status["queue"]["pending"] == 0 and status["dead_letters"] == 0, status


def test_a_reload_wires_the_routing_as_the_runtime_does(tmp_path: Path) -> None:
    """A reload builds what Runtime.build built (both go through runtime.wire_routing): the same targets, and
    a router and an alerter with the same parts (a silence check, the streams an alerter watches)."""
    from langfuse_poller.runtime import Runtime
    from langfuse_poller.service import reload

    from .conftest import make_config

    with FakeLangfuse() as fake:
        rules = [
            {"name": "all", "events": ["trace.*"], "notify": ["file"]},
            {"name": "grouped", "events": ["score.*"], "group_by": ["data.name"], "notify": ["file"]},
        ]
        config = make_config(fake, tmp_path, rules=rules)
        runtime = Runtime.build(config)
        try:
            prepared = reload.prepare(runtime, config)
            assert prepared.needs_restart == () and prepared.config == config
            routing = reload.build(runtime, prepared)
            assert set(routing.targets) == set(runtime.worker.targets)
            for built, running in ((routing.router, runtime.router), (routing.alerter, runtime.alerter)):
                kinds = {name: type(value) for name, value in vars(built).items()}
                assert kinds == {name: type(value) for name, value in vars(running).items()}, type(built)
            assert vars(routing.alerter)["streams"] == vars(runtime.alerter)["streams"]
            for target in routing.targets.values():
                target.close()
        finally:
            runtime.close()


def test_serve_webhooks_is_ready_at_once_and_a_reload_routes_received_events_by_the_new_rules(
    tmp_path: Path, notify: NotifySocket, daemon: Callable[..., Running]
) -> None:
    from .test_webhooks import SECRET, encode, healthy, langfuse_headers, prompt_payload

    port = closed_port()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    webhook_section = f'[webhook]\nlisten = "127.0.0.1:{port}"\nsecret = {q(SECRET)}\n'
    routes = jsonl("a", a) + rule("a", ["prompt.*"], ["a"])
    config = config_file(tmp_path / "config.toml", "http://127.0.0.1:9", routes, extra=webhook_section)
    running = daemon(config, notify.env, command="serve-webhooks")
    ready = notify.wait_for("READY")
    assert ready.get("STATUS") == "running without polling", ready.fields
    base = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: healthy(base), 15)

    def post(payload_id: str) -> None:
        body = encode(prompt_payload(payload_id))
        answer = httpx.post(f"{base}/api/webhooks/langfuse", content=body, headers=langfuse_headers(body), timeout=10)
        assert answer.status_code == 200, answer.text

    post("before")
    assert wait_for(lambda: [e["id"] for e in read_jsonl(a)] == ["prompt.created:before"])
    config_file(
        tmp_path / "config.toml",
        "http://127.0.0.1:9",
        routes + jsonl("b", b) + rule("b", ["prompt.*"], ["b"]),
        extra=webhook_section,
    )
    _, ready = reload_and_wait(running, notify)
    # serve-webhooks reloads its config as it loaded it: nothing in [poll] or [webhook] looks changed
    assert (ready.get("STATUS") or "").startswith("reloaded; "), ready.fields
    post("after")
    # each target drains in its own thread: wait for both
    assert wait_for(lambda: [e["id"] for e in read_jsonl(b)] == ["prompt.created:after"]), read_jsonl(b)
    assert wait_for(lambda: [e["id"] for e in read_jsonl(a)] == ["prompt.created:before", "prompt.created:after"])
    output = running.stop()
    assert "restart" not in output, output


BAD_CEL = rule("more", ["score.*"], ["file"], 'data.level == == "ERROR"')
BAD_MODULE = '[handlers]\nmodules = ["no_such_module_for_langfuse_poller"]\n'


def test_sighup_with_a_broken_config_keeps_the_running_one_and_names_the_key(
    tmp_path: Path, langfuse: FakeLangfuse, notify: NotifySocket, daemon: Callable[..., Running]
) -> None:
    events = tmp_path / "events.jsonl"
    path = tmp_path / "config.toml"
    good = jsonl("file", events) + rule("all", ["trace.*"], ["file"])
    config = config_file(path, langfuse.url, good)
    running = daemon(config, notify.env)
    notify.wait_for("READY")

    expected: list[str] = []
    # a CEL condition that does not compile is refused before anything stops; a handler module that does not
    # import is refused after the daemon was quieted, which then resumes with the old config
    for key, words, body, extra in (
        ("rules[1].when", "a CEL expression", good + BAD_CEL, ""),
        ("handlers.modules", "an importable Python module", good, BAD_MODULE),
    ):
        config_file(path, langfuse.url, body, extra=extra)
        _, ready = reload_and_wait(running, notify)
        status = ready.get("STATUS") or ""
        assert status.startswith(f"reload failed, running the previous config: {path}: {key}: expected {words}"), status
        running.wait_log(f"reload failed, the running config stays: {path}: {key}: expected {words}")
        # the old config still runs, polls and delivers
        trace = langfuse.add_trace()[0]["traceId"]
        expected.append(f"trace.created:{trace}")
        assert wait_for(lambda: [e["id"] for e in read_jsonl(events)] == expected), (key, read_jsonl(events))

    # sections that a reload cannot apply are named, and wait for a restart
    config_file(path, langfuse.url, good, interval="2s")
    _, ready = reload_and_wait(running, notify)
    assert "restart to apply [poll]" in (ready.get("STATUS") or ""), ready.fields
    output = running.stop()
    assert "reload: [poll] changed; it applies at the next restart, the running values stay" in output, output
    assert output.count("reload failed, the running config stays") == 2


# --- metrics -------------------------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed: (sample name, sorted labels) -> value."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_after_a_poll(
    tmp_path: Path, langfuse: FakeLangfuse, notify: NotifySocket, daemon: Callable[..., Running]
) -> None:
    port = closed_port()
    # an ERROR root with a generation and a span, and a plain root: 2 trace.created, 1 trace.updated, 1 generation
    langfuse.add_trace(start_time=ago(40), observations=2, level="ERROR")
    langfuse.add_trace(start_time=ago(30))
    langfuse.add_score(value=0.2, timestamp=ago(20))
    events = tmp_path / "events.jsonl"
    body = (
        jsonl("file", events)
        + '[notifiers.alerts]\ntype = "log"\n'
        + rule("all", ["trace.*", "generation.*", "score.*"], ["file"])
        + rule("errors", ["trace.updated"], ["alerts"], 'data.level == "ERROR"')
        + 'group_wait = "0s"\n'
    )
    config = config_file(
        tmp_path / "config.toml", langfuse.url, body, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
    )
    running = daemon(config, notify.env)
    notify.wait_for("READY")
    assert wait_for(lambda: len(read_jsonl(events)) == 5), read_jsonl(events)
    assert wait_for(lambda: "rule.firing" in running.output(), 10), running.output()

    def value(name: str, **labels: str) -> float:
        return metrics[name, tuple(sorted(labels.items()))]

    # the files and the log show a delivery a moment before it is recorded as done
    delivered = (("outcome", "delivered"), ("target", "notifier:alerts"))
    assert wait_for(lambda: scrape(port).get(("langfuse_poller_deliveries_total", delivered)) == 1)
    assert wait_for(lambda: scrape(port).get(("langfuse_poller_queue_depth", (("target", "notifier:file"),))) == 0)
    metrics = scrape(port)
    for stream in ("observations", "scores"):
        assert 0 <= value("langfuse_poller_lag_seconds", stream=stream) < 30
        assert abs(value("langfuse_poller_last_success_timestamp_seconds", stream=stream) - time.time()) < 30
        assert value("langfuse_poller_poll_failing", stream=stream) == 0
    assert value("langfuse_poller_events_total", type="trace.created", source="poll") == 2
    assert value("langfuse_poller_events_total", type="generation.created", source="poll") == 1
    assert value("langfuse_poller_events_total", type="trace.updated", source="poll") == 1
    assert value("langfuse_poller_events_total", type="score.created", source="poll") == 1
    assert value("langfuse_poller_events_total", type="score.updated", source="poll") == 0
    assert value("langfuse_poller_events_total", type="rule.firing", source="rule") == 1
    assert value("langfuse_poller_alert_notifications_total", rule="errors", status="firing") == 1
    assert value("langfuse_poller_api_requests_total", endpoint="/api/public/v2/observations", status="200") >= 1
    assert value("langfuse_poller_api_requests_total", endpoint="/api/public/v3/scores", status="200") >= 1
    assert value("langfuse_poller_queue_depth", target="notifier:file") == 0
    assert value("langfuse_poller_dead_letters") == 0
    assert value("langfuse_poller_deliveries_total", target="notifier:file", outcome="delivered") == 5
    assert value("langfuse_poller_deliveries_total", target="notifier:alerts", outcome="delivered") == 1
    assert value("langfuse_poller_deliveries_total", target="notifier:file", outcome="dead") == 0
    assert value("langfuse_poller_alert_groups", rule="errors", state="firing") == 1
    assert value("langfuse_poller_config_last_reload_successful") == 1
    assert 0 <= value("langfuse_poller_poll_stalled_seconds") < 5
    assert value("langfuse_poller_build_info", version="0.1.0") == 1
    assert value("process_resident_memory_bytes") > 0

    # a failed reload shows in the metrics; the counters go on from where they were
    (tmp_path / "config.toml").write_text(config.read_text(encoding="utf-8") + "[poll2]\n", encoding="utf-8")
    reload_and_wait(running, notify)
    metrics = scrape(port)
    assert value("langfuse_poller_config_reloads_total", outcome="failed") == 1
    assert value("langfuse_poller_config_last_reload_successful") == 0
    assert value("langfuse_poller_events_total", type="trace.created", source="poll") == 2
    running.stop()


def test_check_probes_the_metrics_port_and_run_refuses_a_port_in_use(
    tmp_path: Path, langfuse: FakeLangfuse, daemon: Callable[..., Running]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGFUSE_")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MODULE, *args], capture_output=True, text=True, timeout=60, env=env)

    port = closed_port()
    config = config_file(tmp_path / "config.toml", langfuse.url, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    free = cli("check", "--config", str(config))
    assert free.returncode == 0, free.stdout + free.stderr
    assert f"ok   metrics.listen 127.0.0.1:{port} is free" in free.stdout, free.stdout

    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        taken = cli("check", "--config", str(config))
        assert taken.returncode == 1, taken.stdout
        assert f"FAIL metrics.listen 127.0.0.1:{port} is in use by another program" in taken.stdout, taken.stdout
        refused = cli("run", "--config", str(config))
        assert refused.returncode == 1, refused.stderr
        assert f"error: cannot listen on 127.0.0.1:{port} for [metrics] listen" in refused.stderr, refused.stderr

    running = daemon(config)
    running.wait_log("langfuse-poller running")
    during = cli("check", "--config", str(config))
    assert during.returncode == 0, during.stdout
    assert f"is in use, by the running langfuse-poller (pid {running.proc.pid}) presumably" in during.stdout
    running.stop()


def test_a_bad_metrics_listen_is_a_config_error(tmp_path: Path) -> None:
    path = config_file(tmp_path / "config.toml", "http://127.0.0.1:9", extra='[metrics]\nlisten = "9464"\n')
    done = subprocess.run([*MODULE, "status", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert f"config error: {path}: metrics.listen: expected an address and port such as" in done.stderr
