"""Senders: ACKs split up, peers that never answer or hang up, NAKs, wrong ids, reuse, TLS."""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import hl7bridge
from hl7bridge.client import DeferredSender, Sender
from hl7bridge.errors import AckMismatch, AckTimeout, ConnectTimeout, NegativeAck
from hl7bridge.receiver import LoggingReceiver
from hl7bridge.testing import asyncio_test
from tests.handlers import admissions
from tests.support import CR, FS, HOST, VT, listening, message, msa, self_signed
from tests.test_session import Recording

Answer = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def fake_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: Answer) -> None:
    """One connection of a listener written here: reads frames and answers each with ``answer``."""
    try:
        while True:
            block = await reader.readuntil(FS + CR)
            await answer(block[1:-2], reader, writer)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def fake_peer(answer: Answer) -> tuple[asyncio.Server, list[int]]:
    """A listener written here; the list grows by one for each connection it accepts."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await fake_connection(reader, writer, answer)

    server = await asyncio.start_server(serve, HOST, 0)
    return server, connections


def ack_for(block: bytes, code: str = "AA", control_id: str | None = None) -> bytes:
    msh = block.split(b"\r")[0].split(b"|")
    cid = control_id.encode() if control_id is not None else msh[9]
    return VT + b"MSH|^~\\&|R|R|S|S|20240101||ACK^A01^ACK|X|P|2.5\rMSA|" + code.encode() + b"|" + cid + b"\r" + FS + CR


def port_of(server: asyncio.Server) -> int:
    return server.sockets[0].getsockname()[1]


@asyncio_test
async def test_ack_split_over_many_segments_and_connection_reused() -> None:
    async def dribble(block: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for byte in ack_for(block):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0)

    server, connections = await fake_peer(dribble)
    async with Sender(HOST, port_of(server)) as sender:
        for n in range(3):
            assert msa(await sender.send(message(f"SPLIT{n}")))[1:3] == ["AA", f"SPLIT{n}"]
    assert len(connections) == 1
    server.close()


@asyncio_test
async def test_peer_that_never_answers_times_out() -> None:
    async def silent(block: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    server, _ = await fake_peer(silent)
    async with Sender(HOST, port_of(server), ack_timeout=0.3) as sender:
        with pytest.raises(AckTimeout):
            await sender.send(message("SILENT"))
    server.close()


@asyncio_test
async def test_peer_that_hangs_up_is_retried_on_a_new_connection() -> None:
    async def hang_up_first(block: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(connections) == 1:
            writer.close()
            raise ConnectionError
        writer.write(ack_for(block))

    server, connections = await fake_peer(hang_up_first)
    async with Sender(HOST, port_of(server), retries=2, backoff=0.05) as sender:
        assert msa(await sender.send(message("RETRY1")))[1:3] == ["AA", "RETRY1"]
    assert len(connections) == 2
    server.close()


@asyncio_test
async def test_retries_back_off_doubling_up_to_the_cap(caplog: pytest.LogCaptureFixture) -> None:
    times: list[float] = []

    async def hang_up_thrice(block: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        times.append(time.monotonic())
        if len(times) <= 3:
            writer.close()
            raise ConnectionError
        writer.write(ack_for(block))

    server, connections = await fake_peer(hang_up_thrice)
    async with Sender(HOST, port_of(server), retries=3, backoff=0.1, max_backoff=0.3) as sender:
        assert msa(await sender.send(message("BACK1")))[1:3] == ["AA", "BACK1"]
    server.close()
    assert len(connections) == 4
    # Each wait is at least its backoff: 0.1 s, then doubled, then capped at 0.3 s.
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert [gap >= delay * 0.9 for gap, delay in zip(gaps, (0.1, 0.2, 0.3), strict=True)] == [True] * 3, gaps
    logged = [r.getMessage() for r in caplog.records if r.name == "hl7bridge.client"]
    assert [line.rsplit(" ", 3)[1:] for line in logged] == [
        ["1", "in", "0.1s"],
        ["2", "in", "0.2s"],
        ["3", "in", "0.3s"],
    ]


@asyncio_test
async def test_retries_run_out_and_the_last_error_is_raised() -> None:
    async def hang_up(block: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        raise ConnectionError

    server, connections = await fake_peer(hang_up)
    async with Sender(HOST, port_of(server), retries=2, backoff=0.01) as sender:
        with pytest.raises((asyncio.IncompleteReadError, OSError)):
            await sender.send(message("OUT1"))
    server.close()
    assert len(connections) == 3  # the first try and two retries


@asyncio_test
async def test_an_ack_timeout_is_retried_on_a_new_connection() -> None:
    async def silent_first(block: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(connections) == 1:
            await asyncio.sleep(3600)
        writer.write(ack_for(block))

    server, connections = await fake_peer(silent_first)
    async with Sender(HOST, port_of(server), ack_timeout=0.3, retries=1, backoff=0.01) as sender:
        assert msa(await sender.send(message("SLOW1")))[1:3] == ["AA", "SLOW1"]
    server.close()
    assert len(connections) == 2


@asyncio_test
async def test_a_listener_that_comes_back_is_reconnected_to() -> None:
    async def answer(block: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(ack_for(block))

    with socket.socket() as probe:  # a free port, with nothing listening on it yet
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    later: list[asyncio.Server] = []

    async def start_later() -> None:
        await asyncio.sleep(0.2)
        later.append(await asyncio.start_server(lambda r, w: fake_connection(r, w, answer), HOST, port))

    starting = asyncio.get_running_loop().create_task(start_later())
    try:
        async with Sender(HOST, port, retries=5, backoff=0.1) as sender:
            assert msa(await sender.send(message("BACK2")))[1:3] == ["AA", "BACK2"]
    finally:
        await starting
        later[0].close()


@asyncio_test
async def test_deferred_sender_fails_with_the_typed_error() -> None:
    async with listening("twisted", admissions.handle) as port:
        sender = DeferredSender(HOST, port)
        loop = asyncio.get_running_loop()
        with pytest.raises(NegativeAck) as raised:
            await sender.send(message("DEF2", body="PID|1||||DOE^JANE\r")).asFuture(loop)
        assert raised.value.code == "AE"
        await sender.close().asFuture(loop)


@asyncio_test
async def test_peer_that_hangs_up_without_retries_raises() -> None:
    async def hang_up(block: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        raise ConnectionError

    server, _ = await fake_peer(hang_up)
    async with Sender(HOST, port_of(server)) as sender:
        with pytest.raises((asyncio.IncompleteReadError, OSError)):
            await sender.send(message("GONE"))
    server.close()


@pytest.mark.parametrize("code", ["AE", "AR", "CE", "CR"])
@asyncio_test
async def test_negative_acks_raise_with_their_code(code: str) -> None:
    async def negative(block: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(ack_for(block, code))

    server, connections = await fake_peer(negative)
    async with Sender(HOST, port_of(server), retries=3, backoff=0.01) as sender:
        with pytest.raises(NegativeAck) as raised:
            await sender.send(message("NEG1"))
    assert raised.value.code == code and msa(raised.value.ack)[2] == "NEG1"
    assert len(connections) == 1  # a negative ACK is an answer: never sent again
    server.close()


@asyncio_test
async def test_wrong_msa2_raises() -> None:
    async def wrong(block: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(ack_for(block, control_id="SOMEONE-ELSE"))

    server, _ = await fake_peer(wrong)
    async with Sender(HOST, port_of(server)) as sender:
        with pytest.raises(AckMismatch, match="SOMEONE-ELSE"):
            await sender.send(message("MINE1"))
    server.close()


@asyncio_test
async def test_deferred_sender_against_the_twisted_face() -> None:
    async with listening("twisted", Recording()) as port:
        sender = DeferredSender(HOST, port)
        loop = asyncio.get_running_loop()
        ack = await sender.send(message("DEF1")).asFuture(loop)
        assert msa(ack)[1:3] == ["AA", "DEF1"]
        await sender.close().asFuture(loop)


def mutual_tls(folder: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, ssl.SSLContext]:
    """Server context requiring client certificates, a client with one, a client without."""
    (folder / "server").mkdir()
    (folder / "client").mkdir()
    server_cert, server_key = self_signed(folder / "server")
    client_cert, client_key = self_signed(folder / "client")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_cert))
    server.load_cert_chain(str(server_cert), str(server_key))
    server.verify_mode = ssl.CERT_REQUIRED
    with_cert = ssl.create_default_context(cafile=str(server_cert))
    with_cert.load_cert_chain(str(client_cert), str(client_key))
    without_cert = ssl.create_default_context(cafile=str(server_cert))
    return server, with_cert, without_cert


@asyncio_test
async def test_mutual_tls_accepts_a_good_client_certificate_and_refuses_none(tmp_path: Path) -> None:
    server_context, with_cert, without_cert = mutual_tls(tmp_path)
    server = await hl7bridge.serve(LoggingReceiver(), HOST, 0, ssl=server_context)
    port = port_of(server)
    try:
        async with Sender(HOST, port, ssl=with_cert) as sender:
            assert msa(await sender.send(message("TLS1")))[1:3] == ["AA", "TLS1"]
        async with Sender(HOST, port, ssl=without_cert, ack_timeout=5) as sender:
            with pytest.raises((ssl.SSLError, OSError, asyncio.IncompleteReadError)):
                await sender.send(message("TLS2"))
    finally:
        await hl7bridge.shutdown(server)


@asyncio_test
async def test_verification_is_on_by_default(tmp_path: Path) -> None:
    server_context, _, _ = mutual_tls(tmp_path)
    server_context.verify_mode = ssl.CERT_NONE
    server = await hl7bridge.serve(LoggingReceiver(), HOST, 0, ssl=server_context)
    try:
        async with Sender(HOST, port_of(server), ssl=ssl.create_default_context()) as sender:
            with pytest.raises(ssl.SSLCertVerificationError):
                await sender.send(message("TLS3"))
    finally:
        await hl7bridge.shutdown(server)


@asyncio_test
async def test_connect_timeout_is_typed_and_retried(tmp_path: Path) -> None:
    """A listener that takes the TCP connection but never answers the TLS handshake."""

    async def never(block: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("no frame can arrive before the handshake")

    server, connections = await fake_peer(never)
    _, with_cert, _ = mutual_tls(tmp_path)
    started = time.monotonic()
    async with Sender(HOST, port_of(server), ssl=with_cert, connect_timeout=0.3, retries=1, backoff=0.01) as sender:
        with pytest.raises(ConnectTimeout, match=r"within 0\.3s"):
            await sender.send(message("CONN1"))
    assert 0.6 <= time.monotonic() - started < 10
    assert len(connections) == 2
    server.close()
