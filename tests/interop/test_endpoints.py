"""The Twisted face behind endpoint strings: unix sockets and TLS, as txHL7 deployments use them."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import pytest
from twisted.internet import endpoints, reactor

from hl7bridge.defer import to_future
from hl7bridge.mllp import MLLPFactory
from hl7bridge.testing import asyncio_test
from tests.support import Peer, frame, message, msa, self_signed
from tests.test_session import Recording


async def listen(description: str, receiver: Recording) -> tuple[object, MLLPFactory]:
    factory = MLLPFactory(receiver)
    port = await to_future(endpoints.serverFromString(reactor, description).listen(factory), asyncio.get_running_loop())
    return port, factory


async def stop(port: object, factory: MLLPFactory) -> None:
    await to_future(port.stopListening(), asyncio.get_running_loop())  # type: ignore[attr-defined]
    await factory.engine.close()


async def exchange(peer: Peer) -> list[str]:
    await peer.send(frame(message("EP1").encode()) + frame(message("EP2").encode()))
    replies = await peer.replies(2)
    await peer.close()
    return [msa(r.decode())[2] for r in replies]


@asyncio_test
async def test_unix_socket_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "mllp.sock"
    receiver = Recording()
    port, factory = await listen(f"unix:{path}", receiver)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await exchange(Peer(reader, writer)) == ["EP1", "EP2"]
    finally:
        await stop(port, factory)
    assert len(receiver.received) == 2


@asyncio_test
async def test_tls_endpoint(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    receiver = Recording()
    port, factory = await listen(f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}", receiver)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        reader, writer = await asyncio.open_connection("127.0.0.1", port.getHost().port, ssl=context)  # type: ignore[attr-defined]
        assert await exchange(Peer(reader, writer)) == ["EP1", "EP2"]
    finally:
        await stop(port, factory)
    assert len(receiver.received) == 2


def mutual_tls_files(folder: Path) -> dict[str, Path]:
    """A listener's certificate and key, and a sender's, each self-signed, in files."""
    (folder / "listener").mkdir()
    (folder / "sender").mkdir()
    listener_cert, listener_key = self_signed(folder / "listener")
    sender_cert, sender_key = self_signed(folder / "sender")
    return {
        "listener_cert": listener_cert,
        "listener_key": listener_key,
        "sender_cert": sender_cert,
        "sender_key": sender_key,
    }


def mtls_endpoint(files: dict[str, Path]) -> str:
    """An ``mtls:`` endpoint on a free port that accepts the sender of ``files`` only."""
    return (
        f"mtls:0:interface=127.0.0.1:privateKey={files['listener_key']}:certKey={files['listener_cert']}"
        f":caCerts={files['sender_cert']}"
    )


async def refused(port: int, context: ssl.SSLContext) -> None:
    """Assert that the listener refuses this client: at the handshake (TLS 1.2) or at the first read (1.3)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    except (ssl.SSLError, ConnectionError):
        return
    peer = Peer(reader, writer)
    try:
        await peer.send(frame(message("REFUSED").encode()))
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await peer.reply()
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


@asyncio_test
async def test_mtls_endpoint_accepts_a_good_client_certificate_and_refuses_none(tmp_path: Path) -> None:
    files = mutual_tls_files(tmp_path)
    receiver = Recording()
    port, factory = await listen(mtls_endpoint(files), receiver)
    number = port.getHost().port  # type: ignore[attr-defined]
    try:
        with_cert = ssl.create_default_context(cafile=str(files["listener_cert"]))
        with_cert.load_cert_chain(str(files["sender_cert"]), str(files["sender_key"]))
        reader, writer = await asyncio.open_connection("127.0.0.1", number, ssl=with_cert)
        assert await exchange(Peer(reader, writer)) == ["EP1", "EP2"]

        # A certificate the listener does not trust, and none at all: no message gets through.
        stranger_cert, stranger_key = self_signed(tmp_path)
        with_stranger = ssl.create_default_context(cafile=str(files["listener_cert"]))
        with_stranger.load_cert_chain(str(stranger_cert), str(stranger_key))
        without_cert = ssl.create_default_context(cafile=str(files["listener_cert"]))
        for context in (with_stranger, without_cert):
            await refused(number, context)
    finally:
        await stop(port, factory)
    assert len(receiver.received) == 2


def test_mtls_endpoint_needs_a_ca_certificate(tmp_path: Path) -> None:
    files = mutual_tls_files(tmp_path)
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificate here\n")
    description = mtls_endpoint(files).replace(str(files["sender_cert"]), str(empty))
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        endpoints.serverFromString(reactor, description)
