"""A received webhook is written before the poller's next page: the store's urgent writes, on a real SQLite file.

Langfuse gives a webhook 4 attempts within about a second (`worker/src/queues/webhooks.ts`); a catch-up that
holds the write lock for a group of pages must not make the receiver wait that long.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from langfuse_poller.events import Event
from langfuse_poller.poller import PageGroup
from langfuse_poller.store import Store

pytestmark = pytest.mark.timeout(30)


def event(n: int) -> Event:
    return Event(
        id=f"prompt.created:p{n}", type="prompt.created", timestamp=datetime.now(UTC), source="webhook", data={}
    )


def wait_until(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


def test_an_urgent_writer_goes_before_an_ordinary_one_that_comes_back_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    order: list[str] = []
    holding = threading.Event()

    def ordinary() -> None:
        with store.write():
            holding.set()
            assert wait_until(store.writers_waiting), "the urgent writer is counted while it waits"
            order.append("first page group")
        # a poller commits its page group and opens the next one at once: the lock alone would let it back in
        with store.write():
            order.append("next page group")

    def urgent() -> None:
        with store.write(urgent=True) as tx:
            tx.enqueue(event(1), [])
            order.append("webhook")

    poller = threading.Thread(target=ordinary)
    poller.start()
    assert holding.wait(5)
    receiver = threading.Thread(target=urgent)
    receiver.start()
    poller.join(10)
    receiver.join(10)
    assert order == ["first page group", "webhook", "next page group"]
    assert not store.writers_waiting()
    store.close()


def test_a_page_group_is_full_as_soon_as_a_webhook_waits_for_the_lock(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    commits: list[str] = []
    group = PageGroup(store, lambda: commits.append("commit"))
    group.transaction()
    group.added(1)
    assert not group.full()  # one page, just opened
    stored = threading.Event()

    def receive() -> None:
        with store.write(urgent=True) as tx:
            tx.enqueue(event(2), [])
        stored.set()

    receiver = threading.Thread(target=receive)
    receiver.start()
    assert wait_until(store.writers_waiting)
    assert group.full()
    group.commit()
    assert stored.wait(5) and commits == ["commit"]
    receiver.join(5)
    store.close()
