"""langfuse-poller: webhook-style events from the Langfuse public API.

from langfuse_poller import DeliveryError, on

@on("score.created")
def low_scores(event):
    if event.data["value"] is not None and event.data["value"] < 0.5:
        ...  # an exception here is retried with backoff, then kept as a dead letter;
        # raise DeliveryError("why", retryable=False) to make a dead letter at once
"""

from __future__ import annotations

from .errors import DeliveryError
from .events import Event
from .registry import Registry, on, registry

__version__ = "0.1.0"
__all__ = ["DeliveryError", "Event", "Registry", "__version__", "on", "registry"]
