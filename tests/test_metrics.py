"""Metrics per message type and ACK code, the one-line-per-message log, and /metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import urllib.request

import pytest
from twisted.internet import reactor

from hl7bridge.defer import to_future
from hl7bridge.metrics import BUCKETS, Metrics
from hl7bridge.mllp import MLLPFactory
from hl7bridge.testing import asyncio_test
from tests.handlers import admissions
from tests.support import HOST, Peer, frame, message
from tests.test_cli import Server, hl7bridge_send


def test_metrics_count_and_bucket() -> None:
    metrics = Metrics()
    metrics.record("ADT^A01", "AA", 0.0004)
    metrics.record("ADT^A01", "AE", 0.02)
    metrics.record('ODD"TYPE', "none", 99)
    snapshot = metrics.snapshot()
    assert snapshot["ADT^A01"]["acks"] == {"AA": 1, "AE": 1}
    assert snapshot["ADT^A01"]["count"] == 2
    buckets = snapshot["ADT^A01"]["buckets"]
    assert buckets[0.001] == 1 and buckets[0.025] == 2 and buckets[BUCKETS[-1]] == 2
    assert snapshot['ODD"TYPE']["buckets"][BUCKETS[-1]] == 0  # past the last bucket: only in +Inf
    text = metrics.prometheus_text()
    assert 'hl7bridge_messages_total{message_type="ADT^A01",ack_code="AE"} 1' in text
    assert 'hl7bridge_handling_seconds_bucket{message_type="ODD\\"TYPE",le="+Inf"} 1' in text
    assert 'hl7bridge_handling_seconds_count{message_type="ADT^A01"} 2' in text


@asyncio_test
async def test_listener_metrics_and_one_log_line_per_message(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hl7bridge.messages")
    factory = MLLPFactory(admissions.handle, metrics=True)
    port = reactor.listenTCP(0, factory, interface=HOST)
    try:
        peer = await Peer.connect(port.getHost().port)
        data = frame(message("M1").encode()) + frame(message("M2", body="PID|1||||DOE^JANE\r").encode())
        await peer.send(data + frame(message("M3", "A08").encode()))
        await peer.replies(3)
        await peer.close()
    finally:
        await to_future(port.stopListening(), asyncio.get_running_loop())
        await factory.engine.close()
    assert factory.engine.metrics is not None
    snapshot = factory.engine.metrics.snapshot()
    assert snapshot["ADT^A01"]["acks"] == {"AA": 1, "AE": 1}
    assert snapshot["ADT^A08"]["acks"] == {"AA": 1}
    lines = [r.getMessage() for r in caplog.records if r.name == "hl7bridge.messages"]
    assert len(lines) == 3
    assert re.fullmatch(r"127\.0\.0\.1:\d+ ADT\^A01 M2 AE \d+\.\dms", lines[1])
    assert not [line for line in lines if "DOE" in line or "JANE" in line]


def test_serve_exposes_metrics_for_prometheus(tmp_path: object) -> None:
    server = Server("--metrics-endpoint", "tcp:0:interface=127.0.0.1")
    try:
        metrics_port = int(server.wait_for(r"metrics on 127\.0\.0\.1:(\d+)").group(1))
        result = hl7bridge_send("-p", str(server.port), "-q", "127.0.0.1", stdin=message("PROM1").encode())
        assert result.returncode == 0, result.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            body = response.read().decode()
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    finally:
        server.stop(signal.SIGTERM)
    assert 'hl7bridge_messages_total{message_type="ADT^A01",ack_code="AA"} 1' in body
