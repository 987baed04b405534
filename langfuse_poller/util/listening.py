"""Addresses the daemon listens on (`[metrics] listen`, and any other `listen` key): parsing, and `check`'s probe.

`listen_addresses(config)` is the one list of them: `check` probes each, so a section that adds a listener
(the webhook receiver's `[webhook]`) extends that function, and the readiness report follows.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .lockfile import lock_holder

if TYPE_CHECKING:
    from ..config import Config

LISTEN_FORM = 'an address and port such as "127.0.0.1:9464", "[::1]:9464" or "0.0.0.0:9464"'


def parse_listen(text: str) -> tuple[str, int]:
    """`host:port` (an IP address, IPv6 in brackets, or localhost) into (host, port); ValueError otherwise."""
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(text)
    if host != "localhost":
        ipaddress.ip_address(host)
    return host, int(port_text)


def format_listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
