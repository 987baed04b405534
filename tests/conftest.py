"""Shared fixtures: a loopback Langfuse stand-in, a controllable clock, and config builders."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.config import Config, parse_config
from langfuse_poller.registry import Registry
from langfuse_poller.runtime import Runtime
from langfuse_poller.testing.fake_langfuse import FakeLangfuse


class Clock:
    """A clock that tests move by hand; shared by the fake server and the poller."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeLangfuse]:
    with FakeLangfuse(clock=clock) as server:
        yield server


def make_config(fake: FakeLangfuse, tmp_path: Path, **sections: Any) -> Config:
    """A Config pointing at `fake`, state in tmp_path; keyword sections update the TOML tables."""
    data: dict[str, Any] = {
        "langfuse": {"base_url": fake.url, "public_key": "pk-lf-test", "secret_key": "sk-lf-test"},
        "poll": {"start": "now", "settle": "0s", "lookback": "10m", "reread": ["1m"], "sweep_interval": "1m"},
        "state": {"path": str(tmp_path / "state.db")},
        "notifiers": {"file": {"type": "jsonl", "path": str(tmp_path / "events.jsonl")}},
        # not "*": that would subscribe to observation.created, one event per observation
        "rules": [{"name": "all", "events": ["trace.*", "generation.*", "score.*"], "notify": ["file"]}],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data, "test-config")


@contextmanager
def runtime_for(config: Config, clock: Clock, handlers: Registry | None = None) -> Iterator[Runtime]:
    """A Runtime on `clock` with its streams started; retries of 5xx and timeouts back off briefly."""
    runtime = Runtime.build(config, handlers=handlers or Registry(), clock=clock)
    runtime.reader.backoff_initial = 0.001
    runtime.reader.backoff_max = 0.01
    runtime.poller.start_streams()
    try:
        yield runtime
    finally:
        runtime.close()


def poll(runtime: Runtime, *, force_sweeps: bool = False) -> None:
    """One poll that must succeed, then its deliveries."""
    result = runtime.poller.poll_once(force_sweeps=force_sweeps)
    assert not result.errors, result.errors
    runtime.worker.run_until_idle()


def delivered(tmp_path: Path) -> Counter[str]:
    """How often each event id reached the `file` notifier of `make_config`."""
    path = tmp_path / "events.jsonl"
    if not path.exists():
        return Counter()
    return Counter(json.loads(line)["id"] for line in path.read_text().splitlines())


def at(clock: Clock, seconds_ago: float) -> datetime:
    return datetime.fromtimestamp(clock.now - seconds_ago, UTC)
