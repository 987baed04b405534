"""`listen = "host:port"`, as the config spells the addresses the daemon listens on (`[metrics]`, `[webhook]`),
and back: parsed into (host, port), written for logs and messages.

`check` probes the addresses a config asks for: see `listen_addresses` in service/check.py.
"""

from __future__ import annotations

import ipaddress

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
    """(host, port) as `host:port`, an IPv6 host in brackets: how logs and messages show an address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
