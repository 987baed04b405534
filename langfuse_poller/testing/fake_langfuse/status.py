"""``GET /api/public/health`` and ``GET /api/public/projects``: what a client asks before it reads data.

Health needs no credentials and says whether the server can reach its database; projects needs them and
names the one project a key belongs to. Neither counts against a rate limit or sees injected faults.
"""

from __future__ import annotations

from typing import Final

from .wire import Response, json_response

HEALTH_PATH: Final = "/api/public/health"
PROJECTS_PATH: Final = "/api/public/projects"

SERVER_VERSION: Final = "3.130.0"


def health_response(healthy: bool) -> Response:
    """The health answer: 200 with the server version, or 503 while the database is unavailable."""
    if not healthy:
        return json_response(503, {"status": "Database not available", "version": SERVER_VERSION})
    return json_response(200, {"status": "OK", "version": SERVER_VERSION})


def projects_response(project_id: str, *, organization: bool = True) -> Response:
    """The projects answer: the project of the key, in its organization.

    ``organization=False`` answers as servers before v3.143.0 do, which have no ``organization`` on a project
    (it came with langfuse commit e10102eb0b, web/src/pages/api/public/projects/index.ts).
    """
    project: dict[str, object] = {"id": project_id, "name": "test-project", "metadata": {}, "retentionDays": None}
    if organization:
        project["organization"] = {"id": "org-test", "name": "test-org"}
    return json_response(200, {"data": [project]})
