"""`langfuse-poller serve-webhooks`: receive Langfuse's webhooks and deliver them, without polling.

It is the daemon with the receiver on and no stream to poll: the same store, router, handlers, notifiers
and alert groups as `run`. The state's lock makes it one or the other on a state file (`run` with
`[webhook] enabled = true` does both in one process).
"""

from __future__ import annotations

from dataclasses import replace

from ..config import WEBHOOK_SECRET_EXPECTED, Config
from ..errors import ConfigError
from ..runtime import Runtime
from .daemon import Daemon
from .reload import config_loader


def serve_webhooks(config: Config) -> int:
    """Serve `[webhook]` until SIGTERM or SIGINT; 0 on a clean stop. Whatever `enabled` says, a secret is needed."""
    if not config.webhook.secrets:
        raise ConfigError(config.source, "webhook.secret", None, WEBHOOK_SECRET_EXPECTED)
    # a reload (SIGHUP) re-reads the file the same way, so that only what changed in it is reported
    loader = config_loader(config)
    return Daemon(Runtime.build(receive_only(config)), load_config=lambda: receive_only(loader())).run()


def receive_only(config: Config) -> Config:
    """The config as `serve-webhooks` runs it (and reloads it): no stream to poll, the receiver on."""
    return replace(config, poll=replace(config.poll, streams=()), webhook=replace(config.webhook, enabled=True))
