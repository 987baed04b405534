"""The command line, end to end: real subprocesses against FakeLangfuse and loopback HTTP receivers.

Every command runs as `python -m langfuse_poller ...` (and, in places, the installed `langfuse-poller`
script), with an environment cleared of LANGFUSE_* variables and with XDG directories inside tmp_path, so
that nothing on the machine leaks in. Every result is checked for tracebacks and for the secrets below.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from langfuse_poller import __version__
from langfuse_poller.testing.fake_langfuse import FakeLangfuse

MODULE = [sys.executable, "-m", "langfuse_poller"]
SCRIPT = Path(sys.executable).parent / "langfuse-poller"

PUBLIC_KEY = "pk-lf-cli-test"
SECRET_KEY = "sk-lf-cli-s3cr3t-7f1d9a"
WRONG_SECRET_KEY = "sk-lf-wrong-c0ffee-42"
WEBHOOK_SECRET = "whsec-cli-4b8e2c-do-not-print"
URL_TOKEN = "hooktoken-9c1e5f"  # webhook URLs often carry a token in their path
SECRETS = (SECRET_KEY, WRONG_SECRET_KEY, WEBHOOK_SECRET, URL_TOKEN)
PROJECT_ID = "proj-test"


# --- running the CLI ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __str__(self) -> str:
        command = " ".join(self.args)
        return (
            f"$ langfuse-poller {command}\nexit {self.returncode}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


def assert_clean(result: Result) -> None:
    """No traceback and no secret in any output, whatever the command and its outcome."""
    assert "Traceback (most recent call last)" not in result.output, str(result)
    for secret in SECRETS:
        assert secret not in result.output, f"secret {secret!r} printed\n{result}"


@dataclass(frozen=True)
class Started:
    args: tuple[str, ...]
    proc: subprocess.Popen[str]


class Cli:
    """Runs the CLI in subprocesses with a controlled environment; `many` runs independent calls in parallel."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)

    def start(self, *args: str, env: Mapping[str, str] | None = None, exe: Sequence[str] = MODULE) -> Started:
        proc = subprocess.Popen(
            [*exe, *args],
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        return Started(tuple(args), proc)

    @staticmethod
    def finish(started: Started, timeout: float = 30) -> Result:
        proc = started.proc
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"langfuse-poller {' '.join(started.args)} did not finish within {timeout}s\n{out}\n{err}")
        result = Result(started.args, proc.returncode, out, err)
        assert_clean(result)
        return result

    def __call__(self, *args: str | Path, env: Mapping[str, str] | None = None, exe: Sequence[str] = MODULE) -> Result:
        return self.finish(self.start(*map(str, args), env=env, exe=exe))

    def many(self, *calls: Sequence[object] | tuple[Sequence[object], Mapping[str, str]]) -> list[Result]:
        """Run independent calls at once; a call is an argument list, or (argument list, extra env)."""
        started = []
        for call in calls:
            args: Sequence[object] = call
            env: Mapping[str, str] | None = None
            if isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], Mapping):
                args, env = call  # type: ignore[assignment]
            started.append(self.start(*[str(a) for a in args], env=env))
        return [self.finish(s) for s in started]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGFUSE_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return Cli(env)


# --- loopback servers --------------------------------------------------------------------------------------


@pytest.fixture
def langfuse() -> Iterator[FakeLangfuse]:
    """A FakeLangfuse on real time (the CLI runs in other processes, on the real clock)."""
    with FakeLangfuse(public_key=PUBLIC_KEY, secret_key=SECRET_KEY, project_id=PROJECT_ID) as fake:
        yield fake
    assert fake.errors == []


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records every POST and answers with `status`."""

    def __init__(self) -> None:
        self.status = 200
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.status
                payload = b'{"error": "no thanks"}' if status >= 400 else b'{"ok": true}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def server_bind(self) -> None:  # skip the getfqdn() of HTTPServer, slow on some resolvers
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook/{URL_TOKEN}"

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NOWHERE = "http://127.0.0.1:9"  # for configs whose command never reaches Langfuse


# --- configs -----------------------------------------------------------------------------------------------


def q(value: object) -> str:
    """A TOML basic string."""
    return json.dumps(str(value))


def langfuse_section(url: str, *, public_key: str = PUBLIC_KEY, secret_key: str = SECRET_KEY) -> str:
    return f"[langfuse]\nbase_url = {q(url)}\npublic_key = {q(public_key)}\nsecret_key = {q(secret_key)}\n"


def write_config(
    path: Path, url: str, body: str = "", *, langfuse: str | None = None, state: Path | None = None
) -> Path:
    """A config: [langfuse] for `url` (or the given section), polls from an hour ago, state next to the file."""
    state = state or path.with_suffix(".db")
    head = langfuse_section(url) if langfuse is None else langfuse
    # settle 0s: the stand-in makes records readable at once, unlike Langfuse (the default waits 30 s)
    path.write_text(
        f'{head}\n[poll]\nstart = "-1h"\nsettle = "0s"\n\n[state]\npath = {q(state)}\n\n{body}', encoding="utf-8"
    )
    return path


def webhook(name: str, url: str, *, secret: str | None = WEBHOOK_SECRET) -> str:
    text = f'[notifiers.{name}]\ntype = "webhook"\nurl = {q(url)}\ntimeout = "5s"\n'
    return text + (f"secret = {q(secret)}\n" if secret else "")


def jsonl(name: str, path: Path) -> str:
    return f'[notifiers.{name}]\ntype = "jsonl"\npath = {q(path)}\n'


def rule(name: str, events: Sequence[str], notify: Sequence[str], when: str | None = None) -> str:
    text = f"[[rules]]\nname = {q(name)}\nevents = {json.dumps(list(events))}\nnotify = {json.dumps(list(notify))}\n"
    return text + (f"when = '{when}'\n" if when else "")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- help, version, bad input ------------------------------------------------------------------------------

COMMANDS = (
    (),
    ("run",),
    ("once",),
    ("status",),
    ("check",),
    ("dead-letters",),
    ("dead-letters", "list"),
    ("dead-letters", "replay"),
    ("dead-letters", "purge"),
    ("send-test-event",),
    ("silence",),
    ("silence", "add"),
    ("silence", "list"),
    ("silence", "expire"),
    ("test-rule",),
    ("demo",),
    ("serve-webhooks",),
    ("worker",),
)


def test_every_command_has_help_and_the_version_is_printed(cli: Cli) -> None:
    results = cli.many(*[[*command, "--help"] for command in COMMANDS], ["--version"])
    for command, result in zip(COMMANDS, results, strict=False):
        assert result.returncode == 0, str(result)
        assert result.stdout.startswith("usage: langfuse-poller"), str(result)
        assert " ".join(command) in result.stdout.splitlines()[0], str(result)
        assert result.stderr == ""
    assert "--config" in results[1].stdout and "--json" in results[3].stdout
    assert "--all" in results[7].stdout and "--notifier" in results[9].stdout
    version = results[-1]
    assert version.returncode == 0 and version.stdout.strip() == f"langfuse-poller {__version__}", str(version)

    # the installed console script is the same program
    assert SCRIPT.is_file(), f"no console script next to {sys.executable}"
    script_version = cli("--version", exe=[str(SCRIPT)])
    assert script_version.returncode == 0 and script_version.stdout == version.stdout
    script_help = cli("dead-letters", "replay", "--help", exe=[str(SCRIPT)])
    assert script_help.returncode == 0 and script_help.stdout == results[7].stdout


def test_every_command_has_a_handler_and_is_in_the_help_test() -> None:
    # a subcommand added without set_defaults(func=...) would parse and then fail at dispatch; one missing from
    # COMMANDS would go without the help check above
    from langfuse_poller.cli import _parser

    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(actions[0].choices) if actions else {}

    for name, parser in subcommands(_parser()).items():
        assert callable(parser.get_default("func")), name
        assert (name,) in COMMANDS, name
        for action in subcommands(parser):
            assert (name, action) in COMMANDS, (name, action)


def test_bad_input_gets_a_message_and_never_a_traceback(cli: Cli, tmp_path: Path) -> None:
    ok = write_config(tmp_path / "ok.toml", f"http://127.0.0.1:{closed_port()}", jsonl("file", tmp_path / "e.jsonl"))
    state_dir = tmp_path / "state-is-a-dir"
    (state_dir / "state.db").mkdir(parents=True)
    dir_state = write_config(tmp_path / "dir.toml", NOWHERE, state=state_dir / "state.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_text("this is not an SQLite database, " * 40, encoding="utf-8")
    garbage_state = write_config(tmp_path / "garbage.toml", NOWHERE, state=garbage)
    missing = tmp_path / "nowhere" / "config.toml"

    (
        no_command,
        unknown_command,
        no_action,
        bad_id,
        bad_level,
        missing_file,
        directory,
        state_is_dir,
        state_garbage,
        no_rule,
        unknown_id,
    ) = cli.many(
        [],
        ["frobnicate"],
        ["dead-letters", "--config", ok],
        ["dead-letters", "replay", "seven", "--config", ok],
        ["status", "--log-level", "loud", "--config", ok],
        ["status", "--config", missing],
        ["check", "--config", tmp_path],
        ["once", "--config", dir_state],
        ["status", "--config", garbage_state],
        ["send-test-event", "--event", "prompt.created", "--config", ok],
        ["dead-letters", "replay", "999", "--config", ok],
    )
    assert no_command.returncode == 2 and "usage: langfuse-poller" in no_command.stdout
    assert unknown_command.returncode == 2 and "invalid choice: 'frobnicate'" in unknown_command.stderr
    assert no_action.returncode == 2 and "ACTION" in no_action.stderr
    assert bad_id.returncode == 2 and "invalid int value: 'seven'" in bad_id.stderr
    assert bad_level.returncode == 2 and "invalid choice: 'loud'" in bad_level.stderr
    for result, path in ((missing_file, missing), (directory, tmp_path)):
        assert result.returncode == 2, str(result)
        assert f"config error: {path}: <file>: expected a readable TOML file" in result.stderr, str(result)
    assert state_is_dir.returncode == 1 and "cannot open the state database" in state_is_dir.stderr
    assert state_garbage.returncode == 1 and f"{garbage}: file is not a database" in state_garbage.stderr
    assert no_rule.returncode == 1 and "no rule or handler wants prompt.created" in no_rule.stdout
    assert unknown_id.returncode == 0 and "queued 0" in unknown_id.stdout


def test_a_config_file_that_is_not_utf8_is_a_config_error(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[langfuse]\npublic_key = "pk-lf-caf\xe9"\n')
    result = cli("status", "--config", path)
    assert result.returncode == 2 and str(path) in result.stderr


@pytest.mark.parametrize("value", ["1e300", "inf", '"99999999999999d"'], ids=["1e300", "inf", "huge-days"])
def test_a_duration_too_large_is_a_config_error(cli: Cli, tmp_path: Path, value: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"{langfuse_section(NOWHERE)}[poll]\ninterval = {value}\n", encoding="utf-8")
    result = cli("status", "--config", path)
    assert result.returncode == 2 and "poll.interval" in result.stderr, str(result)


# --- config errors -----------------------------------------------------------------------------------------

HOOK = webhook("hook", f"{NOWHERE}/hook")


@dataclass(frozen=True)
class BadConfig:
    text: str
    key: str
    found: str
    expected: Sequence[str]


BAD_CONFIGS = {
    "unknown-poll-key": BadConfig(
        f'{langfuse_section(NOWHERE)}[poll]\nintervall = "10s"\n',
        "poll.intervall",
        "found 'intervall'",
        ("a known key of [poll]", "interval"),
    ),
    "bad-duration": BadConfig(
        f'{langfuse_section(NOWHERE)}[poll]\ninterval = "10 minutes"\n',
        "poll.interval",
        "found '10 minutes'",
        ('a duration such as "250ms", "10s"',),
    ),
    "missing-notifier": BadConfig(
        f"{langfuse_section(NOWHERE)}{HOOK}{rule('errors', ['trace.updated'], ['pager'])}",
        "rules[0].notify",
        "found 'pager'",
        ("[notifiers.NAME]", "configured: hook"),
    ),
    "bad-cel": BadConfig(
        f"{langfuse_section(NOWHERE)}{HOOK}{rule('errors', ['trace.updated'], ['hook'], 'data.level == == 1')}",
        "rules[0].when",
        "found 'data.level == == 1'",
        ("a CEL expression", "Syntax error"),
    ),
    "invalid-toml": BadConfig(
        f"{langfuse_section(NOWHERE)}[poll\ninterval = 10\n",
        "<syntax>",
        "line 5",
        ("valid TOML",),
    ),
    "no-public-key": BadConfig(
        f"[langfuse]\nbase_url = {q(NOWHERE)}\nsecret_key = {q(SECRET_KEY)}\n",
        "langfuse.public_key",
        "found None",
        ("a public key (pk-lf-...)", "LANGFUSE_PUBLIC_KEY"),
    ),
    "unknown-notifier-type": BadConfig(
        f'{langfuse_section(NOWHERE)}[notifiers.mail]\ntype = "smtp"\nto = "ops@example.com"\n',
        "notifiers.mail.type",
        "found 'smtp'",
        ("a notifier type: alertmanager, jsonl, log, pagerduty, slack, webhook",),
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_errors_exit_2_and_name_file_key_found_and_expected(cli: Cli, tmp_path: Path, case: str) -> None:
    bad = BAD_CONFIGS[case]
    path = tmp_path / "config.toml"
    path.write_text(bad.text, encoding="utf-8")
    commands = [["run", "--config", path], ["check", "--config", path], ["once", "--config", path]]
    if case != "bad-cel":  # the CEL expression is compiled by the commands that route events, not by `status`
        commands.append(["status", "--config", path])
    for result in cli.many(*commands):
        assert result.returncode == 2, str(result)
        assert result.stderr.startswith(f"config error: {path}: {bad.key}: expected "), str(result)
        assert bad.found in result.stderr, str(result)
        for words in bad.expected:
            assert words in result.stderr, str(result)
        assert result.stdout == ""


def test_check_exits_2_for_a_bad_cel_condition(cli: Cli, tmp_path: Path, langfuse: FakeLangfuse) -> None:
    path = write_config(
        tmp_path / "config.toml",
        langfuse.url,
        HOOK + rule("errors", ["trace.updated"], ["hook"], 'data.level == == "ERROR"'),
    )
    assert cli("check", "--config", path).returncode == 2


def test_a_misspelt_secret_key_is_not_printed(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        f"{langfuse_section(NOWHERE)}{webhook('hook', NOWHERE + '/hook', secret=None)}secert = {q(WEBHOOK_SECRET)}\n",
        encoding="utf-8",
    )
    result = cli("check", "--config", path)  # assert_clean fails: the secret is in the message
    assert result.returncode == 2 and "notifiers.hook.secert" in result.stderr


def test_config_discovery_env_fallbacks_and_secret_file(cli: Cli, tmp_path: Path, langfuse: FakeLangfuse) -> None:
    closed = f"http://127.0.0.1:{closed_port()}"
    keys = {"LANGFUSE_PUBLIC_KEY": PUBLIC_KEY, "LANGFUSE_SECRET_KEY": SECRET_KEY}
    full = write_config(tmp_path / "full.toml", langfuse.url)
    broken = tmp_path / "broken.toml"
    broken.write_text("[poll]\nintervall = 1\n", encoding="utf-8")
    user_config = tmp_path / "xdg-config" / "langfuse-poller" / "config.toml"
    user_config.parent.mkdir(parents=True)
    write_config(user_config, langfuse.url, state=tmp_path / "user.db")
    keyless = write_config(tmp_path / "keyless.toml", "", langfuse="")
    secret_file = tmp_path / "secret-key"
    secret_file.write_text(SECRET_KEY + "\n", encoding="utf-8")
    from_file = write_config(
        tmp_path / "from-file.toml",
        "",
        langfuse=f"[langfuse]\nbase_url = {q(langfuse.url)}\npublic_key = {q(PUBLIC_KEY)}\n"
        f"secret_key_file = {q(secret_file)}\n",
    )
    missing_file = write_config(
        tmp_path / "missing-file.toml",
        "",
        langfuse=f"[langfuse]\nbase_url = {q(langfuse.url)}\npublic_key = {q(PUBLIC_KEY)}\n"
        f"secret_key_file = {q(tmp_path / 'no-such-secret')}\n",
    )

    # discovery and precedence show in the first line of `status`, which does not contact Langfuse
    by_env, explicit_wins, user_dir, base_url_first, env_config_used = cli.many(
        (["status"], {"LANGFUSE_POLLER_CONFIG": str(full)}),
        (["status", "--config", full], {"LANGFUSE_POLLER_CONFIG": str(broken)}),
        ["status"],
        (["status", "--config", keyless], {**keys, "LANGFUSE_BASE_URL": langfuse.url, "LANGFUSE_HOST": closed}),
        (["status"], {"LANGFUSE_POLLER_CONFIG": str(broken)}),
    )
    for result, source in ((by_env, full), (explicit_wins, full), (user_dir, user_config), (base_url_first, keyless)):
        assert result.returncode == 0, str(result)
        assert f"(config {source}, Langfuse {langfuse.url})" in result.stdout.splitlines()[0], str(result)
    assert env_config_used.returncode == 2, str(env_config_used)
    assert env_config_used.stderr.startswith(f"config error: {broken}: "), str(env_config_used)

    # the keys and host from the environment, or the secret from a file, are accepted by Langfuse
    base_url_env, host_env, secret_from_file, missing_secret_file, no_public_key = cli.many(
        (["check", "--config", keyless], {**keys, "LANGFUSE_BASE_URL": langfuse.url}),
        (["check", "--config", keyless], {**keys, "LANGFUSE_HOST": langfuse.url}),
        ["check", "--config", from_file],
        ["check", "--config", missing_file],
        (["check", "--config", keyless], {"LANGFUSE_SECRET_KEY": SECRET_KEY, "LANGFUSE_BASE_URL": langfuse.url}),
    )
    for result, source in ((base_url_env, keyless), (host_env, keyless), (secret_from_file, from_file)):
        assert result.returncode == 0, str(result)
        assert f"ok   config {source}:" in result.stdout, str(result)
        assert f"ok   Langfuse {langfuse.url} (version 3.130.0) accepts the keys" in result.stdout, str(result)
        assert "all checks passed" in result.stdout
    assert missing_secret_file.returncode == 2, str(missing_secret_file)
    assert f"{missing_file}: langfuse.secret_key_file: expected a readable file" in missing_secret_file.stderr
    assert no_public_key.returncode == 2, str(no_public_key)
    assert f"{keyless}: langfuse.public_key: expected a public key" in no_public_key.stderr
    assert "LANGFUSE_PUBLIC_KEY" in no_public_key.stderr


# --- check -------------------------------------------------------------------------------------------------


def test_check_ok_wrong_keys_and_unreachable_host(cli: Cli, tmp_path: Path, langfuse: FakeLangfuse) -> None:
    host = langfuse.url.removeprefix("http://")
    port = closed_port()
    good = write_config(tmp_path / "good.toml", langfuse.url, HOOK)
    wrong_secret = write_config(
        tmp_path / "wrong.toml", langfuse.url, langfuse=langfuse_section(langfuse.url, secret_key=WRONG_SECRET_KEY)
    )
    wrong_public = write_config(
        tmp_path / "wrong-public.toml", langfuse.url, langfuse=langfuse_section(langfuse.url, public_key="pk-lf-nobody")
    )
    unreachable = write_config(tmp_path / "down.toml", f"http://127.0.0.1:{port}")
    ok, bad_secret, bad_public, down = cli.many(
        ["check", "--config", good],
        ["check", "--config", wrong_secret],
        ["check", "--config", wrong_public],
        ["check", "--config", unreachable],
    )

    assert ok.returncode == 0, str(ok)
    assert ok.stdout.splitlines() == [
        f"ok   config {good}: 0 rules, 0 handlers",
        "ok   notifier hook (webhook)",
        f"ok   state {good.with_suffix('.db')} is writable",
        f"ok   Langfuse {langfuse.url} (version 3.130.0) accepts the keys: test-project ({PROJECT_ID})",
        'ok   read path v2 (api = "auto"): observations from /api/public/v2/observations, '
        "scores from /api/public/v3/scores",
        "all checks passed",
    ]
    for result, public_key in ((bad_secret, PUBLIC_KEY), (bad_public, "pk-lf-nobody")):
        assert result.returncode == 1, str(result)
        assert f"FAIL {host} rejected the API keys (public key {public_key}, HTTP 401" in result.stdout, str(result)
        assert "Check [langfuse] public_key and secret_key" in result.stdout
        assert "1 problem(s) found" in result.stdout
    assert down.returncode == 1, str(down)
    assert f"FAIL cannot reach http://127.0.0.1:{port}: " in down.stdout, str(down)
    assert "Connection refused" in down.stdout


# --- once and status ---------------------------------------------------------------------------------------


def test_status_before_any_run_says_there_is_no_state(cli: Cli, tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.toml", NOWHERE)
    text, as_json = cli.many(["status", "--config", path], ["status", "--json", "--config", path])
    assert text.returncode == 0 and as_json.returncode == 0
    assert "no state yet" in text.stdout and "queue: 0 deliveries pending" in text.stdout, str(text)
    report = json.loads(as_json.stdout)
    assert report["streams"] == [] and report["queue"]["pending"] == 0 and report["dead_letters"] == 0
    assert "no state yet" in report["note"]
    assert not path.with_suffix(".db").exists(), "status must not create the state"


def test_once_delivers_the_expected_events_to_a_jsonl_file(cli: Cli, tmp_path: Path, langfuse: FakeLangfuse) -> None:
    error_trace = langfuse.add_trace(observations=2, level="ERROR", start_time=ago(40), name="checkout")
    warning_trace = langfuse.add_trace(observations=0, level="WARNING", start_time=ago(30))
    score = langfuse.add_score(trace_id=error_trace[0]["traceId"], value=0.2, name="helpfulness", timestamp=ago(20))
    events = tmp_path / "events.jsonl"
    path = write_config(
        tmp_path / "config.toml",
        langfuse.url,
        jsonl("archive", events)
        + rule("new", ["trace.created", "generation.*", "score.*"], ["archive"])
        + rule("errors", ["trace.updated"], ["archive"], 'data.level == "ERROR"'),
    )

    # the installed console script, once
    first = cli("once", "--config", path, exe=[str(SCRIPT)])
    assert first.returncode == 0, str(first)
    assert "5 new events; delivered 5, pending 0, new dead letters 0" in first.stdout, str(first)

    root, generation = error_trace[0], error_trace[1]
    by_id = {event["id"]: event for event in read_jsonl(events)}
    updated = [i for i in by_id if i.startswith(f"trace.updated:{root['id']}:")]
    assert set(by_id) == {
        f"trace.created:{root['traceId']}",
        f"trace.created:{warning_trace[0]['traceId']}",
        f"generation.created:{generation['id']}",
        f"score.created:{score['id']}",
        *updated,
    }, by_id.keys()
    assert len(updated) == 1  # the WARNING trace does not pass `when`
    created = by_id[f"trace.created:{root['traceId']}"]
    assert created["event"] == "trace.created" and created["source"] == "poll"
    assert created["data"]["name"] == "checkout" and created["data"]["projectId"] == PROJECT_ID
    assert created["data"]["url"] == f"{langfuse.url}/project/{PROJECT_ID}/traces/{root['traceId']}"
    assert by_id[updated[0]]["data"]["level"] == "ERROR"
    assert by_id[f"generation.created:{generation['id']}"]["data"]["model"] == "gpt-4o"
    assert by_id[f"score.created:{score['id']}"]["data"]["value"] == pytest.approx(0.2)

    again, text, as_json = (
        cli("once", "--config", path),
        *cli.many(["status", "--config", path], ["status", "--json", "--config", path]),
    )
    assert again.returncode == 0 and "0 new events" in again.stdout, str(again)
    assert len(read_jsonl(events)) == 5, "a second once repeats nothing"
    assert text.returncode == 0 and "queue: 0 deliveries pending" in text.stdout and "dead letters: 0" in text.stdout
    for name in ("observations", "scores"):
        assert f"ok   {name}" in text.stdout, str(text)
    report = json.loads(as_json.stdout)
    assert [s["name"] for s in report["streams"]] == ["observations", "scores"]
    for stream in report["streams"]:
        assert datetime.fromisoformat(stream["watermark"]) > ago(60)
        assert 0 <= stream["lag_seconds"] < 60
        assert stream["last_error"] is None and stream["healthy"] is True
    assert report["streams"][0]["events"] == 4 and report["streams"][1]["events"] == 1
    assert report["queue"] == {"pending": 0, "by_target": {}} and report["dead_letters"] == 0
    assert report["langfuse"] == langfuse.url and report["config"] == str(path)


def test_once_with_a_failing_webhook_exits_non_zero_and_status_shows_the_queue(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, receiver: Receiver
) -> None:
    receiver.status = 500
    langfuse.add_trace(start_time=ago(30))
    langfuse.add_trace(start_time=ago(20))
    path = write_config(
        tmp_path / "config.toml", langfuse.url, webhook("hook", receiver.url) + rule("new", ["trace.*"], ["hook"])
    )
    once = cli("once", "--config", path)
    assert once.returncode == 1, str(once)
    assert "2 new events; delivered 0, pending 2, new dead letters 0" in once.stdout, str(once)
    assert "127.0.0.1" in once.stderr and "answered HTTP 500" in once.stderr, str(once)
    assert len(receiver.requests()) >= 1

    text, as_json = cli.many(["status", "--config", path], ["status", "--json", "--config", path])
    assert "queue: 2 deliveries pending" in text.stdout and "notifier:hook: 2" in text.stdout, str(text)
    report = json.loads(as_json.stdout)
    assert report["queue"] == {"pending": 2, "by_target": {"notifier:hook": 2}}
    assert report["dead_letters"] == 0
    assert {"watermark", "lag_seconds", "last_error"} <= set(report["streams"][0])

    failed = cli("send-test-event", "--notifier", "hook", "--config", path)
    assert failed.returncode == 1 and "FAILED notifier:hook" in failed.stderr, str(failed)
    assert "stays queued for retry" in failed.stderr


def test_status_shows_the_last_langfuse_error_in_words(cli: Cli, tmp_path: Path, langfuse: FakeLangfuse) -> None:
    # a status that retrying cannot fix: 5xx answers are retried with backoff for ~30 s per stream
    langfuse.fail_next(50, status=404)
    failing = write_config(tmp_path / "failing.toml", langfuse.url)
    wrong_keys = write_config(
        tmp_path / "wrong.toml", langfuse.url, langfuse=langfuse_section(langfuse.url, secret_key=WRONG_SECRET_KEY)
    )
    once_failing, once_wrong = cli.many(["once", "--config", failing], ["once", "--config", wrong_keys])
    for result in (once_failing, once_wrong):
        assert result.returncode == 1, str(result)
        assert "error: observations: " in result.stderr and "error: scores: " in result.stderr, str(result)

    host = langfuse.url.removeprefix("http://")
    text, as_json, wrong_text, wrong_json = cli.many(
        ["status", "--config", failing],
        ["status", "--json", "--config", failing],
        ["status", "--config", wrong_keys],
        ["status", "--json", "--config", wrong_keys],
    )
    assert "WARN observations" in text.stdout and "last error at " in text.stdout, str(text)
    # api = "auto": neither the v2 endpoint nor the legacy one answers
    assert f"{host} has neither /api/public/v2/observations nor /api/public/observations (HTTP 404" in text.stdout
    assert f"{host} has neither /api/public/v3/scores nor /api/public/v2/scores (HTTP 404" in text.stdout, str(text)
    report = json.loads(as_json.stdout)
    assert all(s["last_error"] and s["last_error_at"] and not s["healthy"] for s in report["streams"]), report
    assert f"{host} rejected the API keys (public key {PUBLIC_KEY}" in wrong_text.stdout, str(wrong_text)
    wrong_report = json.loads(wrong_json.stdout)
    assert all("rejected the API keys" in s["last_error"] for s in wrong_report["streams"]), wrong_report


# --- dead letters ------------------------------------------------------------------------------------------


def test_dead_letters_list_replay_and_purge(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, receiver: Receiver
) -> None:
    receiver.status = 400  # refused: not retryable, a dead letter at once
    trace = langfuse.add_trace(start_time=ago(30))
    trace_id = trace[0]["traceId"]
    langfuse.add_raw_observation(
        {"id": "obs-without-trace", "type": "SPAN", "projectId": PROJECT_ID, "startTime": ago(25).isoformat()},
        start_time=ago(25),
    )
    path = write_config(
        tmp_path / "config.toml", langfuse.url, webhook("hook", receiver.url) + rule("new", ["trace.created"], ["hook"])
    )
    once = cli("once", "--config", path)
    assert once.returncode == 1, str(once)
    assert "delivered 0, pending 0, new dead letters 2" in once.stdout, str(once)
    assert len(receiver.requests()) == 1

    listing, as_json, status, replay_nothing, purge_nothing = cli.many(
        ["dead-letters", "list", "--config", path],
        ["dead-letters", "list", "--json", "--config", path],
        ["status", "--config", path],
        ["dead-letters", "replay", "--config", path],
        ["dead-letters", "purge", "--config", path],
    )
    assert listing.returncode == 0, str(listing)
    assert f"trace.created:{trace_id} -> notifier:hook after 1 attempts" in listing.stdout, str(listing)
    assert "refused the event: HTTP 400" in listing.stdout
    assert "unparseable observations record" in listing.stdout
    assert "field 'traceId' must be a non-empty string" in listing.stdout
    letters = [json.loads(line) for line in as_json.stdout.splitlines()]
    delivery, record = sorted(letters, key=lambda letter: letter["kind"])
    assert delivery["kind"] == "delivery" and delivery["event_id"] == f"trace.created:{trace_id}"
    assert delivery["target"] == "notifier:hook" and delivery["attempts"] == 1
    assert record["kind"] == "record" and record["stream"] == "observations"
    assert json.loads(record["raw"])["id"] == "obs-without-trace"
    assert "dead letters: 2" in status.stdout, str(status)
    for result in (replay_nothing, purge_nothing):
        assert result.returncode == 2, str(result)
        assert "give dead letter IDs, or --all" in result.stderr

    receiver.status = 200
    replay = cli("dead-letters", "replay", str(delivery["id"]), "--config", path)
    assert replay.returncode == 0 and "queued 1 for delivery again" in replay.stdout, str(replay)
    deliver = cli("once", "--config", path)
    assert deliver.returncode == 0, str(deliver)
    assert "delivered 1, pending 0, new dead letters 0" in deliver.stdout, str(deliver)
    received = receiver.requests()
    assert len(received) == 2
    assert received[-1].headers["webhook-id"] == f"trace.created:{trace_id}"
    assert received[-1].json()["id"] == f"trace.created:{trace_id}"

    left, replay_all = cli.many(
        ["dead-letters", "list", "--json", "--config", path],
        ["dead-letters", "replay", "--all", "--config", path],
    )
    assert [json.loads(line)["kind"] for line in left.stdout.splitlines()] == ["record"], str(left)
    assert replay_all.returncode == 1, str(replay_all)
    assert "1 records still cannot be parsed and stay dead letters" in replay_all.stderr

    purge = cli("dead-letters", "purge", "--all", "--config", path)
    assert purge.returncode == 0 and "purged 1 dead letters" in purge.stdout, str(purge)
    empty_text, empty_json, status = cli.many(
        ["dead-letters", "list", "--config", path],
        ["dead-letters", "list", "--json", "--config", path],
        ["status", "--config", path],
    )
    assert empty_text.stdout.strip() == "no dead letters" and empty_json.stdout == ""
    assert "dead letters: 0" in status.stdout


def test_a_malformed_record_read_again_by_a_sweep_stays_one_dead_letter(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse
) -> None:
    added = time.time()
    # inside the next 1m re-read window: [first once - 60 s, second once - 60 s)
    langfuse.add_raw_observation({"id": "obs-without-trace", "type": "SPAN"}, start_time=ago(58.5))
    path = write_config(tmp_path / "config.toml", langfuse.url, jsonl("file", tmp_path / "e.jsonl"))
    first = cli("once", "--config", path)
    assert "new dead letters 1" in first.stdout, str(first)
    if time.time() - added > 1.4:
        pytest.skip("the first once took too long to read the record inside the next 1m re-read window")
    time.sleep(max(0.0, added + 2.0 - time.time()))
    cli("once", "--config", path)
    letters = cli("dead-letters", "list", "--json", "--config", path).stdout.splitlines()
    assert len(letters) == 1, letters


# --- send-test-event ---------------------------------------------------------------------------------------


def test_send_test_event(cli: Cli, tmp_path: Path, receiver: Receiver) -> None:
    archive = tmp_path / "archive.jsonl"
    path = write_config(
        tmp_path / "config.toml",
        NOWHERE,
        webhook("hook", receiver.url)
        + jsonl("archive", archive)
        + rule("low-scores", ["score.*"], ["archive"], "data.value < 0.5"),
    )
    to_hook, through_rules, unknown, unwanted = cli.many(
        ["send-test-event", "--notifier", "hook", "--config", path],
        ["send-test-event", "--event", "score.created", "--config", path],
        ["send-test-event", "--notifier", "pager", "--config", path],
        ["send-test-event", "--event", "trace.created", "--config", path],
    )

    assert to_hook.returncode == 0, str(to_hook)
    [request] = receiver.requests()
    body = request.json()
    assert to_hook.stdout.strip() == f"sent {body['id']} to notifier:hook"
    assert request.path == f"/hook/{URL_TOKEN}"
    assert body["event"] == "trace.created" and body["source"] == "test" and body["id"].startswith("trace.created:")
    assert request.headers["webhook-id"] == body["id"]
    assert request.headers["content-type"] == "application/json"
    signature = dict(part.split("=", 1) for part in request.headers["x-langfuse-signature"].split(","))
    assert set(signature) == {"t", "v1"}
    assert abs(int(signature["t"]) - time.time()) < 120
    expected = hmac.new(WEBHOOK_SECRET.encode(), f"{signature['t']}.".encode() + request.body, hashlib.sha256)
    assert hmac.compare_digest(signature["v1"], expected.hexdigest())

    assert through_rules.returncode == 0, str(through_rules)
    [event] = read_jsonl(archive)
    assert event["event"] == "score.created" and event["source"] == "test"
    assert through_rules.stdout.strip() == f"sent {event['id']} to notifier:archive"

    assert unknown.returncode == 2, str(unknown)
    assert f"config error: {path}: --notifier: expected a configured notifier (archive, hook), found 'pager'" in (
        unknown.stderr
    )
    assert unwanted.returncode == 1 and "nothing sent" in unwanted.stdout, str(unwanted)
    assert len(receiver.requests()) == 1 and len(read_jsonl(archive)) == 1


def test_a_test_event_goes_straight_to_an_alerting_rules_notifiers(cli: Cli, tmp_path: Path) -> None:
    archive = tmp_path / "archive.jsonl"
    grouped = rule("errors", ["trace.updated"], ["archive"]) + "group = true\n"
    path = write_config(tmp_path / "config.toml", NOWHERE, jsonl("archive", archive) + grouped)
    sent = cli("send-test-event", "--event", "trace.updated", "--config", path)
    assert sent.returncode == 0, str(sent)
    [event] = read_jsonl(archive)
    assert event["event"] == "trace.updated" and event["source"] == "test"
    assert sent.stdout.strip() == f"sent {event['id']} to notifier:archive"


# --- run ---------------------------------------------------------------------------------------------------


def test_run_delivers_holds_the_state_lock_and_stops_cleanly_on_sigterm(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse
) -> None:
    trace = langfuse.add_trace(start_time=ago(30))
    events = tmp_path / "events.jsonl"
    path = write_config(
        tmp_path / "config.toml", langfuse.url, jsonl("file", events) + rule("new", ["trace.*"], ["file"])
    )
    started = cli.start("run", "--config", str(path))
    try:
        assert wait_for(lambda: len(read_jsonl(events)) == 1), "run delivered nothing"
        assert read_jsonl(events)[0]["id"] == f"trace.created:{trace[0]['traceId']}"
        second = cli("once", "--config", path)
        assert second.returncode == 1, str(second)
        assert f"another langfuse-poller (pid {started.proc.pid}) is using" in second.stderr, str(second)
    finally:
        started.proc.send_signal(signal.SIGTERM)
        result = Cli.finish(started, timeout=20)
    assert result.returncode == 0, str(result)
    assert "stopped" in result.stderr


# --- what a server (or a missing package) can do to the CLI: a message and an exit code, never a traceback ---


def test_check_and_once_accept_keys_whose_projects_have_no_organization(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse
) -> None:
    langfuse.projects_organization = False  # servers before Langfuse v3.143.0
    path = write_config(tmp_path / "config.toml", langfuse.url)
    check, once = cli.many(["check", "--config", path], ["once", "--config", path])
    assert check.returncode == 0, str(check)
    assert f"accepts the keys: test-project ({PROJECT_ID})" in check.stdout, str(check)
    assert once.returncode == 0, str(once)  # nothing to read: `once` proves the keys with the same check


@pytest.mark.parametrize("body", ["list", "no-data", "cursor", "html", "empty"])
def test_once_and_check_name_the_endpoint_of_an_unexpected_answer(
    cli: Cli, tmp_path: Path, langfuse: FakeLangfuse, body: str
) -> None:
    path = write_config(tmp_path / "config.toml", langfuse.url)
    langfuse.unexpected_next(2, body)
    once = cli("once", "--config", path)
    assert once.returncode == 1, str(once)
    errors = [line for line in once.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, str(once)
    assert "GET /api/public/v2/observations" in errors[0] and "GET /api/public/v3/scores" in errors[1], str(once)
    langfuse.unexpected_next(1, body)
    check = cli("check", "--config", path)
    assert check.returncode == 1, str(check)
    assert "FAIL " in check.stdout and "GET /api/public/v2/observations" in check.stdout, str(check)


# the CLI as it runs where the `redis` extra is not installed: bullmq and redis cannot be imported
WITHOUT_REDIS = """
import sys
from importlib.abc import MetaPathFinder

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("bullmq", "redis"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from langfuse_poller.cli import main
sys.exit(main())
"""


def test_the_redis_backend_without_the_redis_extra_is_a_config_error(cli: Cli, tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.toml", NOWHERE, '[queue]\nbackend = "redis"\n')
    blocked = [sys.executable, "-c", WITHOUT_REDIS]
    results = [cli(command, "--config", path, exe=blocked) for command in ("check", "once", "run", "worker")]
    for result in results:
        assert result.returncode == 2, str(result)
        assert "queue.backend" in result.stderr + result.stdout, str(result)
        assert 'pip install "langfuse-poller[redis]"' in result.output, str(result)
    # the same config where the extra is installed gets past the config (and fails on the unreachable host)
    assert cli("check", "--config", path).returncode == 1
