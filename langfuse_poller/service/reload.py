"""Reloading the config (SIGHUP): new rules, notifiers, handlers and delivery settings, same state and reader.

What a reload replaces is the routing: the Router (rules compiled), the alert rules (Alerter, Silences), the
delivery targets (handlers and notifiers) and the `[delivery]` settings. What it keeps: the state, with its
watermarks, pending deliveries, alert groups and dead letters; the Langfuse reader with its rate-limit pacing
and read paths; the delivery worker with its counts.

`[langfuse]`, `[poll]`, `[state]`, `[metrics]` and any other section (a listener's) would need to rebuild or
rebind what keeps running; a reload does not half-apply them: it logs which changed and that they wait for a
restart, and keeps running with the values it started with. A handler module newly listed in `[handlers]
modules` is imported; one taken out stays loaded until a restart, and so does a change to a module's code
(Python cannot unload a module safely).

The work comes in two steps, so that a bad config never disturbs the running one:
`prepare` reads and checks everything that has no side effect (the file, the CEL conditions) while the daemon
runs on; `apply` runs while the daemon is quiet (no poll, no delivery in flight; see `lifecycle.py`), imports the
new handler modules and builds the notifiers, and swaps them in only when all of it worked.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from ..alerting.alerter import Alerter
from ..config import NO_CONFIG_FILE, Config, load_config
from ..errors import LangfusePollerError
from ..notifiers import Notifier
from ..registry import Router, import_handler_modules
from ..runtime import Runtime, apply_rules_at_once, wire_routing

log = logging.getLogger(__name__)

# the Config fields a reload applies; any other field that changed waits for a restart
RELOADABLE = frozenset({"source", "rules", "notifiers", "delivery", "handler_modules"})
# how the log names a Config field, as the file spells it
SECTIONS = {"state_path": "[state] path", "handler_modules": "[handlers] modules"}


def section(field_name: str) -> str:
    return SECTIONS.get(field_name, f"[{field_name}]")


def config_loader(running: Config) -> Callable[[], Config]:
    """How a reload reads the config: the file the daemon started with (found again when it had none)."""
    source = None if running.source == NO_CONFIG_FILE else running.source
    return lambda: load_config(source)


@dataclass(frozen=True)
class Prepared:
    """A checked new config, ready to apply: what will run, its compiled router, what waits for a restart."""

    config: Config
    router: Router
    needs_restart: tuple[str, ...]
    new_modules: tuple[str, ...]


def prepare(runtime: Runtime, new: Config) -> Prepared:
    """Check a new config against the running one; ConfigError (naming file and key) when it cannot run."""
    running = runtime.config
    needs_restart = [
        section(f.name)
        for f in fields(Config)
        if f.name not in RELOADABLE and getattr(running, f.name) != getattr(new, f.name)
    ]
    removed = [m for m in running.handler_modules if m not in new.handler_modules]
    if removed:
        needs_restart.append(f"{section('handler_modules')} (removed: {', '.join(removed)})")
    new_modules = tuple(m for m in new.handler_modules if m not in running.handler_modules)
    # what runs: the new reloadable parts, and everything else as it started (modules only ever add up)
    keep = {f.name: getattr(running, f.name) for f in fields(Config) if f.name not in RELOADABLE}
    config = replace(new, **keep, handler_modules=tuple(dict.fromkeys((*running.handler_modules, *new_modules))))
    # compiling the CEL conditions has no side effect: a bad one is refused before anything stops
    router = Router(config.rules, runtime.router.registry, config.source)
    return Prepared(config, router, tuple(needs_restart), new_modules)


@dataclass
class Routing:
    """The parts a reload builds: the router, the alerter and the delivery targets."""

    router: Router
    alerter: Alerter
    targets: dict[str, Notifier]


def build(runtime: Runtime, prepared: Prepared) -> Routing:
    """Import the new handler modules and build the notifiers and alert rules, as Runtime.build does; the new
    handlers are unregistered again on any failure."""
    registry = prepared.router.registry
    before = set(registry.handlers)
    try:
        if prepared.new_modules:
            # the import system caches directory listings: a module file written since the start would be missed
            importlib.invalidate_caches()
        import_handler_modules(prepared.new_modules, prepared.config.source)
        alerter, targets = wire_routing(
            prepared.config, prepared.router, runtime.store, runtime.worker.clock, runtime.alerter.store
        )
    except Exception as exc:
        for name in set(registry.handlers) - before:
            registry.unregister(name)
        if isinstance(exc, LangfusePollerError):
            raise
        raise LangfusePollerError(f"the new config could not be built: {type(exc).__name__}: {exc}") from exc
    return Routing(prepared.router, alerter, targets)


def swap(runtime: Runtime, prepared: Prepared, routing: Routing) -> None:
    """Put the new routing in place; only while nothing polls or delivers. Closes the old targets."""
    old_targets = runtime.worker.replace_targets(routing.targets, prepared.config.delivery)
    apply_rules_at_once(runtime.store, routing.alerter, routing.targets, runtime.worker)
    old_silences = runtime.alerter.silences
    runtime.config = prepared.config
    runtime.router = routing.router
    runtime.alerter = routing.alerter
    runtime.poller.router = routing.router.targets
    runtime.poller.factory.observation_created = lambda: routing.router.subscribes("observation.created")
    rewire_listeners(runtime)
    # groups of rules that are gone are dropped; absence rules that are new start watching
    routing.alerter.start()
    _close_all(old_targets)
    # the new routing has a silence book of its own (a Redis connection with the Redis backend)
    old_silences.close()


def rewire_listeners(runtime: Runtime) -> None:
    """Point what else routes events at the new router: the webhook receiver, when it runs.

    The receiver's `kick` is the delivery worker's, which a reload keeps."""
    if runtime.receiver is not None:
        runtime.receiver.router = runtime.router


def _close_all(targets: dict[str, Notifier]) -> None:
    for name, target in targets.items():
        try:
            target.close()
        except Exception:
            log.exception("closing %s failed", name)
