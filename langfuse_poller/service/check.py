"""`check`: a readiness report. Validates config, rules, notifiers and state, and reaches Langfuse with the keys."""

from __future__ import annotations

from typing import TextIO

from ..config import Config
from ..errors import LangfusePollerError


def run_check(config: Config, *, out: TextIO) -> int:
    """Print one line per check; return the number of problems."""
    problems = 0

    def report(ok: bool, what: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        out.write(f"{'ok  ' if ok else 'FAIL'} {what}\n")

    from ..registry import Router, import_handler_modules, registry

    # a config error (a bad CEL condition, a handler module that does not import) ends the check with exit 2
    import_handler_modules(config.handler_modules, config.source)
    router = Router(config.rules, registry, config.source)
    report(True, f"config {config.source}: {len(router.rules)} rules, {len(registry.handlers)} handlers")

    from ..notifiers import build_notifier

    for name, notifier_config in config.notifiers.items():
        try:
            build_notifier(notifier_config).close()
            report(True, f"notifier {name} ({notifier_config.type})")
        except Exception as exc:
            report(False, f"notifier {name} ({notifier_config.type}): {exc}")

    from ..util.listening import check_listeners

    for ok, what in check_listeners(config):
        report(ok, what)

    from ..store import Store

    try:
        store = Store(config.state_path)
        with store.write():
            pass
        store.close()
        report(True, f"state {config.state_path} is writable")
    except (LangfusePollerError, OSError) as exc:
        report(False, f"state {config.state_path}: {exc}")
    except Exception as exc:  # sqlite3.OperationalError: a read-only file or directory
        report(False, f"state {config.state_path} is not writable: {exc}")

    from ..langfuse.reader import ENDPOINTS, LangfuseReader

    reader = LangfuseReader(config.langfuse)
    try:
        result = reader.check()
        projects = ", ".join(f"{name} ({pid})" for pid, name in result.projects) or "no project"
        report(
            True,
            f"Langfuse {config.langfuse.base_url} (version {result.version}) accepts the keys: {projects}",
        )
        # the endpoints the poller would read: the configured read path, or the newest the server has
        paths = [(stream, reader.find_read_path(stream)) for stream in config.poll.streams]
        read = ", ".join(f"{stream} from {ENDPOINTS[stream, path]}" for stream, path in paths)
        names = sorted({path for _, path in paths})
        report(True, f'read path {" and ".join(names)} (api = "{config.langfuse.api}"): {read}')
    except LangfusePollerError as exc:
        report(False, str(exc))
    finally:
        reader.close()
    out.write("all checks passed\n" if problems == 0 else f"{problems} problem(s) found\n")
    return problems
