"""Receiving Langfuse's own webhooks: signatures, payload mapping, the HTTP receiver."""
