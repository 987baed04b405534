"""Configuration: found, read and checked once, into frozen typed objects.

Nothing past `load_config` touches a raw TOML dict. Every error names the file, the key, what was found
and what was expected, so that a person can fix it without reading the code.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .usage_config import UsageConfig, parse_usage
from .util.durations import DURATION_FORM, START_FORM, parse_duration, parse_start
from .util.listening import LISTEN_FORM, parse_listen
from .util.redis_url import CLUSTER_FORM, is_cluster_url, parse_cluster_url
from .util.toml_tables import Secret, Table

if TYPE_CHECKING:
    from .notifiers.base import NotifierConfig
    from .rules import Rule

APP_NAME = "langfuse-poller"
SYSTEM_CONFIG = Path("/etc/langfuse-poller/config.toml")
# the source of a config made of defaults and the environment alone: errors name it, and a reload looks again
NO_CONFIG_FILE = "<no config file>"
DEFAULT_BASE_URL = "https://cloud.langfuse.com"
STREAMS = ("observations", "scores")
# the read paths: "v2" is /v2/observations and /v3/scores; "legacy" the page-based lists of self-hosted v3 servers
API_CHOICES = ("auto", "v2", "legacy")
# field groups of /v2/observations beyond the ones the events always need (see langfuse/reader.py), which add
# their fields to the events (see ExtraFields in events.py)
OPTIONAL_FIELD_GROUPS = ("io", "metadata", "prompt")
ALWAYS_READ_GROUPS = ("core", "basic", "time", "model", "usage", "metrics", "trace_context")
FIELDS_FORM = (
    "a list of field groups from 'io', 'metadata', 'prompt' "
    "(core, basic, time, model, usage, metrics and trace_context are always read)"
)
DEFAULT_IO_MAX_CHARS = 2000


@dataclass(frozen=True)
class LangfuseConfig:
    """Where Langfuse is and the keys that read it."""

    base_url: str
    public_key: str
    secret_key: Secret
    timeout: timedelta = timedelta(seconds=30)
    max_requests_per_minute: int = 0
    # which endpoints to read: "auto" probes the server (see langfuse/reader.py), "v2" or "legacy" force one
    api: str = "auto"
    # the budget of the legacy endpoints' own, smaller rate-limit bucket (traces, v1 observations)
    legacy_max_requests_per_minute: int = 0


@dataclass(frozen=True)
class PollConfig:
    """How often and how far back the poller reads. See poller.py for the window and sweep design."""

    interval: timedelta = timedelta(seconds=10)
    lookback: timedelta = timedelta(minutes=10)
    start: str = "now"
    streams: tuple[str, ...] = STREAMS
    # Langfuse makes most records readable 15-30 s after they start; a head that waits that long reads them
    # the first time, instead of leaving them to the re-reads minutes later (see BENCHMARKS.md, completeness)
    settle: timedelta = timedelta(seconds=30)
    reread: tuple[timedelta, ...] = (timedelta(minutes=1),)
    sweep_interval: timedelta = timedelta(minutes=2)
    catchup_slice: timedelta = timedelta(hours=1)
    fields: tuple[str, ...] = ()
    environments: tuple[str, ...] = ()
    # input and output in the events: redacted by these patterns, then cut to this many characters (0: whole)
    io_max_chars: int = DEFAULT_IO_MAX_CHARS
    redact_io: tuple[str, ...] = ()
    # metadata keys sent as expandMetadata, which makes the server send every metadata value uncut
    expand_metadata: tuple[str, ...] = ()

    @property
    def sweep_ages(self) -> tuple[timedelta, ...]:
        """The ages at which records are read again: each `reread` age, then `lookback`."""
        return tuple(sorted({*self.reread, self.lookback}))


@dataclass(frozen=True)
class WebhookConfig:
    """`[webhook]`: the receiver of Langfuse's own webhooks (see webhooks/receiver.py). Never without a secret."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8787
    path: str = "/api/webhooks/langfuse"
    # several during a rotation: a request signed with any of them is accepted
    secrets: tuple[Secret, ...] = ()
    tolerance: timedelta = timedelta(minutes=5)
    max_body: int = 1 << 20
    accept_unsigned_timestamp: bool = False
    timeout: timedelta = timedelta(seconds=10)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # the URL configured in Langfuse (a reverse proxy's, or this receiver's on 443); `check` reads it
    public_url: str | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    """Retries and retention of the durable delivery queue."""

    max_attempts: int = 10
    backoff: timedelta = timedelta(seconds=1)
    max_backoff: timedelta = timedelta(minutes=10)
    timeout: timedelta = timedelta(seconds=10)
    retention: timedelta = timedelta(days=7)


QUEUE_BACKENDS = ("sqlite", "redis")
# a lease shorter than a second is renewed more often than a busy Redis answers; longer than 10 minutes makes a
# takeover slower than anyone would wait for
MIN_LEASE = timedelta(seconds=1)
MAX_LEASE = timedelta(minutes=10)


@dataclass(frozen=True)
class QueueConfig:
    """Where deliveries to handlers and notifiers run: in this process ("sqlite") or in BullMQ workers ("redis")."""

    backend: str = "sqlite"
    url: str = "redis://127.0.0.1:6379/0"
    name: str = "langfuse-events"
    # several `run` processes share the Redis: one holds the lease and polls, the others wait to take over
    standby: bool = False
    lease: timedelta = timedelta(seconds=15)
    # who this process is in the lease and in `status`; empty: "<hostname>:<pid>", chosen at start
    replica: str = ""

    @property
    def display_url(self) -> str:
        """The URL without its password, for logs and messages."""
        return redacted_url(self.url)

    @property
    def cluster(self) -> bool:
        """Whether `url` names a Redis Cluster (`redis+cluster://`): its keys then carry one hash tag."""
        return is_cluster_url(self.url)


def redacted_url(url: str) -> str:
    """A URL with the password of its user info replaced by ***."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}" if colon else f"{scheme}://***@{host}"


@dataclass(frozen=True)
class MetricsConfig:
    """`[metrics]`: where the Prometheus endpoint listens; off unless `listen` is set."""

    host: str = ""
    port: int = 0
    # the usage metrics (`usage = true`), None when off
    usage: UsageConfig | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.host)


@dataclass(frozen=True)
class Config:
    """The whole configuration, after every check."""

    source: str
    langfuse: LangfuseConfig
    poll: PollConfig
    state_path: Path
    handler_modules: tuple[str, ...]
    rules: tuple[Rule, ...]
    notifiers: Mapping[str, NotifierConfig]
    delivery: DeliveryConfig
    metrics: MetricsConfig = MetricsConfig()
    webhook: WebhookConfig = WebhookConfig()
    queue: QueueConfig = QueueConfig()


def default_state_path() -> Path:
    from platformdirs import user_state_path

    return user_state_path(APP_NAME) / "state.db"


def find_config_file(explicit: str | None = None) -> Path | None:
    """The config file to read: --config, else $LANGFUSE_POLLER_CONFIG, else the user config dir, else /etc."""
    if explicit:
        return Path(explicit)
    if os.environ.get("LANGFUSE_POLLER_CONFIG"):
        return Path(os.environ["LANGFUSE_POLLER_CONFIG"])
    from platformdirs import user_config_path

    for candidate in (user_config_path(APP_NAME) / "config.toml", SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def load_config(explicit: str | None = None) -> Config:
    """Find and read the config (see `find_config_file`); with no file at all, defaults and the environment."""
    path = find_config_file(explicit)
    if path is None:
        return parse_config({}, NO_CONFIG_FILE)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "<file>", exc.strerror, "a readable TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "<file>", f"byte {exc.start} is not UTF-8", "a UTF-8 TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "<syntax>", str(exc), "valid TOML") from None
    return parse_config(data, str(path))


def parse_config(data: Mapping[str, Any], source: str) -> Config:
    """Check a parsed TOML document and build the Config; raises ConfigError naming the first bad key."""
    from .notifiers import parse_notifier
    from .rules import parse_rules

    top = Table(source, "", data)
    langfuse = _parse_langfuse(top.table("langfuse"))
    poll = _parse_poll(top.table("poll"))

    state = top.table("state")
    state_path_text = state.string("path", env=("LANGFUSE_POLLER_STATE",))
    state_path = Path(state_path_text).expanduser() if state_path_text else default_state_path()
    state.finish()

    handlers = top.table("handlers")
    modules = handlers.str_list("modules")
    handlers.finish()

    delivery = _parse_delivery(top.table("delivery"))
    webhook = _parse_webhook(top.table("webhook"))
    queue = _parse_queue(top.table("queue"))

    notifiers_table = top.table("notifiers")
    notifiers: dict[str, NotifierConfig] = {}
    for name in notifiers_table.data:
        entry = notifiers_table.table(name)
        notifiers[name] = parse_notifier(name, entry)
    notifiers_table.finish()

    rules = parse_rules(top, notifiers)
    metrics = _parse_metrics(top.table("metrics"), poll)
    top.finish()
    return Config(
        source=source,
        langfuse=langfuse,
        poll=poll,
        state_path=state_path,
        handler_modules=modules,
        rules=rules,
        notifiers=notifiers,
        delivery=delivery,
        metrics=metrics,
        webhook=webhook,
        queue=queue,
    )


def _parse_langfuse(table: Table) -> LangfuseConfig:
    base_url = table.string("base_url", env=("LANGFUSE_BASE_URL", "LANGFUSE_HOST")) or DEFAULT_BASE_URL
    if not base_url.startswith(("http://", "https://")):
        raise table.error("base_url", base_url, "an http:// or https:// URL such as https://cloud.langfuse.com")
    public_key = table.required_str(
        "public_key",
        env=("LANGFUSE_PUBLIC_KEY",),
        expected="a public key (pk-lf-...) in [langfuse] public_key or the LANGFUSE_PUBLIC_KEY environment variable",
    )
    secret_key = table.secret("secret_key", env=("LANGFUSE_SECRET_KEY",))
    if secret_key is None:
        raise table.error(
            "secret_key",
            None,
            "a secret key (sk-lf-...) in [langfuse] secret_key, secret_key_file, "
            "or the LANGFUSE_SECRET_KEY environment variable",
        )
    api = table.string("api", "auto") or "auto"
    if api not in API_CHOICES:
        raise table.error("api", api, "one of " + ", ".join(repr(c) for c in API_CHOICES))
    max_requests_per_minute = table.integer("max_requests_per_minute", 0)
    config = LangfuseConfig(
        base_url=base_url.rstrip("/"),
        public_key=public_key,
        secret_key=secret_key,
        timeout=table.positive_duration("timeout", "30s"),
        max_requests_per_minute=max_requests_per_minute,
        api=api,
        # unset: the same budget per minute as every other endpoint, counted apart
        legacy_max_requests_per_minute=table.integer("legacy_max_requests_per_minute", max_requests_per_minute),
    )
    table.finish()
    return config


def _parse_poll(table: Table) -> PollConfig:
    interval = table.positive_duration("interval", "10s")
    lookback = table.duration("lookback", "10m")
    start = table.string("start", "now") or "now"
    try:
        parse_start(start, datetime.now(UTC))
    except ValueError:
        raise table.error("start", start, START_FORM) from None
    reread_raw = table.raw("reread")
    if reread_raw is None:
        reread: tuple[timedelta, ...] = (timedelta(minutes=1),)
    elif isinstance(reread_raw, list):
        try:
            reread = tuple(parse_duration(v) for v in reread_raw)
        except ValueError:
            raise table.error("reread", reread_raw, f"a list of durations, each {DURATION_FORM}") from None
    else:
        raise table.error("reread", reread_raw, f"a list of durations, each {DURATION_FORM}")
    reread = tuple(age for age in reread if age < lookback)
    config = PollConfig(
        interval=interval,
        lookback=lookback,
        start=start,
        streams=table.str_list("streams", STREAMS, choices=STREAMS),
        settle=table.duration("settle", "30s"),
        reread=reread,
        sweep_interval=table.positive_duration("sweep_interval", "2m"),
        catchup_slice=table.positive_duration("catchup_slice", "1h"),
        environments=table.str_list("environments", ()),
        **_field_groups(table),
    )
    table.finish()
    return config


def _field_groups(table: Table) -> dict[str, Any]:
    """`[poll] fields` and the keys that shape what those groups add to the events."""
    fields = _str_list(table, "fields", FIELDS_FORM)
    for group in fields:
        if group not in OPTIONAL_FIELD_GROUPS:
            raise table.error("fields", group, FIELDS_FORM)
    redact_io = _str_list(
        table, "redact_io", 'a list of regular expressions (Python re syntax), such as ["sk-[A-Za-z0-9]+"]'
    )
    for pattern in redact_io:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise table.error(
                "redact_io", pattern, f"a list of regular expressions (Python re syntax): {exc}"
            ) from None
        if compiled.search("") is not None:
            # it would put "[redacted]" between every two characters
            raise table.error("redact_io", pattern, "a list of regular expressions that cannot match an empty string")
    if redact_io and "io" not in fields:
        raise table.error("redact_io", list(redact_io), 'an empty list unless "io" in [poll] fields')
    expand_metadata = _str_list(table, "expand_metadata", "a list of metadata keys")
    for key in expand_metadata:
        if "," in key:
            # the server reads expandMetadata as one comma-separated list
            raise table.error("expand_metadata", key, "a list of metadata keys without commas")
    if expand_metadata and "metadata" not in fields:
        raise table.error("expand_metadata", list(expand_metadata), 'an empty list unless "metadata" in [poll] fields')
    return {
        "fields": fields,
        "io_max_chars": table.integer("io_max_chars", DEFAULT_IO_MAX_CHARS, minimum=0),
        "redact_io": redact_io,
        "expand_metadata": expand_metadata,
    }


def _str_list(table: Table, name: str, form: str) -> tuple[str, ...]:
    """A list of non-empty strings (one string: a list of one, as Table.str_list reads it); errors name `form`."""
    value = table.raw(name)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise table.error(name, value, form)
    return tuple(value)


WEBHOOK_SECRET_EXPECTED = (
    "a webhook secret (lf-whsec_...) in [webhook] secret (a string, or a list during a rotation), "
    "secret_file, or the LANGFUSE_WEBHOOK_SECRET environment variable"
)
WEBHOOK_LISTEN_FORM = 'an address and port such as "127.0.0.1:8787" or "[::1]:8787"'
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "kb": 1000, "mib": 1 << 20, "mb": 1000**2}


def _parse_webhook(table: Table) -> WebhookConfig:
    enabled = table.boolean("enabled", False)
    listen = table.string("listen", "127.0.0.1:8787") or "127.0.0.1:8787"
    host, port = _listen_address(table, listen, WEBHOOK_LISTEN_FORM)
    path = table.string("path", WebhookConfig.path) or WebhookConfig.path
    if not path.startswith("/") or path == "/healthz" or any(c in path for c in "?# "):
        raise table.error("path", path, 'a URL path starting with "/", other than /healthz')
    secrets = _webhook_secrets(table)
    tls_cert, tls_key = _pem_file(table, "tls_cert"), _pem_file(table, "tls_key")
    if (tls_cert is None) != (tls_key is None):
        missing = "tls_key" if tls_key is None else "tls_cert"
        raise table.error(missing, None, "both tls_cert and tls_key, or neither (then plain HTTP is served)")
    config = WebhookConfig(
        enabled=enabled,
        host=host,
        port=port,
        path=path,
        secrets=secrets,
        tolerance=table.positive_duration("tolerance", "5m"),
        max_body=_size(table, "max_body", WebhookConfig.max_body),
        accept_unsigned_timestamp=table.boolean("accept_unsigned_timestamp", False),
        timeout=table.positive_duration("timeout", "10s"),
        tls_cert=tls_cert,
        tls_key=tls_key,
        public_url=_public_url(table),
    )
    table.finish()  # first: a misspelt `secert` is named as such
    if enabled and not secrets:
        # the receiver never accepts unsigned input
        raise table.error("secret", None, WEBHOOK_SECRET_EXPECTED)
    return config


# Langfuse checks a webhook URL when the automation is saved and at every attempt
# (packages/shared/src/server/webhooks/validation.ts): http or https, no credentials, port 80 or 443 only
WEBHOOK_PORTS = (80, 443)
PUBLIC_URL_FORM = "the URL configured in Langfuse, such as https://hooks.example.com/api/webhooks/langfuse"


def _public_url(table: Table) -> str | None:
    """`public_url`: where Langfuse delivers. Refused here when Langfuse itself would refuse it."""
    from urllib.parse import urlsplit

    text = table.string("public_url")
    if text is None:
        return None
    try:
        url = urlsplit(text.strip())
        port = url.port
    except ValueError:
        raise table.error("public_url", text, PUBLIC_URL_FORM) from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise table.error("public_url", text, f"an http:// or https:// URL: {PUBLIC_URL_FORM}")
    if url.username is not None or url.password is not None:
        raise table.error("public_url", text, "a URL without user:password@ (Langfuse refuses credentials in it)")
    if port is not None and port not in WEBHOOK_PORTS:
        raise table.error(
            "public_url",
            text,
            f"a URL on port 80 or 443, or with no port (Langfuse delivers to no other port, not even to "
            f"whitelisted hosts; put a reverse proxy on 443 in front of port {port})",
        )
    return text.strip()


def _pem_file(table: Table, name: str) -> Path | None:
    text = table.string(name)
    if text is None:
        return None
    path = Path(text).expanduser()
    if not path.is_file():
        raise table.error(name, text, "the path of a readable PEM file")
    return path


def _listen_address(table: Table, text: str, form: str) -> tuple[str, int]:
    """`listen = "host:port"`: an IP address (IPv6 in brackets) or localhost, and a port (0: any free one)."""
    try:
        return parse_listen(text)
    except ValueError:
        raise table.error("listen", text, form) from None


def _webhook_secrets(table: Table) -> tuple[Secret, ...]:
    """`secret` (a string or a list), else `secret_file` (one secret a line), else $LANGFUSE_WEBHOOK_SECRET
    (several separated by commas)."""
    value = table.raw("secret")
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            # the values are secrets: never echo them
            raise table.error("secret", "<hidden>", "a non-empty string or a list of non-empty strings")
        if table.raw("secret_file") is not None:
            raise table.error("secret_file", "both set", "either webhook.secret or webhook.secret_file, not both")
        return tuple(Secret(v.strip()) for v in value)
    secret = table.secret("secret", env=("LANGFUSE_WEBHOOK_SECRET",))
    if secret is None:
        return ()
    # during a rotation a file or the environment holds several: one a line, or separated by commas
    parts = [p.strip() for p in secret.reveal().replace(",", "\n").splitlines()] if value is None else [secret.value]
    return tuple(Secret(p) for p in parts if p)


def _size(table: Table, name: str, default: int) -> int:
    """A size in bytes: a number, or a string such as "64KiB", "1MiB", "2MB"; at least 1 KiB."""
    import re

    value = table.raw(name)
    if value is None:
        return default
    size: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)):
        unit = _SIZE_UNITS.get(match.group(2).lower())
        size = None if unit is None else float(match.group(1)) * unit
    if size is None or not 1024 <= size <= 1 << 30:
        raise table.error(name, value, 'a size between 1 KiB and 1 GiB: bytes, or "64KiB", "1MiB", "2MB"')
    return int(size)


def _parse_delivery(table: Table) -> DeliveryConfig:
    config = DeliveryConfig(
        max_attempts=table.integer("max_attempts", 10, minimum=1),
        backoff=table.positive_duration("backoff", "1s"),
        max_backoff=table.positive_duration("max_backoff", "10m"),
        timeout=table.positive_duration("timeout", "10s"),
        retention=table.positive_duration("retention", "7d"),
    )
    table.finish()
    return config


def _parse_metrics(table: Table, poll: PollConfig) -> MetricsConfig:
    text = table.string("listen")
    usage = parse_usage(table, poll.fields)
    table.finish()
    if text is None:
        if usage is not None:
            raise table.error("usage", True, 'false, or an endpoint to serve them: listen = "127.0.0.1:9464"')
        return MetricsConfig()
    return MetricsConfig(*_listen_address(table, text, LISTEN_FORM), usage=usage)


def _importable(module: str) -> bool:
    """Whether an optional dependency is installed, found without importing it (bullmq takes a while)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _parse_queue(table: Table) -> QueueConfig:
    backend = table.string("backend", "sqlite") or "sqlite"
    if backend not in QUEUE_BACKENDS:
        raise table.error("backend", backend, "one of " + ", ".join(repr(b) for b in QUEUE_BACKENDS))
    if backend == "redis" and (missing := [m for m in ("bullmq", "redis") if not _importable(m)]):
        raise table.error(
            "backend",
            backend,
            f'"sqlite", or the redis extra installed ({" and ".join(missing)} cannot be imported): '
            'pip install "langfuse-poller[redis]"',
        )
    url = table.string("url", QueueConfig.url, env=("LANGFUSE_POLLER_REDIS_URL",)) or QueueConfig.url
    found = redacted_url(url) if "@" in url else url
    if is_cluster_url(url):
        try:
            parse_cluster_url(url)
        except ValueError as exc:
            raise table.error("url", found, f"{CLUSTER_FORM}: {exc}") from None
    elif not url.startswith(("redis://", "rediss://", "unix://")):
        raise table.error(
            "url", found, f"a Redis URL such as redis://127.0.0.1:6379/0 (or rediss://, unix://, {CLUSTER_FORM})"
        )
    name = table.string("name", QueueConfig.name) or QueueConfig.name
    if ":" in name:
        # BullMQ refuses queue names with ":", its key separator
        raise table.error("name", name, 'a BullMQ queue name without ":", such as "langfuse-events"')
    standby = table.boolean("standby", False)
    if standby and backend != "redis":
        # the lease, the watermark and the dedup keys live in Redis: without it there is nothing to share
        raise table.error("standby", standby, 'false, or backend = "redis" in the same table')
    lease = table.duration("lease", "15s")
    if not MIN_LEASE <= lease <= MAX_LEASE:
        raise table.error("lease", table.raw("lease"), f"{DURATION_FORM}, between 1s and 10m")
    replica = table.string("replica", "") or ""
    if replica and not re.fullmatch(r"[A-Za-z0-9._:@/-]{1,100}", replica):
        raise table.error("replica", replica, "up to 100 letters, digits and . _ : @ / - (default: <hostname>:<pid>)")
    config = QueueConfig(backend=backend, url=url, name=name, standby=standby, lease=lease, replica=replica)
    table.finish()
    return config
