"""Endpoint strings served by asyncio's own servers: the listeners of ``hl7bridge serve`` and twistd.

Real sockets on 127.0.0.1 and unix sockets in a temporary folder. The TLS
tests use a handshake timeout of half a second, so a silent client is closed
quickly; a valid client is served meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hl7bridge.endpoints import ListenEndpoint, parse_listen_endpoint
from hl7bridge.listeners import TLS_REFUSED, Listener, listener_for
from hl7bridge.metrics import prometheus_text
from hl7bridge.mllp import StreamTransport
from hl7bridge.session import Engine, Settings
from hl7bridge.testing import asyncio_test
from tests.interop.test_endpoints import mtls_endpoint, mutual_tls_files, refused
from tests.support import Peer, frame, message, msa, needs_asyncio_tls, self_signed
from tests.test_session import Recording

HANDSHAKE_TIMEOUT = 0.5


# Endpoint strings ---------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:2575", {"kind": "tcp", "port": 2575, "interface": "", "backlog": 50}),
        ("tcp:0:interface=127.0.0.1:backlog=7", {"port": 0, "interface": "127.0.0.1", "backlog": 7}),
        ("tcp:port=2575:interface=\\:\\:1", {"port": 2575, "interface": "::1"}),
        ("tcp:2575:127.0.0.1:9", {"interface": "127.0.0.1", "backlog": 9}),  # by place, as Twisted takes them
        ("unix:/run/mllp.sock", {"kind": "unix", "address": "/run/mllp.sock", "mode": 0o666, "lockfile": True}),
        ("unix:/run/mllp.sock:mode=660:lockfile=0", {"mode": 0o660, "lockfile": False}),
        ("unix:/run/a\\:b.sock", {"address": "/run/a:b.sock"}),
        ("ssl:2575", {"kind": "ssl", "private_key": "server.pem", "cert_key": None}),
        (
            "ssl:2575:privateKey=k.pem:certKey=c.pem:extraCertChain=chain.pem",
            {"private_key": "k.pem", "cert_key": "c.pem", "extra_cert_chain": "chain.pem"},
        ),
        ("mtls:2575:privateKey=k.pem:caCerts=ca.pem", {"kind": "mtls", "ca_certs": "ca.pem"}),
    ],
)
def test_endpoint_strings_hl7bridge_listens_on(description: str, expected: dict[str, Any]) -> None:
    endpoint = parse_listen_endpoint(description)
    assert endpoint is not None
    assert {name: getattr(endpoint, name) for name in expected} == expected


@pytest.mark.parametrize(
    "description",
    [
        "tcp6:2575:interface=\\:\\:1",
        "systemd:domain=INET:index=0",
        "ssl:2575:privateKey=k.pem:sslmethod=TLSv1_2_METHOD",
        "ssl:2575:privateKey=k.pem:dhParameters=dh.pem",
        "tcp:2575:reuse=1",
        "tcp:2575:127.0.0.1:9:extra",
    ],
)
def test_other_endpoint_strings_are_left_to_twisted(description: str) -> None:
    assert parse_listen_endpoint(description) is None


@pytest.mark.parametrize(
    ("description", "complaint"),
    [
        ("tcp:http", "port must be a whole number, not 'http'"),
        ("tcp:2575:backlog=many", "backlog must be a whole number"),
        ("unix:/run/x.sock:mode=rw", "mode must be an octal number"),
        ("mtls:2575:privateKey=k.pem", "mtls: needs caCerts=FILE"),
        ("tcp", "tcp: needs a port"),
    ],
)
def test_malformed_endpoint_strings_say_what_is_wrong(description: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_listen_endpoint(description)


# Listening ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    description: str, receiver: Any = None, timeout: float = HANDSHAKE_TIMEOUT, **settings: Any
) -> AsyncIterator[Listener]:
    engine = Engine(receiver or Recording(), Settings(**settings))
    listener = listener_for(description, engine, asyncio.get_running_loop(), timeout)
    assert listener is not None
    listener.bind()
    await listener.start()
    try:
        yield listener
    finally:
        listener.close()
        await engine.close()


def port_of(listener: Listener) -> int:
    return int(listener.where.rsplit(":", 1)[1])


async def one_exchange(peer: Peer, control_id: str) -> str:
    await peer.send(frame(message(control_id).encode()))
    reply = await peer.reply()
    await peer.close()
    return msa(reply.decode())[2]


@asyncio_test
async def test_tcp_listener_serves_on_asyncios_own_transport() -> None:
    receiver = Recording()
    async with serving("tcp:0:interface=127.0.0.1", receiver) as listener:
        assert listener.where.startswith("127.0.0.1:")
        peer = await Peer.connect(port_of(listener))
        await peer.send(frame(message("TCP1").encode()))
        await peer.reply()
        [session] = list(listener.engine._sessions)
        # Not Twisted's transport behind hl7bridge's StreamTransport: asyncio's own.
        assert isinstance(session.writer.transport, asyncio.Transport)
        assert not isinstance(session.writer.transport, StreamTransport)
        await peer.close()
    assert len(receiver.received) == 1


@asyncio_test
async def test_tcp_listener_reports_a_port_in_use() -> None:
    async with serving("tcp:0:interface=127.0.0.1") as listener:
        engine = Engine(Recording())
        second = listener_for(f"tcp:{port_of(listener)}:interface=127.0.0.1", engine, asyncio.get_running_loop())
        assert second is not None
        with pytest.raises(OSError, match="Address already in use"):
            second.bind()


@asyncio_test
async def test_unix_listener_has_its_mode_and_lock_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "mllp.sock"
    receiver = Recording()
    async with serving(f"unix:{path}:mode=600", receiver):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert (tmp_path / "mllp.sock.lock").is_symlink()  # Twisted's FilesystemLock
        # Another listener on the same path is refused by the lock, not given the socket.
        other = listener_for(f"unix:{path}", Engine(Recording()), asyncio.get_running_loop())
        assert other is not None
        with pytest.raises(OSError, match="cannot acquire the lock"):
            other.bind()
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await one_exchange(Peer(reader, writer), "UNIX1") == "UNIX1"
    assert not path.exists() and not (tmp_path / "mllp.sock.lock").exists()
    assert len(receiver.received) == 1


@asyncio_test
async def test_unix_listener_replaces_a_socket_file_left_by_a_dead_process(tmp_path: Path) -> None:
    path = tmp_path / "mllp.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, as after a crash, and so does the lock of the dead process
    os.symlink(str(2**22 + 1), tmp_path / "mllp.sock.lock")  # above Linux's largest process id
    async with serving(f"unix:{path}"):
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await one_exchange(Peer(reader, writer), "STALE1") == "STALE1"


def test_a_tls_listener_with_a_missing_key_does_not_bind(tmp_path: Path) -> None:
    endpoint = ListenEndpoint("ssl:0", "ssl", private_key=str(tmp_path / "none.pem"))
    listener = Listener(endpoint, Engine(Recording()), asyncio.new_event_loop())
    try:
        with pytest.raises(OSError):
            listener.bind()
        assert listener._socket is None
    finally:
        listener.loop.close()


# TLS handshakes ----------------------------------------------------------


def tls_client(cafile: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


async def silent_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection that never starts a TLS handshake."""
    return await asyncio.open_connection("127.0.0.1", port)


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "hl7bridge.listeners" and r.levelno == logging.INFO and "TLS handshake refused" in r.getMessage()
    ]


@needs_asyncio_tls
@asyncio_test
async def test_silent_clients_are_closed_after_the_handshake_timeout_while_a_tls_client_is_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = self_signed(tmp_path)
    receiver = Recording()
    description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    # Few connection slots: handshakes under way must not take them.
    async with serving(description, receiver, max_connections=2, metrics=True) as listener:
        port = port_of(listener)
        silent = [await silent_client(port) for _ in range(20)]
        started = asyncio.get_running_loop().time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls_client(cert))
        assert await one_exchange(Peer(reader, writer), "TLS1") == "TLS1"
        for silent_reader, silent_writer in silent:
            assert await asyncio.wait_for(silent_reader.read(), 10) == b""
            silent_writer.close()
        waited = asyncio.get_running_loop().time() - started
        assert listener._handshakes == {}
        metrics = listener.engine.metrics
    assert waited < 10
    assert len(receiver.received) == 1
    lines = refusals(caplog)
    assert len(lines) == 20
    assert all(line.endswith(f"no TLS handshake within {HANDSHAKE_TIMEOUT}s") for line in lines)
    assert all(line.startswith("127.0.0.1:") for line in lines)
    assert metrics is not None
    text = prometheus_text(metrics.families())
    assert f'hl7bridge_problems_total{{kind="{TLS_REFUSED}"}} 20' in text


@needs_asyncio_tls
@asyncio_test
async def test_mtls_refusals_are_logged_with_peer_and_reason_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = mutual_tls_files(tmp_path)
    receiver = Recording()
    async with serving(mtls_endpoint(files), receiver, metrics=True) as listener:
        port = port_of(listener)
        good = tls_client(files["listener_cert"], files["sender_cert"], files["sender_key"])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=good)
        assert await one_exchange(Peer(reader, writer), "MTLS1") == "MTLS1"

        await refused(port, tls_client(files["listener_cert"]))  # no certificate
        stranger_cert, stranger_key = self_signed(tmp_path)
        await refused(port, tls_client(files["listener_cert"], stranger_cert, stranger_key))
        # Plain MLLP on a TLS port: not TLS at all.
        plain = await Peer.connect(port)
        await plain.send(frame(message("PLAIN1").encode()))
        assert await plain.closed_by_peer()
        await plain.close()
        for _ in range(100):  # the server may see the last refusal just after the client does
            if len(refusals(caplog)) == 3:
                break
            await asyncio.sleep(0.02)
        metrics = listener.engine.metrics
    no_certificate, stranger, not_tls = refusals(caplog)
    assert "no client certificate" in no_certificate
    assert "client certificate not accepted" in stranger
    assert "not TLS" in not_tls
    for line in (no_certificate, stranger, not_tls):
        assert line.startswith("127.0.0.1:")
        assert "hl7bridge test" not in line  # nothing of the certificate itself
    assert metrics is not None
    assert f'hl7bridge_problems_total{{kind="{TLS_REFUSED}"}} 3' in prometheus_text(metrics.families())
    assert len(receiver.received) == 1


@needs_asyncio_tls
@asyncio_test
async def test_closing_a_tls_listener_abandons_handshakes_under_way(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    async with serving(f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}", timeout=30) as listener:
        reader, writer = await silent_client(port_of(listener))
        for _ in range(100):
            if listener._handshakes:
                break
            await asyncio.sleep(0.01)
        assert len(listener._handshakes) == 1
    # The listener closed: its silent client is let go at once, not after 30 seconds.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


def test_twistd_service_listens_through_asyncio_where_it_can() -> None:
    from twisted.application.internet import StreamServerEndpointService

    from hl7bridge import tap

    options = tap.Options()
    options.parseOptions(["-e", "tcp:0:interface=127.0.0.1", "-e", "tcp6:0:interface=\\:\\:1"])
    logger = logging.getLogger("hl7bridge")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        top = tap.makeService(options)
    finally:
        # makeService sends hl7bridge's records to Twisted's log, as twistd needs; not the rest of the suite's.
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    asyncio_service, twisted_service = list(top)  # type: ignore[call-overload]
    assert isinstance(asyncio_service, tap.ListeningService)
    assert asyncio_service.listener.engine is twisted_service.factory.engine  # one engine behind both
    assert isinstance(twisted_service, StreamServerEndpointService)
