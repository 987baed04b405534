"""Restarts without loss: `serve-webhooks` on a listening socket handed over as systemd does (socket activation).

The test holds the socket, as systemd's socket unit does, and hands it to each new process on fd 3 with
`LISTEN_FDS=1` and `LISTEN_PID` set to the child's own pid (an exec wrapper sets it, since the pid is known only
in the child). Meanwhile senders behave like Langfuse's webhook worker (`worker/src/queues/webhooks.ts`): 4
attempts about 0.1/0.2/0.4 s apart, 10 s timeout each, only 2xx counts, the signature made once per delivery.
The receiver is stopped with SIGTERM and killed with SIGKILL in turn and started again; connections that
arrive meanwhile wait in the socket's queue. Every webhook must be answered 2xx and stored exactly once.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from langfuse_poller.webhooks.activation import inherited_listener, listen_fds

from .test_webhooks import (
    SECRET,
    assert_clean,
    base_config,
    cli_env,
    encode,
    langfuse_signature,
    prompt_payload,
    read_jsonl,
    write,
)

pytestmark = pytest.mark.timeout(90)

WEBHOOKS = 300
RATE = 30.0  # webhooks per second, so that the sending spans the restarts
SENDERS = 8
RESTARTS = 6
# Langfuse's backOff defaults: no delay before the first attempt, then 100 ms doubling
DELAYS = (0.0, 0.1, 0.2, 0.4)
ATTEMPT_TIMEOUT = 10.0
# sets LISTEN_PID to the pid that serve-webhooks will have (exec keeps it), with the socket on fd 3
WRAPPER = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'langfuse_poller', *sys.argv[2:]])\n"
)


def deliver(port: int, n: int) -> tuple[bool, int]:
    """One delivery as Langfuse makes it: (answered 2xx, attempts made)."""
    body = encode(prompt_payload(f"restart-{n}"))
    headers = {
        "content-type": "application/json",
        "user-agent": "Langfuse/1.0",
        # built once, before the attempts: every attempt carries the same t and digest
        "x-langfuse-signature": langfuse_signature(SECRET, body),
    }
    for attempt, delay in enumerate(DELAYS, start=1):
        time.sleep(delay)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ATTEMPT_TIMEOUT)
            try:
                conn.request("POST", "/api/webhooks/langfuse", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
            finally:
                conn.close()
        except OSError:
            continue
        if 200 <= response.status < 300:
            return True, attempt
    return False, len(DELAYS)


def start(listener: socket.socket, config: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    fd = listener.fileno()
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", WRAPPER, str(fd), "serve-webhooks", "--config", str(config)],
            pass_fds=(fd,),
            env={**env, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "webhooks"},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def wait_for_log(log: Path, text: str, count: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text(encoding="utf-8", errors="replace").count(text) < count:
        assert proc.poll() is None, log.read_text(encoding="utf-8", errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s"
        time.sleep(0.02)


def test_no_webhook_is_lost_or_stored_twice_across_sigterm_and_sigkill_restarts(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    # listen names another port: a process that bound it instead of taking the socket would get no webhook
    config = write(
        tmp_path / "config.toml",
        base_config(tmp_path) + f'[webhook]\nlisten = "127.0.0.1:9"\nsecret = "{SECRET}"\n',
    )
    env = cli_env(tmp_path)
    log = tmp_path / "serve.log"
    log.touch()
    ready = "a socket handed over by systemd"
    began = time.monotonic()

    def paced(n: int) -> tuple[bool, int]:
        # each delivery is due at its own moment, whatever the ones before it waited for
        time.sleep(max(0.0, began + n / RATE - time.monotonic()))
        return deliver(port, n)

    proc = start(listener, config, env, log)
    stops = Counter[str]()
    try:
        wait_for_log(log, ready, 1, proc)
        with ThreadPoolExecutor(SENDERS) as pool:
            results = pool.map(paced, range(WEBHOOKS))
            for restart in range(RESTARTS):
                time.sleep(0.3 + 0.2 * (restart % 3))  # the process serves for a while, then goes
                how = signal.SIGTERM if restart % 2 == 0 else signal.SIGKILL
                proc.send_signal(how)
                proc.wait(timeout=20)
                stops[how.name] += 1
                proc = start(listener, config, env, log)
                wait_for_log(log, ready, restart + 2, proc)
            outcomes = list(results)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        listener.close()
    output = log.read_text(encoding="utf-8", errors="replace")
    assert_clean(output)
    assert stops == {"SIGTERM": 3, "SIGKILL": 3}
    failed = [n for n, (ok, _) in enumerate(outcomes) if not ok]
    assert not failed, f"{len(failed)} webhooks not answered 2xx in 4 attempts: {failed[:10]}\n{output[-3000:]}"
    retried = sum(1 for _, attempts in outcomes if attempts > 1)
    print(f"{WEBHOOKS} webhooks across {RESTARTS} restarts, {retried} needed more than one attempt")
    with sqlite3.connect(tmp_path / "state.db") as db:
        stored = Counter(row[0] for row in db.execute("SELECT id FROM events WHERE source = 'webhook'"))
    expected = {f"prompt.created:restart-{n}" for n in range(WEBHOOKS)}
    assert set(stored) == expected
    assert max(stored.values()) == 1, [event_id for event_id, n in stored.items() if n > 1]
    # the notifier got each at least once (a kill between a send and its record repeats one, at most per kill)
    delivered = Counter(event["id"] for event in read_jsonl(tmp_path / "events.jsonl"))
    assert set(delivered) == expected
    assert sum(delivered.values()) - WEBHOOKS <= stops["SIGKILL"]


def test_the_variables_are_read_once_and_removed_and_another_pid_gets_nothing() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "webhooks", "PATH": "/bin"}
    assert listen_fds(env) == {}
    assert env == {"PATH": "/bin"}  # a child started later does not take the socket for its own
    assert inherited_listener({}) is None
    assert listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == {}
