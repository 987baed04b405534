"""What a person is told about an event: a title, the facts that matter for its type, and links.

Slack, PagerDuty and the log notifier render the same `Message`, so an alert says the same thing wherever
it lands. Alert notifications (`rule.firing`, `rule.resolved`) summarise their group: how many matches, first
and last time, a few sample links, and the facts of the latest match; those of the rules that measure say what
was measured against which threshold, over which window, and link the top contributors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..events import Event
from ..rules import MEASURING_KINDS

MAX_FACT_CHARS = 500


@dataclass(frozen=True)
class Message:
    """A rendering-neutral notification."""

    title: str
    facts: tuple[tuple[str, str], ...]
    links: tuple[tuple[str, str], ...]  # (text, url) of sample matches
    url: str | None  # the one link to open: the trace
    status: str  # "firing", "resolved", or "event" for a forwarded event

    @property
    def text(self) -> str:
        """A one-paragraph plain-text form: Slack's notification text, PagerDuty's summary."""
        facts = "; ".join(f"{label}: {value}" for label, value in self.facts[:6])
        return f"{self.title} ({facts})" if facts else self.title


def message_for(event: Event) -> Message:
    if event.type in ("rule.firing", "rule.resolved"):
        return _alert_message(event)
    data = event.data
    return Message(
        title=_event_title(event.type, data),
        facts=tuple(_facts(event.type, data)),
        links=(),
        url=_str(data.get("url")),
        status="event",
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_FACT_CHARS else text[: MAX_FACT_CHARS - 1] + "…"


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _event_title(event_type: str, data: Mapping[str, Any]) -> str:
    name = data.get("name") or data.get("title") or ""
    level = data.get("level")
    if event_type.startswith("trace."):
        # trace.updated names the observation; the trace's own name is traceName
        name = data.get("traceName") or name
        if level == "ERROR":
            return f"🔴 Error in trace {name}".strip()
        if level == "WARNING":
            return f"🟠 Warning in trace {name}".strip()
        return f"Trace {name}".strip()
    if event_type.startswith("score."):
        value = data.get("value") if data.get("value") is not None else data.get("stringValue")
        return f"📉 Score {name} = {_number(value)}" if value is not None else f"Score {name}"
    if event_type == "generation.created":
        return f"Generation {name} ({data.get('model') or 'unknown model'})"
    return f"{event_type} {name}".strip()


def _facts(event_type: str, data: Mapping[str, Any]) -> list[tuple[str, str]]:
    facts: list[tuple[str, str]] = []

    def add(label: str, value: Any) -> None:
        if value is not None and value != "" and value != {}:
            facts.append((label, _short(value)))

    if event_type.startswith("score."):
        add("Score", data.get("name"))
        add("Value", _number(data["value"]) if data.get("value") is not None else data.get("stringValue"))
        add("Data type", data.get("dataType"))
        add("Source", data.get("source"))
        add("Comment", data.get("comment"))
    elif event_type == "generation.created":
        add("Generation", data.get("name"))
        add("Model", data.get("model"))
        add("Prompt", _prompt(data))
        usage = data.get("usage") or {}
        if isinstance(usage, Mapping) and usage.get("totalTokens") is not None:
            add(
                "Tokens",
                f"{_number(usage.get('promptTokens'))} in / {_number(usage.get('completionTokens'))} out / "
                f"{_number(usage.get('totalTokens'))} total",
            )
        if data.get("totalCost") is not None:
            add("Cost", f"${_number(data['totalCost'])}")
        if data.get("latency") is not None:
            add("Latency", f"{_number(data['latency'], 3)} s")
        add("Level", data.get("level"))
        add("Status message", data.get("statusMessage"))
    elif event_type.startswith("trace."):
        add("Trace", data.get("traceName") or data.get("name"))
        if data.get("traceName") and data.get("name") != data.get("traceName"):
            add("Observation", data.get("name"))
        add("Prompt", _prompt(data))
        add("Level", data.get("level"))
        add("Status message", data.get("statusMessage"))
    else:
        add("Name", data.get("name"))
        add("Prompt", _prompt(data))
        add("Level", data.get("level"))
        add("Status message", data.get("statusMessage"))
        add("Message", data.get("body") or data.get("message"))
    add("Environment", data.get("environment"))
    add("User", data.get("userId"))
    return facts


def _prompt(data: Mapping[str, Any]) -> str | None:
    """The Langfuse prompt an observation used, as "NAME vVERSION" (`[poll] fields` with "prompt"), else None."""
    name = _str(data.get("promptName"))
    if name is None:
        return None
    version = data.get("promptVersion")
    return name if version is None else f"{name} v{version}"


def _matches(count: int) -> str:
    return f"{count} match" if count == 1 else f"{count} matches"


def _alert_message(event: Event) -> Message:
    data = event.data
    rule = data.get("rule", "?")
    labels = data.get("group") or {}
    group = ", ".join(f"{path.removeprefix('data.')}={value or '(none)'}" for path, value in labels.items())
    where = f" [{group}]" if group else ""
    count = data.get("count", 0)
    kind = data.get("kind")
    resolved = event.type == "rule.resolved"
    if kind in MEASURING_KINDS:
        return _measure_message(data, rule, group, where, resolved)
    if kind == "absence":
        title = (
            f"✅ Resolved: {rule}{where}: events are arriving again"
            if resolved
            else f"🔕 {rule}{where}: no matching event for {data.get('window')}"
        )
    elif resolved:
        title = f"✅ Resolved: {rule}{where} ({_matches(count)})"
    else:
        title = f"🔥 {rule}{where}: {_matches(count)}"
    # Slack shows ten facts at most: what identifies the group and the latest match comes first
    facts: list[tuple[str, str]] = []
    if group:
        facts.append(("Group", group))
    if kind == "absence":
        facts.append(("Last seen", data.get("lastSeenAt") or "never since the rule started"))
    else:
        new = data.get("new", 0)
        facts.append(("Matches", f"{count}" + (f" (+{new} new)" if new and new != count and not resolved else "")))
        if data.get("firstAt"):
            facts.append(("First", str(data["firstAt"])))
        if data.get("lastAt"):
            facts.append(("Last", str(data["lastAt"])))
    samples = [s for s in data.get("samples") or [] if isinstance(s, Mapping)]
    if samples and not resolved:
        latest = samples[-1]
        for label, value in _facts(str(latest.get("event", "")), latest):
            if all(label != existing for existing, _ in facts):
                facts.append((label, value))
    if kind == "frequency":
        facts.append(("Threshold", f"{data.get('threshold')} within {data.get('window')}"))
    if data.get("silenced"):
        facts.append(("Silenced", str(data["silenced"])))
    if data.get("condition"):
        facts.append(("Condition", _short(data["condition"])))
    links = tuple(
        (f"{s.get('name') or s.get('event')} at {s.get('timestamp')}", str(s["url"])) for s in samples if s.get("url")
    )
    return Message(
        title=title,
        facts=tuple(facts),
        links=links,
        url=_str(data.get("url")),
        status="resolved" if resolved else "firing",
    )


def _measured(data: Mapping[str, Any], value: Any) -> str:
    """A measured value as people read it: a share in percent, a number to four digits."""
    if value is None:
        return "-"
    if data.get("aggregate") == "share" and isinstance(value, int | float):
        return f"{value * 100:.3g}%"
    return _number(float(value)) if isinstance(value, int | float) else str(value)


def _unjudged(data: Mapping[str, Any]) -> str:
    """Why a measure has no value (`value` is null): its window held no values, or fewer than `min_count`."""
    count, window = data.get("count") or 0, data.get("window")
    if not count:
        return f"no values in the last {window}"
    values = "1 value" if count == 1 else f"{count} values"
    return f"only {values} in the last {window} (min_count {data.get('minCount')})"


def _measure_message(data: Mapping[str, Any], rule: str, group: str, where: str, resolved: bool) -> Message:
    """A metric, ratio, spike or new_value alert: the value against its threshold, the window, the samples."""
    kind = data.get("kind")
    value, threshold = data.get("value"), data.get("threshold")
    aggregate = data.get("aggregate")
    warning = data.get("severity") == "warning"
    facts: list[tuple[str, str]] = []
    if group:
        facts.append(("Group", group))
    if kind == "new_value":
        shown = _short(value) if value is not None else "-"
        title = f"✅ Resolved: {rule}{where}: not seen again" if resolved else f"🆕 {rule}{where}: {shown}"
        if data.get("fingerprint"):
            facts.append(("Fingerprint", _short(data["fingerprint"])))
        facts.append(("Seen", f"{data.get('count', 0)} times"))
        if data.get("firstAt"):
            facts.append(("First", str(data["firstAt"])))
    else:
        unjudged = _unjudged(data) if value is None else None
        if unjudged is not None:
            line = unjudged
        elif kind == "spike":
            previous = data.get("previous")
            compared = f"{aggregate} {_measured(data, value)} against {_measured(data, previous)} the window before"
            line = f"{compared} (x{_number(float(data.get('factor') or 0))} {data.get('direction')})"
        else:
            sign = ">" if threshold is not None and value is not None and value > threshold else "<"
            line = f"{aggregate} {_measured(data, value)} {sign} {_measured(data, threshold)}"
        icon = "🟠" if warning else "🔥"
        title = f"✅ Resolved: {rule}{where}: {line}" if resolved else f"{icon} {rule}{where}: {line}"
        facts.append(("Value", unjudged or f"{_measured(data, value)} ({aggregate} over {data.get('window')})"))
        if threshold is not None:
            facts.append(("Threshold", _measured(data, threshold)))
        facts.append(("Severity", str(data.get("severity"))))
        counted = f"{data.get('count', 0)}"
        if kind == "ratio":
            counted = f"{data.get('matching', 0)} of {counted}"
        facts.append(("Values", counted))
        left_out = [
            f"{count} {what}"
            for count, what in ((data.get("late"), "too late"), (data.get("skipped"), "not a number"))
            if count
        ]
        if left_out:
            facts.append(("Left out", ", ".join(left_out)))
    if data.get("silenced"):
        facts.append(("Silenced", str(data["silenced"])))
    if data.get("condition"):
        facts.append(("Condition", _short(data["condition"])))
    samples = [s for s in data.get("samples") or [] if isinstance(s, Mapping)]
    links = tuple(
        (
            f"{s.get('traceName') or s.get('name') or s.get('event')}"
            + (f" {_number(s['measured'])}" if s.get("measured") is not None else "")
            + f" at {s.get('timestamp')}",
            str(s["url"]),
        )
        for s in samples
        if s.get("url")
    )
    return Message(
        title=title,
        facts=tuple(facts),
        links=links,
        url=_str(data.get("url")),
        status="resolved" if resolved else "firing",
    )
