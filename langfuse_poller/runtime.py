"""Wiring: builds the store, reader, router, notifiers, alerter, poller and delivery worker from one Config."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .alerting.alerter import Alerter
from .alerting.silences import Silences, silence_book
from .alerting.state import AlertStore
from .config import Config
from .delivery import DeliveryWorker, HandlerTarget
from .events import EventFactory, ExtraFields
from .langfuse.reader import LangfuseReader
from .notifiers import Notifier, build_notifier
from .poll_state import PollState
from .poller import Poller
from .registry import Registry, Router, import_handler_modules, registry
from .store import InProcessTarget, Store
from .webhooks.receiver import WebhookReceiver

if TYPE_CHECKING:
    from .redis.queue import RedisQueueTarget
    from .redis.standby.replica import Replica
    from .redis.standby.shared_state import SharedPollState


def wire_routing(
    config: Config, router: Router, store: Store, clock: Callable[[], float], alert_store: AlertStore | None = None
) -> tuple[Alerter, dict[str, Notifier]]:
    """Around a compiled router: its silences, the alert rules, and every delivery target (handlers of the
    router's registry, notifiers, alert groups, the Redis queue). What `Runtime.build` wires, and what a
    reload (service/reload.py) builds again from a new config. The alert groups live in `alert_store` when
    given (Redis, with standby pollers), else in `store`."""
    silences = Silences(silence_book(config, store), clock=clock)
    # with the Redis backend the workers apply (and count) the silences of forwarding rules, at delivery
    router.silences = silences if config.queue.backend != "redis" else None
    alerter = Alerter(alert_store or store, router.rules, silences, streams=config.poll.streams, clock=clock)
    targets: dict[str, Notifier] = {
        f"handler:{name}": HandlerTarget(handler.func) for name, handler in router.registry.handlers.items()
    }
    targets.update({f"notifier:{name}": build_notifier(nc) for name, nc in config.notifiers.items()})
    targets.update(alerter.targets())
    if config.queue.backend == "redis":
        from .redis.queue import QUEUE_TARGET, RedisQueueTarget

        # events for handlers and notifiers go to BullMQ workers; alert groups stay here, and so do the
        # notifiers, which send the alerts (and deliveries queued before the switch to Redis)
        targets[QUEUE_TARGET] = RedisQueueTarget(config.queue, config.delivery)
        router.queue = QUEUE_TARGET
    alerter.store.use_targets(targets)
    return alerter, targets


def apply_rules_at_once(
    store: Store, alerter: Alerter, targets: Mapping[str, Notifier], worker: DeliveryWorker
) -> None:
    """Have the transaction that stores an event record it into the groups of its alerting rules at once
    (`Database.apply_at_once`), when those groups live in the same store. With standby pollers they live in Redis,
    where the matches wait for the leader: the rules then keep their deliveries."""
    rules = {name: t for name, t in targets.items() if isinstance(t, InProcessTarget)} if alerter.store is store else {}
    store.apply_at_once(rules, on_applied=worker.count_applied)


@dataclass
class Runtime:
    """Everything a command needs, built once; `close` releases it."""

    config: Config
    store: Store
    router: Router
    reader: LangfuseReader
    poller: Poller
    worker: DeliveryWorker
    alerter: Alerter
    cancel: threading.Event
    receiver: WebhookReceiver | None = None
    # `[queue] standby = true`: this process's role in the lease, and the poll state every replica shares
    replica: Replica | None = None
    shared: SharedPollState | None = None
    jobs: RedisQueueTarget | None = None

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        handlers: Registry | None = None,
        clock: Callable[[], float] = time.time,
        lock: bool = True,
        on_commit: Callable[[], None] | None = None,
    ) -> Runtime:
        """Build from config: imports handler modules, compiles rules, opens (and locks) the state."""
        handlers = handlers or registry
        import_handler_modules(config.handler_modules, config.source)
        # rules compile before the state is opened: a bad condition is a config error, whatever else runs
        router = Router(config.rules, handlers, config.source)
        store = Store(config.state_path, clock=clock)
        if lock:
            store.lock()
        cancel = threading.Event()
        standby = None
        if config.queue.standby:
            from .redis.standby.wiring import build_standby

            standby = build_standby(config, store, cancel, clock)
        alerter, targets = wire_routing(config, router, store, clock, standby[4] if standby else None)
        worker = DeliveryWorker(store, targets, config.delivery, clock=clock, cancel=cancel)
        apply_rules_at_once(store, alerter, targets, worker)
        reader = LangfuseReader(
            config.langfuse,
            extra_fields=config.poll.fields,
            expand_metadata=config.poll.expand_metadata,
            environments=config.poll.environments,
            cancel=cancel,
            clock=clock,
        )
        reader.on_read_path = lambda stream, path: store.set_read_path(stream, path)
        replica = shared = jobs = None
        poll_state: PollState = store
        if standby is not None:
            replica, shared, reader.cancel, jobs, _ = standby
            reader.on_read_path = lambda stream, path: shared.set_read_path(stream, path)
            poll_state = shared
        factory = EventFactory(
            config.langfuse.base_url, lambda: router.subscribes("observation.created"), ExtraFields.of(config.poll)
        )
        poller = Poller(
            config.poll,
            poll_state,
            reader,
            factory,
            router.targets,
            clock=clock,
            on_commit=on_commit or worker.kick,
        )
        return cls(config, store, router, reader, poller, worker, alerter, cancel, None, replica, shared, jobs)

    def leader_term(self) -> AbstractContextManager[int | None]:
        """Around one poll: with standby pollers, pins the fencing token the poll runs under (None without)."""
        return self.shared.leader_term() if self.shared is not None else nullcontext()

    def start_receiver(self) -> WebhookReceiver:
        """Receive Langfuse's webhooks (`[webhook]`) into this store and router, in the background; `close`
        stops it. Raises when it cannot listen."""
        receiver = WebhookReceiver(
            self.config.webhook,
            self.store,
            self.router,
            kick=self.worker.kick,
            base_url=self.config.langfuse.base_url,
            source=self.config.source,
            clock=self.worker.clock,
        )
        receiver.start()
        self.receiver = receiver
        return receiver

    def close(self) -> None:
        if self.receiver is not None:
            # first: the requests in flight finish storing before the store closes
            self.receiver.stop()
        self.cancel.set()
        if self.replica is not None:
            self.replica.close()
        if self.jobs is not None:
            self.jobs.close()
        self.worker.close()
        self.reader.close()
        self.alerter.silences.close()
        self.store.close()
