"""Helpers shared by the tests: listeners on both faces, raw MLLP clients, the corpus."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import ipaddress
import os
import re
import socket
import struct
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

import hl7bridge
from hl7bridge.defer import to_future
from hl7bridge.mllp import MLLPFactory
from hl7bridge.server import _engines
from hl7bridge.session import Engine

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
FACES = ("asyncio", "twisted")
HOST = "127.0.0.1"
# Tests open hundreds of connections at once; the default backlogs (50 for
# Twisted, 100 for asyncio) would refuse some of them.
BACKLOG = 1024

#: The database the journal tests use (each in a schema of its own): see the ``journal_url`` fixture.
POSTGRES = os.environ.get("HL7BRIDGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

CORPUS = Path(os.environ.get("HL7BRIDGE_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus"))


def message(control_id: str = "MSG00001", trigger: str = "A01", body: str = "PID|1||12345||DOE^JANE\r") -> str:
    """A small ADT message of our own, segments ended by CR."""
    return (
        f"MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240102030405||ADT^{trigger}^ADT_{trigger}|{control_id}|P|2.5\r"
        f"EVN|{trigger}|20240102030405\r" + body
    )


def frame(data: bytes) -> bytes:
    return VT + data + FS + CR


def fields(segment: str) -> list[str]:
    return segment.split("|")


def msa(ack_text: str) -> list[str]:
    """The MSA fields of an ACK (index 1 is MSA-1), in the ACK's own field separator."""
    for segment in ack_text.split("\r"):
        if segment.startswith("MSA") and len(segment) > 3:
            return segment.split(segment[3])
    raise AssertionError(f"no MSA segment in {ack_text!r}")


def without_time_and_id(ack_text: str) -> str:
    """An ACK with MSH-7 and MSH-10 blanked, the two fields that differ on every ACK."""
    segments = ack_text.split("\r")
    separator = segments[0][3]
    msh = segments[0].split(separator)
    msh[6] = msh[9] = ""
    segments[0] = separator.join(msh)
    return "\r".join(segments)


def corpus_messages() -> list[tuple[str, str]]:
    """(name, text) of the shared corpus messages, CR-normalised; skips without it."""
    folder = CORPUS / "cdc-trusted-intermediary"
    if not folder.is_dir():
        pytest.skip(f"shared corpus not found at {folder}")
    found = []
    for path in sorted(folder.glob("*.hl7")):
        text = path.read_text(encoding="utf-8").replace("\r\n", "\r").replace("\n", "\r")
        if text.strip():
            found.append((path.name, text))
    return found


def control_id(text: str) -> str:
    """MSH-10 of the first MSH, by plain splitting, independent of the code under test."""
    segments = re.split("[\r\n]", text.lstrip())
    segment = next((s for s in segments if s.startswith("MSH")), segments[0])
    msh = segment.split(segment[3]) if len(segment) > 3 else []
    return msh[9] if len(msh) > 9 else ""


def msh_complete(text: str) -> bool:
    """Whether the MSH has the fields an ACK needs (MSH-2, MSH-9, MSH-10), by plain splitting.

    hl7bridge answers a message that lacks MSH-2 or MSH-9 with AR "required
    field missing", and one that lacks MSH-10 not at all; txHL7 answered some
    of these with an ordinary ACK.
    """
    segments = re.split("[\r\n]", text.lstrip())
    segment = next((s for s in segments if s.startswith("MSH")), "")
    msh = segment.split(segment[3]) if len(segment) > 3 else []
    return len(msh) > 9 and all(msh[index].strip() for index in (1, 8, 9))


# The engine behind each port that listening() serves, for tests that look inside.
ENGINES: dict[int, Engine] = {}


@contextlib.asynccontextmanager
async def listening(face: str, receiver: Any, **options: Any) -> AsyncIterator[int]:
    """Serve ``receiver`` on 127.0.0.1 on a free port with one face; yield the port.

    Connection limits are off unless given: tests open hundreds of connections
    from 127.0.0.1 at once. ``ENGINES[port]`` is the listener's engine meanwhile.
    """
    options.setdefault("max_connections", None)
    options.setdefault("max_connections_per_peer", None)
    if face == "asyncio":
        server = await hl7bridge.serve(receiver, HOST, 0, backlog=BACKLOG, **options)
        number = server.sockets[0].getsockname()[1]
        ENGINES[number] = _engines[server]
        try:
            yield number
        finally:
            del ENGINES[number]
            server.close()
            if _engines[server].journal is not None:
                await _engines[server].journal.close()
    else:
        factory = MLLPFactory(receiver, **options)
        port = reactor.listenTCP(0, factory, backlog=BACKLOG, interface=HOST)
        number = port.getHost().port
        ENGINES[number] = factory.engine
        try:
            yield number
        finally:
            del ENGINES[number]
            await to_future(port.stopListening(), asyncio.get_running_loop())
            await factory.engine.close()


def open_fds() -> int:
    """File descriptors this process holds (Linux: needs /proc)."""
    return len(os.listdir("/proc/self/fd"))


async def all_closed(port: int, timeout: float = 10) -> None:
    """Wait until the listener on ``port`` serves no connection: none is stuck."""
    engine = ENGINES[port]
    deadline = asyncio.get_running_loop().time() + timeout
    while engine.connections:
        assert asyncio.get_running_loop().time() < deadline, f"{engine.connections} connections still served"
        await asyncio.sleep(0.02)


class Unhandled:
    """Errors nobody handled while it watches: the loop's exception handler and Twisted's error log.

    "Task exception was never retrieved" and "Unhandled error in Deferred"
    are reported when the object is collected, so :meth:`collect` runs the
    garbage collector first.
    """

    def __init__(self) -> None:
        self.errors: list[Any] = []

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._previous = self._loop.get_exception_handler()
        self._loop.set_exception_handler(lambda _, context: self.errors.append(context))
        globalLogPublisher.addObserver(self._twisted_event)

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self._twisted_event)
        self._loop.set_exception_handler(self._previous)

    def collect(self) -> list[Any]:
        gc.collect()
        return self.errors

    def _twisted_event(self, event: dict[str, Any]) -> None:
        if event.get("isError") or event.get("log_failure"):
            self.errors.append(event)

    async def __aenter__(self) -> Unhandled:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        try:
            if exc_type is None:
                assert self.collect() == []
        finally:
            self.stop()


class Peer:
    """A raw MLLP client over asyncio streams: sends bytes, collects framed replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Peer:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send(self, data: bytes, chunk: int | None = None) -> None:
        """Send ``data``, in pieces of ``chunk`` bytes with a pause after each if given."""
        if chunk is None:
            self.writer.write(data)
            await self.writer.drain()
            return
        for start in range(0, len(data), chunk):
            self.writer.write(data[start : start + chunk])
            await self.writer.drain()
            await asyncio.sleep(0.001)

    async def reply(self, timeout: float = 10) -> bytes:
        """The next reply, which must be framed exactly as MLLP says."""
        data = await asyncio.wait_for(self.reader.readuntil(FS + CR), timeout)
        assert data.startswith(VT), data
        return data[1:-2]

    async def replies(self, count: int, timeout: float = 10) -> list[bytes]:
        return [await self.reply(timeout) for _ in range(count)]

    async def no_reply(self, wait: float = 0.3) -> None:
        """Assert nothing arrives within ``wait`` seconds (the connection may close)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), wait)
        except asyncio.TimeoutError:
            return
        assert data == b"", f"unexpected reply bytes {data!r}"

    async def closed_by_peer(self, timeout: float = 10) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), timeout) == b""
        except ConnectionError:
            return True

    def reset(self) -> None:
        """Drop the connection with a TCP reset (RST), as a crashed peer does."""
        self.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made for this test."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hl7bridge test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _asyncio_tls() -> bool:
    from hl7bridge.listeners import ASYNCIO_TLS

    return ASYNCIO_TLS


#: Tests of TLS served by asyncio (the handshake timeout and its refusals).
needs_asyncio_tls = pytest.mark.skipif(
    not _asyncio_tls(), reason="before Python 3.11, Twisted's TLS serves ssl: and mtls: endpoints"
)


def on_postgres(statement: str, *args: Any, dsn: str = POSTGRES) -> None:
    """Run one SQL statement on PostgreSQL, from any test, sync or not.

    It runs on an event loop of its own in a thread of its own: the suite's
    loop is the reactor's, and may be running or not.
    """
    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            await connection.execute(statement, *args)
        finally:
            await connection.close()

    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, run()).result()
