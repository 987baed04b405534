"""The project's error types: one base, few subclasses, messages built from the facts."""

from __future__ import annotations


class LangfusePollerError(Exception):
    """Raised when langfuse-poller cannot do what it was asked; the message says what, where and what was expected."""


class ConfigError(LangfusePollerError):
    """Raised when the configuration file or environment holds a value that cannot be used."""

    def __init__(self, source: str, key: str, found: object, expected: str) -> None:
        self.source = source
        self.key = key
        self.found = found
        self.expected = expected
        super().__init__(f"{source}: {key}: expected {expected}, found {found!r}")


class ApiError(LangfusePollerError):
    """Raised when the Langfuse API answers with an error that retrying will not fix, or keeps failing."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class AuthError(ApiError):
    """Raised when the Langfuse host rejects the configured API keys."""


class StateError(LangfusePollerError):
    """Raised when the state database cannot be opened, locked or migrated."""


class DeliveryError(LangfusePollerError):
    """Raised by a notifier when a delivery failed; `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool = True, retry_after: float | None = None) -> None:
        self.retryable = retryable
        self.retry_after = retry_after
        super().__init__(message)
