"""Alerting from the command line: `test-rule` dry runs, `silence add/list/expire`, grouped alerts from `once`,
and what `status` says about open groups and silences. Real subprocesses against the loopback Langfuse."""

# the fixtures `cli` and `langfuse` come from test_cli, and each test names them as parameters
# ruff: noqa: F811

from __future__ import annotations

import json
import signal
from pathlib import Path

from langfuse_poller.testing.fake_langfuse import FakeLangfuse

from .test_cli import Cli, ago, cli, jsonl, langfuse, read_jsonl, rule, wait_for, write_config  # noqa: F401


def grouped_rule(name: str, notify: str, **keys: object) -> str:
    text = rule(name, ["trace.updated"], [notify], 'data.level == "ERROR"')
    return text + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())


def test_test_rule_replays_langfuse_and_sends_nothing(cli: Cli, tmp_path: Path, langfuse: FakeLangfuse) -> None:
    for n in range(6):
        langfuse.add_trace(level="ERROR", name="checkout", environment="production", start_time=ago(3000 - n * 60))
    for n in range(2):
        langfuse.add_trace(level="DEFAULT", name="checkout", start_time=ago(2000 - n))
    langfuse.add_trace(level="ERROR", name="search", environment="production", start_time=ago(600))
    alerts = tmp_path / "alerts.jsonl"
    path = write_config(
        tmp_path / "config.toml",
        langfuse.url,
        jsonl("alerts", alerts)
        + grouped_rule("errors", "alerts", group_by=["data.name"], group_wait="30s", resolve_after="15m"),
    )
    text = cli("test-rule", "errors", "--since", "-2h", "--config", path)
    assert text.returncode == 0, str(text)
    assert "7 matched" in text.stdout, text
    # the search group opened 10 minutes ago and resolves after 15: still open when the range ends
    assert "would send 4 notifications to alerts for 7 matches; 1 groups still open at the end" in text.stdout
    assert "nothing was sent" in text.stdout
    as_json = cli("test-rule", "errors", "--since", "-2h", "--json", "--config", path)
    notices = [json.loads(line) for line in as_json.stdout.splitlines()]
    resolved = {n["data"]["group"]["data.name"]: n["data"]["count"] for n in notices if n["event"] == "rule.resolved"}
    assert resolved == {"checkout": 6}
    # checkout errors come a minute apart: the first after group_wait holds one, the update after
    # group_interval (5m) holds all six, and the resolve comes 15m after the last
    checkout = [
        (n["data"]["reason"], n["data"]["count"]) for n in notices if n["data"]["group"]["data.name"] == "checkout"
    ]
    assert checkout == [("new", 1), ("update", 6), ("resolved", 6)]
    assert "dry run" not in text.stderr and "alert errors" not in text.stderr, "a dry run logs no alert as sent"
    # nothing sent, no state written
    assert not alerts.exists()
    assert not (tmp_path / "config.db").exists()


def test_test_rule_reads_envelopes_from_a_file(cli: Cli, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    lines = [
        {
            "id": f"score.created:s{n}",
            "event": "score.created",
            "timestamp": f"2026-11-27T10:00:{n:02d}Z",
            "source": "poll",
            "data": {"name": "helpfulness", "value": n / 10, "dataType": "NUMERIC"},
        }
        for n in range(10)
    ]
    events.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n", encoding="utf-8")
    path = write_config(
        tmp_path / "config.toml",
        "http://127.0.0.1:9",
        jsonl("archive", tmp_path / "archive.jsonl")
        + rule("low", ["score.created"], ["archive"], 'data.dataType == "NUMERIC" && data.value < 0.5'),
    )
    result = cli("test-rule", "low", "--events", events, "--config", path)
    assert result.returncode == 0, str(result)
    assert "10 events read" in result.stdout and "5 matched" in result.stdout, str(result)
    assert "would send 5 events to archive" in result.stdout
    assert "1 lines were not event envelopes" in result.stdout
    missing = cli("test-rule", "nope", "--events", events, "--config", path)
    assert missing.returncode == 2 and "rule" in missing.stderr and "low" in missing.stderr, str(missing)
    unreadable = cli("test-rule", "low", "--events", tmp_path / "missing.jsonl", "--config", path)
    assert unreadable.returncode == 2 and "--events" in unreadable.stderr, str(unreadable)


def test_silence_add_list_expire(cli: Cli, tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "config.toml",
        "http://127.0.0.1:9",
        jsonl("alerts", tmp_path / "alerts.jsonl") + grouped_rule("errors", "alerts"),
    )
    added = cli(
        "silence",
        "add",
        "--rule",
        "errors",
        "--for",
        "2h",
        "--when",
        'data.environment == "staging"',
        "--comment",
        "deploy in progress",
        "--config",
        path,
    )
    assert added.returncode == 0 and "silence 1: rule errors silenced for 2h 0m" in added.stdout, str(added)
    listed = cli("silence", "list", "--config", path)
    assert "active" in listed.stdout and 'when data.environment == "staging"' in listed.stdout, str(listed)
    assert "deploy in progress" in listed.stdout
    status = cli("status", "--json", "--config", path)
    assert [s["rule"] for s in json.loads(status.stdout)["silences"]] == ["errors"]

    for bad, key in (
        (["--rule", "nope", "--for", "1h"], "rule"),
        (["--rule", "errors", "--for", "soon"], "--for"),
        (["--rule", "errors", "--for", "1h", "--when", "data.level == == 1"], "--when"),
    ):
        refused = cli("silence", "add", *bad, "--config", path)
        assert refused.returncode == 2 and key in refused.stderr, str(refused)

    expired = cli("silence", "expire", "1", "--config", path)
    assert expired.returncode == 0 and "silence 1 expired" in expired.stdout
    again = cli("silence", "expire", "1", "--config", path)
    assert again.returncode == 1 and "no active silence" in again.stderr
    assert "no silences" in cli("silence", "list", "--config", path).stdout
    everything = cli("silence", "list", "--all", "--json", "--config", path)
    assert [json.loads(line)["id"] for line in everything.stdout.splitlines()] == [1]


def test_once_sends_a_grouped_alert_once_and_status_shows_the_group(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse
) -> None:
    for _ in range(3):
        langfuse.add_trace(level="ERROR", name="checkout", start_time=ago(120))
    alerts = tmp_path / "alerts.jsonl"
    path = write_config(
        tmp_path / "config.toml",
        langfuse.url,
        jsonl("alerts", alerts) + grouped_rule("errors", "alerts", group_wait="0s", resolve_after="1h"),
    )
    first = cli("once", "--config", path)
    assert first.returncode == 0, str(first)
    sent = read_jsonl(alerts)
    assert [(n["event"], n["data"]["count"]) for n in sent] == [("rule.firing", 3)]
    assert sent[0]["data"]["samples"][0]["url"].startswith(f"{langfuse.url}/project/")
    second = cli("once", "--config", path)
    assert second.returncode == 0 and len(read_jsonl(alerts)) == 1, "an open group is not sent again"
    status = cli("status", "--config", path)
    assert "alerts: 1 firing groups" in status.stdout and "errors: firing, 3 matches" in status.stdout, str(status)
    report = json.loads(cli("status", "--json", "--config", path).stdout)
    assert [(a["rule"], a["matches"]) for a in report["alerts"]] == [("errors", 3)]


def test_run_killed_mid_group_neither_resends_nor_forgets_it(cli: Cli, tmp_path: Path, langfuse: FakeLangfuse) -> None:
    alerts = tmp_path / "alerts.jsonl"
    path = write_config(
        tmp_path / "config.toml",
        langfuse.url,
        jsonl("alerts", alerts)
        + grouped_rule("errors", "alerts", group_wait="1s", group_interval="2s", resolve_after="6s"),
    )
    path.write_text(path.read_text().replace('[poll]\nstart = "-1h"', '[poll]\nstart = "-1h"\ninterval = "250ms"'))

    def reasons() -> list[tuple[str, int]]:
        return [(n["data"]["reason"], n["data"]["count"]) for n in read_jsonl(alerts)]

    for _ in range(2):
        langfuse.add_trace(level="ERROR", name="checkout", start_time=ago(5))
    first = cli.start("run", "--config", str(path))
    try:
        assert wait_for(lambda: reasons() == [("new", 2)]), reasons()
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.communicate(timeout=10)
    langfuse.add_trace(level="ERROR", name="checkout", start_time=ago(0))
    second = cli.start("run", "--config", str(path))
    try:
        assert wait_for(lambda: len(reasons()) >= 3, timeout=30), reasons()
    finally:
        second.proc.send_signal(signal.SIGTERM)
        result = Cli.finish(second, timeout=20)
    assert result.returncode == 0, str(result)
    # the open group went on after the kill: one update with the new match, then one resolve
    assert reasons() == [("new", 2), ("update", 3), ("resolved", 3)]
    ids = [n["id"] for n in read_jsonl(alerts)]
    assert len(ids) == len(set(ids))
