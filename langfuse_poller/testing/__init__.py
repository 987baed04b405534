"""Tools for testing code that uses langfuse-poller without a Langfuse account.

- `FakeLangfuse`: a loopback stand-in for the Langfuse public API (traces, observations, scores, delays,
  faults), started with `with FakeLangfuse() as langfuse: ...`.
- `PollHarness`: the real poller and delivery worker against it, in a throwaway state; `poll()` returns the
  events your handlers and rules got.
"""

from .fake_langfuse import FakeLangfuse
from .harness import PollHarness

__all__ = ["FakeLangfuse", "PollHarness"]
