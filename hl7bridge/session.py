"""The one path of a message: block -> decode -> parse -> handle -> ordered ACK.

Both faces (the asyncio :func:`hl7bridge.serve` and the Twisted
:class:`hl7bridge.mllp.MLLPFactory`) hand each connection's ``hl7.mllp``
stream reader and writer to :meth:`Engine.start_connection`; everything after
that is written once, here.

Per connection, one task reads bytes, splits them into frames
(:mod:`hl7bridge.framing`), decodes each with the receiver's codec, calls the
receiver's ``parseMessage`` once and ``handleMessage`` once, and writes the
ACKs in the order the messages arrived, whatever order their handlers finish
in. Handlers of one connection run concurrently, up to ``max_in_flight``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Union

from hl7.mllp import HL7StreamReader, HL7StreamWriter
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from hl7bridge import ack, framing
from hl7bridge.defer import is_pending_result, to_future
from hl7bridge.framing import DEFAULT_MAX_MESSAGE_SIZE, LENIENT
from hl7bridge.receiver import check_receiver, codec_of

log = logging.getLogger("hl7bridge.session")

#: Bytes asked of the stream reader at a time.
READ_SIZE = 64 * 1024

#: What a message turns into: the ACK bytes, None for no answer, or a future of either.
Reply = Union[bytes, None, "asyncio.Future[bytes | None]"]


@dataclass(frozen=True)
class Settings:
    """Listener settings shared by both faces.

    Args:
        framing: ``"lenient"`` (accept what txHL7 accepted, and more) or ``"strict"``.
        max_message_size: largest message accepted, in bytes; larger ones get an AR.
        idle_timeout: seconds of idleness before a connection is closed, used
            when the receiver's ``getTimeout()`` gives None; None for never.
        max_in_flight: messages of one connection handled at once; reading
            pauses past it, so a pipelining sender gets TCP backpressure.
    """

    framing: str = LENIENT
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    idle_timeout: float | None = None
    max_in_flight: int = 32

    def __post_init__(self) -> None:
        if self.framing not in framing.FRAMING_MODES:
            raise ValueError(f"framing must be one of {framing.FRAMING_MODES}, not {self.framing!r}")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")


class Engine:
    """One listener's receiver, settings and live connections.

    Args:
        receiver: an ``IHL7Receiver`` (hl7bridge's or txHL7's, or any object
            with its four methods).
        settings: listener settings; defaults if None.
    """

    def __init__(self, receiver: Any, settings: Settings | None = None) -> None:
        self.receiver = check_receiver(receiver)
        self.settings = settings or Settings()
        self.encoding, self.errors = codec_of(receiver)
        timeout = receiver.getTimeout()
        self.idle_timeout: float | None = timeout if timeout is not None else self.settings.idle_timeout
        self._sessions: dict[asyncio.Task[None], Session] = {}

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._sessions)

    def start_connection(
        self, reader: HL7StreamReader, writer: HL7StreamWriter, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Task[None]:
        """Serve one connection in a task; the engine holds it until it ends."""
        session = Session(self, reader, writer, loop)
        task = loop.create_task(session.run())
        self._sessions[task] = session
        task.add_done_callback(self._sessions.pop)
        return task

    async def close(self, timeout: float = 5.0) -> None:
        """Close every connection, wait up to ``timeout`` seconds for them to end.

        Connections still open after that are cancelled.
        """
        for session in self._sessions.values():
            session.writer.close()
        if self._sessions:
            _, late = await asyncio.wait(set(self._sessions), timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)


class Session:
    """The state of one connection while :meth:`run` serves it."""

    def __init__(
        self, engine: Engine, reader: HL7StreamReader, writer: HL7StreamWriter, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.engine = engine
        self.receiver = engine.receiver
        self.reader = reader
        self.writer = writer
        self.loop = loop
        self.peer = _peer_name(writer.get_extra_info("peername"))
        self._pending: deque[Reply] = deque()
        self._deviations: set[str] = set()
        self._last_activity = loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        """Serve the connection until the peer closes it, it idles out, or framing fails."""
        settings = self.engine.settings
        deframer = framing.Deframer(settings.framing, settings.max_message_size)
        log.debug("%s: connected", self.peer)
        self._arm_idle_timer()
        try:
            while True:
                data = await self.reader.read(READ_SIZE)
                self._last_activity = self.loop.time()
                events = deframer.feed(data) if data else deframer.end()
                if not self._handle_events(events) or not data:
                    break
                await self.writer.drain()
                while len(self._pending) >= settings.max_in_flight:
                    await self._wait_for_head()
            while self._pending:
                await self._wait_for_head()
        except ConnectionError as exc:
            log.debug("%s: connection lost: %s", self.peer, exc)
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._abandon_pending()
            self.writer.close()
            log.debug("%s: closed", self.peer)

    def _handle_events(self, events: list[framing.Event]) -> bool:
        """Act on framing events; False when the connection must close."""
        for event in events:
            if isinstance(event, framing.Frame):
                self._submit(self.dispatch(event.data))
            elif isinstance(event, framing.Deviation):
                self._note_deviation(event.kind, event.offset)
            elif isinstance(event, framing.Oversized):
                log.warning(
                    "%s: message of %d bytes is over the %d byte limit; dropped",
                    self.peer,
                    event.size,
                    self.engine.settings.max_message_size,
                )
                self._submit(self._nak(event.head, "AR", "message too large"))
            else:
                log.warning("%s: strict framing: %s at byte %d; closing", self.peer, event.kind, event.offset)
                return False
        return True

    def dispatch(self, block: bytes) -> Reply:
        """Decode, parse and handle one block; return its reply."""
        engine = self.engine
        try:
            text = block.decode(engine.encoding, engine.errors)
        except UnicodeDecodeError as exc:
            log.warning("%s: message does not decode as %s (byte %d); AR sent", self.peer, engine.encoding, exc.start)
            return self._nak(block, "AR", "undecodable message")
        if not text.lstrip().startswith("MSH"):
            # Junk, or a batch (FHS/BHS), which original-mode ACKs cannot answer.
            log.warning("%s: dropped a block of %d bytes that does not start with MSH", self.peer, len(block))
            return None
        try:
            container = self.receiver.parseMessage(text)
        except Exception:
            log.exception("%s: parseMessage failed; AR sent", self.peer)
            return self._nak(block, "AR", "message could not be parsed")
        try:
            result = self.receiver.handleMessage(container)
        except Exception:
            return self._failed(Failure(), container)
        if not is_pending_result(result):
            return self._encode(result)
        if isinstance(result, Deferred):
            result.addCallbacks(self._encode, self._failed, errbackArgs=(container,))
            return to_future(result, self.loop)
        return self.loop.create_task(self._settle(container, result))

    async def _settle(self, container: Any, awaitable: Any) -> bytes | None:
        try:
            result = await awaitable
        except Exception:
            return self._failed(Failure(), container)
        return self._encode(result)

    def _failed(self, failure: Failure, container: Any) -> bytes | None:
        """A handler failed: log it once, and answer with ``container.err(failure)``."""
        log.error(
            "%s: handleMessage failed: %s",
            self.peer,
            failure.getErrorMessage(),
            exc_info=(failure.type, failure.value, failure.getTracebackObject()),
        )
        try:
            return self._encode(container.err(failure))
        except Exception:
            log.exception("%s: the container's err() failed too; AE sent", self.peer)
            return self._nak(container.raw_message.encode(self.engine.encoding, "replace"), "AE", "handler failed")

    def _encode(self, reply: object) -> bytes | None:
        """The bytes of a handler's answer (text, bytes, an hl7.Message, or None)."""
        if reply is None or isinstance(reply, bytes):
            return reply
        text = str(reply)
        try:
            return text.encode(self.engine.encoding, self.engine.errors)
        except UnicodeEncodeError:
            log.warning(
                "%s: ACK does not encode as %s; unencodable characters replaced", self.peer, self.engine.encoding
            )
            return text.encode(self.engine.encoding, "replace")

    def _nak(self, block: bytes, code: str, reason: str) -> bytes | None:
        """A NAK built from whatever MSH the raw block holds; None if it holds none."""
        # MSH is ASCII in practice; latin-1 decodes any bytes, so a broken
        # message body cannot stop its header from being read.
        header = ack.read_header(block[: framing.HEAD_SIZE].decode("latin-1"))
        if header is None:
            log.warning("%s: no MSH segment to answer; message dropped without ACK", self.peer)
            return None
        return self._encode(ack.build_ack(header, code, text=reason))

    def _submit(self, reply: Reply) -> None:
        """Queue a reply behind those of earlier messages; send what is ready."""
        if isinstance(reply, asyncio.Future):
            if reply.done() and not self._pending:
                self._send(reply.result())
                return
            reply.add_done_callback(self._flush)
            self._pending.append(reply)
        elif self._pending:
            self._pending.append(reply)
        else:
            self._send(reply)

    def _flush(self, _: object = None) -> None:
        pending = self._pending
        while pending:
            head = pending[0]
            if isinstance(head, asyncio.Future):
                if not head.done():
                    return
                pending.popleft()
                if head.cancelled():
                    continue
                self._send(head.result())
            else:
                pending.popleft()
                self._send(head)

    async def _wait_for_head(self) -> None:
        head = self._pending[0]
        if isinstance(head, asyncio.Future):
            await asyncio.wait((head,))
        self._flush()

    def _abandon_pending(self) -> None:
        """The connection is closing: replies still to come can no longer be sent."""
        for reply in self._pending:
            if isinstance(reply, asyncio.Future):
                reply.remove_done_callback(self._flush)
        if self._pending:
            log.warning("%s: connection closed with %d ACKs unsent", self.peer, len(self._pending))
        self._pending.clear()

    def _send(self, data: bytes | None) -> None:
        if data is None:
            return
        if self.writer.is_closing():
            log.warning("%s: connection closed before an ACK could be sent", self.peer)
            return
        self.writer.writeblock(data)

    def _note_deviation(self, kind: str, offset: int) -> None:
        if kind not in self._deviations:
            self._deviations.add(kind)
            log.warning("%s: framing deviation tolerated: %s at byte %d", self.peer, kind, offset)

    def _arm_idle_timer(self) -> None:
        timeout = self.engine.idle_timeout
        if timeout is not None:
            self._idle_timer = self.loop.call_at(self._last_activity + timeout, self._check_idle)

    def _check_idle(self) -> None:
        # Reset lazily: reads only stamp the time, and this re-arms from it.
        timeout = self.engine.idle_timeout
        assert timeout is not None
        if self._pending or self.loop.time() < self._last_activity + timeout:
            if self._pending:
                self._last_activity = self.loop.time()
            self._arm_idle_timer()
            return
        log.info("%s: idle for %ss; closing", self.peer, timeout)
        self.writer.close()


def _peer_name(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "peer")
