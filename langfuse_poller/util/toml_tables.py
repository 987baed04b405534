"""Reading TOML tables into typed values: each getter names the file and the key when a value will not do.

`Table` is what config.py, rules.py and every notifier type read their part of the file with, and `Secret`
what they keep a secret in; `ConfigError` carries the file, the key, what was found and what was expected.
Nothing here knows which keys the project has: that is config.py's, rules.py's and the notifiers' own business.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .durations import DURATION_FORM, parse_duration
from .redaction import hide


@dataclass(frozen=True)
class Secret:
    """A secret value that never shows itself in repr, str, logs or errors."""

    value: str = field(repr=False)

    def __post_init__(self) -> None:
        # whatever logs it by mistake (a library logging a URL with its token), the log shows *** instead
        hide(self.value)

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it."""
        return self.value


class Table:
    """One TOML table being read: typed getters that name the key on error, and a check for unknown keys."""

    def __init__(self, source: str, prefix: str, data: Mapping[str, Any]) -> None:
        self.source = source
        self.prefix = prefix
        self.data = data
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        """The dotted name of a key in this table, as errors show it."""
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, found: object, expected: str) -> ConfigError:
        """A ConfigError about one key of this table."""
        return ConfigError(self.source, self.key(name), found, expected)

    def raw(self, name: str) -> Any:
        self._read.add(name)
        return self.data.get(name)

    def has(self, name: str) -> bool:
        return name in self.data

    def string(self, name: str, default: str | None = None, *, env: Sequence[str] = ()) -> str | None:
        value = self.raw(name)
        if value is None:
            for var in env:
                if os.environ.get(var):
                    return os.environ[var]
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.error(name, value, "a non-empty string")
        return value

    def required_str(self, name: str, *, env: Sequence[str] = (), expected: str = "a non-empty string") -> str:
        value = self.string(name, env=env)
        if value is None:
            raise self.error(name, None, expected)
        return value

    def secret(self, name: str, *, env: Sequence[str] = ()) -> Secret | None:
        """A secret from the key itself, from `<key>_file`, or from the environment, in that order."""
        file_key = f"{name}_file"
        path = self.raw(file_key)
        if self.has(name) and path is not None:
            raise self.error(file_key, "both set", f"either {self.key(name)} or {self.key(file_key)}, not both")
        if path is not None:
            if not isinstance(path, str):
                raise self.error(file_key, path, "the path of a file holding the secret")
            try:
                text = expand_path(path).read_text(encoding="utf-8").strip()
            except KeyError as exc:
                raise self.error(file_key, path, _unset_variable(exc.args[0])) from None
            except OSError as exc:
                raise self.error(file_key, path, f"a readable file ({exc.strerror})") from None
            if not text:
                raise self.error(file_key, path, "a file holding the secret, found an empty file")
            return Secret(text)
        value = self.raw(name)
        if value is not None:
            if not isinstance(value, str) or not value.strip():
                # the value itself is a secret: never echo it
                raise self.error(name, "<hidden>", "a non-empty string")
            return Secret(value)
        for var in env:
            if os.environ.get(var):
                return Secret(os.environ[var])
        return None

    def duration(self, name: str, default: str | float) -> timedelta:
        value = self.raw(name)
        try:
            return parse_duration(default if value is None else value)
        except ValueError:
            raise self.error(name, value, DURATION_FORM) from None

    def positive_duration(self, name: str, default: str | float) -> timedelta:
        value = self.duration(name, default)
        if value <= timedelta(0):
            raise self.error(name, self.raw(name), f"{DURATION_FORM}, greater than zero")
        return value

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(name, value, f"an integer >= {minimum}")
        if maximum is not None and value > maximum:
            raise self.error(name, value, f"an integer between {minimum} and {maximum}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, value, "true or false")
        return value

    def str_list(
        self, name: str, default: Sequence[str] = (), *, choices: Sequence[str] | None = None
    ) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return tuple(default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            expected = "a list of strings"
            if choices:
                expected += " from " + ", ".join(repr(c) for c in choices)
            raise self.error(name, value, expected)
        if choices is not None:
            for item in value:
                if item not in choices:
                    raise self.error(name, item, "one of " + ", ".join(repr(c) for c in choices))
        return tuple(value)

    def table(self, name: str) -> Table:
        value = self.raw(name)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.error(name, value, "a table")
        return Table(self.source, self.key(name), value)

    def finish(self) -> None:
        """Refuse keys nobody read: a misspelt key must not be ignored silently."""
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read)) or "no keys"
            # name the key, never its value: a misspelt `secert = "..."` holds a secret
            raise self.error(unknown[0], unknown[0], f"a known key of [{self.prefix or 'top level'}]: {known}")


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand_path(text: str) -> Path:
    """A path with `$NAME` or `${NAME}` replaced from the environment, and `~` expanded; KeyError(NAME) when a
    variable is not set. `secret_key_file = "${CREDENTIALS_DIRECTORY}/langfuse-secret-key"` reads a systemd
    credential wherever systemd mounted it."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            raise KeyError(name)
        return os.environ[name]

    return Path(_VARIABLE.sub(value, text)).expanduser()


def _unset_variable(name: str) -> str:
    hint = " (systemd sets it for a service with LoadCredential=)" if name == "CREDENTIALS_DIRECTORY" else ""
    return f"the path of a file holding the secret, with every variable set: ${name} is not set{hint}"
