"""langfuse-poller: webhook-style events from the Langfuse public API."""
