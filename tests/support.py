"""Helpers shared by the tests: listeners on both faces, raw MLLP clients, the corpus."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor

import hl7bridge
from hl7bridge.defer import to_future
from hl7bridge.mllp import MLLPFactory

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
FACES = ("asyncio", "twisted")
HOST = "127.0.0.1"
# Tests open hundreds of connections at once; the default backlogs (50 for
# Twisted, 100 for asyncio) would refuse some of them.
BACKLOG = 1024

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


@contextlib.asynccontextmanager
async def listening(face: str, receiver: Any, **options: Any) -> AsyncIterator[int]:
    """Serve ``receiver`` on 127.0.0.1 on a free port with one face; yield the port.

    Connection limits are off unless given: tests open hundreds of connections
    from 127.0.0.1 at once.
    """
    options.setdefault("max_connections", None)
    options.setdefault("max_connections_per_peer", None)
    if face == "asyncio":
        server = await hl7bridge.serve(receiver, HOST, 0, backlog=BACKLOG, **options)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
    else:
        factory = MLLPFactory(receiver, **options)
        port = reactor.listenTCP(0, factory, backlog=BACKLOG, interface=HOST)
        try:
            yield port.getHost().port
        finally:
            await to_future(port.stopListening(), asyncio.get_running_loop())
            await factory.engine.close()


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

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
