"""The secrets that no log line may show: `hide` registers one, `redact` masks every one registered in a text.

`Secret` (util/toml_tables.py) hides each value it holds as the config is read, and every log formatter
(service/logs.py) redacts what it writes, tracebacks included: a library that logs a URL with its token stays
harmless. It sits at the bottom so that both can use it without the config reading knowing about logging.
"""

from __future__ import annotations

import threading
from urllib.parse import urlsplit

# shorter values would hide ordinary words; real secrets and tokens are far longer
MIN_SECRET = 6
MASK = "***"

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def hide(value: str) -> None:
    """Never show `value` in a log line; for a URL, its path and query (where tokens live) as well."""
    candidates = [value]
    if value.startswith(("http://", "https://")):
        parts = urlsplit(value)
        candidates.append(parts.path + (f"?{parts.query}" if parts.query else ""))
    with _secrets_lock:
        _secrets.update(c for c in candidates if len(c.strip("/")) >= MIN_SECRET)


def redact(text: str) -> str:
    """`text` with every hidden value replaced by ***; the longest first, so a URL goes before its path."""
    if not _secrets:
        return text
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text
