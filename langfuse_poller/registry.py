"""The one handler registry: who gets which event, whatever its source (poll, webhook, test).

User code registers handlers with `@on("score.created")`; config `[[rules]]` map events to notifiers.
A `Router` joins both and answers, for one event, the list of delivery targets: `handler:<name>` and
`notifier:<name>`. Nothing here knows where events come from.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Protocol, TypeVar

from .errors import ConfigError
from .events import Event
from .rules import Rule

log = logging.getLogger(__name__)

HandlerFunc = Callable[[Event], Any]
F = TypeVar("F", bound=HandlerFunc)


@dataclass(frozen=True)
class Handler:
    """A registered handler: its unique name, the event patterns it wants, and the function."""

    name: str
    patterns: tuple[str, ...]
    func: HandlerFunc


class Registry:
    """Handlers by name. The decorator returns the function unchanged and refuses a duplicate name."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def on(self, *patterns: str, name: str | None = None) -> Callable[[F], F]:
        """Register the decorated function for events whose type matches any pattern (globs allowed)."""
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise TypeError('on() needs at least one event type or glob, e.g. @on("score.created")')

        def decorator(func: F) -> F:
            self.register(func, patterns, name=name)
            return func

        return decorator

    def register(self, func: HandlerFunc, patterns: Sequence[str], *, name: str | None = None) -> Handler:
        handler_name = name or f"{func.__module__}.{func.__qualname__}"
        existing = self._handlers.get(handler_name)
        if existing is not None and existing.func is not func:
            raise ValueError(f"a handler named {handler_name!r} is already registered; pass name= to tell them apart")
        handler = Handler(handler_name, tuple(patterns), func)
        self._handlers[handler_name] = handler
        return handler

    def unregister(self, name: str) -> None:
        self._handlers.pop(name, None)

    @property
    def handlers(self) -> Mapping[str, Handler]:
        return dict(self._handlers)


registry = Registry()


def on(*patterns: str, name: str | None = None) -> Callable[[F], F]:
    """Register a handler in the default registry: `@on("score.created")`, `@on("trace.*")`."""
    return registry.on(*patterns, name=name)


def import_handler_modules(modules: Iterable[str], source: str = "config") -> None:
    """Import the `[handlers].modules`, whose `@on(...)` decorators register their handlers."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigError(
                source,
                "handlers.modules",
                module,
                f"an importable Python module ({type(exc).__name__}: {exc})",
            ) from None


def matches(patterns: Iterable[str], event_type: str) -> bool:
    return any(fnmatchcase(event_type, pattern) for pattern in patterns)


class CompiledRule:
    """A config rule with its CEL condition compiled once."""

    def __init__(self, rule: Rule, source: str = "config") -> None:
        self.rule = rule
        self.program: Any = None
        if rule.when:
            import cel  # imported here: it costs a quarter of a second, which `status` need not pay

            try:
                self.program = cel.compile(rule.when)
            except ValueError as exc:
                raise ConfigError(source, f"{rule.key}.when", rule.when, f"a CEL expression ({exc})") from None
        self._warned = False

    def matches(self, event: Event, envelope: Mapping[str, Any]) -> bool:
        """Whether the condition holds for an event whose type the rule's globs match (the Router checked)."""
        if self.program is None:
            return True
        try:
            return self.program.execute(dict(envelope)) is True
        except Exception as exc:
            # a field the event lacks, or of another type (a categorical score under `data.value < 0.5`),
            # is no match; say so once, so a typo in a field name does not go unnoticed
            if not self._warned:
                log.info("rule %s: condition not met by %s (%s)", self.rule.name, event.type, exc)
                self._warned = True
            return False


class SilenceCheck(Protocol):
    """What the router asks of the silences (alerting.silences.Silences) for a forwarded match."""

    def mutes(self, rule: str) -> bool: ...

    def match(self, rule: str, envelope: Mapping[str, Any]) -> object: ...

    def covers(self, rule: str, envelope: Mapping[str, Any]) -> bool: ...


class Router:
    """Routes events to targets: matching handlers of a registry, and the notifiers or alert groups of matching
    rules."""

    def __init__(
        self,
        rules: Sequence[Rule],
        handlers: Registry | None = None,
        source: str = "config",
        silences: SilenceCheck | None = None,
    ) -> None:
        self.rules = [CompiledRule(rule, source) for rule in rules]
        self.registry = handlers or registry
        self.silences = silences
        # set by the Redis backend: handlers and notifiers become one delivery to this target
        self.queue: str | None = None
        self._by_type: dict[str, tuple[list[str], list[CompiledRule]]] = {}

    def _candidates(self, event_type: str) -> tuple[list[str], list[CompiledRule]]:
        found = self._by_type.get(event_type)
        if found is None:
            handlers = [f"handler:{h.name}" for h in self.registry.handlers.values() if matches(h.patterns, event_type)]
            rules = [r for r in self.rules if matches(r.rule.events, event_type)]
            found = self._by_type[event_type] = (handlers, rules)
        return found

    def subscribes(self, event_type: str) -> bool:
        """Whether any handler or rule could want events of this type."""
        handlers, rules = self._candidates(event_type)
        return bool(handlers or rules)

    def targets(self, event: Event) -> list[str]:
        """The delivery targets of one event, each once. With a `queue` target (the Redis backend), the handlers
        and notifiers are one delivery to that queue, whose workers route the event again; alert groups stay."""
        ordered, direct, alerts = self._route(event)
        if self.queue is not None and direct:
            return [*alerts, self.queue]
        return ordered

    def direct_targets(self, event: Event, *, count_silenced: bool = True) -> list[str]:
        """The handlers and notifiers of one event, without alert groups: what a queue worker delivers. A retry
        of the same delivery routes with `count_silenced=False`: its silenced matches were counted the first
        time."""
        return self._route(event, count_silenced)[1]

    def _route(self, event: Event, count_silenced: bool = True) -> tuple[list[str], list[str], list[str]]:
        """(all targets in rule order, handler and notifier targets, alert group targets) of one event, each once."""
        handlers, rules = self._candidates(event.type)
        ordered = list(handlers)
        direct = list(handlers)
        alerts: list[str] = []
        envelope: dict[str, Any] | None = None
        for compiled in rules:
            rule = compiled.rule
            # the envelope is built only when a condition or a silence reads it: most events meet neither
            if compiled.program is not None:
                envelope = envelope or event.envelope()
                if not compiled.matches(event, envelope):
                    continue
            if rule.grouping is not None:
                # the alerter counts the match into its group, and applies silences there
                alerts.append(rule.target)
                ordered.append(rule.target)
                continue
            if self.silences is not None and self.silences.mutes(rule.name):
                envelope = envelope or event.envelope()
                silence = self.silences.match if count_silenced else self.silences.covers
                if silence(rule.name, envelope):
                    continue
            notifiers = [f"notifier:{name}" for name in rule.notify]
            direct.extend(notifiers)
            ordered.extend(notifiers)
        return list(dict.fromkeys(ordered)), list(dict.fromkeys(direct)), list(dict.fromkeys(alerts))
