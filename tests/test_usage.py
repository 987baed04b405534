"""The usage metrics (`[metrics] usage = true`): counted from the events the poller makes, each record once.

The poller reads a loopback FakeLangfuse on a hand-moved clock into a real SQLite state (or Redis, for standby
pollers); the series are read through prometheus_client's own exposition, as a scrape reads them.
"""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller import poller as poller_module
from langfuse_poller.config import Config, parse_config
from langfuse_poller.errors import ConfigError
from langfuse_poller.runtime import Runtime
from langfuse_poller.service.usage import UsageMetrics
from langfuse_poller.testing.fake_langfuse import FakeLangfuse
from langfuse_poller.usage_config import UsageConfig

from .conftest import Clock, at, make_config, poll, redis_server, runtime_for
from .usage_traffic import Expected, Samples, add_traffic, assert_counts, parse, times, total

LISTEN = "127.0.0.1:0"


def usage_config(fake: FakeLangfuse, tmp_path: Path, *, state: str = "state.db", **metrics: Any) -> Config:
    """A config with the usage metrics on, and no rule: the series must not need one."""
    sections: dict[str, Any] = {
        "poll": {"start": "-1h"},
        "metrics": {"listen": LISTEN, "usage": True, **metrics},
        "rules": [],
        "state": {"path": str(tmp_path / state)},
    }
    return make_config(fake, tmp_path, **sections)


def counting(runtime: Runtime) -> UsageMetrics:
    """The usage metrics of `runtime`, told of what its poller makes, as the daemon wires them."""
    assert runtime.config.metrics.usage is not None
    usage = UsageMetrics(runtime.config.metrics.usage)
    runtime.poller.on_made = usage.tally
    return usage


def scrape(usage: UsageMetrics) -> Samples:
    return parse(usage.render())


def test_config_keys_and_errors_name_the_key(fake: FakeLangfuse, tmp_path: Path) -> None:
    config = usage_config(fake, tmp_path, usage_labels=["userId", "traceName"], usage_max_series=5)
    usage = config.metrics.usage
    assert usage is not None and usage.labels == ("userId", "traceName") and usage.max_series == 5
    assert usage.score_buckets[0] == 0.0 and usage.score_buckets[-1] == 1.0
    assert usage.labels_of("cost_usd_total") == ("traceName",)
    assert usage.labels_of("traces_total") == ("userId",)
    assert make_config(fake, tmp_path).metrics.usage is None
    bad: list[tuple[dict[str, Any], str, str]] = [
        ({"usage_labels": ["traceId"]}, "metrics.usage_labels", "a list of data fields from userId"),
        ({"usage_labels": ["userId", "userId"]}, "metrics.usage_labels", "each data field once"),
        ({"usage_labels": ["promptName"]}, "metrics.usage_labels", '"prompt" in [poll] fields'),
        ({"usage_max_series": 0}, "metrics.usage_max_series", "an integer >= 1"),
        ({"usage_score_buckets": [1, 0.5]}, "metrics.usage_score_buckets", "increasing order"),
        ({"usage_score_buckets": []}, "metrics.usage_score_buckets", "increasing order"),
        ({"usage": "yes"}, "metrics.usage", "true or false"),
    ]
    for keys, key, expected in bad:
        with pytest.raises(ConfigError) as error:
            usage_config(fake, tmp_path, **keys)
        assert error.value.key == key and expected in str(error.value), (keys, str(error.value))
    # a wrong label is refused while usage is off too: switching it on must not be what reveals it
    with pytest.raises(ConfigError) as error:
        make_config(fake, tmp_path, metrics={"usage": False, "usage_labels": ["traceId"]})
    assert error.value.key == "metrics.usage_labels"
    with pytest.raises(ConfigError) as error:
        make_config(fake, tmp_path, metrics={"usage": True})
    assert error.value.key == "metrics.usage" and "listen" in str(error.value)
    prompts = make_config(
        fake,
        tmp_path,
        poll={"fields": ["prompt"]},
        metrics={"listen": LISTEN, "usage": True, "usage_labels": ["promptName"]},
    )
    assert prompts.metrics.usage is not None and prompts.metrics.usage.labels_of("generations_total") == ("promptName",)


def test_the_example_config_documents_the_defaults() -> None:
    data = tomllib.loads((Path(__file__).resolve().parent.parent / "config.example.toml").read_text())
    assert data["metrics"]["usage"] is False
    data["metrics"] |= {"usage": True, "listen": LISTEN}
    assert parse_config(data, "example").metrics.usage == UsageConfig()


def test_counts_equal_the_records_with_no_rule_subscribed(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    expected = Expected()
    add_traffic(fake, times(at(clock, 600), timedelta(seconds=2)), 60, expected)
    with runtime_for(usage_config(fake, tmp_path), clock) as runtime:
        usage = counting(runtime)
        poll(runtime)
        assert_counts(scrape(usage), expected)
        # a scrape keeps the text of each histogram series until the series changes: the next one shows the change
        add_traffic(fake, times(at(clock, 30), timedelta(seconds=1)), 12, expected, start=60)
        clock.advance(60)
        poll(runtime)
        samples = scrape(usage)
    assert_counts(samples, expected)
    assert set(expected.tokens) >= {("gpt-4o", "input_cached_tokens"), ("gpt-4o", "output_reasoning_tokens")}
    # buckets are cumulative and end at +Inf with the count
    label = (("environment", "production"), ("model", "gpt-4o"))

    def bucket(le: str) -> float:
        return samples["langfuse_generation_latency_seconds_bucket", tuple(sorted((*label, ("le", le))))]

    assert bucket("+Inf") == samples["langfuse_generation_latency_seconds_count", label] > 0
    assert bucket("0.1") == 0 <= bucket("1.0") <= bucket("120.0") <= bucket("+Inf")


def test_a_reread_and_a_restart_count_nothing_twice(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    expected = Expected()
    add_traffic(fake, times(at(clock, 300), timedelta(seconds=1)), 30, expected)
    config = usage_config(fake, tmp_path)
    with runtime_for(config, clock) as runtime:
        usage = counting(runtime)
        poll(runtime)
        # every sweep re-reads the lookback: the records are remembered, nothing is counted again
        clock.advance(120)
        poll(runtime, force_sweeps=True)
        assert_counts(scrape(usage), expected)
        before = scrape(usage)
    # a restart on the same state: the new process counts from zero, and only what is new (here: records that
    # became visible late, inside windows already read, which the sweeps re-read)
    more = Expected()
    add_traffic(fake, times(at(clock, 90), timedelta(seconds=1)), 10, more, start=30)
    clock.advance(120)
    with runtime_for(config, clock) as runtime:
        usage = counting(runtime)
        poll(runtime, force_sweeps=True)
        after = scrape(usage)
    assert_counts(after, more)
    assert total(after, "langfuse_generations_total") == 10 < total(before, "langfuse_generations_total")


def test_rows_served_twice_and_a_root_updated_at_error_count_once(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path
) -> None:
    # the server's table does not deduplicate until a merge: one page can hold a row twice (langfuse-api.md)
    fake.duplicate_rows = True
    expected = Expected()
    add_traffic(fake, times(at(clock, 300), timedelta(seconds=1)), 20, expected)
    root = fake.add_observation(start_time=at(clock, 200), name="failing", is_root=True, level="ERROR")
    with runtime_for(usage_config(fake, tmp_path), clock) as runtime:
        usage = counting(runtime)
        poll(runtime)
        # the root's updatedAt moves while it stays at ERROR: another trace.updated, the same error
        clock.advance(5)
        fake.update_observation(root["id"], status_message="still failing")
        clock.advance(60)
        poll(runtime, force_sweeps=True)
        samples = scrape(usage)
    assert total(samples, "langfuse_generations_total") == 20
    assert total(samples, "langfuse_observation_errors_total", name="failing") == 1
    assert total(samples, "langfuse_traces_total") == 21


def test_a_failed_slice_counts_nothing_and_its_reread_counts_once(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a catch-up from hours ago: slices that keep no dedup keys, whose re-read after a failure makes their events
    # again; a commit per page, so that a slice fails after some of its pages committed
    monkeypatch.setattr(poller_module, "COMMIT_PAGES", 1)
    expected = Expected()
    add_traffic(fake, times(at(clock, 4 * 3600 - 60), timedelta(seconds=20)), 450, expected)
    config = make_config(fake, tmp_path, poll={"start": "-4h"}, metrics={"listen": LISTEN, "usage": True}, rules=[])
    scores = 0

    def fail_the_second_scores_page(path: str, query: dict[str, list[str]]) -> None:
        nonlocal scores
        if path.endswith("/v3/scores") and "cursor" in query:
            scores += 1
            if scores == 1:
                fake.fail_next(20)

    with runtime_for(config, clock) as runtime:
        usage = counting(runtime)
        fake.on_data_request = fail_the_second_scores_page
        result = runtime.poller.poll_once()
        assert any(error.startswith("scores") for error in result.errors), result.errors
        failed = scrape(usage)
        fake.clear_faults()
        poll(runtime)
        samples = scrape(usage)
    assert total(failed, "langfuse_generations_total") == 450
    assert total(failed, "langfuse_score_value_count") == 0, "the slice failed: nothing of it counts yet"
    assert_counts(samples, expected)


def test_a_takeover_by_a_standby_counts_each_record_once(fake: FakeLangfuse, clock: Clock, tmp_path: Path) -> None:
    pytest.importorskip("redis", reason="the Python redis package is not installed (pip install -e '.[redis]')")
    from langfuse_poller.redis.queue import sync_client
    from langfuse_poller.redis.standby.keys import PollerKeys
    from langfuse_poller.redis.standby.replica import PollCancel, Replica
    from langfuse_poller.redis.standby.shared_state import SharedPollState

    def no_jobs(jobs: object) -> None:
        raise AssertionError("no event is routed to the Redis queue here")

    @contextmanager
    def replica_runtime(server_url: str, name: str) -> Iterator[tuple[Runtime, Replica, UsageMetrics]]:
        """A runtime whose poller keeps its state in Redis under replica `name`'s lease, with its own SQLite."""
        config = usage_config(fake, tmp_path, state=f"{name}.db")
        with runtime_for(config, clock) as runtime:
            replica = Replica(sync_client(server_url, 1.0), PollerKeys("q"), name, 600.0, PollCancel(threading.Event()))
            try:
                runtime.poller.store = SharedPollState(
                    sync_client(server_url, 1.0),
                    PollerKeys("q"),
                    local=runtime.store,
                    add_jobs=no_jobs,
                    token=replica.token,
                    on_deposed=replica.deposed,
                    clock=clock,
                )
                runtime.poller.start_streams()
                yield runtime, replica, counting(runtime)
            finally:
                replica.close()

    first, late = Expected(), Expected()
    add_traffic(fake, times(at(clock, 300), timedelta(seconds=1)), 30, first)
    with (
        contextmanager(redis_server)(tmp_path, durable=False) as server,
        replica_runtime(server.url, "r0") as (a, lead_a, usage_a),
        replica_runtime(server.url, "r1") as (b, lead_b, usage_b),
    ):
        lead_a.tick()
        lead_b.tick()
        assert (lead_a.role, lead_b.role) == ("leader", "standby")
        poll(a)
        # the leader stops and hands the lease over; records then become visible late, inside windows read
        lead_a.close()
        lead_b.tick()
        assert lead_b.role == "leader"
        add_traffic(fake, times(at(clock, 90), timedelta(seconds=1)), 10, late, start=30)
        clock.advance(120)
        poll(b, force_sweeps=True)
        counted_a, counted_b = scrape(usage_a), scrape(usage_b)
    assert_counts(counted_a, first)
    assert_counts(counted_b, late)
    # each record by the one replica that committed it: the sum over the replicas is the total
    generations = total(counted_a, "langfuse_generations_total") + total(counted_b, "langfuse_generations_total")
    assert generations == 40


def test_extra_labels_fold_into_other_past_the_cap(
    fake: FakeLangfuse, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = Expected()
    add_traffic(fake, times(at(clock, 300), timedelta(seconds=1)), 8, expected)
    config = usage_config(fake, tmp_path, usage_labels=["userId", "traceName"], usage_max_series=5)
    with runtime_for(config, clock) as runtime:
        usage = counting(runtime)
        poll(runtime)
        samples = scrape(usage)
    users = {dict(key).get("user_id") for name, key in samples if name == "langfuse_traces_total"}
    # eight users: five keep their own series, the other three count as "other"
    assert len(users) == 6 and "other" in users
    assert total(samples, "langfuse_traces_total", user_id="other") == 3
    assert total(samples, "langfuse_traces_total") == 8
    assert (
        total(samples, "langfuse_poller_usage_labels_folded_total", metric="langfuse_traces_total", label="user_id")
        == 3
    )
    # two trace names stay below the cap: nothing folds on the generation series
    assert total(samples, "langfuse_poller_usage_labels_folded_total", label="trace_name") == 0
    assert {dict(key).get("trace_name") for name, key in samples if name == "langfuse_cost_usd_total"} == {
        "chat-0",
        "chat-1",
    }
    warnings = [r.getMessage() for r in caplog.records if "usage label user_id" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert_counts(samples, expected)
