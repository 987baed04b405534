"""The command line: parses arguments, calls the library, turns its errors into messages and exit codes.

Commands import what they need when they run, so `--help` and `status` stay quick.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from .errors import ConfigError, LangfusePollerError

if TYPE_CHECKING:
    from .config import Config
    from .redis.standby.alert_dead import AlertDeadLetters
    from .runtime import Runtime

log = logging.getLogger("langfuse_poller")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="langfuse-poller",
        description="Turn what happens in a Langfuse project into events for your handlers and notifiers.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $LANGFUSE_POLLER_CONFIG, the user "
        "config dir, then /etc/langfuse-poller/config.toml)",
    )
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    common.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "text", "journal", "json"],
        help="auto (default): journal under systemd's journald, else text; json: one object per line",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the daemon in the foreground until SIGTERM or SIGINT")
    run.set_defaults(func=cmd_run)
    once = sub.add_parser("once", parents=[common], help="poll every stream up to now, deliver what is pending, exit")
    once.set_defaults(func=cmd_once)
    status = sub.add_parser("status", parents=[common], help="watermarks, lag, last errors, queue and dead letters")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    check = sub.add_parser("check", parents=[common], help="validate the config and reach Langfuse with the keys")
    check.set_defaults(func=cmd_check)
    worker = sub.add_parser(
        "worker", parents=[common], help="process the Redis queue's events with the handlers and notifiers"
    )
    worker.add_argument(
        "--concurrency", type=int, default=1, metavar="N", help="jobs processed at once by this process (default 1)"
    )
    worker.set_defaults(func=cmd_worker)
    serve = sub.add_parser(
        "serve-webhooks", parents=[common], help="receive Langfuse's webhooks and deliver them, without polling"
    )
    serve.set_defaults(func=cmd_serve_webhooks)

    dead = sub.add_parser("dead-letters", parents=[common], help="inspect, replay or purge what failed for good")
    dead.set_defaults(func=cmd_dead_letters)
    dead_sub = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = dead_sub.add_parser("list", parents=[common], help="list dead letters")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    for action, text in (
        ("replay", "queue dead letters for delivery again"),
        ("purge", "delete dead letters"),
    ):
        cmd = dead_sub.add_parser(action, parents=[common], help=text)
        cmd.add_argument(
            "ids", nargs="*", type=_dead_letter_id, metavar="ID", help="a number, or an alert notification's id"
        )
        cmd.add_argument("--all", action="store_true", help="every dead letter")

    silence = sub.add_parser("silence", parents=[common], help="mute a rule's alerts for a while")
    silence.set_defaults(func=cmd_silence)
    silence_sub = silence.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = silence_sub.add_parser("add", parents=[common], help="silence a rule (or the matches meeting --when)")
    add.add_argument("--rule", required=True, metavar="NAME", help="the rule to silence")
    add.add_argument("--for", dest="duration", required=True, metavar="DURATION", help='how long, e.g. "2h"')
    add.add_argument("--when", metavar="EXPR", help="only matches meeting this CEL condition over the event")
    add.add_argument("--comment", default="", help="why, for whoever reads `silence list`")
    silence_list = silence_sub.add_parser("list", parents=[common], help="list silences that have not ended")
    silence_list.add_argument("--all", action="store_true", help="include silences that ended")
    silence_list.add_argument("--json", action="store_true", help="one JSON object per line")
    expire = silence_sub.add_parser("expire", parents=[common], help="end a silence now")
    expire.add_argument("id", type=int, metavar="ID")

    dry = sub.add_parser("test-rule", parents=[common], help="show what a rule would have sent, sending nothing")
    dry.add_argument("rule", metavar="NAME", help="the rule to try")
    dry.add_argument("--since", default="-1h", help='where to start reading Langfuse: "-1h" (default), RFC 3339')
    dry.add_argument("--until", default="now", help='where to stop: "now" (default), "-10m", RFC 3339')
    dry.add_argument("--events", metavar="FILE", help="replay the envelopes of a jsonl file instead of Langfuse")
    dry.add_argument(
        "--json",
        action="store_true",
        help="print the notifications as envelopes, one per line; for metric, ratio and spike rules each key's series",
    )
    dry.add_argument(
        "--keys", type=int, default=10, metavar="N", help="metric, ratio, spike: chart the N keys nearest to firing"
    )
    dry.set_defaults(func=cmd_test_rule)

    demo = sub.add_parser(
        "demo", parents=[common], help="see it work: a Langfuse stand-in with made-up traffic, no keys needed"
    )
    demo.add_argument("--duration", type=float, default=30.0, metavar="SECONDS", help="how long (default 30)")
    demo.add_argument("--seed", type=int, help="make the made-up traffic repeatable")
    demo.set_defaults(func=cmd_demo)

    test = sub.add_parser("send-test-event", parents=[common], help="push a test event through the registry")
    test.add_argument("--event", default="trace.created", metavar="TYPE", help="event type (default trace.created)")
    test.add_argument("--notifier", metavar="NAME", help="send to this notifier only, whatever the rules say")
    test.set_defaults(func=cmd_send_test_event)
    return parser


# options whose values often start with "-" ("--since -1h"), which argparse would take for an option
RELATIVE_TIME_OPTIONS = ("--since", "--until")


def _join_relative_times(argv: Sequence[str]) -> list[str]:
    """Turn `--since -1h` into `--since=-1h`, as the docs write it and argparse cannot read it."""
    joined: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in RELATIVE_TIME_OPTIONS:
            value = next(args, None)
            joined.append(arg if value is None else f"{arg}={value}")
        else:
            joined.append(arg)
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(_join_relative_times(sys.argv[1:] if argv is None else argv))
    if args.version:
        from . import __version__

        print(f"langfuse-poller {__version__}")
        return EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_CONFIG
    _setup_logging(args.log_level, args.log_format)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LangfusePollerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _setup_logging(level: str, log_format: str = "auto") -> None:
    from .service.logs import setup_logging

    setup_logging(level, log_format)


def _config(args: argparse.Namespace) -> Config:
    from .config import load_config

    return load_config(args.config)


def _runtime(args: argparse.Namespace, *, lock: bool = True) -> Runtime:
    from .runtime import Runtime

    return Runtime.build(_config(args), lock=lock)


def cmd_run(args: argparse.Namespace) -> int:
    from .service.daemon import Daemon

    return Daemon(_runtime(args), load_config=lambda: _config(args)).run()


def cmd_worker(args: argparse.Namespace) -> int:
    from .redis.worker import run_worker

    config = _config(args)
    if config.queue.backend != "redis":
        raise ConfigError(config.source, "queue.backend", config.queue.backend, '"redis" for `worker`')
    if args.concurrency < 1:
        raise ConfigError("command line", "--concurrency", args.concurrency, "an integer >= 1")
    return run_worker(config, concurrency=args.concurrency)


def cmd_serve_webhooks(args: argparse.Namespace) -> int:
    from .service.serve_webhooks import serve_webhooks

    return serve_webhooks(_config(args))


def cmd_once(args: argparse.Namespace) -> int:
    from .service.once import LeaseUnavailable, run_once

    runtime = _runtime(args)
    # the outcome is printed before the runtime closes: closing can wait seconds for the lease's thread
    try:
        result = run_once(runtime)
    except LeaseUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    else:
        print(
            f"polled {result.streams} streams with {result.requests} API requests: {result.events} new events; "
            f"delivered {result.delivered}, pending {result.pending}, new dead letters {result.dead_letters}"
        )
        for error in result.errors:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_OK if result.ok else EXIT_FAILED
    finally:
        runtime.close()


def cmd_status(args: argparse.Namespace) -> int:
    from .service.status import collect_status, render_status

    config = _config(args)
    report = collect_status(config, now=time.time())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_status(report))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from .service.check import run_check

    problems = run_check(_config(args), out=sys.stdout)
    return EXIT_OK if problems == 0 else EXIT_FAILED


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from .store import Store

    config = _config(args)
    if args.action == "list":
        store = Store(config.state_path)
        letters = store.dead_letters()
        # with standby pollers, alert notifications die in Redis, named by their notification's id
        alerts = _alert_dead_letters(config, lambda dead: dead.list()) or []
        if args.json:
            for letter in letters:
                print(json.dumps(letter.__dict__))
            for alert in alerts:
                print(json.dumps(alert.as_json()))
            return EXIT_OK
        if not letters and not alerts:
            print("no dead letters")
        for letter in letters:
            when = datetime.fromtimestamp(letter.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            what = (
                f"{letter.event_id} -> {letter.target} after {letter.attempts} attempts"
                if letter.kind == "delivery"
                else f"unparseable {letter.stream} record"
            )
            print(f"{letter.id:>6}  {when}  {what}\n        {letter.error}")
        for alert in alerts:
            when = datetime.fromtimestamp(alert.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            to = ", ".join(alert.targets)
            print(f"{alert.id}\n        {when}  alert notification -> {to} after {alert.attempts} attempts")
            print(f"        {alert.error}")
        return EXIT_OK
    if not args.ids and not args.all:
        print(f"dead-letters {args.action}: give dead letter IDs, or --all", file=sys.stderr)
        return EXIT_CONFIG
    numbered = [i for i in args.ids if isinstance(i, int)]
    named = [i for i in args.ids if isinstance(i, str)]
    if named and not config.queue.standby:
        print(f"dead-letters {args.action}: no dead letter {named[0]!r} (their IDs are numbers)", file=sys.stderr)
        return EXIT_CONFIG
    ids, alert_ids = (None, None) if args.all else (numbered, named)
    if args.action == "purge":
        count = Store(config.state_path).delete_dead_letters(ids) if ids != [] else 0
        if alert_ids != []:
            count += _alert_dead_letters(config, lambda dead: dead.purge(alert_ids)) or 0
        print(f"purged {count} dead letters")
        return EXIT_OK
    from .service.replay import replay_dead_letters

    requeued = still_bad = 0
    if ids != []:
        runtime = _runtime(args, lock=False)
        try:
            requeued, still_bad = replay_dead_letters(runtime, ids)
        finally:
            runtime.close()
    if alert_ids != []:
        requeued += _alert_dead_letters(config, lambda dead: dead.replay(alert_ids, time.time())) or 0
    print(f"queued {requeued} for delivery again; the daemon (or `langfuse-poller once`) delivers them")
    if still_bad:
        print(f"{still_bad} records still cannot be parsed and stay dead letters", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


T = TypeVar("T")


def _dead_letter_id(text: str) -> int | str:
    """A dead letter's ID: a number (SQLite), or the id of an alert notification (`rule.<status>:...`, in Redis)."""
    if text.startswith("rule.") and ":" in text:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def _alert_dead_letters(config: Config, act: Callable[[AlertDeadLetters], T]) -> T | None:
    """`act` on the dead alert notifications in Redis, with standby pollers; None without (they are in SQLite)."""
    if not config.queue.standby:
        return None
    from .redis.standby.alert_dead import alert_dead_letters

    with alert_dead_letters(config.queue) as dead:
        return act(dead)


def cmd_silence(args: argparse.Namespace) -> int:
    from .alerting.silences import add_silence, silence_book
    from .store import Store
    from .util.durations import DURATION_FORM, format_duration, parse_duration

    config = _config(args)
    now = time.time()
    store = Store(config.state_path)
    book = silence_book(config, store)
    try:
        if args.action == "add":
            from .alerting.dryrun import find_rule

            find_rule(config, args.rule)
            try:
                duration = parse_duration(args.duration).total_seconds()
            except ValueError:
                duration = 0.0
            if duration <= 0:
                raise ConfigError("command line", "--for", args.duration, f"{DURATION_FORM}, above zero")
            silence = add_silence(
                book, args.rule, duration=duration, condition=args.when, comment=args.comment, now=now
            )
            print(f"silence {silence.id}: rule {silence.rule} silenced for {format_duration(duration)}")
            return EXIT_OK
        if args.action == "expire":
            if not book.expire(args.id, now):
                print(f"no active silence has id {args.id} (see `langfuse-poller silence list`)", file=sys.stderr)
                return EXIT_FAILED
            print(f"silence {args.id} expired")
            return EXIT_OK
        silences = book.list(now=None if args.all else now)
    finally:
        store.close()
    for silence in silences:
        if args.json:
            print(json.dumps(silence.__dict__))
            continue
        state = "active" if silence.active(now) else "ended"
        ends = datetime.fromtimestamp(silence.ends_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        condition = f" when {silence.condition}" if silence.condition else ""
        print(f"{silence.id:>5}  {state:<6} rule {silence.rule}{condition} until {ends}, {silence.matched} matched")
        if silence.comment:
            print(f"       {silence.comment} ({silence.created_by})")
    if not silences and not args.json:
        print("no silences")
    return EXIT_OK


def cmd_test_rule(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .alerting.dryrun import DryRun, dry_run, dump, events_from_file, events_from_langfuse, find_rule, render
    from .util.durations import START_FORM, parse_start

    config = _config(args)
    rule = find_rule(config, args.rule)
    if args.keys < 1:
        raise ConfigError("command line", "--keys", args.keys, "an integer >= 1")
    run = DryRun(rule)
    bounds: list[datetime] = []
    if args.events:
        events = events_from_file(Path(args.events), run)
        source = args.events
    else:
        for flag, text in (("--since", args.since), ("--until", args.until)):
            try:
                bounds.append(parse_start(text, datetime.now(UTC)))
            except ValueError:
                raise ConfigError("command line", flag, text, START_FORM) from None
        events = events_from_langfuse(config, rule, bounds[0], bounds[1])
        source = f"{config.langfuse.base_url} from {bounds[0].isoformat()} to {bounds[1].isoformat()}"
    if args.events:
        dry_run(config, rule, events, run)
    else:
        dry_run(config, rule, events, run, since=bounds[0], until=bounds[1])
    if args.json:
        dump(run, sys.stdout)
    else:
        render(run, sys.stdout, source=source, keys=args.keys)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .service.demo import run_demo

    return run_demo(args.duration, seed=args.seed)


def cmd_send_test_event(args: argparse.Namespace) -> int:
    from .events import test_event

    runtime = _runtime(args, lock=False)
    try:
        config = runtime.config
        if args.notifier and args.notifier not in config.notifiers:
            known = ", ".join(sorted(config.notifiers)) or "none configured"
            raise ConfigError(config.source, "--notifier", args.notifier, f"a configured notifier ({known})")
        event = test_event(args.event, base_url=config.langfuse.base_url)
        targets = [f"notifier:{args.notifier}"] if args.notifier else runtime.router.test_targets(event)
        if not targets:
            print(f"no rule or handler wants {event.type}; nothing sent (use --notifier NAME to send anyway)")
            return EXIT_FAILED
        with runtime.store.write() as tx:
            tx.enqueue(event, targets)
        outcomes = runtime.worker.deliver_event(event.id)
        states = {target: state for target, state, _, _ in runtime.store.deliveries_of(event.id)}
    finally:
        runtime.close()
    failed = 0
    for target, error in outcomes.items():
        if error is None:
            print(f"sent {event.id} to {target}")
            continue
        failed += 1
        after = (
            "a dead letter now: see `langfuse-poller dead-letters list`"
            if states.get(target) == "dead"
            else "it stays queued for retry"
        )
        print(f"FAILED {target}: {error} ({after})", file=sys.stderr)
    return EXIT_OK if failed == 0 else EXIT_FAILED
