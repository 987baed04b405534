"""Reading the Langfuse public API: the cursor lists, and the page-based lists of self-hosted v3."""
