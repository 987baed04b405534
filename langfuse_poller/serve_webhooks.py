"""`langfuse-poller serve-webhooks`: receive Langfuse's webhooks and deliver them, without polling.

The same store, router, handlers and notifiers as `run`; the state's lock makes it one or the other on a
state file (`run` with `[webhook] enabled = true` does both in one process).
"""

from __future__ import annotations

from .config import WEBHOOK_SECRET_EXPECTED, Config
from .daemon import Daemon
from .errors import ConfigError
from .runtime import Runtime


def serve_webhooks(config: Config) -> int:
    """Serve `[webhook]` until SIGTERM or SIGINT; 0 on a clean stop. Whatever `enabled` says, a secret is needed."""
    if not config.webhook.secrets:
        raise ConfigError(config.source, "webhook.secret", None, WEBHOOK_SECRET_EXPECTED)
    return Daemon(Runtime.build(config), webhooks_only=True).run()
