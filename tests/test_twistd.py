"""``twistd hl7bridge`` from an installed wheel, as a deployment runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import ROOT, mllp_send

TWISTD = "from twisted.scripts.twistd import run; run()"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hl7bridge built as a wheel and installed into a folder of its own."""
    folder = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder), str(ROOT)], check=True, timeout=300)
    [wheel] = folder.glob("hl7bridge-*.whl")
    target = folder / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    assert (target / "twisted" / "plugins" / "hl7bridge_plugin.py").is_file()
    return target


def twistd(site: Path, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--logfile=-", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_twistd_serves_from_the_wheel_and_drains_on_sigterm(installed: Path, tmp_path: Path) -> None:
    process = twistd(
        installed, tmp_path, "--reactor", "asyncio", "hl7bridge", "--endpoint", "tcp:0:interface=127.0.0.1"
    )
    assert process.stdout is not None
    lines = []
    port = None
    deadline = time.monotonic() + 60
    while port is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"MLLPFactory starting on (\d+)", line)
        port = int(found.group(1)) if found else None
    assert port is not None, "".join(lines)
    # twistd found the plugin in the wheel's folder (and cached it there).
    assert (installed / "twisted" / "plugins" / "dropin.cache").is_file()
    message_file = tmp_path / "m.hl7"
    message_file.write_bytes(b"\x0bMSH|^~\\&|A|B|C|D|20240101||ADT^A01^ADT_A01|TWISTD01|P|2.5\rPID|1||1||X^Y\r\x1c\r")
    assert "MSA|AA|TWISTD01" in mllp_send(port, message_file).replace("\r", "\n")
    # hl7bridge's own log lines reach twistd's log (LoggingReceiver's, here).
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    log = "".join(lines) + out
    assert "received ADT^A01 control id TWISTD01" in log
    # twistd ends by re-raising the signal that stopped it, after a clean shutdown.
    assert process.returncode in (0, -signal.SIGTERM), log
    assert "Server Shut Down." in log
    assert "Traceback" not in log


def test_twistd_without_the_asyncio_reactor_says_what_to_add(installed: Path, tmp_path: Path) -> None:
    process = twistd(installed, tmp_path, "hl7bridge", "--endpoint", "tcp:0:interface=127.0.0.1")
    out, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "Add --reactor asyncio" in out
