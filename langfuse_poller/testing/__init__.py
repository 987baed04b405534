"""Tools for testing code that uses langfuse-poller without a Langfuse account.

- `FakeLangfuse`: a loopback stand-in for the Langfuse public API (traces, observations, scores, delays,
  faults), started with `with FakeLangfuse() as langfuse: ...`.
- `PollHarness`: the real poller and delivery worker against it, in a throwaway state; `poll()` returns the
  events your handlers and rules got.
- `loopback_webhook.LoopbackWebhook`: a webhook endpoint that fails on purpose (`fail_rate`, `delay`) and
  records what arrived, for delivery tests.
- `archive.read_archive`: the event ids a jsonl notifier wrote, with their counts and the torn lines, and
  `archive.repeats` of those counts: "nothing lost, repeats within the contract" in a crash test.
"""

from .fake_langfuse import FakeLangfuse
from .harness import PollHarness

__all__ = ["FakeLangfuse", "PollHarness"]
