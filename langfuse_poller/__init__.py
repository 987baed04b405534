"""langfuse-poller: webhook-style events from the Langfuse public API.

from langfuse_poller import on

@on("score.created")
def low_scores(event):
    if event.data["value"] is not None and event.data["value"] < 0.5:
        ...
"""

from __future__ import annotations

from .events import Event
from .registry import Registry, on, registry

__version__ = "0.1.0"
__all__ = ["Event", "Registry", "__version__", "on", "registry"]
