"""The Twisted face: txHL7's ``MLLPFactory`` and ``MinimalLowerLayerProtocol``.

``MLLPFactory(receiver)`` works wherever txHL7's did: ``reactor.listenTCP``,
any server endpoint (tcp, ssl, unix), ``twistd``. Each connection feeds an
``hl7.mllp`` stream reader and writes through an ``hl7.mllp`` stream writer,
and the same :class:`hl7bridge.session.Session` serves it as on the asyncio
face. Twisted's transport is shown to asyncio through :class:`StreamTransport`,
which also maps the two flow controls onto each other.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from hl7.mllp import HL7StreamProtocol, HL7StreamReader, HL7StreamWriter
from twisted.internet import interfaces, protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from hl7bridge.defer import to_deferred
from hl7bridge.reactor import event_loop
from hl7bridge.receiver import IHL7Receiver
from hl7bridge.session import Engine, Settings

__all__ = ["IHL7Receiver", "MLLPFactory", "MinimalLowerLayerProtocol", "StreamTransport"]


@implementer(interfaces.IPushProducer)
class StreamTransport(asyncio.Transport):
    """An asyncio transport that writes to a Twisted transport.

    Flow control both ways: when asyncio's stream reader holds too much it
    pauses reading, which pauses the Twisted transport as a producer; when
    Twisted's write buffer fills it pauses this object, registered as the
    transport's producer, which pauses the asyncio protocol's writing (so
    ``writer.drain()`` waits).
    """

    # One per connection: no __dict__.
    __slots__ = ("_closing", "_protocol", "_reading", "_transport", "_writing_paused")

    def __init__(self, transport: Any, stream_protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self._transport = transport
        self._protocol = stream_protocol
        self._closing = False
        self._writing_paused = False
        self._reading = True
        transport.registerProducer(self, True)

    # asyncio.Transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._transport.loseConnection()

    def abort(self) -> None:
        self._closing = True
        self._transport.abortConnection()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            peer = self._transport.getPeer()
            host = getattr(peer, "host", None)
            return (host, peer.port) if host is not None else str(peer)
        if name == "sockname":
            local = self._transport.getHost()
            host = getattr(local, "host", None)
            return (host, local.port) if host is not None else str(local)
        if name == "twisted_transport":
            return self._transport
        return default

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._transport.pauseProducing()

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._transport.resumeProducing()

    def is_reading(self) -> bool:
        return self._reading

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        # Twisted keeps its buffer to itself; it tells only when it is too full.
        return sys.maxsize if self._writing_paused else 0

    # IPushProducer, called by Twisted about its write buffer

    def pauseProducing(self) -> None:  # noqa: N802
        if not self._writing_paused:
            self._writing_paused = True
            self._protocol.pause_writing()

    def resumeProducing(self) -> None:  # noqa: N802
        if self._writing_paused:
            self._writing_paused = False
            self._protocol.resume_writing()

    def stopProducing(self) -> None:  # noqa: N802
        self._closing = True

    def lost(self) -> None:
        """Twisted says the connection is gone: nothing more can be written."""
        self._closing = True


class TwistedStreamWriter(HL7StreamWriter):
    """An ``hl7.mllp`` stream writer over a Twisted connection.

    Twisted owns the connection and closes it; a protocol driven by hand in a
    unit test is never connected or closed at all. So, unlike asyncio's own
    writers (Python 3.11.5 and later), it does not warn "unclosed" when it is
    collected.
    """

    def __del__(self) -> None:
        pass


@implementer(interfaces.IHalfCloseableProtocol)
class MinimalLowerLayerProtocol(protocol.Protocol):
    """MLLP over one Twisted connection, served by the factory's engine.

    Half-closeable, like asyncio's streams: a sender that shuts down its side
    after its last message still gets the ACKs of the messages in flight.

    As on txHL7, a protocol may be driven by hand, with no event loop running:
    set ``factory`` and ``transport`` and call ``dataReceived``. The session
    starts with the first bytes if ``connectionMade`` was never called, and an
    answer that is ready at once is written before ``dataReceived`` returns.
    """

    factory: MLLPFactory
    _stream_protocol: HL7StreamProtocol | None = None
    _stream_transport: StreamTransport | None = None

    def connectionMade(self) -> None:  # noqa: N802
        if self._stream_protocol is not None:
            return
        loop = self.factory.loop
        reader = HL7StreamReader(loop=loop)
        self._stream_protocol = stream_protocol = HL7StreamProtocol(reader, loop=loop)
        self._stream_transport = transport = StreamTransport(self.transport, stream_protocol)
        stream_protocol.connection_made(transport)
        writer = TwistedStreamWriter(transport, stream_protocol, reader, loop)
        self.factory.engine.start_connection(reader, writer, loop)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._stream_protocol is None:
            self.connectionMade()
        self._stream_protocol.data_received(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:  # noqa: N802
        if self._stream_protocol is not None:
            self._stream_protocol.eof_received()

    def writeConnectionLost(self) -> None:  # noqa: N802
        # The peer stopped reading; the session closes when its writes fail.
        pass

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        if self._stream_protocol is None:
            return
        self._stream_transport.lost()  # type: ignore[union-attr]
        # asyncio streams take None for a clean close and an OSError otherwise.
        exc = None if reason.check(ConnectionDone) else ConnectionResetError(reason.getErrorMessage())
        self._stream_protocol.connection_lost(exc)


class MLLPFactory(protocol.ServerFactory):
    """Serve ``receiver`` to every connection, as txHL7's ``MLLPFactory`` does.

    Args:
        receiver: an ``IHL7Receiver`` (hl7bridge's, txHL7's, or any object with
            its four methods).
        **options: the fields of :class:`hl7bridge.session.Settings`.

    Raises:
        NotAReceiver: ``receiver`` lacks an IHL7Receiver method.
        WrongReactor: (when listening starts) the reactor is not Twisted's asyncio reactor.
    """

    protocol = MinimalLowerLayerProtocol  # type: ignore[assignment]

    def __init__(self, receiver: Any, **options: Any) -> None:
        self.engine = Engine(receiver, Settings(**options))
        self.receiver = self.engine.receiver
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The asyncio loop of the installed reactor, found on first use."""
        # Not in __init__: txHL7 code builds the factory before it installs a
        # reactor, but nothing can connect before one is installed.
        if self._loop is None:
            self._loop = event_loop()
        return self._loop

    def startFactory(self) -> None:  # noqa: N802
        # Fail when listening starts, with a message, rather than hang later.
        self.loop  # noqa: B018

    def drain(self, timeout: float | None = None) -> Deferred[None]:
        """Stop every connection gracefully; fires when all have closed.

        Connections stop reading, the messages in flight are handled and
        answered (for up to ``timeout`` seconds, the ``drain_timeout`` setting
        by default), then they close. Stop listening first (``port.stopListening()``).
        """
        return to_deferred(self.engine.close(timeout), self.loop)
