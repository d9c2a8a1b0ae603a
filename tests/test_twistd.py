"""twistd and hl7bridge's commands, run as a deployment runs them.

Each runs as a console script of a virtualenv, from a folder outside the
checkout, without PYTHONPATH, in two installs: the one this suite runs in
(``make install``'s editable install) and a fresh virtualenv with hl7bridge
installed from a wheel and its dependencies from the package index. The wheel
is built from a copy of the files that make the distribution (so no
``build/`` folder left in the checkout can slip stale files into it). Every wait
is bounded: a twistd that hangs fails the test, and is killed, instead of
holding up the suite.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hl7bridge.listeners import ASYNCIO_TLS
from tests.interop.test_endpoints import mtls_endpoint, mutual_tls_files
from tests.test_cli import ROOT, Server, mllp_send, without_pythonpath, write_app_package
from tests.test_docs import Lines

# What setup.cfg packages: the sources of the wheel, and nothing else of the checkout.
DISTRIBUTION = ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "hl7bridge", "twisted")
INSTALLS = ("this-venv", "wheel-venv")
# What twistd hl7bridge logs for each endpoint it serves, as hl7bridge serve does.
SERVING = r"serving \S+ on 127\.0\.0\.1:(\d+)"


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with hl7bridge installed from its wheel (and twisted[tls] for mtls:)."""
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"
    for name in DISTRIBUTION:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    pip = ["-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [sys.executable, *pip, "wheel", "--no-deps", "-w", str(folder), str(source)], check=True, timeout=300
    )
    [wheel] = folder.glob("hl7bridge-*.whl")
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = [str(venv / "bin" / "python"), *pip, "install", str(wheel), "twisted[tls]"]
    subprocess.run(install, check=True, timeout=600, env=without_pythonpath())
    return venv


@pytest.fixture(params=INSTALLS)
def scripts(request: pytest.FixtureRequest) -> Path:
    """The bin folder of an install: this suite's own virtualenv, or the wheel's."""
    if request.param == "this-venv":
        return Path(sys.executable).parent
    return Path(request.getfixturevalue("wheel_venv")) / "bin"


def test_the_wheel_is_what_runs_in_its_venv(wheel_venv: Path, tmp_path: Path) -> None:
    """In the wheel's virtualenv, neither the checkout nor the editable install is used."""
    code = (
        "import importlib, twisted.plugins\n"
        "from twisted.plugin import getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "[maker] = [p for p in getPlugins(IServiceMaker) if p.tapname == 'hl7bridge']\n"
        "print(importlib.import_module('twisted.plugins.hl7bridge_plugin').__file__)\n"
        "print(importlib.import_module(maker.module).__file__)\n"
        "print(*twisted.plugins.__path__, sep='\\n')\n"
    )
    result = subprocess.run(
        [str(wheel_venv / "bin" / "python"), "-c", code],
        cwd=tmp_path,
        env=without_pythonpath(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert Path(lines[0]).is_relative_to(wheel_venv)
    assert Path(lines[1]).is_relative_to(wheel_venv)
    # Plugins come from the wheel's twisted/plugins folder, not from the checkout's.
    assert ROOT / "twisted" / "plugins" not in [Path(path) for path in lines[2:]]


def test_commands_find_hl7bridge_plugins_from_any_folder(scripts: Path, tmp_path: Path) -> None:
    """twistd lists the hl7bridge plugin, and hl7bridge serve knows mtls:, outside the checkout."""
    listed = subprocess.run(
        [str(scripts / "twistd"), "--help"],
        cwd=tmp_path,
        env=without_pythonpath(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert re.search(r"^ +hl7bridge +MLLP listener", listed.stdout, re.MULTILINE), listed.stdout + listed.stderr
    files = mutual_tls_files(tmp_path)
    server = Server("-e", mtls_endpoint(files), program=[str(scripts / "hl7bridge")], cwd=tmp_path)
    try:
        tls_port = server.wait_for(r"serving \S+ on 127\.0\.0\.1:(\d+)").group(1)
        tls = ["-p", tls_port, "--cafile", str(files["listener_cert"])]
        client = ["--cert", str(files["sender_cert"]), "--key", str(files["sender_key"])]
        sent = subprocess.run(
            [str(scripts / "hl7bridge"), "send", *tls, *client, "127.0.0.1"],
            input=b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01^ADT_A01|ANYDIR1|P|2.5\rPID|1||1||X^Y\r",
            cwd=tmp_path,
            env=without_pythonpath(),
            capture_output=True,
            timeout=60,
        )
        assert sent.returncode == 0 and b"MSA|AA|ANYDIR1" in sent.stdout, sent.stderr
    finally:
        assert server.stop(signal.SIGTERM) == 0


class Twistd:
    """twistd in a subprocess, its output read in a thread so every wait has a deadline."""

    def __init__(self, scripts: Path, cwd: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [str(scripts / "twistd"), "-n", "--pidfile=", "--logfile=-", *args],
            cwd=cwd,
            env=without_pythonpath(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = Lines(self.process.stdout)
        self.closed = False

    def finish(self, sig: int | None = None, timeout: float = 30) -> str:
        """Send ``sig`` (if any), wait at most ``timeout`` seconds for the end, return all output."""
        if sig is not None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout)
        finally:
            self.close()
        return "".join(self.output.seen)

    def close(self) -> None:
        """Kill the process if it still runs, and read what it printed to the end."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        if not self.closed:
            self.closed = True
            self.output.rest()


@pytest.fixture
def twistd(scripts: Path, tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    """Starts twistd with the arguments given; kills what is still running when the test ends."""
    started: list[Twistd] = []

    def start(*args: str) -> Twistd:
        started.append(Twistd(scripts, tmp_path, *args))
        return started[-1]

    yield start
    for process in started:
        process.close()


def test_twistd_serves_and_drains_on_sigterm(scripts: Path, tmp_path: Path, twistd: Callable[..., Twistd]) -> None:
    files = mutual_tls_files(tmp_path)
    process = twistd(
        "--reactor", "asyncio", "hl7bridge", "--endpoint", "tcp:0:interface=127.0.0.1", "-e", mtls_endpoint(files)
    )
    if ASYNCIO_TLS:
        ports = [int(process.output.wait_for(SERVING).group(1)) for _ in range(2)]
    else:  # Twisted's TLS serves mtls: there, and says so first
        tls_port = int(process.output.wait_for(r"MLLPFactory \(TLS\) starting on (\d+)").group(1))
        ports = [int(process.output.wait_for(SERVING).group(1)), tls_port]
    message_file = tmp_path / "m.hl7"
    message_file.write_bytes(b"\x0bMSH|^~\\&|A|B|C|D|20240101||ADT^A01^ADT_A01|TWISTD01|P|2.5\rPID|1||1||X^Y\r\x1c\r")
    assert "MSA|AA|TWISTD01" in mllp_send(ports[0], message_file).replace("\r", "\n")
    # The second listener, mutual TLS through the install's mtls: endpoint, answered the installed sender.
    tls = [
        "--cafile",
        str(files["listener_cert"]),
        "--cert",
        str(files["sender_cert"]),
        "--key",
        str(files["sender_key"]),
    ]
    sent = subprocess.run(
        [str(scripts / "hl7bridge"), "send", "-p", str(ports[1]), *tls, "127.0.0.1", str(message_file)],
        cwd=tmp_path,
        env=without_pythonpath(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0 and "MSA|AA|TWISTD01" in sent.stdout, sent.stderr
    # hl7bridge's log lines reach twistd's log: LoggingReceiver's and the one line per message.
    process.output.wait_for(r"\[hl7bridge\.messages#info\] 127\.0\.0\.1:\d+ ADT\^A01 TWISTD01 AA \d+\.\dms")
    log = process.finish(signal.SIGTERM)
    assert log.count("received ADT^A01 control id TWISTD01") == 2
    # twistd ends by re-raising the signal that stopped it, after a clean shutdown.
    assert process.process.returncode in (0, -signal.SIGTERM), log
    assert "Server Shut Down." in log
    assert "Traceback" not in log
    # Both endpoints were served by asyncio's own servers, not by Twisted's ports.
    assert "MLLPFactory" not in log or not ASYNCIO_TLS


def test_twistd_logs_json_lines_with_the_json_observer(tmp_path: Path, twistd: Callable[..., Twistd]) -> None:
    process = twistd(
        "--logger",
        "hl7bridge.tap.json_log_observer",
        "--reactor",
        "asyncio",
        "hl7bridge",
        "-e",
        "tcp:0:interface=127.0.0.1",
    )
    port = int(process.output.wait_for(SERVING).group(1))
    message_file = tmp_path / "m.hl7"
    message_file.write_bytes(b"\x0bMSH|^~\\&|A|B|C|D|20240101||ADT^A01^ADT_A01|TWISTD02|P|2.5\rPID|1||1||X^Y\r\x1c\r")
    assert "MSA|AA|TWISTD02" in mllp_send(port, message_file).replace("\r", "\n")
    process.output.wait_for(r'"logger": "hl7bridge.messages"')
    log = process.finish(signal.SIGTERM)
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is JSON
    [entry] = [e for e in entries if e["logger"] == "hl7bridge.messages"]
    assert entry["control_id"] == "TWISTD02" and entry["ack_code"] == "AA" and entry["message_type"] == "ADT^A01"
    assert "X^Y" not in log


def test_twistd_without_the_asyncio_reactor_says_what_to_add(twistd: Callable[..., Twistd]) -> None:
    process = twistd("hl7bridge", "--endpoint", "tcp:0:interface=127.0.0.1")
    out = process.finish(timeout=60)
    assert process.process.returncode != 0
    assert "Add --reactor asyncio" in out


def test_twistd_finds_receivers_in_its_folder_and_says_why_one_cannot_be_imported(
    tmp_path: Path, twistd: Callable[..., Twistd]
) -> None:
    write_app_package(tmp_path)  # the folder twistd runs in
    listen = ["--reactor", "asyncio", "hl7bridge", "-e", "tcp:0:interface=127.0.0.1"]
    process = twistd(*listen, "--receiver", "myinterface.receivers.AdmissionsReceiver")
    port = int(process.output.wait_for(SERVING).group(1))
    message_file = tmp_path / "m.hl7"
    message_file.write_bytes(b"\x0bMSH|^~\\&|A|B|C|D|20240101||ADT^A01^ADT_A01|TWISTD03|P|2.5\rPID|1||1||X^Y\r\x1c\r")
    assert "MSA|AA|TWISTD03" in mllp_send(port, message_file).replace("\r", "\n")
    process.finish(signal.SIGTERM)
    process = twistd(*listen, "--receiver", "myinterface.needs_a_driver.Receiver")
    out = process.finish(timeout=60)
    assert process.process.returncode == 2
    where = f"({tmp_path}/myinterface/needs_a_driver.py, line 3)"
    assert f"ModuleNotFoundError: No module named 'no_such_driver' {where}" in out
    assert "Traceback" not in out


def test_twistd_that_cannot_listen_says_why_and_exits_1(twistd: Callable[..., Twistd]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = twistd("--reactor", "asyncio", "hl7bridge", "-e", f"tcp:{port}:interface=127.0.0.1")
        out = process.finish(timeout=60)
    assert process.process.returncode == 1
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1: [Errno 98] Address already in use" in out
    assert "Traceback" not in out
