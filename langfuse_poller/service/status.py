"""`status`: what the state says, in words a person can act on, or as JSON. Never contacts Langfuse."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..alerting.groups import Group
from ..config import Config
from ..errors import StateError
from ..poll_state import StreamState
from ..util.durations import format_duration

if TYPE_CHECKING:
    from ..redis.standby.report import QueueReport


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _stream(
    config: Config, stream: StreamState, read_paths: dict[str, tuple[str, float]], now: float
) -> dict[str, Any]:
    interval = config.poll.interval.total_seconds()
    read_path, read_path_since = read_paths.get(stream.name, (None, None))
    lag = max(0.0, now - stream.head)
    healthy = stream.last_error is None and lag <= interval * 3 + config.poll.settle.total_seconds() + 60
    return {
        "name": stream.name,
        "watermark": _iso(stream.head),
        "lag_seconds": round(lag, 3),
        "sweeps": {format_duration(age): _iso(wm) for age, wm in sorted(stream.sweeps.items())},
        "last_poll": _iso(stream.last_poll_at),
        "last_success": _iso(stream.last_success_at),
        "last_error": stream.last_error,
        "last_error_at": _iso(stream.last_error_at),
        "api_requests": stream.api_requests,
        "records": stream.records,
        "events": stream.events,
        # the endpoints the poller last read this stream from: "v2" or "legacy" (None: not yet)
        "read_path": read_path,
        "read_path_since": _iso(read_path_since),
        "healthy": healthy,
    }


def _alert(group: Group) -> dict[str, Any]:
    return {
        "rule": group.rule,
        "group": group.labels,
        "state": group.state,
        "matches": group.count,
        "silenced": group.silenced,
        "opened": _iso(group.opened_at),
        "last_notified": _iso(group.last_notified_at),
    }


def _redis_alerts(config: Config) -> dict[str, Any]:
    from ..redis.standby.alert_state import read_alert_state

    found = read_alert_state(config.queue, config.delivery)
    return {
        "url": found.url,
        "groups": [_alert(group) for group in found.groups],
        "notifications_waiting": found.waiting,
        "notifications_failed": found.dead,
        "error": found.error,
    }


def collect_status(config: Config, *, now: float) -> dict[str, Any]:
    """A JSON-ready report of every stream, the queue and the dead letters."""
    from ..alerting.silences import silence_book
    from ..store import Store

    report: dict[str, Any] = {
        "config": config.source,
        "state": str(config.state_path),
        "langfuse": config.langfuse.base_url,
        "api": config.langfuse.api,
        "streams": [],
        "queue": {"pending": 0, "by_target": {}},
        "dead_letters": 0,
        "alerts": [],
        "silences": [],
    }
    shared: QueueReport | None = None
    if config.queue.backend == "redis":
        from ..redis.standby.report import read_report, report_json

        shared = read_report(config.queue, now=now)
        report["redis"] = report_json(shared)
        if config.queue.standby:
            # the replicas share their watermarks in Redis: a replica's SQLite holds none
            report["streams"] = [_stream(config, s, shared.read_paths, now) for s in shared.streams]
    report["alert_state"] = {"backend": "redis" if config.queue.standby else "sqlite"}
    if config.queue.standby:
        # the alert groups live in Redis, shared by the replicas: the leader's now, a standby's at a takeover
        report["alert_state"].update(_redis_alerts(config))
        report["alerts"] = report["alert_state"].pop("groups")
    if not config.state_path.exists():
        report["note"] = "no state yet: the poller has not run with this state path"
        return report
    store = Store(config.state_path)
    try:
        if not config.queue.standby:
            read_paths = store.read_paths()
            report["streams"] = [_stream(config, stream, read_paths, now) for stream in store.streams()]
        if not config.queue.standby:
            report["alerts"] = [_alert(group) for group in store.alert_state().open_groups()]
        try:
            report["silences"] = [
                {"id": s.id, "rule": s.rule, "when": s.condition, "until": _iso(s.ends_at), "matched": s.matched}
                for s in silence_book(config, store).list(now=now)
                if s.active(now)
            ]
        except StateError as exc:  # Redis unreachable (the error names its redacted URL): the rest still stands
            report["silences_error"] = str(exc)
        by_target = store.pending_by_target()
        report["queue"] = {"pending": sum(by_target.values()), "by_target": by_target}
        report["dead_letters"] = store.dead_letter_count()
    finally:
        store.close()
    return report


def render_status(report: dict[str, Any]) -> str:
    lines = [f"state {report['state']}  (config {report['config']}, Langfuse {report['langfuse']})"]
    if report.get("note"):
        lines.append(report["note"])
    for stream in report["streams"]:
        mark = "ok  " if stream["healthy"] else "WARN"
        lines.append(
            f"{mark} {stream['name']:<13} watermark {stream['watermark']}  lag {format_duration(stream['lag_seconds'])}"
            f"  last poll {stream['last_poll'] or 'never'}  ({stream['events']} events from {stream['records']} "
            f"records, {stream['api_requests']} API requests"
            + (f"; {stream['read_path']} read path since {stream['read_path_since']})" if stream["read_path"] else ")")
        )
        if stream["last_error"]:
            lines.append(f"     last error at {stream['last_error_at']}: {stream['last_error']}")
    queue = report["queue"]
    lines.append(f"queue: {queue['pending']} deliveries pending")
    for target, count in sorted(queue["by_target"].items()):
        lines.append(f"     {target}: {count}")
    if report.get("redis"):
        lines.extend(_render_redis(report["redis"]))
    alerts = report["alerts"]
    lines.append(f"alerts: {sum(1 for a in alerts if a['state'] == 'firing')} firing groups")
    shared = report.get("alert_state", {})
    if shared.get("backend") == "redis":
        lines.append(
            f"     alert state in Redis at {shared['url']}, shared by the replicas: {len(alerts)} open groups, which"
            f" a standby takes over; {shared['notifications_waiting']} notifications waiting,"
            f" {shared['notifications_failed']} failed for good"
        )
        if shared["error"]:
            lines.append(f"WARN {shared['error']}")
    for alert in alerts:
        group = ", ".join(f"{k}={v}" for k, v in alert["group"].items())
        lines.append(
            f"     {alert['rule']}{f' [{group}]' if group else ''}: {alert['state']}, {alert['matches']} matches"
            f" since {alert['opened']}, last notified {alert['last_notified'] or 'not yet'}"
        )
    for silence in report["silences"]:
        when = f" when {silence['when']}" if silence["when"] else ""
        lines.append(f"silence {silence['id']}: rule {silence['rule']}{when} until {silence['until']}")
    if report.get("silences_error"):
        lines.append(f"WARN {report['silences_error']}")
    dead = report["dead_letters"]
    lines.append(
        f"dead letters: {dead}" + ("  (see `langfuse-poller dead-letters list`, then replay or purge)" if dead else "")
    )
    return "\n".join(lines)


def _render_redis(redis: dict[str, Any]) -> list[str]:
    cluster = redis.get("cluster")
    shape = f" (cluster of {cluster['nodes']} nodes, keys tagged {cluster['hash_tag']})" if cluster else ""
    lines = [f"redis queue {redis['name']} at {redis['url']}{shape}"]
    if redis["error"]:
        lines.append(f"     {redis['error']}")
    if redis["jobs"]:
        jobs = redis["jobs"]
        counts = ", ".join(f"{state} {count}" for state, count in jobs.items() if state != "failed")
        lines.append(f"     depth {redis['depth']} jobs ({counts}); failed {jobs.get('failed', 0)}")
    workers = redis["workers"]
    seen = ", ".join(f"{w['name']} ({w['addr']})" for w in workers)
    lines.append(f"     workers seen: {len(workers)}" + (f": {seen}" if seen else ""))
    if redis["lease"] is not None or redis["replicas"]:
        lease = redis["lease"]
        if lease:
            left = format_duration(lease["expires_in_seconds"])
            lines.append(f"     lease: held by {lease['holder']} (token {lease['token']}), {left} left")
        else:
            lines.append("     lease: held by nobody; the next standby to try takes it")
        for replica in redis["replicas"]:
            token = f" (token {replica['token']})" if replica["token"] is not None else ""
            gone = ", gone?" if replica["gone"] else ""
            lines.append(
                f"     replica {replica['name']}: {replica['role']}{token}, "
                f"seen {format_duration(replica['seen_seconds_ago'])} ago{gone}"
            )
    return lines
