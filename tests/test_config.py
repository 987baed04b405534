"""Config: the example loads, durations parse, and every error names file, key, found and expected."""

from __future__ import annotations

import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.config import Secret, load_config, parse_config
from langfuse_poller.errors import ConfigError
from langfuse_poller.registry import Router
from langfuse_poller.util.durations import parse_duration, parse_start

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def base(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"langfuse": {"public_key": "pk-lf-1", "secret_key": "sk-lf-secret-value"}}
    data.update(sections)
    return data


def test_the_example_config_loads_with_every_section() -> None:
    config = load_config(str(EXAMPLE))
    assert config.source == str(EXAMPLE)
    assert config.poll.interval == timedelta(seconds=10)
    assert config.poll.lookback == timedelta(minutes=10)
    assert config.poll.sweep_ages == (timedelta(minutes=1), timedelta(minutes=10))
    types = {"webhook", "jsonl", "log", "slack", "pagerduty", "alertmanager"}
    assert {n.type for n in config.notifiers.values()} == types
    rules = {rule.name: rule for rule in config.rules}
    assert list(rules) == [
        "trace-errors",
        "low-scores",
        "error-storm",
        "no-traffic",
        "errors",
        "usage-archive",
        "new-traces",
    ]
    # the seed scenarios: grouped alerts to Slack, a frequency rule paging PagerDuty, an absence rule,
    # and forwarding rules that send every event
    assert rules["trace-errors"].grouping is not None
    assert rules["trace-errors"].grouping.by == ("data.traceName", "data.environment")
    assert rules["low-scores"].when is not None and "data.value < 0.5" in rules["low-scores"].when
    assert (rules["error-storm"].kind, rules["error-storm"].threshold) == ("frequency", 20)
    assert rules["error-storm"].notify == ("pagerduty", "slack")
    assert (rules["no-traffic"].kind, rules["no-traffic"].window) == ("absence", timedelta(minutes=15))
    assert rules["usage-archive"].grouping is None and rules["errors"].grouping is None
    Router(config.rules)  # every CEL condition of the example compiles
    # every key of the example was read: nothing in it is silently ignored
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(data) == {
        "langfuse",
        "poll",
        "state",
        "handlers",
        "metrics",
        "delivery",
        "queue",
        "rules",
        "notifiers",
        "webhook",
    }
    assert config.queue.backend == "sqlite" and config.queue.name == "langfuse-events"
    # the [poll] field group keys are documented there with their defaults
    assert "".join(f"{k}=" for k in ("fields", "io_max_chars", "redact_io", "expand_metadata")) == "".join(
        f"{k}=" for k in data["poll"] if k in ("fields", "io_max_chars", "redact_io", "expand_metadata")
    )
    assert (config.poll.fields, config.poll.io_max_chars, config.poll.redact_io) == ((), 2000, ())
    assert config.poll.expand_metadata == ()


def test_the_field_group_keys_read_into_the_poll_config() -> None:
    poll = {
        "fields": ["prompt", "io", "metadata"],
        "io_max_chars": 0,
        "redact_io": ["sk-[A-Za-z0-9]+", "(?i)bearer [a-z0-9.]+"],
        "expand_metadata": ["request", "document"],
    }
    config = parse_config(base(poll=poll), "test").poll
    assert config.fields == ("prompt", "io", "metadata")
    assert config.io_max_chars == 0
    assert config.redact_io == ("sk-[A-Za-z0-9]+", "(?i)bearer [a-z0-9.]+")
    assert config.expand_metadata == ("request", "document")
    assert parse_config(base(), "test").poll.io_max_chars == 2000


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("10s", 10), ("5m", 300), ("2h", 7200), ("1d", 86400), (15, 15), (1.5, 1.5), ("30", 30)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["10 minutes", "-5s", "", "5w", True, None])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_start_forms() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert parse_start("now", now) == now
    assert parse_start("-1h", now) == datetime(2026, 11, 27, 11, 0, tzinfo=UTC)
    assert parse_start("2026-11-20T00:00:00Z", now) == datetime(2026, 11, 20, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_start("yesterday", now)


@pytest.mark.parametrize(
    ("data", "key", "expected_words"),
    [
        (base(poll={"intervall": "10s"}), "poll.intervall", "a known key of [poll]"),
        (base(poll={"interval": "10 minutes"}), "poll.interval", "a duration"),
        (base(poll={"interval": "0s"}), "poll.interval", "greater than zero"),
        (base(poll={"start": "yesterday"}), "poll.start", "RFC 3339"),
        (base(poll={"streams": ["traces"]}), "poll.streams", "'observations'"),
        (base(rules=[{"name": "r", "events": ["*"], "notify": ["nobody"]}]), "rules[0].notify", "[notifiers.NAME]"),
        (base(rules=[{"name": "r", "notify": []}]), "rules[0].events", "event types"),
        (base(notifiers={"x": {"type": "carrier-pigeon"}}), "notifiers.x.type", "webhook"),
        (base(notifiers={"x": {"type": "webhook", "url": "ftp://nope"}}), "notifiers.x.url", "http"),
        (base(notifiers={"x": {"type": "jsonl"}}), "notifiers.x.path", "path"),
        (base(delivery={"max_attempts": 0}), "delivery.max_attempts", "integer >= 1"),
        (
            base(langfuse={"public_key": "pk", "secret_key": "sk", "base_url": "cloud.langfuse.com"}),
            "langfuse.base_url",
            "http",
        ),
        (base(colour="blue"), "colour", "a known key"),
        (base(poll={"fields": ["usage"]}), "poll.fields", "'io', 'metadata', 'prompt'"),
        (base(poll={"fields": ["usage"]}), "poll.fields", "always read"),
        (base(poll={"fields": ["io"], "io_max_chars": -1}), "poll.io_max_chars", "an integer >= 0"),
        (base(poll={"fields": ["io"], "io_max_chars": "2k"}), "poll.io_max_chars", "an integer >= 0"),
        (base(poll={"fields": ["io"], "redact_io": ["sk-[a-z"]}), "poll.redact_io", "regular expressions"),
        (base(poll={"fields": ["io"], "redact_io": [5]}), "poll.redact_io", "a list of regular"),
        (base(poll={"fields": ["io"], "redact_io": ["x*"]}), "poll.redact_io", "cannot match an empty"),
        (base(poll={"redact_io": ["sk-[a-z]+"]}), "poll.redact_io", '"io" in [poll] fields'),
        (base(poll={"expand_metadata": ["request"]}), "poll.expand_metadata", '"metadata" in [poll] fields'),
        (base(poll={"fields": ["metadata"], "expand_metadata": ["a,b"]}), "poll.expand_metadata", "without commas"),
        (base(poll={"fields": ["metadata"], "expand_metadata": [""]}), "poll.expand_metadata", "metadata keys"),
    ],
)
def test_errors_name_file_key_found_and_expected(data: dict[str, Any], key: str, expected_words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "/etc/langfuse-poller/config.toml")
    message = str(info.value)
    assert message.startswith("/etc/langfuse-poller/config.toml: ")
    assert info.value.key == key
    assert expected_words in message


def test_missing_keys_point_at_the_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LANGFUSE_PUBLIC_KEY", raising=False)
    monkeypatch.delenv("LANGFUSE_SECRET_KEY", raising=False)
    with pytest.raises(ConfigError, match="LANGFUSE_PUBLIC_KEY"):
        parse_config({}, "f.toml")
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-env")
    with pytest.raises(ConfigError, match="LANGFUSE_SECRET_KEY"):
        parse_config({}, "f.toml")


def test_env_fallbacks_in_the_sdk_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-env")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-lf-env")
    monkeypatch.delenv("LANGFUSE_BASE_URL", raising=False)
    monkeypatch.setenv("LANGFUSE_HOST", "https://us.cloud.langfuse.com")
    config = parse_config({}, "f.toml")
    assert config.langfuse.public_key == "pk-lf-env"
    assert config.langfuse.secret_key.reveal() == "sk-lf-env"
    assert config.langfuse.base_url == "https://us.cloud.langfuse.com"
    monkeypatch.setenv("LANGFUSE_BASE_URL", "https://jp.cloud.langfuse.com/")
    assert parse_config({}, "f.toml").langfuse.base_url == "https://jp.cloud.langfuse.com"
    # the file wins over the environment
    assert parse_config(base(), "f.toml").langfuse.public_key == "pk-lf-1"


def test_discovery_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from langfuse_poller.config import find_config_file

    monkeypatch.setenv("LANGFUSE_POLLER_CONFIG", str(tmp_path / "env.toml"))
    assert find_config_file("explicit.toml") == Path("explicit.toml")
    assert find_config_file(None) == tmp_path / "env.toml"
    monkeypatch.delenv("LANGFUSE_POLLER_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    user = tmp_path / "langfuse-poller" / "config.toml"
    user.parent.mkdir()
    user.write_text("")
    assert find_config_file(None) == user


def test_secrets_from_files_and_never_shown(tmp_path: Path) -> None:
    secret_file = tmp_path / "sk"
    secret_file.write_text("sk-lf-from-file\n")
    config = parse_config({"langfuse": {"public_key": "pk", "secret_key_file": str(secret_file)}}, "f.toml")
    assert config.langfuse.secret_key.reveal() == "sk-lf-from-file"
    assert "sk-lf-from-file" not in repr(config)
    assert str(Secret("x")) == "***"
    with pytest.raises(ConfigError, match="readable file"):
        parse_config({"langfuse": {"public_key": "pk", "secret_key_file": str(tmp_path / "missing")}}, "f.toml")
    with pytest.raises(ConfigError) as info:
        parse_config({"langfuse": {"public_key": "pk", "secret_key": "sk-lf-x", "secret_key_file": "y"}}, "f.toml")
    assert "sk-lf-x" not in str(info.value)


def test_a_bad_cel_condition_names_the_rule() -> None:
    config = parse_config(
        base(
            notifiers={"log": {"type": "log"}},
            rules=[{"name": "r", "events": ["*"], "when": "data.level ==", "notify": ["log"]}],
        ),
        "f.toml",
    )
    with pytest.raises(ConfigError) as info:
        Router(config.rules, source="f.toml")
    assert info.value.key == "rules[0].when"
    assert "CEL" in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[poll\ninterval = 1")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(path) in str(info.value) and "valid TOML" in str(info.value)
