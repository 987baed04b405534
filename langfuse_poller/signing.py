"""Webhook signatures as Langfuse makes them: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`."""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "x-langfuse-signature"


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The value of the x-langfuse-signature header for `body`."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify(secrets: list[str], header: str, body: bytes, *, tolerance: float, now: float | None = None) -> bool:
    """True when `header` signs `body` with one of `secrets` and its time is within `tolerance` seconds."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError, IndexError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    signed = f"{t}.".encode() + body
    for secret in secrets:
        expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        if any(hmac.compare_digest(expected, candidate) for candidate in parts.get("v1", [])):
            return True
    return False
