"""Senders: ACKs split up, peers that never answer or hang up, NAKs, wrong ids, reuse, TLS."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import hl7bridge
from hl7bridge.client import DeferredSender, Sender
from hl7bridge.errors import AckMismatch, AckTimeout, NegativeAck
from hl7bridge.receiver import LoggingReceiver
from hl7bridge.testing import asyncio_test
from tests.interop.test_endpoints import self_signed
from tests.support import CR, FS, HOST, VT, listening, message, msa
from tests.test_session import Recording

Answer = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def fake_peer(answer: Answer) -> tuple[asyncio.Server, list[int]]:
    """A listener written here: reads frames and answers each with ``answer``."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                block = await reader.readuntil(FS + CR)
                await answer(block[1:-2], reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

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

    server, _ = await fake_peer(negative)
    async with Sender(HOST, port_of(server), retries=3) as sender:
        with pytest.raises(NegativeAck) as raised:
            await sender.send(message("NEG1"))
    assert raised.value.code == code and msa(raised.value.ack)[2] == "NEG1"
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
