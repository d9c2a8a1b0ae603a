"""``hl7bridge serve`` as a subprocess, answered through python-hl7's ``mllp_send``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cases import CR, FS, VT
from tests.support import message

ROOT = Path(__file__).resolve().parents[1]
MLLP_SEND = Path(sys.executable).with_name("mllp_send")


class Server:
    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hl7bridge", "serve", "--endpoint", "tcp:0:interface=127.0.0.1", *args],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.port = int(self.wait_for(r"serving \S+ on 127\.0\.0\.1:(\d+)").group(1))

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        assert self.process.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.log.append(line)
            found = re.search(pattern, line)
            if found:
                return found
        raise AssertionError(f"{pattern!r} not logged; log so far:\n{''.join(self.log)}")

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        try:
            _, rest = self.process.communicate(timeout=20)
        finally:
            self.process.kill()
        self.log.append(rest)
        return self.process.returncode


@pytest.fixture
def message_file(tmp_path: Path) -> Path:
    path = tmp_path / "message.hl7"
    path.write_bytes(VT + message("CLI0001", body="PID|1||55501||TESTPERSON^SECRET\r").encode() + FS + CR)
    return path


def mllp_send(port: int, path: Path) -> str:
    result = subprocess.run(
        [str(MLLP_SEND), "-p", str(port), "-f", str(path), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_mllp_send_and_stops_cleanly(sig: int, message_file: Path) -> None:
    server = Server()
    reply = mllp_send(server.port, message_file)
    assert "MSA|AA|CLI0001" in reply.replace("\r", "\n")
    assert server.stop(sig) == 0
    log = "".join(server.log)
    assert "stopping" in log
    assert "Traceback" not in log
    assert "TESTPERSON" not in log and "55501" not in log


def test_serve_runs_a_legacy_txhl7_receiver_module(tmp_path: Path) -> None:
    path = tmp_path / "m.hl7"
    text = message("CLI0002", body="PID|1||1||M\u00fcller-L\u00fcdenscheidt^Zo\u00eb\r")
    path.write_bytes(VT + text.encode("cp1252") + FS + CR)
    server = Server("--receiver", "tests.legacy.cp1252_receiver.Cp1252Receiver")
    try:
        assert "MSA|AA|CLI0002" in mllp_send(server.port, path).replace("\r", "\n")
    finally:
        assert server.stop(signal.SIGTERM) == 0


def test_bad_receiver_is_reported_and_exits_non_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hl7bridge", "serve", "--endpoint", "tcp:0", "--receiver", "no.such.Receiver"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "cannot use receiver no.such.Receiver" in result.stderr


def test_endpoint_in_use_is_reported_and_exits_non_zero(message_file: Path) -> None:
    server = Server()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "hl7bridge", "serve", "--endpoint", f"tcp:{server.port}:interface=127.0.0.1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ},
        )
        assert result.returncode == 1
        assert "cannot listen on" in result.stderr
    finally:
        server.stop(signal.SIGTERM)
