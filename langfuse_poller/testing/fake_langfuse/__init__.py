"""A loopback HTTP stand-in for the Langfuse public read API.

``FakeLangfuse`` serves ``/api/public/health``, ``/api/public/projects``, ``/api/public/v2/observations`` and
``/api/public/v3/scores`` the way Langfuse Cloud does (auth, limits, field groups, keyset cursors, ordering,
time filters, 429 rate limiting), so that pollers can be tested end to end with the real SDK or plain httpx.
It also lets a test make data visible late (ingestion delay), update records, and inject faults.

It also serves the legacy read endpoints of self-hosted Langfuse v3 from the same data: ``/api/public/traces``
(and ``/traces/{id}``), ``/api/public/observations`` (v1) and ``/api/public/v2/scores``, page-based (``page``,
``limit`` up to 100, ``meta {page, limit, totalItems, totalPages}``), newest first (traces: ``orderBy``), in
their own record shapes, with their own rate-limit bucket. ``serve`` picks what the server has: ``"v2"`` (the
default, Langfuse Cloud today: 404 on the legacy endpoints), ``"legacy"`` (a self-hosted v3: 404 on
``/v2/observations`` and ``/v3/scores``) or ``"both"``; ``on_data_request`` lets a test change the data between
two requests.

It is as strict as the server where a lenient stand-in would hide a client's bug: ``/v3/scores`` refuses
unknown and repeated query parameters, rate-limit headers come on the 429 alone (``X-RateLimit-Reset`` as a
JavaScript date), ``/v2/observations`` drops unknown field groups and serves no cost as 0, and
``/traces/{id}`` without ``fields`` is the whole trace. What the server does only at times is a switch:
``duplicate_rows`` (one id twice in a page, before a merge), ``shuffle_ties`` (a new order of a millisecond's
ties on each legacy request), ``projects_organization`` (older servers), ``unexpected_next`` (answers of
another shape: a list, HTML, an empty body).

Usage::

    with FakeLangfuse() as fake:
        fake.add_trace(observations=2)
        api = LangfuseAPI(base_url=fake.url, username=fake.public_key, password=fake.secret_key)
        page = api.observations.get_many(limit=100)

One module per part of the real server, so that each endpoint family's rules live in one place:

- ``fake``: ``FakeLangfuse``, and the routing of a request to its endpoint family;
- ``status``: health and projects;
- ``gate``: credentials, rate limits and injected faults, met by every data request;
- ``v2``: ``/v2/observations`` and ``/v3/scores``, with their cursors;
- ``legacy``: ``/traces``, ``/observations`` (v1) and ``/v2/scores``, page-based;
- ``records``: the stored records, how a test adds and updates them, with their delays;
- ``fields``: the fields of an observation and a score, and their field groups;
- ``index``: the sort order of the stored records and what is visible at a time;
- ``query``, ``wire``: query strings as the server reads them, timestamps and JSON as it writes them;
- ``server``: the loopback HTTP server.
"""

from __future__ import annotations

from .fake import SERVES, FakeLangfuse, RequestRecord
from .fields import OBSERVATION_FIELD_GROUPS, SCORE_FIELD_GROUPS
from .legacy import (
    LEGACY_DEFAULT_LIMIT,
    LEGACY_MAX_LIMIT,
    OBSERVATIONS_V1_PATH,
    SCORES_V2_PATH,
    TRACE_FIELD_GROUPS,
    TRACES_PATH,
)
from .query import BadRequest
from .status import HEALTH_PATH, PROJECTS_PATH, SERVER_VERSION
from .v2 import (
    OBSERVATIONS_DEFAULT_LIMIT,
    OBSERVATIONS_MAX_LIMIT,
    OBSERVATIONS_PATH,
    SCORES_DEFAULT_LIMIT,
    SCORES_MAX_LIMIT,
    SCORES_PATH,
)
from .wire import Record, datetime_to_ms, format_ms, parse_iso_us

__all__ = [
    "HEALTH_PATH",
    "LEGACY_DEFAULT_LIMIT",
    "LEGACY_MAX_LIMIT",
    "OBSERVATIONS_DEFAULT_LIMIT",
    "OBSERVATIONS_MAX_LIMIT",
    "OBSERVATIONS_PATH",
    "OBSERVATIONS_V1_PATH",
    "OBSERVATION_FIELD_GROUPS",
    "PROJECTS_PATH",
    "SCORES_DEFAULT_LIMIT",
    "SCORES_MAX_LIMIT",
    "SCORES_PATH",
    "SCORES_V2_PATH",
    "SCORE_FIELD_GROUPS",
    "SERVER_VERSION",
    "SERVES",
    "TRACES_PATH",
    "TRACE_FIELD_GROUPS",
    "BadRequest",
    "FakeLangfuse",
    "Record",
    "RequestRecord",
    "datetime_to_ms",
    "format_ms",
    "parse_iso_us",
]
