"""Sending messages: an asyncio sender over ``hl7.mllp.open_hl7_connection``, and its Twisted face.

Every interface also sends. :class:`Sender` keeps one connection open and
reuses it, reads each answer to its end (framed as MLLP says, or as leniently
as the listener reads), checks that MSA-2 names the message sent, and raises
a typed error for a negative ACK, a wrong ACK, or a peer that does not answer
in time. Told to (``retries``), it reconnects and sends again after a
backoff: MLLP is at-least-once, so a message whose ACK was lost may arrive
twice.

:class:`DeferredSender` is the same for Twisted code: its methods return
Deferreds.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from typing import Any

import hl7
from hl7.mllp import HL7StreamReader, HL7StreamWriter, open_hl7_connection
from twisted.internet.defer import Deferred

from hl7bridge import ack, framing
from hl7bridge.defer import to_deferred
from hl7bridge.errors import AckMismatch, AckTimeout, ConnectTimeout, NegativeAck
from hl7bridge.reactor import event_loop

log = logging.getLogger("hl7bridge.client")

#: MSA-1 codes that mean the message was accepted (original and enhanced mode).
POSITIVE = frozenset({"AA", "CA"})


class Sender:
    """Send messages to one MLLP listener and check their ACKs.

    Args:
        host, port: the listener.
        ssl: an ``ssl.SSLContext`` for TLS (verification is the context's:
            ``ssl.create_default_context()`` verifies by default), or None.
        encoding: codec of the messages and ACKs.
        connect_timeout: seconds to connect.
        ack_timeout: seconds to wait for each ACK.
        retries: times to reconnect and send again after a connection failure,
            connect timeout or ACK timeout (never after a negative ACK).
        backoff: seconds before the first retry, doubled each time, up to ``max_backoff``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: ssl_module.SSLContext | None = None,
        encoding: str = "utf-8",
        connect_timeout: float = 10.0,
        ack_timeout: float = 30.0,
        retries: int = 0,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.host, self.port, self.ssl = host, port, ssl
        self.encoding = encoding
        self.connect_timeout, self.ack_timeout = connect_timeout, ack_timeout
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._reader: HL7StreamReader | None = None
        self._writer: HL7StreamWriter | None = None
        self._deframer = framing.Deframer()
        self._frames: list[bytes] = []
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Sender:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def send(self, message: str | bytes | hl7.Message) -> str:
        """Send one message and return its ACK's text, once the ACK says it was accepted.

        Raises:
            NegativeAck: the ACK's MSA-1 is AE, AR, CE or CR.
            AckMismatch: the ACK's MSA-2 is not the message's MSH-10.
            AckTimeout: no whole ACK within ``ack_timeout`` (after the retries).
            ConnectTimeout: no connection within ``connect_timeout`` (after the retries).
            OSError: the connection failed (after the retries).
        """
        data = message if isinstance(message, bytes) else str(message).encode(self.encoding)
        header = ack.read_header(data[: framing.HEAD_SIZE].decode("latin-1"))
        control_id = header.control_id if header is not None else None
        async with self._lock:  # one message in flight per connection, as MLLP expects
            attempt = 0
            while True:
                try:
                    answer = await self._exchange(data)
                    break
                except (OSError, asyncio.IncompleteReadError, ConnectTimeout, AckTimeout) as exc:
                    await self._disconnect()
                    if attempt >= self.retries:
                        raise
                    delay = min(self.backoff * 2**attempt, self.max_backoff)
                    attempt += 1
                    log.warning(
                        "send to %s:%s failed (%s); retry %d in %.1fs", self.host, self.port, exc, attempt, delay
                    )
                    await asyncio.sleep(delay)
        code, acknowledged = ack.read_ack(answer)
        if control_id is not None and acknowledged != control_id:
            raise AckMismatch(control_id, acknowledged, answer)
        if code not in POSITIVE:
            raise NegativeAck(code, answer)
        return answer

    async def _exchange(self, data: bytes) -> str:
        reader, writer = await self._connect()
        writer.writeblock(data)
        await writer.drain()
        try:
            block = await asyncio.wait_for(self._next_frame(reader), self.ack_timeout)
        except asyncio.TimeoutError:
            raise AckTimeout(f"no ACK from {self.host}:{self.port} within {self.ack_timeout}s") from None
        return block.decode(self.encoding, "replace")

    async def _connect(self) -> tuple[HL7StreamReader, HL7StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing() or self._reader.at_eof():
            await self._disconnect()
            try:
                self._reader, self._writer = await asyncio.wait_for(
                    open_hl7_connection(self.host, self.port, ssl=self.ssl), self.connect_timeout
                )
            except asyncio.TimeoutError:
                raise ConnectTimeout(
                    f"no connection to {self.host}:{self.port} within {self.connect_timeout}s"
                ) from None
            self._deframer = framing.Deframer()
            self._frames = []
        return self._reader, self._writer

    async def _next_frame(self, reader: HL7StreamReader) -> bytes:
        """The next whole frame from the peer, read as leniently as hl7bridge's listeners read."""
        while not self._frames:
            data = await reader.read(64 * 1024)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            for event in self._deframer.feed(data):
                if isinstance(event, framing.Frame):
                    self._frames.append(event.data)
        return self._frames.pop(0)

    async def _disconnect(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl_module.SSLError):
                pass

    async def close(self) -> None:
        """Close the connection, if one is open."""
        await self._disconnect()


class DeferredSender:
    """:class:`Sender` for Twisted code: ``send`` and ``close`` return Deferreds.

    Needs Twisted's asyncio reactor (``hl7bridge.reactor.install()``); takes
    the arguments of :class:`Sender`.
    """

    def __init__(self, host: str, port: int, **options: Any) -> None:
        self._sender = Sender(host, port, **options)

    def send(self, message: str | bytes | hl7.Message) -> Deferred[str]:
        """Send one message; the Deferred fires with the ACK's text, or fails as :meth:`Sender.send` raises."""
        return to_deferred(self._sender.send(message), event_loop())

    def close(self) -> Deferred[None]:
        return to_deferred(self._sender.close(), event_loop())
