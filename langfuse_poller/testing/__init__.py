"""Tools for testing code that uses langfuse-poller without a Langfuse account."""
