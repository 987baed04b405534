"""The `slack` and `pagerduty` notifiers against loopback stand-ins of Slack and PagerDuty.

Real clients (slack-sdk's WebhookClient and WebClient, httpx) talk to `tests.fake_alerting`, mostly through the
real DeliveryWorker, so that what Slack's and PagerDuty's answers lead to (delivered, retried in place, retried
later by the durable queue, dead letter) is what is checked. The last tests run `send-test-event` through the
installed console script and check that no secret (the webhook URL's path, the bot token, the routing key) is
ever printed, whether the send succeeds or fails.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from langfuse_poller.alerting.groups import evaluate, group_key, labels_of, open_group, record_match
from langfuse_poller.config import Config, parse_config
from langfuse_poller.errors import ConfigError, DeliveryError
from langfuse_poller.events import Event
from langfuse_poller.notifiers import build_notifier
from langfuse_poller.rules import Grouping, Rule
from langfuse_poller.runtime import Runtime

from .fake_alerting import FakePagerDuty, FakeSlack, Recorded, block_kit_error
from .test_cli import NOWHERE, SCRIPT, Cli, Result, Started, closed_port, q, write_config
from .test_delivery import drain_until, runtime

BOT_TOKEN = "xoxb-1111-2222-b0tS3cretT0ken"
WRONG_BOT_TOKEN = "xoxb-9999-8888-wr0ngT0kenZz"
ROUTING_KEY = "R0uT1nGk3y5ecret0123456789abcdef"  # an integration key is 32 characters
WRONG_ROUTING_KEY = "WR0NGk3y5ecret0123456789abcdef00"
HOOK_SECRET = FakeSlack.WEBHOOK_PATH.rsplit("/", 1)[1]
SECRETS = (
    *(FakeSlack.WEBHOOK_PATH, "/services/T000/B000", HOOK_SECRET),
    *(BOT_TOKEN, WRONG_BOT_TOKEN, ROUTING_KEY, WRONG_ROUTING_KEY),
)
BASE_URL = "https://langfuse.example.com"
T0 = 1_800_000_000.0


# --- events ------------------------------------------------------------------------------------------------


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, UTC)


def trace_url(trace_id: str) -> str:
    return f"{BASE_URL}/project/p1/traces/{trace_id}"


def trace_error(n: int, environment: str = "production", status: str = "boom") -> Event:
    """A `trace.updated` event for an observation of level ERROR, as the poller makes them."""
    return Event(
        id=f"trace.updated:t{n}:o{n}:1",
        type="trace.updated",
        timestamp=at(n),
        source="poll",
        data={
            "projectId": "p1",
            "traceId": f"t{n}",
            "observationId": f"o{n}",
            "name": "checkout",
            "level": "ERROR",
            "statusMessage": status,
            "environment": environment,
            "url": trace_url(f"t{n}"),
        },
    )


def score_created() -> Event:
    return Event(
        id="score.created:s1",
        type="score.created",
        timestamp=at(10),
        source="poll",
        data={
            "projectId": "p1",
            "scoreId": "s1",
            "traceId": "t10",
            "name": "helpfulness",
            "value": 0.25,
            "dataType": "NUMERIC",
            "source": "API",
            "comment": "too vague",
            "url": trace_url("t10"),
        },
    )


def generation_created() -> Event:
    return Event(
        id="generation.created:g1",
        type="generation.created",
        timestamp=at(11),
        source="poll",
        data={
            "projectId": "p1",
            "traceId": "t11",
            "observationId": "g1",
            "name": "answer",
            "model": "gpt-4o",
            "usage": {"promptTokens": 1200.0, "completionTokens": 345.0, "totalTokens": 1545.0},
            "totalCost": 0.01234,
            "latency": 2.5,
            "level": "DEFAULT",
            "url": trace_url("t11"),
        },
    )


ERROR_STORM = Rule(
    name="error-storm",
    events=("trace.updated",),
    when='data.level == "ERROR"',
    notify=("slack", "pagerduty"),
    grouping=Grouping(
        by=("data.environment",),
        wait=timedelta(0),
        interval=timedelta(minutes=5),
        resolve_after=timedelta(minutes=15),
    ),
)


class Alerts:
    """Alert groups of ERROR_STORM driven by the real group logic, on a clock the test moves."""

    def __init__(self) -> None:
        self.groups: dict[str, Any] = {}
        self.now = T0 + 100

    def match(self, event: Event) -> None:
        labels = labels_of(ERROR_STORM, event.envelope())
        key = group_key(labels)
        group = self.groups.get(key)
        if group is None or group.state == "resolved":
            group = self.groups[key] = open_group(ERROR_STORM, key, labels, self.now)
        record_match(ERROR_STORM, group, event, self.now, silenced=False)

    def tick(self, seconds: float) -> list[Event]:
        """Move the clock, then evaluate every group: the notifications due."""
        self.now += seconds
        notices: list[Event] = []
        for group in self.groups.values():
            notices += evaluate(ERROR_STORM, group, self.now, self.now)
        return notices


# --- config and delivery -----------------------------------------------------------------------------------


def config_for(tmp_path: Path, notifiers: dict[str, Any], **delivery: Any) -> Config:
    """No rules: tests queue deliveries to `notifier:NAME` themselves."""
    return parse_config(
        {
            "langfuse": {"base_url": NOWHERE, "public_key": "pk", "secret_key": "sk"},
            "state": {"path": str(tmp_path / "state.db")},
            "delivery": {"backoff": "10ms", "max_backoff": "50ms", **delivery},
            "notifiers": notifiers,
        },
        "test",
    )


def slack_webhook(slack: FakeSlack) -> dict[str, Any]:
    return {"type": "slack", "webhook_url": slack.webhook_url, "timeout": "5s"}


def slack_bot(slack: FakeSlack, channel: str = "#alerts", token: str = BOT_TOKEN) -> dict[str, Any]:
    return {"type": "slack", "token": token, "channel": channel, "api_url": slack.api_url, "timeout": "5s"}


def pagerduty(pd: FakePagerDuty, severity: str = "critical") -> dict[str, Any]:
    return {"type": "pagerduty", "routing_key": ROUTING_KEY, "severity": severity, "events_url": pd.events_url}


def queue(rt: Runtime, events: Sequence[Event], target: str) -> None:
    with rt.store.write() as tx:
        for event in events:
            tx.enqueue(event, [target])


def one_pass(rt: Runtime) -> None:
    """One delivery attempt of what is due, no waiting for retries."""
    rt.worker.kick()
    rt.worker.wait_idle(timeout=30)


def delivery(rt: Runtime, event: Event) -> tuple[str, int, str | None]:
    """(state, attempts, last error) of the one delivery of an event."""
    [(_, state, attempts, error)] = rt.store.deliveries_of(event.id)
    return state, attempts, error


def no_secret_in(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"secret {secret!r} in {text!r}"


# --- reading Block Kit -------------------------------------------------------------------------------------


def blocks_of(request: Recorded) -> list[dict[str, Any]]:
    blocks = request.body["blocks"]
    assert block_kit_error(blocks) is None
    return list(blocks)


def of_type(blocks: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [b for b in blocks if b["type"] == kind]


def header(blocks: list[dict[str, Any]]) -> str:
    [block] = of_type(blocks, "header")
    assert blocks[0] is block and block["text"]["type"] == "plain_text"
    return str(block["text"]["text"])


def fields(blocks: list[dict[str, Any]]) -> dict[str, str]:
    """The facts section's fields, label -> value ("*Label*\\nvalue")."""
    [section] = [b for b in blocks if b["type"] == "section" and "fields" in b]
    facts = {}
    for field in section["fields"]:
        assert field["type"] == "mrkdwn"
        label, value = field["text"].split("\n", 1)
        assert label.startswith("*") and label.endswith("*"), field
        facts[label.strip("*")] = value
    return facts


def button(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    [actions] = of_type(blocks, "actions")
    [element] = actions["elements"]
    assert element["type"] == "button"
    return dict(element)


def section_texts(blocks: list[dict[str, Any]]) -> list[str]:
    return [b["text"]["text"] for b in blocks if b["type"] == "section" and "text" in b]


# --- the stand-ins themselves ------------------------------------------------------------------------------


def test_the_stand_ins_refuse_what_slack_and_pagerduty_refuse() -> None:
    assert block_kit_error([{"type": "header", "text": {"type": "plain_text", "text": "x" * 150}}]) is None
    assert "150" in str(block_kit_error([{"type": "header", "text": {"type": "plain_text", "text": "x" * 151}}]))
    assert block_kit_error([{"type": "header", "text": {"type": "mrkdwn", "text": "*x*"}}])
    eleven = [{"type": "mrkdwn", "text": f"*f{n}*\nv"} for n in range(11)]
    assert "fields" in str(block_kit_error([{"type": "section", "fields": eleven}]))
    assert block_kit_error([{"type": "section", "fields": eleven[:10]}]) is None
    assert "50" in str(block_kit_error([{"type": "divider"}] * 51))
    assert block_kit_error([{"type": "nonsense"}])

    with FakeSlack() as slack, FakePagerDuty(routing_keys=[ROUTING_KEY]) as pd:
        too_long = {"blocks": [{"type": "header", "text": {"type": "plain_text", "text": "x" * 151}}]}
        answer = httpx.post(slack.webhook_url, json=too_long)
        assert (answer.status_code, answer.text) == (400, "invalid_blocks")
        assert httpx.post(slack.webhook_url, json={"text": "hi"}).text == "ok"
        answer = httpx.post(slack.api_url + "chat.postMessage", json={"channel": "#alerts", "text": "hi"})
        assert answer.json() == {"ok": False, "error": "not_authed"}
        slack.fail_next(429, retry_after=7)
        answer = httpx.post(slack.webhook_url, json={"text": "hi"})
        assert (answer.status_code, answer.headers["retry-after"]) == (429, "7")

        good: dict[str, Any] = {"routing_key": ROUTING_KEY, "event_action": "trigger", "dedup_key": "k1"}
        good["payload"] = {"summary": "s", "source": "src", "severity": "error"}
        answer = httpx.post(pd.events_url, json=good)
        assert answer.status_code == 202 and answer.json()["dedup_key"] == "k1"
        for bad in (
            {**good, "routing_key": WRONG_ROUTING_KEY},
            {**good, "event_action": "fire"},
            {**good, "payload": {"summary": "s", "source": "src", "severity": "fatal"}},
            {"routing_key": ROUTING_KEY, "event_action": "resolve"},
        ):
            answer = httpx.post(pd.events_url, json=bad)
            assert answer.status_code == 400 and answer.json()["status"] == "invalid event", bad
            assert WRONG_ROUTING_KEY not in answer.text
        assert len(pd.events()) == 1 and len(pd.received()) == 5


# --- Slack: incoming webhook -------------------------------------------------------------------------------


def test_slack_webhook_posts_an_error_with_its_facts_and_a_view_trace_button(tmp_path: Path) -> None:
    error = trace_error(1, status="RateLimitError: 429 <openai> & retries exhausted")
    with FakeSlack() as slack, runtime(config_for(tmp_path, {"slack": slack_webhook(slack)})) as rt:
        queue(rt, [error], "notifier:slack")
        one_pass(rt)
        assert delivery(rt, error) == ("done", 1, None)
    [post] = slack.webhook_posts()
    assert post.status == 200 and post.headers["content-type"].startswith("application/json")
    blocks = blocks_of(post)
    assert header(blocks) == "🔴 Error in trace checkout"
    facts = fields(blocks)
    assert facts["Trace"] == "checkout" and facts["Level"] == "ERROR" and facts["Environment"] == "production"
    # mrkdwn: &, < and > are escaped, as Slack asks
    assert facts["Status message"] == "RateLimitError: 429 &lt;openai&gt; &amp; retries exhausted"
    assert button(blocks) == {
        "type": "button",
        "text": {"type": "plain_text", "text": "View trace"},
        "url": trace_url("t1"),
        "action_id": "view_trace",
    }
    [context] = of_type(blocks, "context")
    assert error.id in context["elements"][0]["text"]
    # the notification text (what a phone shows) says the same
    assert "Error in trace checkout" in post.body["text"] and "RateLimitError" in post.body["text"]
    assert post.body["unfurl_links"] is False


def test_slack_webhook_shows_score_values_and_generation_usage(tmp_path: Path) -> None:
    with FakeSlack() as slack, runtime(config_for(tmp_path, {"slack": slack_webhook(slack)})) as rt:
        queue(rt, [score_created(), generation_created()], "notifier:slack")
        one_pass(rt)
    score, generation = (blocks_of(post) for post in slack.webhook_posts())
    assert header(score) == "📉 Score helpfulness = 0.25"
    assert fields(score) == {
        "Score": "helpfulness",
        "Value": "0.25",
        "Data type": "NUMERIC",
        "Source": "API",
        "Comment": "too vague",
    }
    assert button(score)["url"] == trace_url("t10")
    assert header(generation) == "Generation answer (gpt-4o)"
    facts = fields(generation)
    assert facts["Model"] == "gpt-4o"
    assert facts["Tokens"] == "1200 in / 345 out / 1545 total"
    assert facts["Cost"] == "$0.01234"
    assert facts["Latency"] == "2.5 s"


def test_slack_alert_shows_count_first_last_and_sample_links_then_resolves(tmp_path: Path) -> None:
    alerts = Alerts()
    alerts.match(trace_error(1, status="timeout"))
    alerts.match(trace_error(2, status="rate limited"))
    [firing] = alerts.tick(0)
    [resolved] = alerts.tick(15 * 60)
    assert (firing.type, resolved.type) == ("rule.firing", "rule.resolved")

    with FakeSlack() as slack, runtime(config_for(tmp_path, {"slack": slack_webhook(slack)})) as rt:
        queue(rt, [firing, resolved], "notifier:slack")
        one_pass(rt)
    first, last = (blocks_of(post) for post in slack.webhook_posts())

    assert header(first) == "🔥 error-storm [environment=production]: 2 matches"
    facts = fields(first)
    assert "Rule" not in facts, "the rule is in the header; the ten fields go to the facts"
    assert facts["Group"] == "environment=production"
    assert facts["Matches"] == "2"
    assert facts["First"] == firing.data["firstAt"] and facts["First"].startswith(at(1).strftime("%Y-%m-%dT%H:%M:%S"))
    assert facts["Last"] == firing.data["lastAt"] and facts["Last"].startswith(at(2).strftime("%Y-%m-%dT%H:%M:%S"))
    assert facts["Status message"] == "rate limited"  # the facts of the latest match
    [samples] = [text for text in section_texts(first) if text.startswith("*Latest matches*")]
    for n in (1, 2):
        assert f"<{trace_url(f't{n}')}|checkout at " in samples
    assert button(first)["url"] == trace_url("t2")

    assert header(last).startswith("✅ Resolved: error-storm [environment=production]")
    assert "Resolved" in slack.webhook_posts()[1].body["text"]
    assert not [text for text in section_texts(last) if text.startswith("*Latest matches*")]


def test_slack_webhook_keeps_long_and_many_facts_within_block_kit_limits(tmp_path: Path) -> None:
    huge = Event(
        "trace.updated:big:o:1",
        "trace.updated",
        at(5),
        "poll",
        {
            "name": "n" * 400,
            "level": "ERROR",
            "statusMessage": "<&>" * 3000,
            "environment": "e" * 600,
            "userId": "u",
            "body": "b" * 5000,
            "url": trace_url("big"),
        },
    )
    with FakeSlack() as slack, runtime(config_for(tmp_path, {"slack": slack_webhook(slack)})) as rt:
        queue(rt, [huge], "notifier:slack")
        one_pass(rt)
        assert delivery(rt, huge)[0] == "done", slack.refusals
    [post] = slack.webhook_posts()
    assert post.status == 200 and slack.refusals == []


def test_slack_short_retry_after_is_waited_out_in_place(tmp_path: Path) -> None:
    error = trace_error(1)
    with FakeSlack() as slack, runtime(config_for(tmp_path, {"slack": slack_webhook(slack)})) as rt:
        slack.fail_next(429, retry_after=1)
        started = time.monotonic()
        queue(rt, [error], "notifier:slack")
        one_pass(rt)
        elapsed = time.monotonic() - started
        # one delivery attempt, retried inside it by slack-sdk after the server's Retry-After
        assert delivery(rt, error) == ("done", 1, None)
    assert [r.status for r in slack.received()] == [429, 200]
    assert 1.0 <= elapsed < 5.0


def test_slack_long_retry_after_goes_back_to_the_queue_and_nothing_is_lost(tmp_path: Path) -> None:
    error = trace_error(1)
    config = config_for(tmp_path, {"slack": slack_webhook(slack := FakeSlack())})
    with slack:
        notifier = build_notifier(config.notifiers["slack"])
        slack.fail_next(429, retry_after=30)
        started = time.monotonic()
        with pytest.raises(DeliveryError) as failure:
            notifier.send(error)
        assert time.monotonic() - started < 5.0  # not slept through
        assert failure.value.retryable and failure.value.retry_after == 30
        assert "429" in str(failure.value)
        no_secret_in(str(failure.value))
        assert len(slack.received()) == 1

        with runtime(config) as rt:
            slack.fail_next(429, retry_after=30)
            queue(rt, [error], "notifier:slack")
            before = time.time()
            rt.worker.run_until_idle()  # returns: a retry 30 s away is left for later
            state, attempts, last_error = delivery(rt, error)
            assert (state, attempts) == ("pending", 1) and "429" in str(last_error)
            next_at = rt.store.next_due_at("notifier:slack")
            assert next_at is not None and next_at >= before + 30
            assert rt.store.dead_letter_count() == 0
        assert [r.status for r in slack.received()] == [429, 429]


def test_slack_server_errors_are_retried_and_delivered(tmp_path: Path) -> None:
    once, twice = trace_error(1), trace_error(2)
    with FakeSlack() as slack, runtime(config_for(tmp_path, {"slack": slack_webhook(slack)})) as rt:
        slack.fail_next(500)
        queue(rt, [once], "notifier:slack")
        one_pass(rt)
        assert delivery(rt, once) == ("done", 1, None)  # retried in place by slack-sdk
        assert [r.status for r in slack.received()] == [500, 200]

        slack.fail_next(503, count=2)
        queue(rt, [twice], "notifier:slack")
        one_pass(rt)
        drain_until(rt, lambda: delivery(rt, twice)[0] == "done", timeout=10)
        # slack-sdk retried the 503 once in place; the second 503 went back to the queue, whose retry succeeded
        assert delivery(rt, twice)[:2] == ("done", 2)
    assert [r.status for r in slack.received()] == [500, 200, 503, 503, 200]


def test_slack_channel_not_found_is_a_dead_letter_at_once(tmp_path: Path) -> None:
    error = trace_error(1)
    with FakeSlack() as slack, runtime(config_for(tmp_path, {"slack": slack_webhook(slack)})) as rt:
        slack.fail_next(404, error="channel_not_found")
        queue(rt, [error], "notifier:slack")
        rt.worker.run_until_idle()
        assert delivery(rt, error)[:2] == ("dead", 1)
        [letter] = rt.store.dead_letters()
    assert "404" in letter.error and "channel_not_found" in letter.error
    no_secret_in(letter.error)
    assert len(slack.received()) == 1


# --- Slack: bot token (chat.postMessage) -------------------------------------------------------------------


def test_slack_bot_posts_with_its_token_to_its_channel(tmp_path: Path) -> None:
    error = trace_error(1)
    with FakeSlack(token=BOT_TOKEN) as slack, runtime(config_for(tmp_path, {"slack": slack_bot(slack)})) as rt:
        queue(rt, [error], "notifier:slack")
        one_pass(rt)
        assert delivery(rt, error) == ("done", 1, None)
    [post] = slack.api_posts()
    assert post.headers["authorization"] == f"Bearer {BOT_TOKEN}"
    assert post.body["channel"] == "#alerts"
    blocks = blocks_of(post)
    assert header(blocks) == "🔴 Error in trace checkout"
    assert fields(blocks)["Status message"] == "boom"
    assert button(blocks)["url"] == trace_url("t1")
    assert "Error in trace checkout" in post.body["text"]


def test_slack_bot_errors_dead_letter_or_retry_as_slack_means_them(tmp_path: Path) -> None:
    lost, refused, limited = trace_error(1), trace_error(2), trace_error(3)
    notifiers = {
        "lost": slack_bot(slack := FakeSlack(token=BOT_TOKEN), channel="#nowhere"),
        "refused": slack_bot(slack, token=WRONG_BOT_TOKEN),
        "limited": slack_bot(slack),
    }
    with slack, runtime(config_for(tmp_path, notifiers)) as rt:
        # one target at a time: the stand-in's script is shared
        queue(rt, [lost], "notifier:lost")
        one_pass(rt)
        queue(rt, [refused], "notifier:refused")
        one_pass(rt)
        slack.fail_next(429, retry_after=30)
        queue(rt, [limited], "notifier:limited")
        one_pass(rt)

        assert delivery(rt, lost)[:2] == ("dead", 1) and "channel_not_found" in str(delivery(rt, lost)[2])
        assert delivery(rt, refused)[:2] == ("dead", 1) and "invalid_auth" in str(delivery(rt, refused)[2])
        state, attempts, last_error = delivery(rt, limited)
        assert (state, attempts) == ("pending", 1) and "429" in str(last_error)
        next_at = rt.store.next_due_at("notifier:limited")
        assert next_at is not None and next_at >= time.time() + 25
        for letter in rt.store.dead_letters():
            no_secret_in(letter.error)
    answers = [(r.headers["authorization"], r.status, r.body["channel"]) for r in slack.api_posts()]
    assert answers == [
        (f"Bearer {BOT_TOKEN}", 200, "#nowhere"),
        (f"Bearer {WRONG_BOT_TOKEN}", 200, "#alerts"),
        (f"Bearer {BOT_TOKEN}", 429, "#alerts"),
    ]


# --- PagerDuty ---------------------------------------------------------------------------------------------


def test_pagerduty_triggers_one_incident_per_group_and_resolves_it(tmp_path: Path) -> None:
    alerts = Alerts()
    alerts.match(trace_error(1, "production"))
    alerts.match(trace_error(2, "staging"))
    first = alerts.tick(0)  # production and staging: one notification each
    alerts.match(trace_error(3, "production"))
    update = alerts.tick(5 * 60)  # production again, with the new match
    alerts.match(trace_error(4, "staging"))
    later = alerts.tick(11 * 60)  # production resolves (15 min without a match); staging's update
    notices = [*first, *update, *later]
    kinds = [(n.type, n.data["group"]["data.environment"], n.data["reason"]) for n in notices]
    assert kinds == [
        ("rule.firing", "production", "new"),
        ("rule.firing", "staging", "new"),
        ("rule.firing", "production", "update"),
        ("rule.resolved", "production", "resolved"),
        ("rule.firing", "staging", "update"),
    ]
    production, staging = notices[0].data["dedupKey"], notices[1].data["dedupKey"]
    assert production != staging

    with FakePagerDuty(routing_keys=[ROUTING_KEY]) as pd:
        with runtime(config_for(tmp_path, {"pagerduty": pagerduty(pd, severity="critical")})) as rt:
            for notice in notices:  # one at a time: the order PagerDuty sees is the order of the alerts
                queue(rt, [notice], "notifier:pagerduty")
                one_pass(rt)
            assert rt.store.queue_depth() == 0 and rt.store.dead_letter_count() == 0
        sent = pd.events()
    assert len(sent) == 5 and all(r.status == 202 for r in pd.received())
    assert [(e["event_action"], e["dedup_key"]) for e in sent] == [
        ("trigger", production),
        ("trigger", staging),
        ("trigger", production),
        ("resolve", production),
        ("trigger", staging),
    ]
    assert all(e["routing_key"] == ROUTING_KEY for e in sent)

    trigger = sent[2]
    payload = trigger["payload"]
    assert payload["severity"] == "critical" and payload["source"] == "langfuse-poller"
    assert payload["summary"].startswith("🔥 error-storm [environment=production]: 2 matches")
    assert payload["component"] == "error-storm" and "production" in payload["group"]
    details = payload["custom_details"]
    assert details["Rule"] == "error-storm" and details["Matches"] == "2 (+1 new)"
    assert [s["traceId"] for s in details["samples"]] == ["t1", "t3"]
    assert [link["href"] for link in trigger["links"]] == [trace_url("t1"), trace_url("t3")]
    assert trigger["client_url"] == trace_url("t3")
    assert sent[3] == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": production}


def test_pagerduty_forwards_a_single_event_keyed_by_its_id(tmp_path: Path) -> None:
    error = trace_error(7)
    with FakePagerDuty() as pd, runtime(config_for(tmp_path, {"pagerduty": pagerduty(pd, "warning")})) as rt:
        queue(rt, [error], "notifier:pagerduty")
        one_pass(rt)
    [sent] = pd.events()
    assert sent["event_action"] == "trigger" and sent["dedup_key"] == error.id
    assert sent["payload"]["severity"] == "warning"
    assert sent["payload"]["custom_details"]["event"]["data"]["statusMessage"] == "boom"
    assert sent["links"] == [{"href": trace_url("t7"), "text": "View trace in Langfuse"}]


def test_pagerduty_throttling_and_server_errors_retry_and_bad_events_dead_letter(tmp_path: Path) -> None:
    throttled, flaky, refused = trace_error(1), trace_error(2), trace_error(3)
    with FakePagerDuty() as pd, runtime(config_for(tmp_path, {"pagerduty": pagerduty(pd)})) as rt:
        pd.fail_next(429)
        queue(rt, [throttled], "notifier:pagerduty")
        one_pass(rt)
        drain_until(rt, lambda: delivery(rt, throttled)[0] == "done", timeout=10)
        assert delivery(rt, throttled)[:2] == ("done", 2)

        pd.fail_next(500)
        queue(rt, [flaky], "notifier:pagerduty")
        drain_until(rt, lambda: delivery(rt, flaky)[0] == "done", timeout=10)
        assert delivery(rt, flaky)[:2] == ("done", 2)

        pd.fail_next(400, error="'payload.summary' is missing or blank")
        queue(rt, [refused], "notifier:pagerduty")
        rt.worker.run_until_idle()
        assert delivery(rt, refused)[:2] == ("dead", 1)
        [letter] = rt.store.dead_letters()
        assert "HTTP 400" in letter.error and "summary" in letter.error
        no_secret_in(letter.error)
    assert [r.status for r in pd.received()] == [429, 202, 500, 202, 400]


def test_pagerduty_a_wrong_routing_key_is_a_dead_letter_that_does_not_show_the_key(tmp_path: Path) -> None:
    error = trace_error(1)
    notifier = {**pagerduty(pd := FakePagerDuty(routing_keys=[ROUTING_KEY])), "routing_key": WRONG_ROUTING_KEY}
    with pd, runtime(config_for(tmp_path, {"pagerduty": notifier})) as rt:
        queue(rt, [error], "notifier:pagerduty")
        rt.worker.run_until_idle()
        [letter] = rt.store.dead_letters()
    assert "HTTP 400" in letter.error and "Invalid routing key" in letter.error
    no_secret_in(letter.error)
    assert len(pd.received()) == 1


# --- config errors -----------------------------------------------------------------------------------------

CONFIG_ERRORS = {
    "slack without webhook_url or token": ({"type": "slack"}, "notifiers.slack.webhook_url"),
    "slack with webhook_url and token": (
        {"type": "slack", "webhook_url": "https://hooks.slack.com" + FakeSlack.WEBHOOK_PATH, "token": BOT_TOKEN},
        "notifiers.slack.webhook_url",
    ),
    "slack token without channel": ({"type": "slack", "token": BOT_TOKEN}, "notifiers.slack.channel"),
    "slack webhook_url that is no URL": (
        {"type": "slack", "webhook_url": "hooks.slack.com" + FakeSlack.WEBHOOK_PATH},
        "notifiers.slack.webhook_url",
    ),
    "slack empty token": ({"type": "slack", "token": " ", "channel": "#a"}, "notifiers.slack.token"),
    "pagerduty without routing_key": ({"type": "pagerduty"}, "notifiers.pagerduty.routing_key"),
    "pagerduty bad severity": (
        {"type": "pagerduty", "routing_key": ROUTING_KEY, "severity": "fatal"},
        "notifiers.pagerduty.severity",
    ),
    "pagerduty events_url that is no URL": (
        {"type": "pagerduty", "routing_key": ROUTING_KEY, "events_url": "events.pagerduty.com"},
        "notifiers.pagerduty.events_url",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors_name_the_key_and_never_the_secret(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PAGERDUTY_ROUTING_KEY", raising=False)
    table, key = CONFIG_ERRORS[case]
    name = key.split(".")[1]
    with pytest.raises(ConfigError) as raised:
        config_for(tmp_path, {name: table})
    assert raised.value.key == key, str(raised.value)
    assert f"test: {key}: expected " in str(raised.value)
    no_secret_in(str(raised.value))
    no_secret_in(repr(raised.value.found))


def test_secrets_come_from_files_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text(BOT_TOKEN + "\n")
    monkeypatch.setenv("PAGERDUTY_ROUTING_KEY", ROUTING_KEY)
    config = config_for(
        tmp_path,
        {
            "slack": {"type": "slack", "token_file": str(tmp_path / "token"), "channel": "#alerts"},
            "pagerduty": {"type": "pagerduty"},
        },
    )
    slack, pd = config.notifiers["slack"].settings, config.notifiers["pagerduty"].settings
    assert slack.token.reveal() == BOT_TOKEN and slack.api_url == "https://slack.com/api/"
    assert pd.routing_key.reveal() == ROUTING_KEY and pd.severity == "error"
    assert pd.events_url == "https://events.pagerduty.com/v2/enqueue"
    no_secret_in(repr(config))


# --- the command line: send-test-event, secrets never printed ----------------------------------------------


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "PAGERDUTY_"))}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return Cli(env)


def run_all(cli: Cli, calls: Mapping[str, tuple[Sequence[str | Path], Mapping[str, str] | None]]) -> dict[str, Result]:
    """Run independent `langfuse-poller` calls at once, through the installed console script."""
    started: dict[str, Started] = {
        name: cli.start(*map(str, args), env=env, exe=[str(SCRIPT)]) for name, (args, env) in calls.items()
    }
    results = {name: Cli.finish(proc, timeout=30) for name, proc in started.items()}
    leaks = [(name, secret) for name, result in results.items() for secret in SECRETS if secret in result.output]
    assert not leaks, "\n\n".join([f"secrets printed: {leaks}", *(str(results[name]) for name in dict(leaks))])
    return results


def send_test_event(tmp_path: Path, case: str, notifier: str, values: Mapping[str, str], *extra: str) -> list[str]:
    """`send-test-event --notifier NAME` with a config (of its own, and its own state) holding that notifier."""
    table = f"[notifiers.{notifier}]\n" + "".join(f"{key} = {q(value)}\n" for key, value in values.items())
    path = write_config(tmp_path / f"{case.replace(' ', '-').replace(',', '')}.toml", NOWHERE, table)
    return ["send-test-event", "--notifier", notifier, *extra, "--config", str(path)]


@pytest.fixture
def slack_ok() -> Iterator[FakeSlack]:
    with FakeSlack(token=BOT_TOKEN) as slack:
        yield slack


def test_send_test_event_to_slack_never_prints_the_webhook_url_or_token(
    cli: Cli, tmp_path: Path, slack_ok: FakeSlack
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    with FakeSlack() as refusing, FakeSlack() as flaky, FakeSlack() as debugged:
        refusing.fail_next(404, count=5, error="channel_not_found")
        flaky.fail_next(500)  # slack-sdk retries in place, and logs that it does
        debugged.fail_next(503)
        hook = {"type": "slack", "timeout": "5s"}
        bot = {**hook, "token": BOT_TOKEN, "channel": "#alerts"}
        calls = {
            "hook ok": {**hook, "webhook_url": slack_ok.webhook_url},
            "hook 404": {**hook, "webhook_url": refusing.webhook_url},
            "hook closed": {**hook, "webhook_url": dead + FakeSlack.WEBHOOK_PATH},
            "hook retried": {**hook, "webhook_url": flaky.webhook_url},
            "hook retried, debug log": {**hook, "webhook_url": debugged.webhook_url},
            "bot ok": {**bot, "api_url": slack_ok.api_url},
            "bot wrong token": {**bot, "api_url": slack_ok.api_url, "token": WRONG_BOT_TOKEN},
            "bot closed": {**bot, "api_url": dead + "/api/"},
            "both set": {**bot, "webhook_url": slack_ok.webhook_url},
        }
        extra = {"hook retried, debug log": ("--log-level", "debug")}
        results = run_all(
            cli,
            {
                case: (send_test_event(tmp_path, case, "slack", values, *extra.get(case, ())), None)
                for case, values in calls.items()
            },
        )

    for name in ("hook ok", "bot ok", "hook retried", "hook retried, debug log"):
        result = results[name]
        assert result.returncode == 0, str(result)
        assert result.stdout.startswith("sent trace.created:test-") and "to notifier:slack" in result.stdout
    [hook_post] = slack_ok.webhook_posts()
    # the commands ran at once: their requests arrive in any order
    [bot_post, wrong_token] = sorted(
        slack_ok.api_posts(), key=lambda r: r.headers["authorization"] != f"Bearer {BOT_TOKEN}"
    )
    assert header(blocks_of(hook_post)) == "Trace langfuse-poller test event"
    assert bot_post.headers["authorization"] == f"Bearer {BOT_TOKEN}" and bot_post.body["channel"] == "#alerts"
    assert header(blocks_of(bot_post)) == "Trace langfuse-poller test event"
    assert wrong_token.headers["authorization"] == f"Bearer {WRONG_BOT_TOKEN}"
    assert [r.status for r in flaky.received()] == [500, 200]
    assert [r.status for r in debugged.received()] == [503, 200]

    for name, why in (
        ("hook 404", "HTTP 404 (channel_not_found)"),
        ("hook closed", "cannot reach the Slack webhook"),
        ("bot wrong token", "invalid_auth"),
        ("bot closed", "cannot reach Slack at"),
    ):
        result = results[name]
        assert result.returncode == 1, str(result)
        assert "FAILED notifier:slack: " in result.stderr and why in result.stderr, str(result)
    assert len(refusing.received()) == 1  # refused for good: not retried

    both = results["both set"]
    assert both.returncode == 2, str(both)
    assert "notifiers.slack.webhook_url" in both.stderr and "both set" in both.stderr


def test_send_test_event_to_pagerduty_never_prints_the_routing_key(cli: Cli, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{closed_port()}/v2/enqueue"
    with FakePagerDuty(routing_keys=[ROUTING_KEY]) as pd:
        table = {"type": "pagerduty", "events_url": pd.events_url, "severity": "info"}
        calls = {
            "ok": ({**table, "routing_key": ROUTING_KEY}, None),
            "from env": (table, {"PAGERDUTY_ROUTING_KEY": ROUTING_KEY}),
            "wrong key": ({**table, "routing_key": WRONG_ROUTING_KEY}, None),
            "closed": ({**table, "events_url": dead, "routing_key": ROUTING_KEY}, None),
            "bad severity": ({**table, "severity": "sev1", "routing_key": ROUTING_KEY}, None),
        }
        results = run_all(
            cli,
            {case: (send_test_event(tmp_path, case, "pd", values), env) for case, (values, env) in calls.items()},
        )
        received = pd.received()

    for name in ("ok", "from env"):
        assert results[name].returncode == 0, str(results[name])
        assert "to notifier:pd" in results[name].stdout
    accepted = [r.body for r in received if r.status == 202]
    assert len(accepted) == 2 and len(received) == 3
    for event in accepted:
        assert event["routing_key"] == ROUTING_KEY and event["event_action"] == "trigger"
        assert event["dedup_key"].startswith("trace.created:test-")
        assert event["payload"]["severity"] == "info" and "langfuse-poller test event" in event["payload"]["summary"]

    for name, why in (("wrong key", "HTTP 400"), ("closed", "cannot reach PagerDuty")):
        assert results[name].returncode == 1, str(results[name])
        assert "FAILED notifier:pd: " in results[name].stderr and why in results[name].stderr, str(results[name])
    bad = results["bad severity"]
    assert bad.returncode == 2 and "notifiers.pd.severity" in bad.stderr and "'sev1'" in bad.stderr, str(bad)
