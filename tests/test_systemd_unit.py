"""The shipped systemd unit: what it sets, what `systemd-analyze` thinks of it, and the credentials it passes.

`systemd-analyze` comes with Debian's systemd package (`.ci/run` installs it when it can); where it cannot be
run at all, the tests that need it skip, and only those.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from langfuse_poller.service.daemon import STOP_GRACE
from langfuse_poller.service.lifecycle import READY_WITHIN
from langfuse_poller.webhooks.activation import WEBHOOK_FD_NAME

from . import test_cli
from .test_cli import PUBLIC_KEY, SECRET_KEY, q
from .test_service import config_file

pytestmark = pytest.mark.timeout(120)

langfuse = test_cli.langfuse

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "langfuse-poller.service"
SOCKET = UNIT.with_name("langfuse-poller-webhooks.socket")
SCRIPT = Path(sys.executable).parent / "langfuse-poller"
MAX_EXPOSURE = 2.0
EXPOSURE = re.compile(r"Overall exposure level for langfuse-poller\.service: (\d+(?:\.\d+)?)")
SECONDS = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}


def directives(text: str) -> dict[str, list[str]]:
    """`Key=value` lines by key (a key may repeat), comments and section headers left out."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert match and match.group(2) in SECONDS, value
    return float(match.group(1)) * SECONDS[match.group(2)]


def systemd_analyze() -> str:
    """The systemd-analyze binary, or a skip when this machine has none that runs."""
    path = shutil.which("systemd-analyze") or (
        "/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None
    )
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    try:
        subprocess.run([path, "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"systemd-analyze cannot be run here: {exc}")
    return path


def test_the_unit_is_a_notify_service_with_watchdog_reload_restart_limits_and_credentials() -> None:
    unit = directives(UNIT.read_text(encoding="utf-8"))
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    # straight at the installed console script, no shell in between
    exec_start = one["ExecStart"].split()
    assert exec_start[0] == "/opt/langfuse-poller/venv/bin/langfuse-poller"
    assert exec_start[1:] == ["run", "--config", "/etc/langfuse-poller/config.toml"]
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure" and one["RestartPreventExitStatus"] == "2"
    assert int(one["StartLimitBurst"]) >= 3 and seconds(one["StartLimitIntervalSec"]) >= 60
    # the watchdog outlasts a Langfuse request (30 s by default), READY comes well before the start times out,
    # and a stop has time for the poll's grace and a delivery
    assert seconds(one["WatchdogSec"]) > 30
    assert seconds(one["TimeoutStartSec"]) > READY_WITHIN + 30
    assert one["KillSignal"] == "SIGTERM" and seconds(one["TimeoutStopSec"]) >= STOP_GRACE + 10
    assert one["DynamicUser"] == "yes"
    assert one["StateDirectory"] == "langfuse-poller" and one["ConfigurationDirectory"] == "langfuse-poller"
    assert "langfuse-secret-key:/etc/langfuse-poller/langfuse-secret-key" in unit["LoadCredential"]
    assert one["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert one["LimitCORE"] == "0"


def test_systemd_analyze_security_rates_the_unit_2_or_lower() -> None:
    analyze = systemd_analyze()
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )
    if "unrecognized option" in done.stderr:
        pytest.skip(f"this systemd-analyze is older than --offline (systemd 250): {done.stderr.strip()}")
    match = EXPOSURE.search(done.stdout)
    assert match, f"no exposure level in the output:\n{done.stdout}\n{done.stderr}"
    level = float(match.group(1))
    print(f"systemd-analyze security: exposure {level}")
    assert level <= MAX_EXPOSURE, f"exposure {level} > {MAX_EXPOSURE}:\n{done.stdout}"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    if not SCRIPT.is_file():
        pytest.skip(f"no installed console script at {SCRIPT}")
    # verify checks that ExecStart exists: point it at this environment's script
    unit = tmp_path / "langfuse-poller.service"
    unit.write_text(
        UNIT.read_text(encoding="utf-8").replace("/opt/langfuse-poller/venv/bin/langfuse-poller", str(SCRIPT)),
        encoding="utf-8",
    )
    done = subprocess.run(
        [analyze, "verify", "--no-pager", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "langfuse-poller.service" not in done.stderr, done.stderr


def test_the_webhook_socket_is_held_by_systemd_on_443_and_handed_to_the_service() -> None:
    socket_unit = {key: values[-1] for key, values in directives(SOCKET.read_text(encoding="utf-8")).items()}
    # Langfuse delivers to ports 80 and 443 only; systemd binds it, so the unprivileged service needs no capability
    assert socket_unit["ListenStream"] == "443"
    assert socket_unit["FileDescriptorName"] == WEBHOOK_FD_NAME
    assert socket_unit["Service"] == UNIT.name
    assert socket_unit["WantedBy"] == "sockets.target"
    service = directives(UNIT.read_text(encoding="utf-8"))
    # the service takes the socket when it is installed, and runs without it when not (Sockets= only wants it)
    assert service["Sockets"] == [SOCKET.name]
    assert "CapabilityBoundingSet" in service and service["CapabilityBoundingSet"] == [""]


def test_systemd_analyze_verify_accepts_the_socket_with_the_service(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    if not SCRIPT.is_file():
        pytest.skip(f"no installed console script at {SCRIPT}")
    (tmp_path / UNIT.name).write_text(
        UNIT.read_text(encoding="utf-8").replace("/opt/langfuse-poller/venv/bin/langfuse-poller", str(SCRIPT)),
        encoding="utf-8",
    )
    (tmp_path / SOCKET.name).write_text(SOCKET.read_text(encoding="utf-8"), encoding="utf-8")
    done = subprocess.run(
        [analyze, "verify", "--no-pager", SOCKET.name, UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert SOCKET.name not in done.stderr and UNIT.name not in done.stderr, done.stderr


def test_the_config_reads_the_secret_from_the_credentials_directory(
    tmp_path: Path, langfuse: test_cli.FakeLangfuse
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "langfuse-secret-key").write_text(SECRET_KEY + "\n", encoding="utf-8")
    path = config_file(tmp_path / "config.toml", langfuse.url)
    text = path.read_text(encoding="utf-8").replace(
        f"secret_key = {q(SECRET_KEY)}", 'secret_key_file = "${CREDENTIALS_DIRECTORY}/langfuse-secret-key"'
    )
    path.write_text(text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "CREDENTIALS_"))}

    def check(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "langfuse_poller", "check", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **extra},
        )

    under_systemd = check(CREDENTIALS_DIRECTORY=str(credentials))
    assert under_systemd.returncode == 0, under_systemd.stdout + under_systemd.stderr
    assert "accepts the keys" in under_systemd.stdout and PUBLIC_KEY not in under_systemd.stderr
    outside = check()
    assert outside.returncode == 2, outside.stdout + outside.stderr
    assert f"{path}: langfuse.secret_key_file: expected the path of a file holding the secret" in outside.stderr
    assert "$CREDENTIALS_DIRECTORY is not set (systemd sets it for a service with LoadCredential=)" in outside.stderr
    assert SECRET_KEY not in outside.stdout + outside.stderr
