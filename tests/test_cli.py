"""``hl7bridge serve`` as a subprocess, answered through python-hl7's ``mllp_send``."""

from __future__ import annotations

import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.cases import CR, FS, VT
from tests.support import message, needs_asyncio_tls
from tests.test_docs import Lines

ROOT = Path(__file__).resolve().parents[1]
MLLP_SEND = Path(sys.executable).with_name("mllp_send")
HL7BRIDGE = (sys.executable, "-m", "hl7bridge")
# The console script, run as a user runs it (tests/test_twistd.py runs it from a wheel too).
SCRIPT = str(Path(sys.executable).with_name("hl7bridge"))


def without_pythonpath() -> dict[str, str]:
    """This process's environment without PYTHONPATH: commands find what their install gives them."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


class Server:
    """``hl7bridge serve`` in a subprocess; its log is read in a thread, so every wait has a deadline."""

    def __init__(self, *args: str, program: Sequence[str] = HL7BRIDGE, cwd: Path = ROOT) -> None:
        self.process = subprocess.Popen(
            [*program, "serve", "--endpoint", "tcp:0:interface=127.0.0.1", *args],
            cwd=cwd,
            env=without_pythonpath(),
            stderr=subprocess.PIPE,
            text=True,
        )
        self.output = Lines(self.process.stderr)
        self.port = int(self.wait_for(r"serving \S+ on 127\.0\.0\.1:(\d+)").group(1))

    @property
    def log(self) -> list[str]:
        return self.output.seen

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        try:
            return self.output.wait_for(pattern, timeout)
        except AssertionError:
            self.process.kill()
            raise

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=20)
        finally:
            self.process.kill()
            self.process.wait(timeout=20)
            self.output.rest()
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


def _hl7bridge(
    *args: str, stdin: bytes | None = None, timeout: float = 120, program: Sequence[str] = HL7BRIDGE, cwd: Path = ROOT
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*program, *args], cwd=cwd, env=without_pythonpath(), input=stdin, capture_output=True, timeout=timeout
    )


def write_app_package(folder: Path) -> Path:
    """``folder`` made a user's project: ``myinterface/`` with a receiver, and modules that cannot be imported."""
    package = folder / "myinterface"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "receivers.py").write_text(
        "from hl7bridge.receiver import LoggingReceiver\n\n\nclass AdmissionsReceiver(LoggingReceiver):\n    pass\n"
    )
    (package / "needs_a_driver.py").write_text(
        '"""A module whose dependency is not installed."""\n\nimport no_such_driver\n'
    )
    (package / "typo.py").write_text("def handle(message:\n    return None\n")
    return folder


def test_serve_finds_receivers_in_its_folder_or_app_dir(tmp_path: Path) -> None:
    project = write_app_package(tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    receiver = ["--receiver", "myinterface.receivers.AdmissionsReceiver"]
    for cwd, app_dir in ((project, []), (elsewhere, ["--app-dir", str(project)])):
        server = Server(*receiver, *app_dir, program=[SCRIPT], cwd=cwd)
        try:
            sent = hl7bridge_send("-p", str(server.port), "127.0.0.1", stdin=message("APPDIR1").encode())
            assert sent.returncode == 0 and b"MSA|AA|APPDIR1" in sent.stdout, sent.stderr
        finally:
            assert server.stop(signal.SIGTERM) == 0
    shown = _hl7bridge("serve", "--help", program=[SCRIPT]).stdout.decode()
    assert "--app-dir=" in shown and "current folder" in shown


@pytest.mark.parametrize(
    ("receiver", "shown"),
    [
        ("nomodule.Receiver", r"No module named 'nomodule' \(the import path starts with {folder}\)"),
        ("myinterface.receivers.Missing", r"module 'myinterface\.receivers' has no attribute 'Missing'"),
        ("myinterface.nomodule.Receiver", r"No module named 'myinterface\.nomodule'"),
        (
            "myinterface.needs_a_driver.Receiver",
            r"importing myinterface\.needs_a_driver failed: ModuleNotFoundError: No module named 'no_such_driver' "
            r"\({folder}/myinterface/needs_a_driver\.py, line 3\)",
        ),
        (
            "myinterface.typo.handle",
            r"importing myinterface\.typo failed: SyntaxError: .+ \({folder}/myinterface/typo\.py, line 1\)",
        ),
    ],
)
def test_serve_shows_why_a_receiver_cannot_be_imported(tmp_path: Path, receiver: str, shown: str) -> None:
    write_app_package(tmp_path)
    result = _hl7bridge("serve", "-e", "tcp:0:interface=127.0.0.1", "-r", receiver, program=[SCRIPT], cwd=tmp_path)
    assert result.returncode == 2
    error = result.stderr.decode()
    assert re.search(
        f"cannot use receiver {re.escape(receiver)}: " + shown.format(folder=re.escape(str(tmp_path))), error
    )
    assert "Traceback" not in error


def test_bad_receiver_is_reported_and_exits_non_zero() -> None:
    result = _hl7bridge("serve", "--endpoint", "tcp:0", "--receiver", "no.such.Receiver", timeout=30)
    assert result.returncode == 2
    assert "cannot use receiver no.such.Receiver" in result.stderr.decode()


def test_endpoint_in_use_is_reported_and_exits_non_zero(message_file: Path) -> None:
    server = Server()
    try:
        result = _hl7bridge("serve", "--endpoint", f"tcp:{server.port}:interface=127.0.0.1", timeout=30)
        assert result.returncode == 1
        assert "cannot listen on" in result.stderr.decode()
        # It never served, so it has nothing in flight to answer.
        assert "stopping" not in result.stderr.decode()
    finally:
        server.stop(signal.SIGTERM)


def hl7bridge_send(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return _hl7bridge("send", *args, stdin=stdin)


def test_send_many_messages_with_any_line_ends_to_serve(tmp_path: Path) -> None:
    path = tmp_path / "three.hl7"
    texts = [message(f"SEND{n}") for n in range(3)]
    path.write_bytes((texts[0].replace("\r", "\n") + texts[1].replace("\r", "\r\n") + texts[2]).encode())
    server = Server()
    try:
        result = hl7bridge_send("-p", str(server.port), "127.0.0.1", str(path))
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().count("MSA|AA|SEND") == 3
        assert "3 messages: AA 3" in result.stderr.decode()
        assert "sent " not in result.stderr.decode()  # no progress unless asked, off a terminal
        # mllp_send's options and stdin.
        framed = VT + texts[0].encode() + FS + CR
        result = hl7bridge_send("-p", str(server.port), "-q", "--loose", "127.0.0.1", stdin=framed)
        assert result.returncode == 0 and result.stdout == b""
    finally:
        server.stop(signal.SIGTERM)


def test_send_exits_non_zero_on_a_negative_ack_and_on_no_listener(tmp_path: Path) -> None:
    path = tmp_path / "mixed.hl7"
    path.write_bytes((message("OK1") + message("NOID", body="PID|1||||DOE^JANE\r")).encode())
    server = Server("--receiver", "tests.handlers.admissions.handle")
    try:
        result = hl7bridge_send("-p", str(server.port), "-f", str(path), "127.0.0.1")
        assert result.returncode == 1
        assert "2 messages: AA 1, AE 1" in result.stderr.decode()
    finally:
        server.stop(signal.SIGTERM)
    result = hl7bridge_send("-p", str(server.port), "--connect-timeout", "2", "127.0.0.1", str(path))
    assert result.returncode == 2
    assert "2 messages: no ACK 2" in result.stderr.decode()


def test_logs_of_a_corpus_run_hold_no_patient_data(tmp_path: Path) -> None:
    from tests.support import control_id, corpus_messages

    # A message without a control id gets no ACK: the sender would wait for it.
    texts = [text for _, text in corpus_messages() if control_id(text)]
    secrets = set()
    for text in texts:
        for segment in text.split("\r"):
            fields = segment.split("|")
            if fields[0] == "PID" and len(fields) > 5:
                secrets |= {value for value in (fields[3].split("^")[0], fields[5].split("^")[0]) if len(value) > 3}
    assert len(secrets) > 20
    path = tmp_path / "corpus.hl7"
    # Unframed, LF-ended, one file: split at each MSH, batch envelopes left out.
    path.write_bytes("\n".join(texts).replace("\r", "\n").encode())
    server = Server("--log-level", "DEBUG")
    try:
        result = hl7bridge_send("-p", str(server.port), "-q", "127.0.0.1", str(path))
        # Two MSHs lack a required field (MSH-2, MSH-9): AR "required field missing".
        assert result.returncode == 1 and f"{len(texts)} messages: AA {len(texts) - 2}, AR 2" in result.stderr.decode()
    finally:
        server.stop(signal.SIGTERM)
    log = "".join(server.log) + result.stderr.decode()
    assert "received" in log
    # Whole tokens: a patient id may happen to end a (logged) MSH-10 control id.
    assert [s for s in secrets if re.search(rf"(?<![0-9A-Za-z]){re.escape(s)}(?![0-9A-Za-z])", log)] == []


def test_serve_listens_on_several_endpoints_with_mutual_tls(tmp_path: Path) -> None:
    from tests.interop.test_endpoints import mtls_endpoint, mutual_tls_files

    files = mutual_tls_files(tmp_path)
    socket_path = tmp_path / "mllp.sock"
    server = Server("--endpoint", f"unix:{socket_path}", "-e", mtls_endpoint(files))
    try:
        tls_port = server.wait_for(r"serving \S+ on 127\.0\.0\.1:(\d+)").group(1)
        # The other two listeners: the tcp one (server.port) and the unix socket.
        assert socket_path.exists()
        result = hl7bridge_send("-p", str(server.port), "127.0.0.1", stdin=message("MULTI1").encode())
        assert result.returncode == 0 and b"MSA|AA|MULTI1" in result.stdout, result.stderr
        # Mutual TLS: the sender's certificate is accepted; without one, nothing gets through.
        tls = ["-p", tls_port, "--cafile", str(files["listener_cert"])]
        client = ["--cert", str(files["sender_cert"]), "--key", str(files["sender_key"])]
        result = hl7bridge_send(*tls, *client, "127.0.0.1", stdin=message("MTLS1").encode())
        assert result.returncode == 0 and b"MSA|AA|MTLS1" in result.stdout, result.stderr
        result = hl7bridge_send(*tls, "--timeout", "5", "127.0.0.1", stdin=message("MTLS2").encode())
        assert result.returncode == 2, result.stderr
        assert b"MSA" not in result.stdout
        # Verification is on by default: a listener the sender has no CA for is refused.
        result = hl7bridge_send("-p", tls_port, "--tls", *client, "127.0.0.1", stdin=message("MTLS3").encode())
        assert result.returncode == 2 and b"CERTIFICATE_VERIFY_FAILED" in result.stderr, result.stderr
    finally:
        assert server.stop(signal.SIGTERM) == 0
    log = "".join(server.log)
    assert "MULTI1 AA" in log and "MTLS1 AA" in log and "MTLS2" not in log and "MTLS3" not in log


def test_serve_listens_through_asyncio_and_leaves_other_endpoint_types_to_twisted() -> None:
    # tcp6: is not one hl7bridge listens on itself: Twisted's endpoint serves it, into the same engine.
    server = Server("-e", "tcp6:0:interface=\\:\\:1")
    try:
        twisted_port = server.wait_for(r"MLLPFactory starting on (\d+)").group(1)
        server.wait_for(rf"serving \S+ on ::1:{twisted_port}")
        result = hl7bridge_send("-p", twisted_port, "::1", stdin=message("TCP6").encode())
        assert result.returncode == 0 and b"MSA|AA|TCP6" in result.stdout, result.stderr
        result = hl7bridge_send("-p", str(server.port), "127.0.0.1", stdin=message("TCP4").encode())
        assert result.returncode == 0 and b"MSA|AA|TCP4" in result.stdout, result.stderr
    finally:
        assert server.stop(signal.SIGTERM) == 0
    log = "".join(server.log)
    # One Twisted port (tcp6:); the tcp: endpoint had none: asyncio's own server took it.
    assert log.count("starting on") == 1
    assert "TCP6 AA" in log and "TCP4 AA" in log


@needs_asyncio_tls
def test_serve_closes_tls_clients_that_never_shake_hands_and_counts_them(tmp_path: Path) -> None:
    import socket
    import urllib.request

    from tests.support import self_signed

    cert, key = self_signed(tmp_path)
    endpoint = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    metrics = ["--metrics-endpoint", "tcp:0:interface=127.0.0.1"]
    # --endpoint tcp:0 comes first (Server adds it), then the TLS one.
    server = Server("-e", endpoint, "--tls-handshake-timeout", "0.5", "--max-connections", "3", *metrics)
    try:
        tls_port = int(server.wait_for(r"serving \S+ on 127\.0\.0\.1:(\d+)").group(1))
        metrics_port = int(server.wait_for(r"metrics on 127\.0\.0\.1:(\d+)").group(1))
        silent = [socket.create_connection(("127.0.0.1", tls_port), timeout=10) for _ in range(5)]
        tls = ["-p", str(tls_port), "--cafile", str(cert)]
        result = hl7bridge_send(*tls, "127.0.0.1", stdin=message("TLSOK").encode())
        assert result.returncode == 0 and b"MSA|AA|TLSOK" in result.stdout, result.stderr
        for connection in silent:
            assert connection.recv(1) == b""  # closed by the listener, after half a second
            connection.close()
        server.wait_for(r"TLS handshake refused: no TLS handshake within 0\.5s")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            body = response.read().decode()
    finally:
        assert server.stop(signal.SIGTERM) == 0
    assert 'hl7bridge_problems_total{kind="TLS handshake refused"} 5' in body
    refusals = [line for line in server.log if "TLS handshake refused" in line]
    assert len(refusals) == 5 and all(" INFO hl7bridge.listeners: 127.0.0.1:" in line for line in refusals)


def test_serve_reports_an_endpoint_it_cannot_parse() -> None:
    result = _hl7bridge("serve", "-e", "tcp:0", "-e", "mtls:0:privateKey=/no/such/key.pem", timeout=30)
    assert result.returncode == 1
    assert "cannot listen on mtls:0:privateKey=/no/such/key.pem" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_send_shows_progress_on_a_terminal_or_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "many.hl7"
    path.write_bytes("".join(message(f"PROG{n}") for n in range(3)).encode())
    server = Server()
    try:
        result = hl7bridge_send("-p", str(server.port), "-q", "--progress", "127.0.0.1", str(path))
        assert result.returncode == 0, result.stderr
        assert result.stderr.decode().splitlines()[-2:] == ["sent 3/3", "3 messages: AA 3"]
        # On a terminal, the line is rewritten after each message.
        primary, secondary = pty.openpty()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "hl7bridge", "send", "-p", str(server.port), "-q", "127.0.0.1", str(path)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=secondary,
            )
            assert process.wait(timeout=60) == 0
        finally:
            os.close(secondary)
        shown = b""
        while True:
            try:
                data = os.read(primary, 4096)
            except OSError:  # EIO: the terminal's other end is closed and everything has been read
                break
            if not data:
                break
            shown += data
        os.close(primary)
    finally:
        server.stop(signal.SIGTERM)
    text = shown.decode()
    assert "\rsent 1/3\rsent 2/3\rsent 3/3" in text
    assert text.replace("\r\n", "\n").endswith("\n3 messages: AA 3\n")


def test_version() -> None:
    from hl7bridge import __version__

    for command in ([], ["serve"], ["send"], ["shadow-report"]):
        result = _hl7bridge(*command, "--version", program=[SCRIPT])
        assert result.stdout.decode().strip() == f"hl7bridge {__version__}", command


def test_send_reports_a_file_it_cannot_read_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.hl7"
    result = _hl7bridge("send", "127.0.0.1", str(missing), program=[SCRIPT], cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.decode().splitlines()
    assert line.endswith(f"cannot read {missing}: No such file or directory")


def test_serve_help_says_the_receivers_timeout_wins() -> None:
    shown = " ".join(_hl7bridge("serve", "--help", program=[SCRIPT]).stdout.decode().split())
    assert "--idle-timeout= seconds without a byte before a connection is closed; the receiver's getTimeout()" in shown


def test_serve_takes_limits_and_uvloop_from_its_options(tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    server = Server("--uvloop", "--max-message-size", "300", "--max-connections-per-peer", "none")
    try:
        small = hl7bridge_send("-p", str(server.port), "127.0.0.1", stdin=message("LIM1").encode())
        assert small.returncode == 0, small.stderr
        large = message("LIM2", body="PID|1||1||" + "X" * 400 + "\r")
        result = hl7bridge_send("-p", str(server.port), "127.0.0.1", stdin=large.encode())
        assert result.returncode == 1
        assert "MSA|AR|LIM2|message too large" in result.stdout.decode()
    finally:
        assert server.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize(
    ("option", "value", "complaint"),
    [
        ("--max-in-flight", "0", "--max-in-flight must be at least 1"),
        ("--max-connections", "0", "--max-connections must be at least 1"),
        ("--frame-timeout", "-1", "--frame-timeout must be more than 0"),
        ("--framing", "sloppy", "--framing must be one of"),
        ("--log-format", "xml", "--log-format must be one of"),
        ("--idle-timeout", "abc", "--idle-timeout: 'abc' is not a number of seconds (or none)"),
        ("--max-message-size", "1.5", "--max-message-size: '1.5' is not a number of bytes"),
        ("--app-dir", "/no/such/folder", "--app-dir: no folder '/no/such/folder'"),
        ("--tls-handshake-timeout", "0", "--tls-handshake-timeout must be more than 0 seconds"),
    ],
)
def test_serve_refuses_a_bad_option_value(option: str, value: str, complaint: str) -> None:
    result = _hl7bridge("serve", option, value)
    assert result.returncode == 2
    # The last line names the option as typed, not the setting's Python name.
    assert result.stderr.decode().splitlines()[-1].startswith(f"hl7bridge: {complaint}")


def test_send_names_the_option_of_a_bad_number() -> None:
    result = _hl7bridge("send", "--timeout", "soon", "127.0.0.1")
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == "hl7bridge: --timeout: 'soon' is not a number of seconds"


def test_serve_exits_within_the_drain_timeout_whatever_thread_handlers_do() -> None:
    """Handlers blocked in Twisted's thread pool (10 threads) for 30 s, 14 messages: SIGTERM ends it in about 1.5 s."""
    server = Server("--receiver", "tests.handlers.sleepy.SleepyReceiver", "--drain-timeout", "0.5")
    peers = []
    try:
        for number in range(14):
            peer = socket.create_connection(("127.0.0.1", server.port))
            peer.sendall(VT + message(f"SLEEPY{number}").encode() + FS + CR)
            peers.append(peer)
        time.sleep(1)  # every message reached its handler, or the pool's queue
        started = time.monotonic()
        assert server.stop(signal.SIGTERM) == 0
        took = time.monotonic() - started
    finally:
        for peer in peers:
            peer.close()
    log = "".join(server.log)
    assert took < 6, log  # the handlers would hold it for 30 s
    assert "shutdown: 14 connections still busy after 0.5s closed; 14 ACKs never sent" in log
    assert re.search(r"stopping: 10 handler jobs still running in Twisted's thread pool and 4 not started", log), log
