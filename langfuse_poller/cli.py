"""The command line: parses arguments, calls the library, turns its errors into messages and exit codes.

Commands import what they need when they run, so `--help` and `status` stay quick.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .errors import ConfigError, LangfusePollerError

if TYPE_CHECKING:
    from .config import Config
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("run", parents=[common], help="run the daemon in the foreground until SIGTERM or SIGINT")
    sub.add_parser("once", parents=[common], help="poll every stream up to now, deliver what is pending, exit")
    status = sub.add_parser("status", parents=[common], help="watermarks, lag, last errors, queue and dead letters")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("check", parents=[common], help="validate the config and reach Langfuse with the keys")
    sub.add_parser(
        "serve-webhooks", parents=[common], help="receive Langfuse's webhooks and deliver them, without polling"
    )

    dead = sub.add_parser("dead-letters", parents=[common], help="inspect, replay or purge what failed for good")
    dead_sub = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = dead_sub.add_parser("list", parents=[common], help="list dead letters")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    for action, text in (
        ("replay", "queue dead letters for delivery again"),
        ("purge", "delete dead letters"),
    ):
        cmd = dead_sub.add_parser(action, parents=[common], help=text)
        cmd.add_argument("ids", nargs="*", type=int, metavar="ID")
        cmd.add_argument("--all", action="store_true", help="every dead letter")

    test = sub.add_parser("send-test-event", parents=[common], help="push a test event through the registry")
    test.add_argument("--event", default="trace.created", metavar="TYPE", help="event type (default trace.created)")
    test.add_argument("--notifier", metavar="NAME", help="send to this notifier only, whatever the rules say")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"langfuse-poller {__version__}")
        return EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_CONFIG
    _setup_logging(args.log_level)
    command = args.command.replace("-", "_")
    try:
        result: int = globals()[f"cmd_{command}"](args)
        return result
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LangfusePollerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # request logs of the HTTP clients carry full URLs, and notifier URLs can hold tokens
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "skipped: maximum number of running instances reached" each interval while a long poll runs is expected
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def _config(args: argparse.Namespace) -> Config:
    from .config import load_config

    return load_config(args.config)


def _runtime(args: argparse.Namespace, *, lock: bool = True) -> Runtime:
    from .runtime import Runtime

    return Runtime.build(_config(args), lock=lock)


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon

    return Daemon(_runtime(args)).run()


def cmd_serve_webhooks(args: argparse.Namespace) -> int:
    from .serve_webhooks import serve_webhooks

    return serve_webhooks(_config(args))


def cmd_once(args: argparse.Namespace) -> int:
    runtime = _runtime(args)
    try:
        dead_before = runtime.store.dead_letter_count()
        runtime.poller.start_streams()
        result = runtime.poller.poll_once(force_sweeps=True)
        if result.requests == 0 and not result.errors:
            # nothing to read yet (a fresh start = "now"): still prove the host and the keys
            runtime.reader.check()
        runtime.worker.run_until_idle()
        runtime.store.prune_delivered(time.time() - runtime.config.delivery.retention.total_seconds())
        pending = runtime.store.queue_depth()
        dead = runtime.store.dead_letter_count() - dead_before
        stats = runtime.worker.stats
        print(
            f"polled {len(result.streams)} streams with {result.requests} API requests: {result.events} new events; "
            f"delivered {sum(stats.delivered.values())}, pending {pending}, new dead letters {max(0, dead)}"
        )
        for error in result.errors:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_OK if not result.errors and pending == 0 and dead <= 0 else EXIT_FAILED
    finally:
        runtime.close()


def cmd_status(args: argparse.Namespace) -> int:
    from .status import collect_status, render_status

    config = _config(args)
    report = collect_status(config, now=time.time())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_status(report))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from .check import run_check

    problems = run_check(_config(args), out=sys.stdout)
    return EXIT_OK if problems == 0 else EXIT_FAILED


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from .store import Store

    config = _config(args)
    if args.action == "list":
        store = Store(config.state_path)
        letters = store.dead_letters()
        if args.json:
            for letter in letters:
                print(json.dumps(letter.__dict__))
            return EXIT_OK
        if not letters:
            print("no dead letters")
        for letter in letters:
            when = datetime.fromtimestamp(letter.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            what = (
                f"{letter.event_id} -> {letter.target} after {letter.attempts} attempts"
                if letter.kind == "delivery"
                else f"unparseable {letter.stream} record"
            )
            print(f"{letter.id:>6}  {when}  {what}\n        {letter.error}")
        return EXIT_OK
    if not args.ids and not args.all:
        print(f"dead-letters {args.action}: give dead letter IDs, or --all", file=sys.stderr)
        return EXIT_CONFIG
    ids = None if args.all else list(args.ids)
    if args.action == "purge":
        count = Store(config.state_path).delete_dead_letters(ids)
        print(f"purged {count} dead letters")
        return EXIT_OK
    from .replay import replay_dead_letters

    runtime = _runtime(args, lock=False)
    try:
        requeued, still_bad = replay_dead_letters(runtime, ids)
    finally:
        runtime.close()
    print(f"queued {requeued} for delivery again; the daemon (or `langfuse-poller once`) delivers them")
    if still_bad:
        print(f"{still_bad} records still cannot be parsed and stay dead letters", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_send_test_event(args: argparse.Namespace) -> int:
    from .events import test_event

    runtime = _runtime(args, lock=False)
    try:
        config = runtime.config
        if args.notifier and args.notifier not in config.notifiers:
            known = ", ".join(sorted(config.notifiers)) or "none configured"
            raise ConfigError(config.source, "--notifier", args.notifier, f"a configured notifier ({known})")
        event = test_event(args.event, base_url=config.langfuse.base_url)
        targets = [f"notifier:{args.notifier}"] if args.notifier else runtime.router.targets(event)
        if not targets:
            print(f"no rule or handler wants {event.type}; nothing sent (use --notifier NAME to send anyway)")
            return EXIT_FAILED
        with runtime.store.write() as tx:
            tx.enqueue(event, targets)
        outcomes = runtime.worker.deliver_event(event.id)
    finally:
        runtime.close()
    failed = 0
    for target, error in outcomes.items():
        if error is None:
            print(f"sent {event.id} to {target}")
        else:
            failed += 1
            print(f"FAILED {target}: {error} (it stays queued for retry)", file=sys.stderr)
    return EXIT_OK if failed == 0 else EXIT_FAILED
