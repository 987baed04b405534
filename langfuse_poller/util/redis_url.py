"""`[queue] url` for a Redis Cluster: `redis+cluster://[user:password@]host:port[,host:port...]`.

The cluster is named in the URL, not by a separate `cluster = true` key: whether Redis is one server or a
cluster is a fact about where it is, like TLS (`rediss://`), so it travels with the address, and the one
variable `LANGFUSE_POLLER_REDIS_URL` moves a deployment from one to the other. A cluster also needs more than
one address to start from (a seed may be down when the process starts), which a plain Redis URL cannot carry.
The seeds only serve to find the cluster: the client asks any of them for the map of slots and nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
CLUSTER_FORM = "redis+cluster://[user:password@]host:port[,host:port...] (rediss+cluster:// for TLS)"


@dataclass(frozen=True)
class ClusterUrl:
    """A cluster URL, parsed: the seed nodes, the credentials, TLS."""

    seeds: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def is_cluster_url(url: str) -> bool:
    """Whether `url` names a Redis Cluster (by its scheme)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterUrl:
    """The seeds and credentials of a cluster URL. Raises ValueError saying what is wrong (never the password)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError("the scheme must be redis+cluster or rediss+cluster")
    userinfo, at, hosts = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    # a cluster has one database, 0 (SELECT is refused there); "/0" is accepted for symmetry with redis://
    hosts, _, path = hosts.partition("/")
    if path not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, not /{path}")
    if "?" in hosts:
        raise ValueError("query options are not read from a cluster URL")
    seeds = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"each seed must be host:port, got {item.strip()!r}")
        seeds.append((host.strip("[]"), int(port)))
    return ClusterUrl(tuple(seeds), username, password, scheme.lower() == "rediss+cluster")
