"""`check`: a readiness report. Validates config, rules, notifiers and state, and reaches Langfuse with the keys.

`listen_addresses(config)` is the one list of the addresses the daemon listens on: `check` probes each, so a
section that adds a listener (the webhook receiver's `[webhook]`) extends that function, and the report follows.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass
from typing import TextIO

from ..config import WEBHOOK_PORTS, Config
from ..errors import LangfusePollerError
from ..util.listening import format_listen
from ..util.lockfile import lock_holder


def run_check(config: Config, *, out: TextIO) -> int:
    """Print one line per check; return the number of problems."""
    problems = 0

    def report(ok: bool, what: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        out.write(f"{'ok  ' if ok else 'FAIL'} {what}\n")

    from ..registry import Router, import_handler_modules, registry

    # a config error (a bad CEL condition, a handler module that does not import) ends the check with exit 2
    import_handler_modules(config.handler_modules, config.source)
    router = Router(config.rules, registry, config.source)
    report(True, f"config {config.source}: {len(router.rules)} rules, {len(registry.handlers)} handlers")

    from ..notifiers import build_notifier

    for name, notifier_config in config.notifiers.items():
        try:
            build_notifier(notifier_config).close()
            report(True, f"notifier {name} ({notifier_config.type})")
        except Exception as exc:
            report(False, f"notifier {name} ({notifier_config.type}): {exc}")

    for ok, what in check_listeners(config):
        report(ok, what)
    for what in webhook_warnings(config):
        # not a failure: a proxy or a whitelist this check cannot see may make it work
        out.write(f"warn {what}\n")

    from ..store import Store

    try:
        store = Store(config.state_path)
        with store.write():
            pass
        store.close()
        report(True, f"state {config.state_path} is writable")
    except (LangfusePollerError, OSError) as exc:
        report(False, f"state {config.state_path}: {exc}")
    except Exception as exc:  # sqlite3.OperationalError: a read-only file or directory
        report(False, f"state {config.state_path} is not writable: {exc}")

    if config.queue.backend == "redis":
        from ..redis.standby.report import check_redis

        report(*check_redis(config.queue, config.delivery.timeout.total_seconds()))

    from ..langfuse.reader import ENDPOINTS, LangfuseReader

    reader = LangfuseReader(config.langfuse)
    try:
        result = reader.check()
        projects = ", ".join(f"{name} ({pid})" for pid, name in result.projects) or "no project"
        report(
            True,
            f"Langfuse {config.langfuse.base_url} (version {result.version}) accepts the keys: {projects}",
        )
        # the endpoints the poller would read: the configured read path, or the newest the server has
        paths = [(stream, reader.find_read_path(stream)) for stream in config.poll.streams]
        read = ", ".join(f"{stream} from {ENDPOINTS[stream, path]}" for stream, path in paths)
        names = sorted({path for _, path in paths})
        report(True, f'read path {" and ".join(names)} (api = "{config.langfuse.api}"): {read}')
    except LangfusePollerError as exc:
        report(False, str(exc))
    finally:
        reader.close()
    out.write("all checks passed\n" if problems == 0 else f"{problems} problem(s) found\n")
    return problems


@dataclass(frozen=True)
class ListenAddress:
    """One address the daemon will listen on, and the config key that asks for it."""

    key: str
    host: str
    port: int

    def __str__(self) -> str:
        return format_listen(self.host, self.port)


def listen_addresses(config: Config) -> list[ListenAddress]:
    """Every address `run` will listen on with this config: a new listener adds itself here, and `check`
    probes it. (`serve-webhooks` listens on `[webhook] listen` whether or not `enabled` says so.)"""
    found = []
    if config.metrics.enabled:
        found.append(ListenAddress("metrics.listen", config.metrics.host, config.metrics.port))
    if config.webhook.enabled:
        found.append(ListenAddress("webhook.listen", config.webhook.host, config.webhook.port))
    return found


def probe(address: ListenAddress) -> OSError | None:
    """Bind the address for a moment, as the daemon will: the error, or None when it is free."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # as socketserver does: a port in TIME_WAIT after a restart is free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address.host, address.port))
    except OSError as exc:
        return exc
    return None


def describe_probe(address: ListenAddress, error: OSError | None, running_pid: str | None) -> tuple[bool, str]:
    """`check`'s line for one address: (ok, words)."""
    where = f"{address.key} {address}"
    if error is None:
        return True, f"{where} is free"
    if error.errno == errno.EADDRINUSE and running_pid is not None:
        # the running daemon holds the port itself: what a check during operation expects
        return True, f"{where} is in use, by the running langfuse-poller (pid {running_pid}) presumably"
    if error.errno == errno.EADDRINUSE:
        return False, f"{where} is in use by another program: choose another port in {address.key}"
    if error.errno == errno.EADDRNOTAVAIL:
        return False, f"{where}: no interface of this machine has that address; fix {address.key}"
    if error.errno == errno.EACCES:
        return False, f"{where}: permission denied (ports below 1024 need privileges); fix {address.key}"
    return False, f"{where} cannot be listened on: {error.strerror}"


def check_listeners(config: Config) -> list[tuple[bool, str]]:
    """`check`'s lines for every address `run` will listen on: free, or held by the running daemon itself."""
    addresses = listen_addresses(config)
    if not addresses:
        return []
    running = lock_holder(config.state_path)
    return [describe_probe(address, probe(address), running) for address in addresses]


# hostnames Langfuse refuses as they are (packages/shared/src/server/webhooks/ipBlocking.ts), besides private IPs
_BLOCKED_NAMES = ("localhost", "internal", "intranet")


def webhook_warnings(config: Config) -> list[str]:
    """`check`'s warnings about where Langfuse can deliver: it sends only to ports 80 and 443, and only to public
    addresses unless a self-hosted server whitelists others. Empty when the receiver is not configured."""
    webhook = config.webhook
    if not (webhook.enabled or webhook.secrets):
        return []
    warnings = []
    if webhook.public_url is None and webhook.port not in WEBHOOK_PORTS:
        warnings.append(
            f"webhook.listen {format_listen(webhook.host, webhook.port)}: Langfuse delivers only to ports 80 and "
            "443; put a reverse proxy on 443 in front of it (or use langfuse-poller-webhooks.socket) and set "
            "webhook.public_url to the URL configured in Langfuse"
        )
    if webhook.public_url is not None:
        from urllib.parse import urlsplit

        host = (urlsplit(webhook.public_url).hostname or "").rstrip(".").lower()
        try:
            address = ipaddress.ip_address(host)
            private = not address.is_global
        except ValueError:
            private = any(host == name or host.endswith(f".{name}") for name in _BLOCKED_NAMES)
        if private:
            warnings.append(
                f"webhook.public_url {webhook.public_url}: Langfuse refuses private and loopback addresses unless "
                "a self-hosted server whitelists them (LANGFUSE_WEBHOOK_WHITELISTED_HOST, _IPS or _IP_SEGMENTS)"
            )
    return warnings
