"""Where Langfuse can deliver: `[webhook] public_url` is checked as Langfuse checks a webhook URL, and `check` warns
about a receiver that Langfuse cannot reach (a port other than 80 and 443, a private address).

Langfuse's rules (`packages/shared/src/server/webhooks/validation.ts`, `ipBlocking.ts`): http or https, no
credentials in the URL, port 80 or 443 only (no whitelist lifts that), and no private or loopback address unless
the self-hosted server whitelists it.
"""

from __future__ import annotations

import io
import socket
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller.config import load_config, parse_config
from langfuse_poller.errors import ConfigError
from langfuse_poller.service.check import run_check
from langfuse_poller.testing.fake_langfuse import FakeLangfuse

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
SECRET = "lf-whsec_3f9d2c7a41e84b0f9a6c5d2e1b7f8a90"


def config_data(tmp_path: Path, base_url: str = "http://127.0.0.1:9", **webhook: Any) -> dict[str, Any]:
    return {
        "langfuse": {"base_url": base_url, "public_key": "pk-lf-test", "secret_key": "sk-lf-test"},
        "state": {"path": str(tmp_path / "state.db")},
        "webhook": {"enabled": True, "secret": SECRET, **webhook},
    }


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://hooks.example.com:8787/api/webhooks/langfuse", "port 80 or 443"),
        ("http://hooks.example.com:8080/", "not even to whitelisted hosts"),
        ("ftp://hooks.example.com/", "an http:// or https:// URL"),
        ("hooks.example.com/api/webhooks/langfuse", "an http:// or https:// URL"),
        ("https://user:password@hooks.example.com/", "without user:password@"),
        ("https://hooks.example.com:99999/", "the URL configured in Langfuse"),
    ],
)
def test_a_public_url_that_langfuse_refuses_is_a_config_error_that_says_why(
    tmp_path: Path, url: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config_data(tmp_path, public_url=url), "config.toml")
    assert info.value.key == "webhook.public_url"
    assert words in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/api/webhooks/langfuse",
        "https://hooks.example.com:443/api/webhooks/langfuse",
        "http://hooks.example.com:80/langfuse",
    ],
)
def test_urls_on_80_or_443_are_accepted(tmp_path: Path, url: str) -> None:
    assert parse_config(config_data(tmp_path, public_url=url), "config.toml").webhook.public_url == url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def checked(data: dict[str, Any]) -> tuple[int, list[str]]:
    out = io.StringIO()
    problems = run_check(parse_config(data, "config.toml"), out=out)
    return problems, [line for line in out.getvalue().splitlines() if line.startswith("warn ")]


def test_check_warns_about_a_listen_port_langfuse_cannot_deliver_to_unless_a_public_url_says_where(
    tmp_path: Path,
) -> None:
    port = free_port()
    with FakeLangfuse() as fake:
        problems, warnings = checked(config_data(tmp_path, fake.url, listen=f"127.0.0.1:{port}"))
        assert problems == 0  # a warning, not a failure
        assert warnings == [
            f"warn webhook.listen 127.0.0.1:{port}: Langfuse delivers only to ports 80 and 443; put a reverse "
            "proxy on 443 in front of it (or use langfuse-poller-webhooks.socket) and set webhook.public_url to "
            "the URL configured in Langfuse"
        ]
        public = "https://hooks.example.com/api/webhooks/langfuse"
        problems, warnings = checked(config_data(tmp_path, fake.url, listen=f"127.0.0.1:{port}", public_url=public))
        assert (problems, warnings) == (0, [])
        problems, warnings = checked(
            config_data(tmp_path, fake.url, listen=f"127.0.0.1:{port}", public_url="https://10.1.2.3/hook")
        )
        assert problems == 0 and len(warnings) == 1
        assert "Langfuse refuses private and loopback addresses unless" in warnings[0]
        assert "LANGFUSE_WEBHOOK_WHITELISTED_HOST" in warnings[0]
        # no receiver configured: nothing to say
        data = config_data(tmp_path, fake.url)
        del data["webhook"]
        assert checked(data) == (0, [])


def test_the_example_config_documents_public_url() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    assert "# public_url = " in text and "ports 80 and 443" in text
    example = load_config(str(EXAMPLE))
    assert example.webhook.public_url is None
