"""The fields of an observation and a score, as Langfuse serves them, and how a test's keywords become them.

The field groups are the ones ``/v2/observations`` and ``/v3/scores`` serve (``fields=``); together they are
every field a stored record has. A test names fields in snake_case or camelCase; datetimes, input and output
are turned into what the real server returns. A score's ``value`` follows its ``dataType``, and its
``subject`` follows what it is attached to.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from .wire import Record, datetime_to_ms, format_ms

OBSERVATION_FIELD_GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "core": ("id", "traceId", "startTime", "endTime", "projectId", "parentObservationId", "type"),
    "basic": (
        "name",
        "level",
        "statusMessage",
        "version",
        "environment",
        "bookmarked",
        "public",
        "userId",
        "sessionId",
        "isRootObservation",
    ),
    "time": ("completionStartTime", "createdAt", "updatedAt"),
    "io": ("input", "output"),
    "metadata": ("metadata",),
    "model": ("model", "internalModelId", "modelParameters"),
    "usage": ("usageDetails", "costDetails", "totalCost", "usagePricingTierName"),
    "prompt": ("promptId", "promptName", "promptVersion"),
    "metrics": ("latency", "timeToFirstToken"),
    "trace_context": ("traceName", "tags", "release"),
}
"""Field groups of ``/v2/observations`` and the keys each one adds to a returned record."""

SCORE_FIELD_GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "core": (
        "id",
        "projectId",
        "name",
        "value",
        "dataType",
        "source",
        "timestamp",
        "environment",
        "createdAt",
        "updatedAt",
    ),
    "details": ("comment", "configId", "metadata"),
    "annotation": ("authorUserId", "queueId"),
    "subject": ("subject",),
}
"""Field groups of ``/v3/scores``; ``core`` is always returned."""

OBSERVATION_KEYS: Final = frozenset(k for keys in OBSERVATION_FIELD_GROUPS.values() for k in keys)
# Scores also keep what they are attached to, for the traceId/observationId/sessionId filters and `subject`.
_SCORE_LINK_KEYS: Final = ("traceId", "observationId", "sessionId", "datasetRunId")
SCORE_KEYS: Final = frozenset(k for keys in SCORE_FIELD_GROUPS.values() for k in keys) | frozenset(_SCORE_LINK_KEYS)
_KEY_ALIASES: Final = {"is_root": "isRootObservation", "isRoot": "isRootObservation"}

LEVELS: Final = frozenset({"DEBUG", "DEFAULT", "WARNING", "ERROR"})
SCORE_DATA_TYPES: Final = frozenset({"NUMERIC", "BOOLEAN", "CATEGORICAL", "TEXT", "CORRECTION"})
SCORE_SOURCES: Final = frozenset({"API", "ANNOTATION", "EVAL"})


def _camel(key: str) -> str:
    if key in _KEY_ALIASES:
        return _KEY_ALIASES[key]
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def wire_changes(changes: Mapping[str, Any], allowed: frozenset[str]) -> Record:
    """The fields in ``changes`` as stored: camelCase names, datetimes formatted, input/output as strings.

    Raises ``ValueError`` for a name outside ``allowed``.
    """
    out: Record = {}
    for key, value in changes.items():
        name = _camel(key)
        if name not in allowed:
            raise ValueError(f"unknown field {key!r}")
        if isinstance(value, datetime):
            value = format_ms(datetime_to_ms(value))
        elif name in ("input", "output") and value is not None and not isinstance(value, str):
            value = json.dumps(value)
        elif name == "tags" and value is not None:
            value = list(value)
        out[name] = value
    return out


def finish_score(rec: Record, *, subject_given: bool) -> None:
    """Coerce ``value`` by ``dataType`` and, unless it was given, derive ``subject`` from what the score is on."""
    data_type = rec["dataType"]
    if data_type not in SCORE_DATA_TYPES:
        raise ValueError(f"unknown score dataType {data_type!r}")
    value = rec["value"]
    if data_type == "NUMERIC":
        rec["value"] = float(value)
    elif data_type == "BOOLEAN":
        rec["value"] = value.strip().lower() in ("true", "1") if isinstance(value, str) else bool(value)
    else:
        rec["value"] = str(value)
    if not subject_given:
        # the server's order: experiment (dataset run), observation, session, trace; only the observation arm
        # carries traceId (packages/shared/src/server/repositories/scores.ts, `deriveSubjectForV3`)
        if rec.get("datasetRunId") is not None:
            rec["subject"] = {"kind": "experiment", "id": rec["datasetRunId"]}
        elif rec["observationId"] is not None:
            rec["subject"] = {
                "kind": "observation",
                "id": rec["observationId"],
                "traceId": rec["traceId"],
            }
        elif rec["sessionId"] is not None:
            rec["subject"] = {"kind": "session", "id": rec["sessionId"]}
        else:
            rec["subject"] = {"kind": "trace", "id": rec["traceId"]}
