"""Run the real poller against a `FakeLangfuse` and see what your handlers and rules got.

Nothing is mocked: the poll reads the stand-in over HTTP, events go through the SQLite outbox in a
throwaway state, and handlers are called by the delivery worker, as in the daemon::

    from langfuse_poller import Registry
    from langfuse_poller.testing import FakeLangfuse, PollHarness

    def test_low_scores_are_flagged():
        handlers = Registry()
        flagged = []

        @handlers.on("score.created")
        def low_score(event):
            if event.data["value"] < 0.5:
                flagged.append(event.data["name"])

        with FakeLangfuse() as langfuse, PollHarness(langfuse, handlers=handlers) as harness:
            langfuse.add_score(name="helpfulness", value=0.2)
            langfuse.add_score(name="helpfulness", value=0.9)
            events = harness.poll()
        assert [e.type for e in events] == ["score.created", "score.created"]
        assert flagged == ["helpfulness"]
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..config import Config, parse_config
from ..events import Event
from ..registry import Registry, registry
from ..runtime import Runtime
from .fake_langfuse import FakeLangfuse

# what the harness records unless the handlers subscribe to more (observation.created costs one event per
# observation, so it is made only when asked for)
SEEN_TYPES = ("trace.*", "generation.*", "score.*")


class PollHarness:
    """The poller, its delivery worker and a throwaway state, pointed at a FakeLangfuse.

    `handlers` defaults to the global registry (where `@on(...)` registers); `rules` and `notifiers` are
    `[[rules]]` and `[notifiers.NAME]` tables as in the config file; `poll` updates the `[poll]` table.
    """

    def __init__(
        self,
        langfuse: FakeLangfuse,
        *,
        handlers: Registry | None = None,
        rules: Sequence[Mapping[str, Any]] = (),
        notifiers: Mapping[str, Mapping[str, Any]] | None = None,
        poll: Mapping[str, Any] | None = None,
        state_dir: str | Path | None = None,
    ) -> None:
        self._tmp = None if state_dir is not None else tempfile.TemporaryDirectory(prefix="langfuse-poller-test-")
        self.state_dir = Path(state_dir if state_dir is not None else self._tmp.name)  # type: ignore[union-attr]
        self.langfuse = langfuse
        self.config: Config = parse_config(
            {
                "langfuse": {
                    "base_url": langfuse.url,
                    "public_key": langfuse.public_key,
                    "secret_key": langfuse.secret_key,
                },
                # everything the stand-in holds, and nothing waits for late records: tests add them explicitly
                "poll": {"start": "-1d", "settle": "0s", "reread": [], **(poll or {})},
                "state": {"path": str(self.state_dir / "state.db")},
                "delivery": {"backoff": "10ms", "max_backoff": "100ms"},
                "notifiers": dict(notifiers or {}),
                "rules": [dict(rule) for rule in rules],
            },
            "PollHarness",
        )
        self.seen: list[Event] = []
        combined = Registry()
        for handler in (handlers if handlers is not None else registry).handlers.values():
            combined.register(handler.func, handler.patterns, name=handler.name)
        combined.register(self.seen.append, SEEN_TYPES, name="langfuse_poller.testing.seen")
        self.runtime = Runtime.build(self.config, handlers=combined, clock=langfuse.clock)
        self.runtime.poller.start_streams()
        self.runtime.alerter.start()

    def poll(self) -> list[Event]:
        """Poll every stream up to now (re-reads included), deliver, and return the events this poll made."""
        before = len(self.seen)
        result = self.runtime.poller.poll_once(force_sweeps=True)
        if result.errors:
            raise AssertionError("the poll failed: " + "; ".join(result.errors))
        self.runtime.worker.run_until_idle()
        if self.runtime.alerter.tick():
            self.runtime.worker.run_until_idle()
        return self.seen[before:]

    def alerts(self) -> list[Event]:
        """The alert notifications (`rule.firing`, `rule.resolved`) made so far, oldest first."""
        return self.runtime.store.alert_notifications()

    def close(self) -> None:
        self.runtime.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> PollHarness:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
