"""Metrics per message type and ACK code, the one-line-per-message log, and /metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from twisted.internet import reactor

from hl7bridge.defer import to_future
from hl7bridge.metrics import BUCKETS, Metrics, prometheus_text
from hl7bridge.migration import ShadowReport
from hl7bridge.mllp import MLLPFactory
from hl7bridge.testing import asyncio_test
from tests.handlers import admissions
from tests.support import HOST, Peer, frame, message
from tests.test_cli import Server, hl7bridge_send


def test_metrics_count_and_bucket() -> None:
    metrics = Metrics()
    metrics.record("ADT^A01", "AA", 0.0004)
    metrics.record("ADT^A01", "AA", 0.02)
    metrics.record("ADT^A01", "AE", 0.02)
    metrics.record('ODD"TYPE', "none", 99)
    snapshot = metrics.snapshot()
    assert {code: data["count"] for code, data in snapshot["ADT^A01"].items()} == {"AA": 2, "AE": 1}
    buckets = snapshot["ADT^A01"]["AA"]["buckets"]
    assert buckets[0.001] == 1 and buckets[0.025] == 2 and buckets[BUCKETS[-1]] == 2
    assert snapshot['ODD"TYPE']["none"]["buckets"][BUCKETS[-1]] == 0  # past the last bucket: only in +Inf
    text = metrics.prometheus_text()
    assert 'hl7bridge_messages_total{message_type="ADT^A01",ack_code="AE"} 1' in text
    assert 'hl7bridge_handling_seconds_bucket{message_type="ODD\\"TYPE",ack_code="none",le="+Inf"} 1' in text
    assert 'hl7bridge_handling_seconds_count{message_type="ADT^A01",ack_code="AA"} 2' in text


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a metrics page, as Prometheus's own parser (prometheus_client's) reads it."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_text_format_and_prometheus_client_give_the_same_series() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from hl7bridge.prometheus import register

    metrics, report = Metrics(), ShadowReport()
    metrics.record("ADT^A01", "AA", 0.003)
    metrics.record('ODD"TYPE\\', "AE", 0.7)
    report.record("ADT^A01", "agreed", 3)
    report.record("ADT^A01", "failed")
    registry = CollectorRegistry()
    register(metrics, None, report, registry=registry)
    ours = samples(prometheus_text([*metrics.families(), *report.families()]))
    theirs = samples(generate_latest(registry).decode())
    assert ours == theirs
    assert ours["hl7bridge_shadow_comparisons_total", (("message_type", "ADT^A01"), ("outcome", "agreed"))] == 3
    key = ("hl7bridge_handling_seconds_bucket", (("ack_code", "AE"), ("le", "1.0"), ("message_type", 'ODD"TYPE\\')))
    assert ours[key] == 1
    # The series follow the objects: a later record shows at the next scrape.
    metrics.record("ADT^A01", "AA", 0.003)
    later = samples(generate_latest(registry).decode())
    assert later["hl7bridge_messages_total", (("ack_code", "AA"), ("message_type", "ADT^A01"))] == 2


def test_prometheus_module_says_which_extra_it_needs() -> None:
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "from hl7bridge.errors import MissingExtra\n"
        "try:\n"
        "    import hl7bridge.prometheus\n"
        "except MissingExtra as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'hl7bridge[prometheus]'" in result.stdout, result.stderr


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
    assert {code: data["count"] for code, data in snapshot["ADT^A01"].items()} == {"AA": 1, "AE": 1}
    assert list(snapshot["ADT^A08"]) == ["AA"]
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


def test_serve_exposes_a_shadow_run_in_metrics_in_shadow_report_and_at_exit() -> None:
    server = Server("--receiver", "tests.migration.routes.router", "--metrics-endpoint", "tcp:0:interface=127.0.0.1")
    try:
        metrics_port = int(server.wait_for(r"metrics on 127\.0\.0\.1:(\d+)").group(1))
        texts = [message("SH1"), message("SH2"), message("SH3", "A08"), message("SH4", "A03")]
        result = hl7bridge_send("-p", str(server.port), "-q", "127.0.0.1", stdin="".join(texts).encode())
        assert result.returncode == 0, result.stderr
        expected = [["ADT^A01", "2", "0", "0"], ["ADT^A08", "0", "1", "0"]]
        command = [sys.executable, "-m", "hl7bridge", "shadow-report", f"127.0.0.1:{metrics_port}/metrics"]
        deadline = time.monotonic() + 10
        while True:  # the comparisons finish just after the ACKs
            report = subprocess.run(command, capture_output=True, text=True, timeout=60)
            assert report.returncode == 0, report.stderr
            header, *rows = report.stdout.splitlines()
            if [row.split() for row in rows] == expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert header.split() == ["message", "type", "agreed", "differed", "failed"]
        assert [row.split() for row in rows] == expected
        # HOST:PORT alone reads the same page.
        bare = subprocess.run([*command[:-1], f"127.0.0.1:{metrics_port}"], capture_output=True, text=True, timeout=60)
        assert bare.returncode == 0 and bare.stdout == report.stdout, bare.stderr
    finally:
        assert server.stop(signal.SIGTERM) == 0
    log = "".join(server.log)
    assert "shadow report ADT^A01: agreed 2, differed 0, failed 0" in log
    assert "shadow report ADT^A08: agreed 0, differed 1, failed 0" in log


def test_shadow_report_without_a_shadow_run_or_a_listener() -> None:
    server = Server("--metrics-endpoint", "tcp:0:interface=127.0.0.1")
    try:
        metrics_port = int(server.wait_for(r"metrics on 127\.0\.0\.1:(\d+)").group(1))
        command = [sys.executable, "-m", "hl7bridge", "shadow-report", f"http://127.0.0.1:{metrics_port}/metrics"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and "has no shadow report" in result.stderr
    finally:
        server.stop(signal.SIGTERM)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot read" in result.stderr


@asyncio_test
async def test_asyncio_face_metrics_through_engine_of() -> None:
    import hl7bridge
    from hl7bridge.server import engine_of

    server = await hl7bridge.serve(admissions.handle, HOST, 0, metrics=True)
    try:
        peer = await Peer.connect(server.sockets[0].getsockname()[1])
        await peer.send(frame(message("EO1").encode()) + frame(message("EO2", body="PID|1||||DOE^JANE\r").encode()))
        await peer.replies(2)
        await peer.close()
        metrics = engine_of(server).metrics
        assert metrics is not None
        assert {code: data["count"] for code, data in metrics.snapshot()["ADT^A01"].items()} == {"AA": 1, "AE": 1}
    finally:
        await hl7bridge.shutdown(server)
