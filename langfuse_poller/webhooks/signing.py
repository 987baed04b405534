"""Webhook signatures as Langfuse makes them: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.

The secret is the whole `lf-whsec_...` string. `sign` is what the `webhook` notifier sends; `check` is what
the receiver accepts: the timestamped form within a tolerance (both directions, against replays and clocks
far ahead), with any of several secrets (a rotation), and, only when asked, the older plain form whose
header is the hex HMAC of the body alone.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Sequence

HEADER = "x-langfuse-signature"

_TIMESTAMP = re.compile(r"[0-9]{1,15}")
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")

# why a signature was refused: short, and safe to tell the sender (no secret, no expected digest)
MISSING = "missing x-langfuse-signature header"
MALFORMED = "malformed x-langfuse-signature header"
EXPIRED = "signature timestamp outside the tolerance"
MISMATCH = "signature does not match the body"
NO_TIMESTAMP = "signature without a timestamp (accept_unsigned_timestamp is false)"


def _hmac(secret: str, message: bytes) -> bytes:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest().encode()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The value of the x-langfuse-signature header for `body`."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_hmac(secret, f'{t}.'.encode() + body).decode()}"


def check(
    secrets: Sequence[str],
    header: str | None,
    body: bytes,
    *,
    tolerance: float,
    now: float | None = None,
    accept_plain: bool = False,
) -> str | None:
    """None when `header` signs `body` with one of `secrets`; otherwise why not (one of the constants above).

    Every candidate digest is compared with every secret in constant time, so the time taken tells nothing
    about which part matched.
    """
    if not header or not header.strip():
        return MISSING
    header = header.strip()
    if "=" not in header:
        if not _DIGEST.fullmatch(header):
            return MALFORMED
        if not accept_plain:
            return NO_TIMESTAMP
        return None if _matches(secrets, body, [header.lower().encode()]) else MISMATCH
    t: str | None = None
    digests: list[bytes] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            if t is not None or not _TIMESTAMP.fullmatch(value):
                return MALFORMED
            t = value
        elif key == "v1":
            if not _DIGEST.fullmatch(value):
                return MALFORMED
            digests.append(value.lower().encode())
        # other schemes (v0, ...) are ignored, as Langfuse's own verifiers do
    if t is None or not digests:
        return MALFORMED
    if abs((time.time() if now is None else now) - int(t)) > tolerance:
        return EXPIRED
    return None if _matches(secrets, f"{t}.".encode() + body, digests) else MISMATCH


def _matches(secrets: Sequence[str], message: bytes, digests: Sequence[bytes]) -> bool:
    found = False
    for secret in secrets:
        expected = _hmac(secret, message)
        for digest in digests:
            # no early exit: every comparison runs
            found |= hmac.compare_digest(expected, digest)
    return found


def verify(secrets: list[str], header: str, body: bytes, *, tolerance: float, now: float | None = None) -> bool:
    """True when `header` signs `body` with one of `secrets` and its time is within `tolerance` seconds."""
    return check(secrets, header, body, tolerance=tolerance, now=now) is None
