"""The testing kit users write their handler tests with, and the `demo` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from langfuse_poller import Registry
from langfuse_poller.testing import FakeLangfuse, PollHarness


def test_the_readme_example_passes() -> None:
    """The example of the README's "Testing your handlers", as a user would write it."""
    handlers = Registry()
    flagged = []

    @handlers.on("score.created")
    def low_score(event):  # type: ignore[no-untyped-def]
        if event.data["value"] < 0.5:
            flagged.append(event.data["name"])

    with FakeLangfuse() as langfuse, PollHarness(langfuse, handlers=handlers) as harness:
        langfuse.add_score(name="helpfulness", value=0.2)
        langfuse.add_score(name="helpfulness", value=0.9)
        events = harness.poll()
    assert [e.type for e in events] == ["score.created", "score.created"]
    assert flagged == ["helpfulness"]


def test_the_harness_sees_late_records_once_and_runs_rules() -> None:
    seen = []
    handlers = Registry()
    handlers.register(seen.append, ["trace.updated"], name="errors")
    with FakeLangfuse() as langfuse:
        clock = [1_800_000_000.0]
        langfuse.clock = lambda: clock[0]
        rules = [
            {
                "name": "errors",
                "events": ["trace.updated"],
                "group_wait": "0s",
                "group_interval": "1m",
                "notify": ["log"],
            }
        ]
        with PollHarness(
            langfuse, handlers=handlers, rules=rules, notifiers={"log": {"type": "log"}}, poll={"reread": ["1m"]}
        ) as harness:
            clock[0] += 10
            langfuse.add_trace(trace_id="late", level="ERROR", visible_after=30)
            langfuse.add_trace(trace_id="prompt", level="ERROR")
            clock[0] += 1
            first = harness.poll()
            assert [(e.type, e.data["traceId"]) for e in first if e.type == "trace.updated"] == [
                ("trace.updated", "prompt")
            ]
            # visible 30 s late: the next poll's re-read finds it, once
            clock[0] += 90
            second = harness.poll()
            assert [e.data["traceId"] for e in second if e.type == "trace.updated"] == ["late"]
            assert harness.poll() == []
            alerts = harness.alerts()
    assert [e.data["traceId"] for e in seen] == ["prompt", "late"]
    assert [(a.type, a.data["count"]) for a in alerts] == [("rule.firing", 1), ("rule.firing", 2)]


def test_demo_shows_events_and_alerts_then_a_summary(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGFUSE_")}
    # no config anywhere: the demo needs none
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_STATE_HOME=str(tmp_path / "state"))
    result = subprocess.run(
        [sys.executable, "-m", "langfuse_poller", "demo", "--duration", "6", "--seed", "7"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert any(" event    trace.created" in line for line in lines), result.stdout
    assert any(" event    score.created" in line for line in lines), result.stdout
    summary = next(line for line in lines if line.startswith("summary: "))
    assert "traces and" in summary and "events delivered: " in summary and "alerts sent: " in summary
    assert "trace.created" in summary and "API requests: observations" in summary
    assert not (tmp_path / "state").exists(), "the demo keeps its state in a temporary directory"
    # the story: a user's agent loop runs away, and the cost-per-user rule warns, then fires, for that user
    story = [line for line in lines if " story " in line or (" ALERT " in line and "cost-per-user" in line)]
    assert "user-13's agent loop runs away" in story[0], result.stdout
    alerts = [line.split(" ALERT ", 1)[1] for line in story if " ALERT " in line]
    assert [alert.split(":", 1)[0].strip() for alert in alerts][:2] == [
        "🟠 cost-per-user [userId=user-13]",
        "🔥 cost-per-user [userId=user-13]",
    ], result.stdout
    assert "sum over 10s" in alerts[0] and "Threshold: 0.2" in alerts[0] and "Threshold: 0.5" in alerts[1]
