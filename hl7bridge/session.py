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

Every message gets exactly one outcome: the receiver's answer, a NAK built
from its MSH (undecodable, unparseable, too large, incomplete, handler failed
or timed out), or, when it has no MSH, a log line saying it was dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any, Union

import hl7
from hl7.mllp import HL7StreamReader, HL7StreamWriter
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from hl7bridge import ack, charsets, framing
from hl7bridge.defer import is_pending_result
from hl7bridge.framing import DEFAULT_MAX_MESSAGE_SIZE, LENIENT
from hl7bridge.handlers import as_receiver
from hl7bridge.metrics import Metrics
from hl7bridge.receiver import DEFAULT_ENCODING, codec_of

log = logging.getLogger("hl7bridge.session")

#: One line per message at INFO (peer, type, control id, ACK code, time taken);
#: never the content. Silence it alone with ``logging.getLogger("hl7bridge.messages")``.
#: Each record also carries those values as attributes (``peer``, ``message_type``,
#: ``control_id``, ``ack_code``, ``ms``) for structured logs.
message_log = logging.getLogger("hl7bridge.messages")

#: With the ``log_content`` setting only: one line per message at INFO with the
#: message and its ACK, which are patient data (attributes ``hl7_message``, ``hl7_ack``).
content_log = logging.getLogger("hl7bridge.content")

#: Bytes asked of the stream reader at a time.
READ_SIZE = 64 * 1024

#: Unsent ACK bytes past which the session stops handling bytes as they come
#: and waits for the writer to drain.
WRITE_BACKLOG = 64 * 1024

#: What a message turns into: the ACK bytes, None for no answer, or a future of either.
Reply = Union[bytes, None, "asyncio.Future[bytes | None]"]

Codec = tuple[str, str]


@dataclass(frozen=True)
class Settings:
    """Listener settings shared by both faces; every limit has a safe default.

    Args:
        framing: ``"lenient"`` (accept what txHL7 accepted, and more) or ``"strict"``.
        max_message_size: largest message accepted, in bytes; larger ones get an AR.
        idle_timeout: seconds without a byte before a connection is closed, used
            when the receiver's ``getTimeout()`` gives None; None for never.
        frame_timeout: seconds a started message may take to arrive whole
            (a slow sender, or one stuck mid-frame); then it gets an AR if its
            MSH arrived, and the connection is closed. None for no limit.
        handler_timeout: seconds a handler may take before the message is
            answered AE; its late result is logged and dropped. None: no limit.
        max_in_flight: messages of one connection handled at once; reading
            pauses past it, so a pipelining sender gets TCP backpressure.
        max_connections: connections served at once; more are closed at once.
        max_connections_per_peer: the same, per peer address.
        follow_msh18: when the receiver's ``getCodec()`` names no codec, decode
            each message in the character set its MSH-18 declares (and encode
            its ACK the same way) instead of UTF-8.
        drain_timeout: on shutdown, seconds to let messages in flight finish
            and be answered before their connections are closed regardless.
        metrics: count messages per type and ACK code and time them
            (:class:`hl7bridge.metrics.Metrics`, as ``Engine.metrics``).
        log_content: also log each message and its ACK, in full, on the
            ``hl7bridge.content`` logger. Off by default: they are patient data.
    """

    framing: str = LENIENT
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    idle_timeout: float | None = None
    frame_timeout: float | None = 60.0
    handler_timeout: float | None = None
    max_in_flight: int = 32
    max_connections: int | None = 1000
    max_connections_per_peer: int | None = None
    follow_msh18: bool = False
    drain_timeout: float = 10.0
    metrics: bool = False
    log_content: bool = False

    def __post_init__(self) -> None:
        if self.framing not in framing.FRAMING_MODES:
            raise ValueError(f"framing must be one of {framing.FRAMING_MODES}, not {self.framing!r}")
        for name in ("max_message_size", "max_in_flight", "max_connections", "max_connections_per_peer"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None where no limit is allowed)")
        for name in ("idle_timeout", "frame_timeout", "handler_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be more than 0 seconds, or None for no limit")
        if self.drain_timeout < 0:
            raise ValueError("drain_timeout must not be negative")

    @classmethod
    def take(cls, options: dict[str, Any]) -> Settings:
        """Settings from the keys of ``options`` that name fields; those keys are removed."""
        names = {field.name for field in fields(cls)}
        return cls(**{name: options.pop(name) for name in list(options) if name in names})


class Stopped(Exception):
    """Raised into a session's reads to make it stop reading and finish."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Engine:
    """One listener's receiver, settings and live connections.

    Args:
        receiver: an ``IHL7Receiver`` (hl7bridge's or txHL7's, or any object
            with its four methods), or a handler (see :mod:`hl7bridge.handlers`).
        settings: listener settings; defaults if None.
    """

    def __init__(self, receiver: Any, settings: Settings | None = None) -> None:
        self.receiver = receiver = as_receiver(receiver)
        self.settings = settings or Settings()
        self.codec = codec_of(receiver)
        timeout = receiver.getTimeout()
        self.idle_timeout: float | None = timeout if timeout is not None else self.settings.idle_timeout
        self._sessions: dict[asyncio.Task[None], Session] = {}
        self._per_peer: Counter[str] = Counter()
        self.metrics = Metrics() if self.settings.metrics else None

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._sessions)

    def codec_for(self, block: bytes) -> Codec:
        """The codec of one message: the receiver's, else MSH-18's if followed, else UTF-8."""
        encoding, errors = self.codec
        if encoding is None and self.settings.follow_msh18:
            header = ack.read_header(block[: framing.HEAD_SIZE].decode("latin-1"))
            encoding = charsets.codec_for(header.charset) if header is not None else None
        return encoding or DEFAULT_ENCODING, errors

    def connected(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        """A ``start_hl7_server`` callback: serve the new connection on the running loop."""
        self.start_connection(reader, writer, asyncio.get_running_loop())

    def start_connection(
        self, reader: HL7StreamReader, writer: HL7StreamWriter, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Task[None] | None:
        """Serve one connection in a task the engine holds until it ends.

        Past ``max_connections`` (or ``max_connections_per_peer``) the
        connection is closed at once, with a log line, and None is returned.
        """
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        limits = self.settings
        refused = None
        if limits.max_connections is not None and len(self._sessions) >= limits.max_connections:
            refused = f"{len(self._sessions)} connections open, the limit set by max_connections (--max-connections)"
        elif limits.max_connections_per_peer is not None and self._per_peer[host] >= limits.max_connections_per_peer:
            refused = (
                f"{self._per_peer[host]} connections open from this address, "
                "the limit set by max_connections_per_peer (--max-connections-per-peer)"
            )
        if refused:
            log.warning("%s: connection refused: %s", _peer_name(peer), refused)
            writer.close()
            return None
        session = Session(self, reader, writer, loop, host)
        task = loop.create_task(session.run())
        self._sessions[task] = session
        self._per_peer[host] += 1
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        host = self._sessions.pop(task).host
        self._per_peer[host] -= 1
        if not self._per_peer[host]:
            del self._per_peer[host]

    async def close(self, timeout: float | None = None) -> None:
        """Stop every connection: no more reading; messages in flight are answered.

        Waits up to ``timeout`` seconds (the ``drain_timeout`` setting by
        default) for them; connections still open then are cancelled, and
        their unsent ACKs logged.
        """
        if timeout is None:
            timeout = self.settings.drain_timeout
        for session in self._sessions.values():
            session.stop("shutting down")
        if self._sessions:
            _, late = await asyncio.wait(set(self._sessions), timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)


class Session:
    """The state of one connection while :meth:`run` serves it.

    A listener may hold thousands of idle connections, so a session allocates
    little until messages come: slots rather than a ``__dict__``, an empty list
    for the replies pending (a deque allocates a 64-slot block at once), and
    the empty tuple until a framing deviation is noted.
    """

    __slots__ = (
        "_buffer_data",
        "_deframer",
        "_deviations",
        "_direct",
        "_frame_started",
        "_last_activity",
        "_observing",
        "_pending",
        "_timer",
        "engine",
        "host",
        "loop",
        "peer",
        "reader",
        "receiver",
        "settings",
        "writer",
    )

    def __init__(
        self,
        engine: Engine,
        reader: HL7StreamReader,
        writer: HL7StreamWriter,
        loop: asyncio.AbstractEventLoop,
        host: str,
    ) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.receiver = engine.receiver
        self.reader = reader
        self.writer = writer
        self.loop = loop
        self.host = host  # the peer's address, for the per-peer connection count
        self.peer = _peer_name(writer.get_extra_info("peername"))
        self._deframer = framing.Deframer(self.settings.framing, self.settings.max_message_size)
        # Replies in arrival order; rarely more than max_in_flight, so pop(0) costs little.
        self._pending: list[Reply] = []
        self._deviations: tuple[str, ...] = ()
        self._last_activity = loop.time()
        self._frame_started: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._direct = False
        self._buffer_data: Any = None
        self._observing = (
            engine.metrics is not None or self.settings.log_content or message_log.isEnabledFor(logging.INFO)
        )

    async def run(self) -> None:
        """Serve the connection until the peer closes it, it is stopped, or framing fails."""
        log.debug("%s: connected", self.peer)
        self._arm_timer()
        try:
            await self._serve()
        except Stopped as stop:
            log.info("%s: %s; answering %d messages in flight", self.peer, stop.reason, len(self._pending))
            await self._finish(self.settings.drain_timeout)
        except ConnectionError as exc:
            log.debug("%s: connection lost: %s", self.peer, exc)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._abandon_pending()
            self.writer.close()
            log.debug("%s: closed", self.peer)

    def stop(self, reason: str) -> None:
        """Stop reading; :meth:`run` answers the messages in flight, then closes."""
        if self.reader.exception() is None:
            self.reader.set_exception(Stopped(reason))

    async def _serve(self) -> None:
        reader = self.reader
        max_in_flight = self.settings.max_in_flight
        # While this task waits in read(), bytes go straight to _data_received
        # (no task switch per message); while it is busy, the reader buffers
        # them as usual and read() returns them next.
        buffer_data = reader.feed_data
        reader.feed_data = self._data_received
        self._buffer_data = buffer_data
        try:
            while True:
                self._direct = True
                data = await reader.read(READ_SIZE)
                self._direct = False
                if not self._take(data) or not data:
                    break
                await self.writer.drain()
                while len(self._pending) >= max_in_flight:
                    await self._wait_for_head()
        finally:
            self._direct = False
            del reader.feed_data
        await self._finish(None)

    def _data_received(self, data: bytes) -> None:
        """Bytes from the transport: handled now if the session is waiting for them."""
        if not self._direct or len(self._pending) >= self.settings.max_in_flight or self._writes_backed_up():
            self._buffer_data(data)
            return
        if not self._take(data):
            self._direct = False
            self.stop("framing error")

    def _take(self, data: bytes) -> bool:
        """Deframe and dispatch bytes read (``b""`` at the end); False when the connection must close."""
        self._last_activity = self.loop.time()
        events = self._deframer.feed(data) if data else self._deframer.end()
        if not self._handle_events(events):
            return False
        if self._frame_started is not None or self._deframer.incomplete:
            self._track_frame(any(isinstance(event, (framing.Frame, framing.Oversized)) for event in events))
        return True

    def _writes_backed_up(self) -> bool:
        return bool(self.writer.transport.get_write_buffer_size() > WRITE_BACKLOG)

    async def _finish(self, timeout: float | None) -> None:
        """Wait for the replies still to come, up to ``timeout`` seconds, and send them."""
        deadline = None if timeout is None else self.loop.time() + timeout
        while self._pending:
            left = None if deadline is None else deadline - self.loop.time()
            if left is not None and left <= 0:
                return
            await self._wait_for_head(left)

    def _handle_events(self, events: list[framing.Event]) -> bool:
        """Act on framing events; False when the connection must close."""
        for event in events:
            if isinstance(event, framing.Frame):
                self._submit(self._observed(event.data) if self._observing else self.dispatch(event.data))
            elif isinstance(event, framing.Deviation):
                self._note_deviation(event.kind, event.offset)
            elif isinstance(event, framing.Oversized):
                log.warning(
                    "%s: message of %d bytes is over the %d byte limit",
                    self.peer,
                    event.size,
                    self.settings.max_message_size,
                )
                self._submit(self._nak(event.head, ack.TOO_LARGE, self.engine.codec_for(event.head), partial=True))
            else:
                log.warning("%s: strict framing: %s at byte %d; closing", self.peer, event.kind, event.offset)
                return False
        return True

    def dispatch(self, block: bytes) -> Reply:
        """Decode, parse and handle one block; return its reply."""
        codec = self.engine.codec_for(block)
        try:
            text = block.decode(*codec)
        except UnicodeDecodeError as exc:
            log.warning("%s: message does not decode as %s (byte %d)", self.peer, codec[0], exc.start)
            return self._nak(block, ack.UNDECODABLE, codec)
        if not text.lstrip().startswith(ack.BLOCK_HEADERS):
            log.warning("%s: dropped a block of %d bytes that is no HL7 message", self.peer, len(block))
            return None
        try:
            container = self.receiver.parseMessage(text)
        except Exception:
            log.exception("%s: parseMessage failed", self.peer)
            return self._nak(block, ack.UNPARSEABLE, codec)
        try:
            result = self.receiver.handleMessage(container)
        except Exception:
            return self._failed(Failure(), container, codec)
        if result is None or isinstance(result, (str, bytes)) or not is_pending_result(result):
            return self._encode(result, codec)
        reply: asyncio.Future[bytes | None]
        if isinstance(result, Deferred):
            # An answer that cannot be encoded fails like the handler did.
            result.addCallback(self._encode, codec).addErrback(self._failed, container, codec)
            reply = result.asFuture(self.loop)
        else:
            reply = self.loop.create_task(self._settle(result, container, codec))
        if self.settings.handler_timeout is not None and not reply.done():
            reply = self._with_deadline(reply, block, codec)
        return reply

    def _observed(self, block: bytes) -> Reply:
        """:meth:`dispatch`, timed, counted and logged in one line when its answer is ready."""
        started = self.loop.time()
        reply = self.dispatch(block)
        if isinstance(reply, asyncio.Future):
            reply.add_done_callback(
                lambda done: self._record(block, None if done.cancelled() else done.result(), started)
            )
        else:
            self._record(block, reply, started)
        return reply

    def _record(self, block: bytes, answer: bytes | None, started: float) -> None:
        seconds = self.loop.time() - started
        header = ack.read_header(block[: framing.HEAD_SIZE].decode("latin-1"))
        kind, control_id = (header.message_type, header.control_id) if header is not None else ("?", "?")
        code = (ack.read_ack(answer.decode("latin-1"))[0] or "?") if answer is not None else "none"
        if self.engine.metrics is not None:
            self.engine.metrics.record(kind, code, seconds)
        logged = message_log.isEnabledFor(logging.INFO)
        if not (logged or self.settings.log_content):
            return  # metrics only: no log record to carry the fields
        fields = {"peer": self.peer, "message_type": kind, "control_id": control_id, "ack_code": code}
        if logged:
            ms = round(seconds * 1000, 1)
            message_log.info("%s %s %s %s %.1fms", self.peer, kind, control_id, code, ms, extra={**fields, "ms": ms})
        if self.settings.log_content:
            message = block.decode("utf-8", "backslashreplace")
            reply = None if answer is None else answer.decode("utf-8", "backslashreplace")
            content_log.info(
                "%s %s message %r ACK %r",
                self.peer,
                control_id,
                message,
                reply,
                extra={**fields, "hl7_message": message, "hl7_ack": reply},
            )

    async def _settle(self, awaitable: Any, container: Any, codec: Codec) -> bytes | None:
        try:
            return self._encode(await awaitable, codec)
        except Exception:
            return self._failed(Failure(), container, codec)

    def _with_deadline(
        self, reply: asyncio.Future[bytes | None], block: bytes, codec: Codec
    ) -> asyncio.Future[bytes | None]:
        """A reply that is an AE if the handler has not finished in time."""
        answer: asyncio.Future[bytes | None] = self.loop.create_future()

        def finished(done: asyncio.Future[bytes | None]) -> None:
            if not answer.done():
                answer.set_result(None if done.cancelled() else done.result())
                timer.cancel()
            else:
                log.warning("%s: a handler finished after its timeout; its answer was dropped", self.peer)

        def expired() -> None:
            log.error("%s: handler still running after %ss; AE sent", self.peer, self.settings.handler_timeout)
            answer.set_result(self._nak(block, ack.HANDLER_TIMEOUT, codec))

        assert self.settings.handler_timeout is not None
        timer = self.loop.call_later(self.settings.handler_timeout, expired)
        reply.add_done_callback(finished)
        return answer

    def _failed(self, failure: Failure, container: Any, codec: Codec) -> bytes | None:
        """A handler failed: log it once, and answer with ``container.err(failure)``."""
        log.error(
            "%s: handleMessage failed: %s",
            self.peer,
            failure.getErrorMessage(),
            exc_info=(failure.type, failure.value, failure.getTracebackObject()),
        )
        try:
            return self._encode(container.err(failure), codec)
        except Exception:
            log.exception("%s: the container's err() failed too", self.peer)
        # The NAK reads only the MSH, which latin-1 carries whatever the codec.
        raw = getattr(container, "raw_message", "")
        return self._nak(raw.encode("latin-1", "replace"), ack.HANDLER_FAILED, (codec[0], "replace"))

    def _encode(self, reply: object, codec: Codec) -> bytes | None:
        """The bytes of a handler's answer (text, bytes, an hl7.Message, or None).

        Raises:
            TypeError: the answer is something else (a Deferred from ``err()``, say).
        """
        if reply is None or isinstance(reply, bytes):
            return reply
        if not isinstance(reply, (str, hl7.Message)):
            raise TypeError(f"an answer must be text, bytes, an hl7.Message or None, not {type(reply).__name__}")
        text = str(reply)
        try:
            return text.encode(*codec)
        except UnicodeEncodeError:
            log.warning("%s: ACK does not encode as %s; unencodable characters replaced", self.peer, codec[0])
            return text.encode(codec[0], "replace")

    def _nak(self, block: bytes, rejection: ack.Rejection, codec: Codec, partial: bool = False) -> bytes | None:
        """A NAK built from whatever MSH the raw block holds; None if it holds none.

        A ``partial`` block (the start of a message) counts only if its MSH
        segment is complete: a cut-off MSH-10 must not be answered.
        """
        # MSH is ASCII in practice; latin-1 decodes any bytes, so a broken
        # message body cannot stop its header from being read.
        text = block[: framing.HEAD_SIZE].decode("latin-1")
        header = ack.read_header(text)
        if partial and header is not None and len(header.segment) >= len(text.lstrip()):
            header = None
        if header is None:
            log.warning("%s: %s, and no MSH segment to answer; dropped without ACK", self.peer, rejection.text)
            return None
        log.warning("%s: %s %s: %s", self.peer, rejection.code, header.control_id, rejection.text)
        return self._encode(ack.build_nak(header, rejection), codec)

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
                pending.pop(0)
                if not head.cancelled():
                    self._send(head.result())
            else:
                pending.pop(0)
                self._send(head)

    async def _wait_for_head(self, timeout: float | None = None) -> None:
        head = self._pending[0]
        if isinstance(head, asyncio.Future):
            await asyncio.wait((head,), timeout=timeout)
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
            self._deviations += (kind,)
            log.warning("%s: framing deviation tolerated: %s at byte %d", self.peer, kind, offset)

    def _track_frame(self, finished: bool) -> None:
        """Note when the message now arriving started, for ``frame_timeout``.

        Only a finished message restarts the clock: a sender that keeps
        restarting a block (or dribbling junk) does not.
        """
        if not self._deframer.incomplete:
            self._frame_started = None
        elif finished or self._frame_started is None:
            # A new message started in this read.
            self._frame_started = self._last_activity
            self._arm_timer()

    def _arm_timer(self) -> None:
        """Arm one timer for the nearer of the idle and frame deadlines."""
        deadlines = []
        if self.engine.idle_timeout is not None:
            deadlines.append(self._last_activity + self.engine.idle_timeout)
        if self.settings.frame_timeout is not None and self._frame_started is not None:
            deadlines.append(self._frame_started + self.settings.frame_timeout)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadlines:
            self._timer = self.loop.call_at(min(deadlines), self._check_timeouts)

    def _check_timeouts(self) -> None:
        # Reads only stamp the time; the timer checks it when it fires and
        # re-arms itself, so a busy connection costs no timer per read.
        self._timer = None
        now = self.loop.time()
        frame_timeout = self.settings.frame_timeout
        if frame_timeout is not None and self._frame_started is not None and now >= self._frame_started + frame_timeout:
            head = self._deframer.partial_head()
            self._submit(self._nak(head, ack.INCOMPLETE, self.engine.codec_for(head), partial=True))
            self.stop(f"message not completed within {frame_timeout}s")
            return
        idle_timeout = self.engine.idle_timeout
        if self._pending:
            self._last_activity = now
        elif idle_timeout is not None and now >= self._last_activity + idle_timeout:
            self.stop(f"idle for {idle_timeout}s")
            return
        self._arm_timer()


def _peer_name(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "peer")
