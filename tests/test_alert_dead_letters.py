"""Dead alert notifications in Redis (`<prefix>:alert-dead`, with standby pollers): `dead-letters list`, `replay`
and `purge` through the real CLI, beside the SQLite dead letters, on one server and on the three-node cluster."""

# the fixtures `cli`, `langfuse` and `redis` come from other test modules, and each test names them
# ruff: noqa: F811

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from langfuse_poller.alerting.groups import alert_event, open_group
from langfuse_poller.config import DeliveryConfig, load_config
from langfuse_poller.notifiers import build_notifier
from langfuse_poller.redis.queue import sync_client
from langfuse_poller.redis.standby.alert_dead import alert_dead_letters
from langfuse_poller.redis.standby.alert_state import RedisAlertStore
from langfuse_poller.redis.standby.replica import PollCancel, Replica
from langfuse_poller.rules import Rule
from langfuse_poller.testing.fake_langfuse import FakeLangfuse
from tests.fake_alerting import FakePagerDuty
from tests.test_alert_takeover import paging_rule
from tests.test_cli import Cli, cli, langfuse  # noqa: F401
from tests.test_queue_redis import RedisServer, redis  # noqa: F401
from tests.test_standby import keys_for, standby_config

pytest.importorskip("bullmq", reason="the Python bullmq package is not installed (pip install -e '.[redis]')")

pytestmark = pytest.mark.timeout(90)


def test_dead_alert_notifications_are_listed_replayed_and_purged(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, redis: RedisServer
) -> None:
    with FakePagerDuty() as pagerduty:
        config_path = standby_config(tmp_path, langfuse, redis, "a", paging_rule(pagerduty))
        config = load_config(config_path)
        client = sync_client(redis.url, 1.0)
        keys = keys_for(redis)
        leader = Replica(client, keys, "a", 30.0, PollCancel(threading.Event()))
        store = RedisAlertStore(client, keys, token=leader.token, delivery=DeliveryConfig(max_attempts=2))
        store.use_targets({"notifier:pd": build_notifier(config.notifiers["pd"])})
        try:
            leader.tick()
            rule = Rule("errors", ("trace.updated",), None, ("pd",))
            now = time.time()
            group = open_group(rule, "k", {}, now)
            group.count = 1
            firing = alert_event(rule, group, now, status="firing", reason="new", new=1)
            resolved = alert_event(rule, group, now, status="resolved", reason="resolved", new=0)
            with store.write(now) as tx:
                tx.enqueue(firing, ["notifier:pd"])
                tx.enqueue(resolved, ["notifier:pd"])
            # PagerDuty refuses both for good: an answer that cannot change
            pagerduty.fail_next(400, count=2, error="Event object is invalid")
            store.send_notices(now)
            assert pagerduty.events() == []

            listed = cli("dead-letters", "list", "--config", config_path)
            assert listed.returncode == 0, str(listed)
            assert firing.id in listed.stdout and resolved.id in listed.stdout
            assert "alert notification -> notifier:pd after 1 attempts" in listed.stdout
            assert "Event object is invalid" in listed.stdout
            as_json = [
                json.loads(line)
                for line in cli("dead-letters", "list", "--json", "--config", config_path).stdout.splitlines()
            ]
            assert [(d["kind"], d["id"], d["targets"]) for d in as_json] == [
                ("alert", firing.id, ["notifier:pd"]),
                ("alert", resolved.id, ["notifier:pd"]),
            ]

            # one replayed: the leader's next tick sends it; a second replay of it finds nothing
            replayed = cli("dead-letters", "replay", firing.id, "--config", config_path)
            assert replayed.returncode == 0 and "queued 1 for delivery again" in replayed.stdout, str(replayed)
            with alert_dead_letters(config.queue) as dead:
                assert dead.replay([firing.id], time.time()) == 0
            # due when replayed, on the clock of the process that replayed it
            assert store.send_notices(time.time()) == 1
            assert [e["event_action"] for e in pagerduty.events()] == ["trigger"]

            purged = cli("dead-letters", "purge", "--all", "--config", config_path)
            assert purged.returncode == 0 and "purged 1 dead letters" in purged.stdout, str(purged)
            assert store.outbox_size() == (0, 0)
        finally:
            leader.close()
