"""What a handler author imports from the package, and what it means: `DeliveryError` says "don't retry"."""

from __future__ import annotations

import langfuse_poller
from langfuse_poller import DeliveryError, Registry
from langfuse_poller.testing import FakeLangfuse, PollHarness


def test_the_package_exports_what_handlers_use() -> None:
    assert {"on", "Registry", "Event", "DeliveryError"} <= set(langfuse_poller.__all__)
    assert langfuse_poller.DeliveryError is langfuse_poller.errors.DeliveryError


def test_a_handler_that_raises_delivery_error_not_retryable_makes_a_dead_letter_at_once() -> None:
    handlers = Registry()
    calls: list[str] = []

    @handlers.on("score.created")
    def refuse(event: langfuse_poller.Event) -> None:
        calls.append(event.id)
        raise DeliveryError("this score belongs to a deleted project", retryable=False)

    with FakeLangfuse() as langfuse, PollHarness(langfuse, handlers=handlers) as harness:
        score = langfuse.add_score(name="helpfulness", value=0.2)
        harness.poll()
        letters = harness.runtime.store.dead_letters()
    assert calls == [f"score.created:{score['id']}"]
    assert [(letter.event_id, letter.attempts, letter.error) for letter in letters] == [
        (f"score.created:{score['id']}", 1, "this score belongs to a deleted project")
    ]


def test_a_handler_that_raises_anything_else_is_retried() -> None:
    handlers = Registry()
    calls: list[str] = []

    @handlers.on("score.created")
    def flaky(event: langfuse_poller.Event) -> None:
        calls.append(event.id)
        if len(calls) < 3:
            raise ConnectionError("the ticket system is down")

    with FakeLangfuse() as langfuse, PollHarness(langfuse, handlers=handlers) as harness:
        langfuse.add_score(name="helpfulness", value=0.2)
        harness.poll()
        letters = harness.runtime.store.dead_letters()
    assert len(calls) == 3 and len(set(calls)) == 1
    assert letters == []
