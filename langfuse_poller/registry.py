"""The one handler registry: who gets which event, whatever its source (poll, webhook, test).

User code registers handlers with `@on("score.created")`; config `[[rules]]` map events to notifiers.
A `Router` joins both and answers, for one event, the list of delivery targets: `handler:<name>` and
`notifier:<name>`. Nothing here knows where events come from.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, NamedTuple, Protocol, TypeVar

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
        """Register `func` for the event types matching `patterns` (globs) under `name` (default: its module and
        qualified name), the delivery target `handler:<name>`. The same function registered again takes the new
        patterns; raises ValueError when another function already has the name."""
        handler_name = name or f"{func.__module__}.{func.__qualname__}"
        existing = self._handlers.get(handler_name)
        if existing is not None and existing.func is not func:
            raise ValueError(f"a handler named {handler_name!r} is already registered; pass name= to tell them apart")
        handler = Handler(handler_name, tuple(patterns), func)
        self._handlers[handler_name] = handler
        return handler

    def unregister(self, name: str) -> None:
        """Forget the handler of that name, if any."""
        self._handlers.pop(name, None)

    @property
    def handlers(self) -> Mapping[str, Handler]:
        """A copy of the registered handlers, by name."""
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
        self.program: Any = _compile(rule.when, source, f"{rule.key}.when")
        self.resolve_program: Any = _compile(rule.resolve_when, source, f"{rule.key}.resolve_when")
        measure = rule.measure
        # a measuring rule's `value` and `share`, compiled once like `when` (so `check` finds their errors too)
        self.value_program: Any = _compile(measure.value if measure else None, source, f"{rule.key}.value")
        self.share_program: Any = _compile(measure.share if measure else None, source, f"{rule.key}.share")
        # they run on every match of the rule: on what they read, not on the whole envelope
        self._value_reads = Reads.of(measure.value if measure else None)
        self._share_reads = Reads.of(measure.share if measure else None)
        # `when` runs on every event of the rule's types: narrowed the same way
        self._when_reads = Reads.of(rule.when)
        # matches whose `value` was no number (or no value at all): left out of the measure
        self.skipped = 0
        self._warned = False
        self._warned_value = False

    def matches(self, event: Event, envelope: Mapping[str, Any]) -> bool:
        """Whether the condition holds for an event whose type the rule's globs match (the Router checked)."""
        if self.program is None:
            return True
        plainly = self._when_reads.plainly(envelope)
        if plainly is not None:
            return plainly
        return self._holds(self.program, "condition", event, self._when_reads.activation(envelope))

    def resolves(self, event: Event, envelope: Mapping[str, Any]) -> bool:
        """Whether the event meets `resolve_when` (False without one): it resolves its group, and is no match."""
        if self.resolve_program is None:
            return False
        return self._holds(self.resolve_program, "resolve_when", event, envelope)

    def measured(self, event: Event, envelope: Mapping[str, Any]) -> Any:
        """What a measuring rule reads from a match: 1.0 or 0.0 (ratio: whether `share` holds), the number of
        `value` (a value of any kind for `distinct` and new_value rules), 0.0 for a count without `value`; None
        when there is none it can use, which leaves the match out (counted in `skipped`, said once)."""
        if self.share_program is not None:
            plainly = self._share_reads.plainly(envelope)
            if plainly is None:
                plainly = self._holds(self.share_program, "share", event, self._share_reads.activation(envelope))
            return 1.0 if plainly else 0.0
        if self.value_program is None:
            return 0.0
        measure = self.rule.measure
        assert measure is not None
        reads = self._value_reads
        try:
            value = (
                _read_path(envelope, reads.path)
                if reads.path
                else self.value_program.execute(reads.activation(envelope))
            )
        except Exception as exc:
            value = exc
        if self.rule.kind == "new_value" or measure.aggregate == "distinct":
            usable = isinstance(value, (str, int, float)) and value != ""
        else:
            usable = type(value) in (float, int) and math.isfinite(value)
        if usable:
            return value
        self.skipped += 1
        if not self._warned_value:
            log.warning(
                "rule %s: value %s of %s is %r, which it cannot measure; such matches are skipped",
                self.rule.name,
                self.rule.measure and self.rule.measure.value,
                event.id,
                value,
            )
            self._warned_value = True
        return None

    def _holds(self, program: Any, what: str, event: Event, envelope: Mapping[str, Any]) -> bool:
        try:
            return program.execute(dict(envelope)) is True
        except Exception as exc:
            # a field the event lacks, or of another type (a categorical score under `data.value < 0.5`),
            # is no match; say so once, so a typo in a field name does not go unnoticed
            if not self._warned:
                log.info("rule %s: %s not met by %s (%s)", self.rule.name, what, event.type, exc)
                self._warned = True
            return False


_DATA_FIELD = re.compile(r"\bdata\.([A-Za-z_][A-Za-z0-9_]*)")
_DATA = re.compile(r"\bdata\b")
# a macro or a method on `data` itself (`data.exists(k, ...)`, `data.size()`): not a field
_DATA_CALL = re.compile(r"\bdata\.[A-Za-z_][A-Za-z0-9_]*\s*\(")
_TOP_KEYS = re.compile(r"\b(id|event|timestamp|source)\b")
_PATH = re.compile(r"^\s*data(\.[A-Za-z_][A-Za-z0-9_]*)+\s*$")
# `data.level == "ERROR"`: a field against a string without escapes, what most `when` and `share` conditions are
_EQUALS = re.compile(r"""^\s*data\.([A-Za-z_][A-Za-z0-9_]*)\s*==\s*(?:"([^"\\]*)"|'([^'\\]*)')\s*$""")


@dataclass(frozen=True)
class Reads:
    """What a CEL expression reads of the envelope, found in its text: CEL converts its whole activation on every
    run (about 90 us for a generation's envelope, 5 us for the two fields a share reads), so a rule's `when`
    and a measuring rule's `value` and `share` get only the fields they name. Anything the text does not show
    plainly (`data["x"]`, `data` alone, `data.exists(...)`) keeps the whole of `data`; naming too much (a word in
    a string literal) only costs time."""

    data: frozenset[str] | None  # the `data.X` fields read; None: all of `data`
    top: frozenset[str]  # the other top-level keys named
    path: str | None  # the expression is a plain path (`data.totalCost`): read without CEL
    # the expression compares a field of data with a string (`data.level == "ERROR"`): (field, string)
    equals: tuple[str, str] | None = None

    @classmethod
    def of(cls, expression: str | None) -> Reads:
        if not expression:
            return cls(frozenset(), frozenset(), None)
        fields = _DATA_FIELD.findall(expression)
        # every `data` is followed by `.field`: those fields are all it reads of data
        whole = len(_DATA.findall(expression)) != len(fields) or _DATA_CALL.search(expression) is not None
        path = expression.strip() if _PATH.match(expression) else None
        compared = _EQUALS.match(expression)
        equals = (compared[1], compared[2] if compared[2] is not None else compared[3]) if compared else None
        return cls(None if whole else frozenset(fields), frozenset(_TOP_KEYS.findall(expression)), path, equals)

    def plainly(self, envelope: Mapping[str, Any]) -> bool | None:
        """The outcome of an `equals` expression when the field holds a string, found without CEL (about 10 us
        less per match); None when CEL must judge (another expression, a field of another type or missing)."""
        if self.equals is None:
            return None
        data = envelope.get("data")
        value = data.get(self.equals[0]) if type(data) is dict else None
        return value == self.equals[1] if type(value) is str else None

    def activation(self, envelope: Mapping[str, Any]) -> dict[str, Any]:
        """The part of the envelope the expression reads."""
        found = {key: envelope[key] for key in self.top if key in envelope}
        data = envelope.get("data")
        if self.data is None:
            found["data"] = data
        elif isinstance(data, Mapping):
            found["data"] = {name: data[name] for name in self.data if name in data}
        return found


def _read_path(envelope: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path of the envelope, as CEL reads it; KeyError when a part is missing."""
    value: Any = envelope
    for part in path.split("."):
        # event data is made of JSON objects: dicts
        if type(value) is not dict or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


def _compile(condition: str | None, source: str, key: str) -> Any:
    """A CEL condition, compiled; None for none. A ConfigError names the key when it does not compile."""
    if not condition:
        return None
    import cel  # imported here: it costs a quarter of a second, which `status` need not pay

    try:
        return cel.compile(condition)
    except ValueError as exc:
        raise ConfigError(source, key, condition, f"a CEL expression ({exc})") from None


# (all targets in rule order, handler and notifier targets, alert group targets)
Targets = tuple[list[str], list[str], list[str]]


class _Candidates(NamedTuple):
    """What routes an event of one type, whatever the event."""

    handlers: list[str]
    rules: list[CompiledRule]
    # no rule has a condition: only silences can make the targets of two events of this type differ
    unconditional: bool
    # the rules a silence here can mute: the forwarding ones (the alerter applies an alerting rule's silences)
    silenceable: tuple[str, ...]


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
        self._by_type: dict[str, _Candidates] = {}
        # by event type, the targets of an event (as _walk finds them) when no rule has a condition and no silence
        # mutes one: they are the same for every event of the type
        self._fixed: dict[str, Targets] = {}

    def _candidates(self, event_type: str) -> _Candidates:
        found = self._by_type.get(event_type)
        if found is None:
            handlers = [f"handler:{h.name}" for h in self.registry.handlers.values() if matches(h.patterns, event_type)]
            rules = [r for r in self.rules if matches(r.rule.events, event_type)]
            found = self._by_type[event_type] = _Candidates(
                handlers,
                rules,
                all(r.program is None and r.resolve_program is None for r in rules),
                tuple(r.rule.name for r in rules if r.rule.grouping is None),
            )
        return found

    def subscribes(self, event_type: str) -> bool:
        """Whether any handler or rule could want events of this type."""
        found = self._candidates(event_type)
        return bool(found.handlers or found.rules)

    def targets(self, event: Event) -> list[str]:
        """The delivery targets of one event, each once. With a `queue` target (the Redis backend), the handlers
        and notifiers are one delivery to that queue, whose workers route the event again; alert groups stay."""
        ordered, direct, alerts = self._route(event)
        if self.queue is not None and direct:
            return [*alerts, self.queue]
        return ordered

    def test_targets(self, event: Event) -> list[str]:
        """The delivery targets of a test event (`send-test-event`), each once: those of `targets`, with an
        alerting rule's alert group replaced by the rule's notifiers."""
        # a test event goes straight to an alerting rule's notifiers: it must not join a real alert group
        grouping = {c.rule.target: c.rule.notify for c in self.rules if c.rule.grouping is not None}
        return list(
            dict.fromkeys(
                expanded
                for target in self.targets(event)
                for expanded in ([f"notifier:{n}" for n in grouping[target]] if target in grouping else [target])
            )
        )

    def direct_targets(self, event: Event, *, count_silenced: bool = True) -> list[str]:
        """The handlers and notifiers of one event, without alert groups: what a queue worker delivers. A retry
        of the same delivery routes with `count_silenced=False`: its silenced matches were counted the first
        time."""
        return self._route(event, count_silenced)[1]

    def _route(self, event: Event, count_silenced: bool = True) -> Targets:
        """(all targets in rule order, handler and notifier targets, alert group targets) of one event, each once."""
        found = self._candidates(event.type)
        if not found.unconditional or self._muted(found.silenceable):
            return self._walk(event, found, self.silences, count_silenced)
        fixed = self._fixed.get(event.type)
        if fixed is None:
            fixed = self._fixed[event.type] = self._walk(event, found, None, count_silenced)
        # copies: the caller owns what it is given
        return list(fixed[0]), list(fixed[1]), list(fixed[2])

    def _muted(self, rules: Sequence[str]) -> bool:
        """Whether a silence mutes any of these rules now; silences come and go, so this is asked every time."""
        return self.silences is not None and any(map(self.silences.mutes, rules))

    def _walk(self, event: Event, found: _Candidates, silences: SilenceCheck | None, count_silenced: bool) -> Targets:
        """_route, rule by rule: conditions evaluated, and `silences` (if any) applied to forwarded matches."""
        handlers, rules = found.handlers, found.rules
        ordered = list(handlers)
        direct = list(handlers)
        alerts: list[str] = []
        envelope: dict[str, Any] | None = None
        for compiled in rules:
            rule = compiled.rule
            # the envelope is built only when a condition or a silence reads it: most events meet neither
            if compiled.resolve_program is not None:
                envelope = envelope or event.envelope()
                if compiled.resolves(event, envelope):
                    # to the alert group, which it resolves; `when` is for matches
                    alerts.append(rule.target)
                    ordered.append(rule.target)
                    continue
            if compiled.program is not None:
                envelope = envelope or event.envelope()
                if not compiled.matches(event, envelope):
                    continue
            if rule.grouping is not None:
                # the alerter counts the match into its group, and applies silences there
                alerts.append(rule.target)
                ordered.append(rule.target)
                continue
            if silences is not None and silences.mutes(rule.name):
                envelope = envelope or event.envelope()
                silence = silences.match if count_silenced else silences.covers
                if silence(rule.name, envelope):
                    continue
            notifiers = [f"notifier:{name}" for name in rule.notify]
            direct.extend(notifiers)
            ordered.extend(notifiers)
        return list(dict.fromkeys(ordered)), list(dict.fromkeys(direct)), list(dict.fromkeys(alerts))
