"""The `alertmanager` notifier against a real Alertmanager on loopback (prometheus-alertmanager), and against a
loopback stand-in that checks credentials and answers what a test asks: alerts fire, resolve, stay active while
the daemon re-sends them, and failures retry or become dead letters as for every notifier."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from langfuse_poller import events
from langfuse_poller.alerting.groups import Group
from langfuse_poller.alerting.resend import Resender
from langfuse_poller.config import load_config, parse_config
from langfuse_poller.errors import ConfigError, DeliveryError
from langfuse_poller.events import Event
from langfuse_poller.notifiers.alertmanager import AlertmanagerNotifier, AlertmanagerSettings, label_names
from langfuse_poller.rules import Rule
from langfuse_poller.testing.fake_langfuse import FakeLangfuse
from langfuse_poller.util.toml_tables import Table

from .conftest import Clock, free_port, make_config, poll, runtime_for

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
PASSWORD = "am-pass-5e1f7c-never-shown"
TOKEN = "am-token-8d2a4b-never-shown"
RESOLVE_TIMEOUT = 3.0


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Polls a real server's answer until it holds, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


class Recorder:
    """A loopback HTTP server that records each POST (path, headers, JSON body) and answers the statuses a test
    queues (then 200); `auth`, when set, is the only Authorization header it accepts (else 401)."""

    def __init__(self, auth: str | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.statuses: list[tuple[int, str]] = []
        self.auth = auth
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"null")
                recorder.requests.append((self.path, dict(self.headers), body))
                status, text = recorder.statuses.pop(0) if recorder.statuses else (200, "")
                if recorder.auth is not None and self.headers.get("authorization") != recorder.auth:
                    status, text = 401, "unauthorized"
                payload = text.encode()
                self.send_response(status)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Alertmanager:
    """prometheus-alertmanager on a loopback port, without gossip, routing every alert to a `Recorder`."""

    def __init__(self, directory: Path) -> None:
        self.hook = Recorder()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "alertmanager.yml"
        config.write_text(
            f"""global:
  resolve_timeout: {RESOLVE_TIMEOUT:g}s
route:
  receiver: hook
  group_by: ['...']
  group_wait: 100ms
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {self.hook.url}/hook
        send_resolved: true
""",
            encoding="utf-8",
        )
        self.log = (directory / "alertmanager.log").open("wb")
        self.proc = subprocess.Popen(
            [
                "prometheus-alertmanager",
                f"--config.file={config}",
                f"--storage.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if not wait_for(self._ready, 15):
            self.close()
            pytest.fail(f"alertmanager did not start: {(directory / 'alertmanager.log').read_text()}")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def active(self) -> list[dict[str, Any]]:
        """GET /api/v2/alerts: the alerts not yet ended."""
        answer = httpx.get(f"{self.url}/api/v2/alerts", timeout=5)
        answer.raise_for_status()
        alerts: list[dict[str, Any]] = answer.json()
        return alerts

    def notified(self, status: str) -> list[dict[str, Any]]:
        """The alerts of every notification Alertmanager sent its webhook receiver with this status."""
        return [a for _, _, body in list(self.hook.requests) for a in body["alerts"] if a["status"] == status]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        self.hook.close()


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    if shutil.which("prometheus-alertmanager") is None:
        pytest.skip("prometheus-alertmanager is not installed (Debian: apt-get install prometheus-alertmanager)")
    directory = tmp_path / "alertmanager"
    directory.mkdir()
    server = Alertmanager(directory)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    try:
        yield server
    finally:
        server.close()


def settings(**table: Any) -> AlertmanagerSettings:
    return AlertmanagerSettings.from_table(Table("test", "notifiers.am", {"type": "alertmanager", **table}))


def alert_config(fake: FakeLangfuse, tmp_path: Path, notifier: dict[str, Any], **rule: Any) -> Any:
    """Errors grouped by environment and trace name, notifying `am` (an alertmanager notifier)."""
    return make_config(
        fake,
        tmp_path,
        notifiers={"am": {"type": "alertmanager", **notifier}},
        rules=[
            {
                "name": "trace-errors",
                "events": ["trace.updated"],
                "when": 'data.level == "ERROR"',
                "group_by": ["data.environment", "data.traceName"],
                "group_wait": "0s",
                "resolve_after": "5m",
                "notify": ["am"],
                **rule,
            }
        ],
    )


# --- config and labels ------------------------------------------------------------------------------------


def test_label_names_from_group_by_paths() -> None:
    assert label_names(["data.model", "data.metadata.team", "event", "data.1st", "data.équipe"]) == {
        "data.model": "model",
        "data.metadata.team": "metadata_team",
        "event": "event",
        "data.1st": "_1st",
        "data.équipe": "_quipe",
    }
    # a name taken by `alertname` or an earlier path: the later path yields
    assert label_names(["data.a_b", "data.a.b", "data.alertname"]) == {
        "data.a_b": "a_b",
        "data.a.b": "a_b_2",
        "data.alertname": "alertname_2",
    }


def test_settings_and_their_config_errors() -> None:
    one = settings(url="http://127.0.0.1:9093/", labels={"team": "ml"})
    assert one.urls == ("http://127.0.0.1:9093",) and one.labels == (("team", "ml"),)
    assert one.resend_interval.total_seconds() == 60 and one.timeout.total_seconds() == 10
    pair = settings(url=["http://am-1:9093", "https://am-2:9093/prefix"], bearer_token=TOKEN, resend_interval="20s")
    assert pair.urls == ("http://am-1:9093", "https://am-2:9093/prefix") and pair.resend_interval.total_seconds() == 20
    assert TOKEN not in repr(pair)
    refused = [
        ({}, "url"),
        ({"url": "127.0.0.1:9093"}, "url"),
        ({"url": []}, "url"),
        ({"url": ["http://a:9093", "http://a:9093/"]}, "url"),
        ({"url": f"http://admin:{PASSWORD}@a:9093"}, "url"),
        ({"url": "http://a:9093", "username": "admin"}, "password"),
        ({"url": "http://a:9093", "password": PASSWORD}, "username"),
        ({"url": "http://a:9093", "username": "u", "password": PASSWORD, "bearer_token": TOKEN}, "bearer_token"),
        ({"url": "http://a:9093", "labels": {"alertname": "x"}}, "labels.alertname"),
        ({"url": "http://a:9093", "labels": {"team-name": "x"}}, "labels.team-name"),
        ({"url": "http://a:9093", "labels": {"team": ""}}, "labels.team"),
        ({"url": "http://a:9093", "resend_interval": "0s"}, "resend_interval"),
    ]
    for table, key in refused:
        with pytest.raises(ConfigError) as caught:
            settings(**table)
        assert caught.value.key == f"notifiers.am.{key}", table
        assert PASSWORD not in str(caught.value) and TOKEN not in str(caught.value)
    # a rule that notifies Alertmanager groups its matches, as one that notifies PagerDuty does
    config = parse_config(
        {
            "langfuse": {"public_key": "pk", "secret_key": "sk"},
            "notifiers": {"am": {"type": "alertmanager", "url": "http://127.0.0.1:9093"}},
            "rules": [{"name": "errors", "events": ["trace.updated"], "notify": ["am"]}],
        },
        "test",
    )
    assert config.rules[0].grouping is not None


def test_the_example_config_has_an_alertmanager_notifier() -> None:
    notifier = load_config(str(EXAMPLE)).notifiers["alertmanager"]
    assert notifier.type == "alertmanager"
    assert notifier.settings.urls == ("http://127.0.0.1:9093",)
    assert notifier.settings.resend_interval.total_seconds() == 60


# --- a real Alertmanager ------------------------------------------------------------------------------------


def test_a_rule_fires_and_resolves_in_a_real_alertmanager(tmp_path: Path, alertmanager: Alertmanager) -> None:
    # an hour behind the wall clock: the resolve, five minutes of quiet later, is in Alertmanager's past
    clock = Clock(time.time() - 3600)
    with FakeLangfuse(clock=clock) as fake:
        config = alert_config(fake, tmp_path, {"url": alertmanager.url, "labels": {"team": "ml", "severity": "page"}})
        with runtime_for(config, clock) as rt:
            rt.alerter.start()
            clock.advance(1)
            fake.add_trace(name="chat", environment="production", level="ERROR")
            clock.advance(1)
            poll(rt)
            rt.alerter.tick()
            rt.worker.run_until_idle()
            opened = datetime.fromtimestamp(clock.now, UTC)

            [alert] = alertmanager.active()
            assert alert["labels"] == {
                "alertname": "trace-errors",
                "environment": "production",
                "traceName": "chat",
                "severity": "page",
                "team": "ml",
            }
            assert alert["status"]["state"] == "active"
            annotations = alert["annotations"]
            assert annotations["summary"] == "trace-errors [environment=production, traceName=chat]: 1 match"
            lines = annotations["description"].splitlines()
            assert lines[:2] == ["Group: environment=production, traceName=chat", "Matches: 1"]
            assert {"Trace: chat", "Level: ERROR", 'Condition: data.level == "ERROR"'} <= set(lines)
            assert annotations["count"] == "1"
            assert annotations["langfuse_url"].startswith(f"{fake.url}/project/")
            assert alert["generatorURL"] == annotations["langfuse_url"]
            starts = datetime.fromisoformat(alert["startsAt"].replace("Z", "+00:00"))
            assert abs((starts - opened).total_seconds()) < 1

            clock.advance(5 * 60)
            rt.alerter.tick()
            rt.worker.run_until_idle()
            assert rt.store.dead_letter_count() == 0
            assert wait_for(lambda: alertmanager.active() == [], 5), alertmanager.active()
            # Alertmanager told its receiver: firing, then resolved with the group's end, in the past
            assert wait_for(lambda: alertmanager.notified("resolved") != [], 10), alertmanager.hook.requests
            [resolved] = alertmanager.notified("resolved")
            assert resolved["labels"]["alertname"] == "trace-errors"
            ends = datetime.fromisoformat(resolved["endsAt"].replace("Z", "+00:00"))
            assert abs((ends - datetime.fromtimestamp(clock.now, UTC)).total_seconds()) < 1
            assert ends < datetime.now(UTC)


def test_an_event_forwarded_to_alertmanager_is_an_alert_of_its_own(alertmanager: Alertmanager) -> None:
    notifier = settings(url=alertmanager.url).build("am")
    try:
        event = events.test_event("trace.updated")
        notifier.send(event)
        [alert] = alertmanager.active()
        assert alert["labels"]["alertname"] == "trace.updated" and alert["labels"]["event_id"] == event.id
        assert alert["labels"]["severity"] == "critical"
        # never re-sent: Alertmanager ends it after its resolve_timeout
        assert wait_for(lambda: alertmanager.active() == [], 3 * RESOLVE_TIMEOUT)
    finally:
        notifier.close()


def test_alertmanager_refusing_an_alert_is_final_with_its_message(alertmanager: Alertmanager) -> None:
    notifier = settings(url=alertmanager.url).build("am")
    try:
        event = events.test_event("trace.updated")
        # an end before the start: Alertmanager answers 400 with why
        bad = Event(
            event.id, "rule.resolved", event.timestamp, "rule", {"rule": "r", "openedAt": "2099-01-01T00:00:00Z"}
        )
        with pytest.raises(DeliveryError) as caught:
            notifier.send(bad)
        assert caught.value.retryable is False
        assert "HTTP 400" in str(caught.value) and "start time must be before end time" in str(caught.value)
    finally:
        notifier.close()


def test_the_daemon_keeps_an_open_group_active_past_resolve_timeout(tmp_path: Path, alertmanager: Alertmanager) -> None:
    port = free_port()
    with FakeLangfuse() as fake:
        fake.add_trace(name="chat", environment="production", level="ERROR", start_time=datetime.now(UTC))
        config = tmp_path / "config.toml"
        config.write_text(
            f"""[langfuse]
base_url = {json.dumps(fake.url)}
public_key = "pk-lf-test"
secret_key = "sk-lf-test"

[poll]
interval = "250ms"
start = "-1h"
settle = "0s"
reread = []
lookback = "5s"
sweep_interval = "1s"

[state]
path = {json.dumps(str(tmp_path / "state.db"))}

[metrics]
listen = "127.0.0.1:{port}"

[[rules]]
name = "trace-errors"
events = ["trace.updated"]
when = 'data.level == "ERROR"'
group_by = ["data.environment"]
group_wait = "0s"
resolve_after = "1h"
notify = ["am"]

[notifiers.am]
type = "alertmanager"
url = {json.dumps(alertmanager.url)}
username = "langfuse-poller"
password = {json.dumps(PASSWORD)}
resend_interval = "1s"
""",
            encoding="utf-8",
        )
        log = tmp_path / "daemon.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "NOTIFY_", "WATCHDOG_"))}
        env["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "langfuse_poller", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        try:
            assert wait_for(lambda: len(alertmanager.active()) == 1, 30), log.read_text()
            seen = time.monotonic()
            # Alertmanager would end it RESOLVE_TIMEOUT after the first send; the daemon's re-sends keep it active
            while time.monotonic() - seen < 2.5 * RESOLVE_TIMEOUT:
                [alert] = alertmanager.active()
                assert alert["labels"]["environment"] == "production"
                time.sleep(0.25)
            scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            [line] = [
                line
                for line in scrape.splitlines()
                if line.startswith('langfuse_poller_alert_resends_total{notifier="am",outcome="sent"}')
            ]
            assert float(line.split()[-1]) >= 3
            assert 'langfuse_poller_alert_resends_total{notifier="am",outcome="failed"} 0.0' in scrape
        finally:
            proc.terminate()
            assert proc.wait(20) == 0
        # the group is still open, but nobody re-sends it now: Alertmanager ends it after its resolve_timeout
        assert wait_for(lambda: alertmanager.active() == [], 3 * RESOLVE_TIMEOUT)
        text = log.read_text()
        assert PASSWORD not in text and "Traceback" not in text, text


# --- a stand-in in front: credentials, refusals, retries, HA pairs, re-sends -------------------------------


def firing(rt: Any, recorder: Recorder) -> None:
    """Route one ERROR match to the rule, let it fire (group_wait 0s) and deliver the notification."""
    event = Event(
        "trace.updated:t1:o1:1",
        "trace.updated",
        datetime.fromtimestamp(rt.worker.clock(), UTC),
        "poll",
        {"traceId": "t1", "traceName": "chat", "environment": "production", "level": "ERROR"},
    )
    with rt.store.write() as tx:
        tx.enqueue(event, rt.router.targets(event))
    deliver(rt)
    rt.alerter.tick()
    deliver(rt)


def deliver(rt: Any) -> None:
    """One pass of the delivery worker; a retry waits for the test's clock (run_until_idle would wait for it)."""
    rt.worker.kick()
    rt.worker.wait_idle(10)


def test_credentials_reach_the_server_and_never_show(
    tmp_path: Path, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    import base64

    caplog.set_level(logging.DEBUG)
    basic = "Basic " + base64.b64encode(f"langfuse-poller:{PASSWORD}".encode()).decode()
    cases = [
        ({"username": "langfuse-poller", "password": PASSWORD}, basic),
        ({"bearer_token": TOKEN}, f"Bearer {TOKEN}"),
    ]
    for n, (auth, header) in enumerate(cases):
        recorder.auth = header
        notifier = settings(url=recorder.url, **auth).build("am")
        try:
            notifier.send(events.test_event("trace.updated"))
            path, headers, body = recorder.requests[-1]
            assert path == "/api/v2/alerts" and headers["Authorization"] == header and len(body) == 1
            # a wrong credential is refused for good, and the error shows none of it
            recorder.auth = header + "x"
            with pytest.raises(DeliveryError) as caught:
                notifier.send(events.test_event("trace.updated"))
            assert "HTTP 401" in str(caught.value) and caught.value.retryable is False
            for secret in (PASSWORD, TOKEN, header.split()[-1]):
                assert secret not in str(caught.value) and secret not in repr(notifier.settings), n
        finally:
            notifier.close()
    for secret in (PASSWORD, TOKEN):
        assert secret not in caplog.text


def test_a_refusal_is_a_dead_letter_and_a_503_is_retried(tmp_path: Path, recorder: Recorder) -> None:
    clock = Clock(time.time())
    with FakeLangfuse(clock=clock) as fake:
        config = alert_config(fake, tmp_path, {"url": recorder.url})
        with runtime_for(config, clock) as rt:
            rt.alerter.start()
            recorder.statuses = [(503, "busy"), (400, '"invalid label set: invalid name \\"1x\\""')]
            firing(rt, recorder)
            assert len(recorder.requests) == 1 and rt.store.dead_letter_count() == 0
            assert rt.store.pending_by_target() == {"notifier:am": 1}
            # the 503 is retried after the backoff; the 400 that answers it is final, with Alertmanager's message
            clock.advance(60)
            deliver(rt)
            assert len(recorder.requests) == 2
            [dead] = rt.store.dead_letters()
            assert dead.target == "notifier:am" and dead.event_type == "rule.firing"
            assert "HTTP 400" in dead.error and "invalid label set" in dead.error
            assert rt.store.pending_by_target() == {}


def test_an_ha_pair_succeeds_when_one_member_accepts(recorder: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    event = events.test_event("trace.updated")
    notifier = settings(url=[down, recorder.url], timeout="2s").build("am")
    try:
        notifier.send(event)
        assert len(recorder.requests) == 1
        assert "another Alertmanager accepted" in caplog.text
        # none accepts: retried while any failure may pass, final when all refused
        recorder.statuses = [(400, "bad")]
        with pytest.raises(DeliveryError) as caught:
            notifier.send(event)
        assert caught.value.retryable is True and "cannot reach" in str(caught.value)
    finally:
        notifier.close()
    other = Recorder()
    notifier = settings(url=[other.url, recorder.url]).build("am")
    try:
        recorder.statuses, other.statuses = [(400, "bad one")], [(422, "bad two")]
        with pytest.raises(DeliveryError) as caught:
            notifier.send(event)
        assert caught.value.retryable is False
        assert "bad one" in str(caught.value) and "bad two" in str(caught.value)
    finally:
        notifier.close()
        other.close()


def test_open_groups_are_re_sent_on_each_notifiers_interval_until_they_resolve(
    tmp_path: Path, recorder: Recorder
) -> None:
    clock = Clock(time.time())
    with FakeLangfuse(clock=clock) as fake:
        config = alert_config(fake, tmp_path, {"url": recorder.url, "resend_interval": "30s"})
        with runtime_for(config, clock) as rt:
            rt.alerter.start()
            resender = Resender(clock=clock)
            state = rt.store.alert_state()

            def resend() -> int:
                return resender.run(state, rt.alerter.rules, rt.worker.targets)

            # nothing told yet: nothing to re-send (group_wait is the alerter's to keep)
            assert resend() == 0 and recorder.requests == []
            # the metric's series exist from the first look
            assert dict(resender.counts) == {("am", "sent"): 0, ("am", "failed"): 0}
            firing(rt, recorder)
            [(_, _, [told])] = recorder.requests
            # each notifier keeps its own interval, from its last look
            assert resend() == 0
            clock.advance(30)
            assert resend() == 1
            [again] = recorder.requests[-1][2]
            assert again["labels"] == told["labels"] and again["startsAt"] == told["startsAt"]
            assert "endsAt" not in again
            clock.advance(29)
            assert resend() == 0
            clock.advance(1)
            assert resend() == 1 and len(recorder.requests) == 3
            assert resender.counts["am", "sent"] == 2
            # a failed re-send is counted; the next interval tries again
            recorder.statuses = [(503, "")]
            clock.advance(30)
            assert resend() == 0 and resender.counts["am", "failed"] == 1
            # resolved: told once with its end, never re-sent
            clock.advance(5 * 60)
            rt.alerter.tick()
            rt.worker.run_until_idle()
            [resolved] = recorder.requests[-1][2]
            assert resolved["labels"] == told["labels"] and "endsAt" in resolved
            count = len(recorder.requests)
            clock.advance(60)
            assert resend() == 0 and len(recorder.requests) == count


def test_a_re_send_built_before_the_resolve_never_reopens_the_alert(tmp_path: Path, recorder: Recorder) -> None:
    rule = Rule(name="r", events=("trace.updated",), when=None, notify=("am",))
    group = Group(rule="r", key="k", labels={"data.environment": "production"}, state="firing", opened_at=1.0)
    group.told = ["am"]
    from langfuse_poller.alerting.groups import alert_event

    notifier = settings(url=recorder.url).build("am")
    assert isinstance(notifier, AlertmanagerNotifier)
    try:
        stale = alert_event(rule, group, 2.0, status="firing", reason="resend", new=0)
        notifier.send(alert_event(rule, group, 3.0, status="resolved", reason="resolved", new=0))
        assert notifier.resend([stale]) == 0
        [(_, _, [resolved])] = recorder.requests
        assert resolved["endsAt"] == "1970-01-01T00:00:03.000Z"
    finally:
        notifier.close()
