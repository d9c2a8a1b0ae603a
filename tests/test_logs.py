"""Logs: text or JSON, through Python logging and Twisted's logger, content only when asked."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from hl7bridge.tap import JSONFormatter, TwistedLogHandler, json_log_observer
from hl7bridge.testing import asyncio_test
from tests.cases import CR, FS, VT
from tests.support import FACES, frame, message
from tests.test_cli import SCRIPT, Server, hl7bridge_send
from tests.test_session import exchange

SECRET_BODY = "PID|1||55501||TESTPERSON^SECRET\r"


def message_line(entries: list[dict[str, Any]], control_id: str) -> dict[str, Any]:
    [entry] = [e for e in entries if e["logger"] == "hl7bridge.messages" and e.get("control_id") == control_id]
    return entry


def json_log_of_one_message(control_id: str, awaited: str, *options: str) -> list[str]:
    """The log lines of ``hl7bridge serve --log-format json`` that answered one message with SECRET_BODY."""
    server = Server(*options, "--log-format", "json")
    try:
        result = hl7bridge_send(
            "-p", str(server.port), "-q", "127.0.0.1", stdin=message(control_id, body=SECRET_BODY).encode()
        )
        assert result.returncode == 0, result.stderr
        server.wait_for(awaited)
    finally:
        assert server.stop(signal.SIGTERM) == 0
    return [line for line in server.log if line.strip()]


def test_serve_logs_json_lines_with_the_fields_of_each_message() -> None:
    lines = json_log_of_one_message("JSON1", r'"control_id": "JSON1"')
    entries = [json.loads(line) for line in lines]  # every line, Twisted's own included, is JSON
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    entry = message_line(entries, "JSON1")
    assert entry["level"] == "INFO"
    assert entry["message_type"] == "ADT^A01" and entry["ack_code"] == "AA"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", entry["peer"]) and isinstance(entry["ms"], float)
    assert any(e["logger"] == "hl7bridge.cli" and e["message"].startswith("serving ") for e in entries)
    text = "".join(lines)
    assert "TESTPERSON" not in text and "55501" not in text
    assert "hl7_message" not in text


def test_serve_logs_content_only_when_asked() -> None:
    lines = json_log_of_one_message("CONTENT1", r'"logger": "hl7bridge.content"', "--log-content")
    entries = [json.loads(line) for line in lines]
    [content] = [e for e in entries if e["logger"] == "hl7bridge.content"]
    assert content["control_id"] == "CONTENT1"
    assert "PID|1||55501||TESTPERSON^SECRET" in content["hl7_message"]
    assert "MSA|AA|CONTENT1" in content["hl7_ack"]
    # The per-message line stays free of content even then.
    assert "TESTPERSON" not in json.dumps(message_line(entries, "CONTENT1"))


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_content_logger_is_silent_without_the_setting(face: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data = frame(message("QUIET1", body=SECRET_BODY).encode())
    await exchange(face, lambda message: message.create_ack(), data, 1)
    await exchange(face, lambda message: message.create_ack(), data, 1, log_content=True)
    content = [r for r in caplog.records if r.name == "hl7bridge.content"]
    assert len(content) == 1 and "TESTPERSON" in content[0].getMessage()
    others = " ".join(r.getMessage() for r in caplog.records if r.name != "hl7bridge.content")
    assert "TESTPERSON" not in others and "QUIET1" in others


def test_json_formatter_keeps_extra_fields_and_errors() -> None:
    record = logging.makeLogRecord(
        {"name": "hl7bridge.messages", "levelno": logging.INFO, "levelname": "INFO", "msg": "m %s", "args": ("x",)}
    )
    record.control_id = "F1"
    try:
        raise LookupError("boom")
    except LookupError:
        record.exc_info = sys.exc_info()
    entry = json.loads(JSONFormatter().format(record))
    assert entry["message"] == "m x" and entry["control_id"] == "F1"
    assert "LookupError: boom" in entry["error"]


def test_twistd_json_observer_writes_hl7bridge_records_with_their_fields(capsys: pytest.CaptureFixture[str]) -> None:
    """What ``twistd --logger hl7bridge.tap.json_log_observer`` writes, for a record that went through Twisted."""
    observer = json_log_observer()
    globalLogPublisher.addObserver(observer)
    try:
        record = logging.makeLogRecord(
            {"name": "hl7bridge.messages", "levelno": logging.WARNING, "msg": "peer ADT^A01 TW1 AA 0.4ms"}
        )
        record.control_id = "TW1"
        record.ack_code = "AA"
        TwistedLogHandler().emit(record)
    finally:
        globalLogPublisher.removeObserver(observer)
    [entry] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "TW1" in line]
    assert entry["logger"] == "hl7bridge.messages" and entry["level"] == "WARNING"
    assert entry["message"] == "peer ADT^A01 TW1 AA 0.4ms"
    assert entry["control_id"] == "TW1" and entry["ack_code"] == "AA"


def test_a_failure_quoting_patient_data_stays_out_of_json_logs() -> None:
    server = Server("--log-format", "json", "--receiver", "tests.handlers.leaky.LeakyReceiver")
    try:
        result = hl7bridge_send(
            "-p", str(server.port), "-q", "127.0.0.1", stdin=message("LEAKJ", body=SECRET_BODY).encode()
        )
        assert result.returncode == 1, result.stderr  # an AR
        server.wait_for("handleMessage failed")
    finally:
        assert server.stop(signal.SIGTERM) == 0
    entries = [json.loads(line) for line in server.log if line.strip()]
    [failure] = [e for e in entries if "handleMessage failed" in e["message"]]
    assert failure["level"] == "ERROR" and "tests.handlers.leaky.BedNotFound" in failure["message"]
    assert 'leaky.py", line ' in failure["message"]
    assert not [line for line in server.log if "TESTPERSON" in line or "SECRET" in line]


# hl7bridge serve writes its lines in batches (hl7bridge.logs): none may be lost, and none may be late.

BATCH = 300


@pytest.mark.parametrize(
    ("log_format", "logged"), [("text", r" (BATCH\d+) AA "), ("json", r'"control_id": "(BATCH\d+)"')]
)
def test_serve_writes_every_message_line_when_sigterm_comes_right_after_the_last_ack(
    tmp_path: Path, log_format: str, logged: str
) -> None:
    path = tmp_path / "batch.hl7"
    path.write_bytes("".join(message(f"BATCH{number}") for number in range(BATCH)).encode())
    server = Server("--log-format", log_format, program=(SCRIPT,))
    try:
        result = hl7bridge_send("-p", str(server.port), "-q", "127.0.0.1", str(path))
        assert result.returncode == 0, result.stderr
    finally:
        assert server.stop(signal.SIGTERM) == 0  # at once: the last lines are still in the buffer
    written = [found for line in server.log for found in re.findall(logged, line)]
    assert sorted(written) == sorted(f"BATCH{number}" for number in range(BATCH))


def test_serve_writes_a_message_line_within_a_second_while_it_runs() -> None:
    server = Server(program=(SCRIPT,))
    try:
        sent = time.monotonic()
        result = hl7bridge_send("-p", str(server.port), "-q", "127.0.0.1", stdin=message("PROMPT1").encode())
        assert result.returncode == 0, result.stderr
        server.wait_for(r" PROMPT1 AA ", timeout=5)
        assert time.monotonic() - sent < 1.5  # the send itself included
    finally:
        assert server.stop(signal.SIGTERM) == 0


def test_serve_writes_the_lines_of_messages_left_unanswered_when_it_exits_after_the_drain() -> None:
    """Handlers stuck in threads: serve exits through os._exit after the drain, and still writes every line."""
    server = Server("--receiver", "tests.handlers.sleepy.SleepyReceiver", "--drain-timeout", "0.5", program=(SCRIPT,))
    peers = []
    try:
        for number in range(3):
            peer = socket.create_connection(("127.0.0.1", server.port))
            peer.sendall(VT + message(f"STUCK{number}").encode() + FS + CR)
            peers.append(peer)
        time.sleep(1)  # every message reached its handler
        assert server.stop(signal.SIGTERM) == 0
    finally:
        for peer in peers:
            peer.close()
    log = "".join(server.log)
    assert "exiting in" in log  # the exit after the drain, not a normal one
    assert sorted(re.findall(r" (STUCK\d) \S+ not sent ", log)) == ["STUCK0", "STUCK1", "STUCK2"], log
