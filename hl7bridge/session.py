"""The one path of a message: block -> decode -> parse -> handle -> ordered ACK.

Both faces (the asyncio :func:`hl7bridge.serve` and the Twisted
:class:`hl7bridge.mllp.MLLPFactory`) hand each connection's ``hl7.mllp``
stream reader and writer to :meth:`Engine.start_connection`; everything after
that is written once, here.

A session is driven by callbacks, not by a task: the bytes the connection
receives are split into frames (:mod:`hl7bridge.framing`) in the call that
delivered them, each frame is decoded with the receiver's codec, given to the
receiver's ``parseMessage`` once and ``handleMessage`` once, and an answer
that is ready at once (a value, a Deferred that has fired) is written in that
same call. So a protocol driven by hand, with no event loop running, answers
as txHL7's did. Answers still to come (a pending Deferred, a coroutine,
thread work) wait in arrival order and are written, in that order, as they
settle. Handlers of one connection run concurrently, up to ``max_in_flight``;
frames past it wait undispatched while reading is paused.

Every message gets exactly one outcome: the receiver's answer, a NAK built
from its MSH (undecodable, unparseable, too large, incomplete, handler failed
or timed out), or, when it has no MSH and hl7bridge must answer it, a log
line saying it was dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import hl7
from hl7.mllp import HL7StreamReader, HL7StreamWriter
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from hl7bridge import ack, charsets, failures, framing
from hl7bridge.defer import is_pending_result
from hl7bridge.framing import DEFAULT_MAX_MESSAGE_SIZE, LENIENT
from hl7bridge.handlers import as_receiver
from hl7bridge.journal import (
    DEFAULT_KEY,
    DEFAULT_RETENTION_DAYS,
    FAILED,
    Arrival,
    Journal,
    Recorded,
    check_retention,
    check_url,
    parse_key,
)
from hl7bridge.metrics import Metrics
from hl7bridge.receiver import DEFAULT_ENCODING, HL7MessageContainer, codec_of, message_parser

log = logging.getLogger("hl7bridge.session")

#: One line per message at INFO (peer, type, control id, ACK code, time taken);
#: never the content. Silence it alone with ``logging.getLogger("hl7bridge.messages")``.
#: Each record also carries those values as attributes (``peer``, ``message_type``,
#: ``control_id``, ``ack_code``, ``ms``) for structured logs.
message_log = logging.getLogger("hl7bridge.messages")


def message_text(peer: str, message_type: str, control_id: str, ack_code: str, seconds: float, sent: bool) -> str:
    """The text of one message's line: ``10.0.0.7:51234 ADT^A01 TEST0001 AA 0.8ms``."""
    return f"{peer} {message_type} {control_id} {ack_code}{'' if sent else ' not sent'} {seconds * 1000:.1f}ms"


def message_fields(
    peer: str, message_type: str, control_id: str, ack_code: str, seconds: float, sent: bool
) -> dict[str, Any]:
    """The attributes of one message's record, ``ms`` rounded to a tenth; ``sent`` only when the ACK was not."""
    attributes = {
        "peer": peer,
        "message_type": message_type,
        "control_id": control_id,
        "ack_code": ack_code,
        "ms": round(seconds * 1000, 1),
    }
    if not sent:
        attributes["sent"] = False
    return attributes


def log_message(peer: str, message_type: str, control_id: str, ack_code: str, seconds: float, sent: bool) -> None:
    """The line of one message, as an INFO record of ``message_log`` with :func:`message_fields` as attributes.

    ``seconds`` is the time from the message's dispatch to its answer's write.
    ``sent`` is False when an answer was due but never left: the connection went
    first (or the handler was still running when it did).
    """
    values = (peer, message_type, control_id, ack_code, seconds, sent)
    message_log.info(message_text(*values), extra=message_fields(*values))


#: With the ``log_content`` setting only: one line per message at INFO with the
#: message and its ACK, which are patient data (attributes ``hl7_message``, ``hl7_ack``).
content_log = logging.getLogger("hl7bridge.content")

#: Unsent ACK bytes past which the session stops reading until the writer drains.
WRITE_BACKLOG = 64 * 1024

#: Each kind of problem a peer causes is logged when first seen on its
#: connection; repeats are counted, and summed up in one line at most this
#: often (seconds) and when the connection closes.
PROBLEM_SUMMARY_INTERVAL = 60.0

Codec = tuple[str, str]

#: A message being timed for metrics and the message log: its block, its MSH, when it arrived.
Observed = tuple[bytes, "ack.Header | None", float]


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
        journal: URL of a message journal (:mod:`hl7bridge.journal`):
            ``sqlite:///file.db`` or ``postgresql://user@host/db``. Each message
            is journaled when it arrives and its ACK committed before it is
            sent; a retransmission of an accepted message gets the same ACK
            without the handler running. None: no journal.
        journal_key: the MSH fields that identify a message in the journal.
        journal_retention: days a journaled message is kept.
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
    journal: str | None = None
    journal_key: str = DEFAULT_KEY
    journal_retention: float = DEFAULT_RETENTION_DAYS

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
        if self.journal is not None:
            check_url(self.journal)  # its message starts with "journal", the field's name
        try:
            parse_key(self.journal_key)
        except ValueError as exc:
            raise ValueError(f"journal_key {exc}") from None
        try:
            check_retention(self.journal_retention)
        except ValueError as exc:
            raise ValueError(f"journal_retention {exc}") from None

    @classmethod
    def take(cls, options: dict[str, Any]) -> Settings:
        """Settings from the keys of ``options`` that name fields; those keys are removed."""
        names = {field.name for field in fields(cls)}
        return cls(**{name: options.pop(name) for name in list(options) if name in names})


class Answer:
    """An answer still to come: settled once, by its handler or by its timeout.

    Until it is queued on a session (``session`` set), settling only stores
    the value: an answer that is ready before :meth:`Session.dispatch`
    returns is written at once, like a plain value.
    """

    __slots__ = ("arrival", "done", "observed", "ready", "session", "task", "timer", "value")

    def __init__(self) -> None:
        self.done = False  # its value is known
        self.ready = False  # and may be sent: with a journal, once it is committed
        self.value: bytes | None = None
        self.session: Session | None = None
        self.task: asyncio.Task[None] | None = None  # a coroutine's task, held until it ends
        self.timer: asyncio.TimerHandle | None = None  # the handler timeout
        self.observed: Observed | None = None  # for metrics and the message log
        self.arrival: Arrival | None = None  # its journal entry, while the answer is to be committed

    def settle(self, value: bytes | None) -> None:
        """The answer is known; the session writes it when those before it are written.

        With a journal, it is committed first (ACK after commit).
        """
        if self.done:
            # Only the handler timeout settles an answer before its handler does.
            log.warning("a handler finished after its timeout; its answer was dropped")
            return
        self.done = True
        self.value = value
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        arrival = self.arrival
        if arrival is None:
            self._ready(True)
        else:
            code = ack.read_ack_code(value) if value is not None else "none"
            arrival.journal.answer(arrival, value, code, self._ready)  # type: ignore[union-attr]

    def _ready(self, committed: bool) -> None:
        arrival, self.arrival = self.arrival, None
        if not committed and arrival is not None and self.session is not None:
            # The journal could not keep the answer: it must not be sent.
            self.value = self.session._journal_refusal(arrival)
        self.ready = True
        if self.session is not None:
            self.session._settled(self)


#: What a message turns into: the ACK bytes, None for no answer, or an answer still to come.
Reply = bytes | None | Answer

# Why reading is paused; reading resumes when no reason is left.
_HELD = 1  # frames wait for a slot under max_in_flight
_BACKLOG = 2  # the peer does not read its ACKs
_STOPPING = 4  # no more messages are taken


class Engine:
    """One listener's receiver, settings and live connections.

    Args:
        receiver: an ``IHL7Receiver`` (hl7bridge's or txHL7's, or any object
            with its four methods), or a handler (see :mod:`hl7bridge.handlers`).
        settings: listener settings; defaults if None.

    Attributes:
        log_message: called with the values of each message's line (those of
            :func:`log_message`) when ``hl7bridge.messages`` logs at INFO;
            :func:`log_message` by default. ``hl7bridge serve`` writes the lines
            itself, without a LogRecord each (:meth:`hl7bridge.logs.MessageLines.write`).
    """

    def __init__(self, receiver: Any, settings: Settings | None = None) -> None:
        self.receiver = receiver = as_receiver(receiver)
        self.settings = settings or Settings()
        self.codec = codec_of(receiver)
        self.parse_message = message_parser(receiver)
        timeout = receiver.getTimeout()
        self.idle_timeout: float | None = timeout if timeout is not None else self.settings.idle_timeout
        self._sessions: dict[Session, None] = {}
        self._per_peer: Counter[str] = Counter()
        self._all_closed: asyncio.Future[None] | None = None
        # Handler tasks of connections that closed before they finished: held until they end.
        self._orphans: set[asyncio.Task[None]] = set()
        self.metrics = Metrics() if self.settings.metrics else None
        self.log_message: Callable[[str, str, str, str, float, bool], None] = log_message
        settings = self.settings
        self.journal = (
            Journal(settings.journal, settings.journal_key, settings.journal_retention) if settings.journal else None
        )

    async def open(self) -> None:
        """Open the journal, if there is one (else nothing to do): a listener calls it before it accepts.

        Without it, the journal opens when the first message arrives.

        Raises:
            Exception: the journal's database cannot be reached or used.
        """
        if self.journal is not None:
            await self.journal.open()

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
    ) -> Session | None:
        """Serve one connection until it closes; the engine holds its session meanwhile.

        From now on the bytes fed to ``reader`` go to the session. Past
        ``max_connections`` (or ``max_connections_per_peer``) the connection
        is closed at once, with a log line, and None is returned.
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
            log.warning("%s: connection refused: %s", peer_name(peer), refused)
            writer.close()
            return None
        session = Session(self, reader, writer, loop, host)
        self._sessions[session] = None
        self._per_peer[host] += 1
        return session

    def _ended(self, session: Session) -> None:
        del self._sessions[session]
        host = session.host
        self._per_peer[host] -= 1
        if not self._per_peer[host]:
            del self._per_peer[host]
        if not self._sessions and self._all_closed is not None and not self._all_closed.done():
            self._all_closed.set_result(None)

    def _adopt(self, task: asyncio.Task[None]) -> None:
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    async def close(self, timeout: float | None = None) -> None:
        """Stop every connection: no more reading; messages in flight are answered.

        Waits up to ``timeout`` seconds (the ``drain_timeout`` setting by
        default) for them; connections still open then are closed, and their
        unsent ACKs logged.
        """
        if timeout is None:
            timeout = self.settings.drain_timeout
        for session in list(self._sessions):
            session._stop("shutting down")
        if self._sessions:
            self._all_closed = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._all_closed), timeout)
            except asyncio.TimeoutError:
                late = list(self._sessions)
                unsent = sum(session.close() for session in late)
                log.warning(
                    "shutdown: %d connections still busy after %ss closed; %d ACKs never sent",
                    len(late),
                    timeout,
                    unsent,
                )
        if self.journal is not None:
            # What was answered but not yet committed is committed (and stays unsent).
            await self.journal.close()


class Session:
    """One connection: bytes in, answers out, in arrival order.

    The reader's ``feed_data``, ``feed_eof`` and ``set_exception`` are taken
    over, so the bytes a face feeds its ``hl7.mllp`` reader come here as they
    arrive, and nothing waits in the reader's buffer.

    A listener may hold thousands of idle connections, so a session allocates
    little until messages come: slots rather than a ``__dict__``, an empty list
    for the replies pending, and no problem counts until a peer causes a problem.
    """

    __slots__ = (
        "_closed",
        "_deframer",
        "_drain_task",
        "_eof",
        "_frame_started",
        "_header",
        "_held",
        "_last_activity",
        "_logged",
        "_observing",
        "_paused",
        "_pending",
        "_problems",
        "_releasing",
        "_summary_due",
        "_timer",
        "_unread",
        "_unreported",
        "engine",
        "host",
        "journal",
        "listener",
        "loop",
        "parse_message",
        "peer",
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
        self.parse_message = engine.parse_message
        self.writer = writer
        self.loop = loop
        self.host = host  # the peer's address, for the per-peer connection count
        self.peer = peer_name(writer.get_extra_info("peername"))
        self.journal = engine.journal
        # The address the peer connected to, for the journal.
        self.listener = peer_name(writer.get_extra_info("sockname")) if self.journal is not None else ""
        self._deframer = framing.Deframer(self.settings.framing, self.settings.max_message_size)
        # Replies in arrival order; rarely more than max_in_flight, so pop(0) costs little.
        self._pending: list[Reply] = []
        self._held: list[framing.Event] | None = None  # events waiting for a slot
        self._unread: bytearray | None = None  # bytes that came while events were held
        self._paused = 0
        self._eof = False  # the peer sent its last byte
        self._closed = False
        self._releasing = False
        self._drain_task: asyncio.Task[None] | None = None
        self._header: ack.Header | None = None  # the MSH of the block dispatch() took last
        self._problems: dict[str, int] | None = None  # kind -> count, once a peer causes one
        self._unreported = 0
        self._summary_due = 0.0
        self._last_activity = loop.time()
        self._frame_started: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._logged = message_log.isEnabledFor(logging.INFO)
        self._observing = engine.metrics is not None or self.settings.log_content or self._logged
        reader.feed_data = self.data_received
        reader.feed_eof = self.eof_received
        reader.set_exception = self.connection_lost
        log.debug("%s: connected", self.peer)
        self._arm_timer()

    # Events of the connection

    def data_received(self, data: bytes) -> None:
        """Bytes from the peer: deframed, dispatched and answered where the answer is ready."""
        if self._closed or self._paused & _STOPPING:
            return
        self._last_activity = self.loop.time()
        if self._held is not None:
            # Reading is paused; what a transport delivers anyway waits its turn.
            self._unread += data  # type: ignore[operator]
            return
        self._take(self._deframer.feed(data))

    def eof_received(self) -> None:
        """The peer closed its side (or the connection is gone): answer what is in flight, then close."""
        if self._closed:
            return
        if self.writer.transport.is_closing():
            self.connection_lost(None)
            return
        if self._eof:
            return
        self._eof = True
        if self._held is None:
            self._end()

    def connection_lost(self, exc: BaseException | None) -> None:
        """The connection is gone: answers still to come can no longer be sent."""
        if exc is not None:
            log.debug("%s: connection lost: %s", self.peer, exc)
        self.close()

    def stop(self, reason: str) -> None:
        """Take no more messages; answer those in flight, then close.

        The answers get ``drain_timeout`` seconds; the connection is closed
        then, whatever is left. (The engine's shutdown sets its own bound.)
        """
        if self._stop(reason) and not self._closed:
            self._timer = self.loop.call_later(self.settings.drain_timeout, self.close)

    def _stop(self, reason: str) -> bool:
        """Take no more messages; answer those in flight, then close. False if already stopping."""
        if self._closed or self._paused & _STOPPING:
            return False
        log.info("%s: %s; answering %d messages in flight", self.peer, reason, len(self._pending))
        if self._timer is not None:
            self._timer.cancel()  # no idle or frame timeout while stopping
            self._timer = None
        self._held = self._unread = None
        self._pause(_STOPPING)
        self._close_if_answered()
        return True

    def close(self) -> int:
        """Close the connection now; answers not yet written are logged and dropped, and counted."""
        if self._closed:
            return 0
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drain_task is not None:
            self._drain_task.cancel()
        unsent = self._abandon_pending()
        self._summarise()
        self.writer.close()
        self.engine._ended(self)
        log.debug("%s: closed", self.peer)
        return unsent

    # Frames in

    def _take(self, events: list[framing.Event]) -> None:
        """Act on framing events, in order, while slots under ``max_in_flight`` last."""
        finished = False
        max_in_flight = self.settings.max_in_flight
        for index, event in enumerate(events):
            if isinstance(event, framing.Frame):
                if len(self._pending) >= max_in_flight:
                    self._hold(events[index:])
                    break
                finished = True
                if self.journal is not None:
                    self._arrive(event.data)
                elif self._observing:
                    self._submit_observed(event.data)
                else:
                    self._submit(self.dispatch(event.data))
            elif isinstance(event, framing.Deviation):
                self._problem(
                    f"framing: {event.kind}", "framing deviation tolerated: %s at byte %d", event.kind, event.offset
                )
            elif isinstance(event, framing.Oversized):
                finished = True
                self._problem(
                    "message too large",
                    "message of %d bytes is over the %d byte limit",
                    event.size,
                    self.settings.max_message_size,
                )
                self._submit(self._nak(event.head, ack.TOO_LARGE, self.engine.codec_for(event.head), partial=True))
            else:
                log.warning("%s: strict framing: %s at byte %d; closing", self.peer, event.kind, event.offset)
                self.stop("framing error")
                return
            if self._closed:
                return
        if self._frame_started is not None or self._deframer.waiting:
            self._track_frame(finished)

    def _hold(self, events: list[framing.Event]) -> None:
        """Keep frames past ``max_in_flight`` undispatched, and stop reading until a slot frees."""
        self._held = events
        self._unread = bytearray()
        self._pause(_HELD)

    def _release(self) -> None:
        """Slots are free: dispatch the frames held, then the bytes that came meanwhile."""
        if self._releasing:
            return
        self._releasing = True
        try:
            while self._held is not None and len(self._pending) < self.settings.max_in_flight:
                events, unread = self._held, self._unread
                self._held = self._unread = None
                self._take(events)
                if self._held is not None:
                    self._unread = unread
                elif unread and not self._closed:
                    self._take(self._deframer.feed(bytes(unread)))
        finally:
            self._releasing = False
        if self._held is None and not self._closed:
            self._resume(_HELD)
            if self._eof:
                self._end()

    def _end(self) -> None:
        """The stream has ended: report what it left unfinished, answer the rest, close."""
        self._take(self._deframer.end())
        if not self._closed:
            self._pause(_STOPPING)
            self._close_if_answered()

    def _close_if_answered(self) -> None:
        if not self._pending and self._paused & _STOPPING:
            self.close()

    # One message

    def _arrive(self, block: bytes) -> None:
        """With a journal: journal the block, then handle it, or send its recorded answer again.

        A block without a usable MSH (no control id to key it by) is not
        journaled: it gets its NAK, or nothing, as it would without a journal.
        """
        assert self.journal is not None
        header = ack.read_header(block[: framing.HEAD_SIZE].decode("latin-1"))
        key = self.journal.key_of(header) if header is not None and ack.header_fault(header) is None else None
        if key is None:
            if self._observing:
                self._submit_observed(block)
            else:
                self._submit(self.dispatch(block))
            return
        assert header is not None
        answer = Answer()
        if self._observing:
            answer.observed = (block, header, self.loop.time())
        arrival = Arrival(key, header, block, self.listener, self.peer)
        self.journal.begin(arrival, lambda recorded: self._begun(answer, arrival, recorded))
        self._submit(answer)

    def _begun(self, answer: Answer, arrival: Arrival, recorded: Recorded | None) -> None:
        """The journal has the message: handle it (None), or answer it as recorded."""
        if recorded is FAILED:
            answer.settle(self._journal_refusal(arrival))
        elif recorded is not None:
            log.info("%s: retransmission of control id %s answered from the journal", self.peer, arrival.control_id)
            if self.engine.metrics is not None:
                self.engine.metrics.retransmission(arrival.message_type)
            answer.settle(recorded.ack)
        else:
            # Handled even if the connection has gone meanwhile: the journal
            # has it, and a retransmission will get the answer.
            answer.arrival = arrival
            reply = self.dispatch(arrival.raw, answer, arrival.header)
            if not isinstance(reply, Answer) and not answer.done:
                answer.settle(reply)
            elif self._closed and answer.task is not None:
                self.engine._adopt(answer.task)

    def _journal_refusal(self, arrival: Arrival) -> bytes | None:
        """The AR for a message the journal could not keep (or whose answer it could not)."""
        return self._nak(arrival.raw, ack.JOURNAL_UNAVAILABLE, self.engine.codec_for(arrival.raw))

    def dispatch(self, block: bytes, answer: Answer | None = None, header: ack.Header | None = None) -> Reply:
        """Decode, parse and handle one block; return its reply.

        An answer still to come settles ``answer`` if one is given (a new one if
        not). ``header`` is the block's MSH as read when it arrived, without
        fault; it is used again where the decoded block starts with that segment.
        """
        self._header = None
        codec = self.engine.codec_for(block)
        try:
            text = block.decode(*codec)
        except UnicodeDecodeError as exc:
            self._problem("undecodable message", "message does not decode as %s (byte %d)", codec[0], exc.start)
            return self._nak(block, ack.UNDECODABLE, codec)
        end = len(header.segment) if header is not None else 0
        if header is not None and text.startswith(header.segment) and text[end : end + 1] in ("\r", "\n", ""):
            self._header = header  # the MSH read when the block arrived: the same segment
        elif text.startswith(ack.BLOCK_HEADERS) or text.lstrip()[:3] in ack.BLOCK_HEADERS:
            # An HL7 message: hl7bridge may have to answer it, so its MSH must
            # identify it (HL7 v2.5 section 2.14.9: MSH-9 and MSH-10 are required).
            header = self._header = ack.read_header(text)
            fault = ack.header_fault(header)
            if fault is not None:
                return self._refuse(block, header, fault, codec)
        try:
            container = self.parse_message(text)
        except Exception:
            failure = Failure()
            self._problem("message could not be parsed", "parseMessage failed: %s", failures.summary(failure))
            self._log_content_failure("parseMessage", failure)
            return self._nak(block, ack.UNPARSEABLE, codec)
        if isinstance(container, HL7MessageContainer) and self._header is None:
            # hl7bridge builds this container's answers, and they need an MSH.
            # Receivers with containers of their own get any block (txHL7 did).
            self._problem("no HL7 message", "dropped a block of %d bytes that is no HL7 message", len(block))
            return None
        try:
            result = self.receiver.handleMessage(container)
        except Exception:
            return self._failed(Failure(), container, codec)
        if result is None or isinstance(result, (str, bytes)) or not is_pending_result(result):
            return self._encode(result, codec)
        if answer is None:
            answer = Answer()
        if isinstance(result, Deferred):
            # An answer that cannot be encoded fails like the handler did. A
            # Deferred that has fired already settles the answer here and now.
            result.addCallback(self._encode, codec).addErrback(self._failed, container, codec).addCallback(
                answer.settle
            )
        else:
            answer.task = self.loop.create_task(self._settle(result, container, codec, answer))
        if answer.done:
            return answer.value
        if self.settings.handler_timeout is not None:
            answer.timer = self.loop.call_later(self.settings.handler_timeout, self._expired, answer, block, codec)
        return answer

    def _submit_observed(self, block: bytes) -> None:
        """:meth:`dispatch` and :meth:`_submit`, timed, counted and logged in one line once the answer leaves."""
        started = self.loop.time()
        reply = self.dispatch(block)
        observed = (block, self._header, started)
        if isinstance(reply, Answer):
            reply.observed = observed
            self._submit(reply)
        elif not self._pending:
            self._record(observed, reply, True, self._send(reply))
        else:
            # Ready, but behind answers still to come: it waits with them.
            answer = Answer()
            answer.done = answer.ready = True
            answer.value, answer.observed, answer.session = reply, observed, self
            self._pending.append(answer)

    def _record(self, observed: Observed, reply: bytes | None, settled: bool, sent: bool) -> None:
        """Count and log one message now that its answer was written, or could not be."""
        block, header, started = observed
        seconds = self.loop.time() - started
        kind, control_id = (header.message_type, header.control_id) if header is not None else ("?", "?")
        code = ack.read_ack_code(reply) if reply is not None else "none"
        # An answer was due but never left: the connection went first (or the
        # handler was still running when it did).
        lost = not sent and (reply is not None or not settled)
        if self.engine.metrics is not None:
            self.engine.metrics.record(kind, "not sent" if lost else code, seconds)
        if self._logged:
            self.engine.log_message(self.peer, kind, control_id, code, seconds, not lost)
        if self.settings.log_content:
            message = block.decode("utf-8", "backslashreplace")
            text = None if reply is None else reply.decode("utf-8", "backslashreplace")
            content_log.info(
                "%s %s message %r ACK %r",
                self.peer,
                control_id,
                message,
                text,
                extra={
                    "peer": self.peer,
                    "message_type": kind,
                    "control_id": control_id,
                    "ack_code": code,
                    "hl7_message": message,
                    "hl7_ack": text,
                },
            )

    async def _settle(self, awaitable: Any, container: Any, codec: Codec, answer: Answer) -> None:
        try:
            value = self._encode(await awaitable, codec)
        except Exception:
            value = self._failed(Failure(), container, codec)
        answer.task = None
        answer.settle(value)

    def _expired(self, answer: Answer, block: bytes, codec: Codec) -> None:
        log.error("%s: handler still running after %ss; AE sent", self.peer, self.settings.handler_timeout)
        answer.timer = None
        answer.settle(self._nak(block, ack.HANDLER_TIMEOUT, codec))

    def _failed(self, failure: Failure, container: Any, codec: Codec) -> bytes | None:
        """A handler failed: log it once, and answer with ``container.err(failure)``.

        The log says where it failed, not what the exception says: its text
        may quote the message (see :mod:`hl7bridge.failures`).
        """
        log.error(
            "%s: handleMessage failed: %s\n%s", self.peer, failures.summary(failure), failures.traceback_text(failure)
        )
        self._log_content_failure("handleMessage", failure)
        try:
            return self._encode(container.err(failure), codec)
        except Exception:
            log.error("%s: the container's err() failed too: %s", self.peer, failures.summary(Failure()))
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
            self._problem("ACK does not encode", "ACK does not encode as %s; unencodable characters replaced", codec[0])
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
            self._problem("no MSH to answer", "%s, and no MSH segment to answer; dropped without ACK", rejection.text)
            return None
        fault = ack.header_fault(header)
        if fault is not None and fault not in ack.ANSWERABLE:
            self._problem(fault.text, "%s, and %s to answer it; dropped without ACK", rejection.text, fault.text)
            return None
        self._problem(rejection.text, "%s %s: %s", rejection.code, header.control_id, rejection.text)
        return self._encode(ack.build_nak(header, rejection), codec)

    def _refuse(self, block: bytes, header: ack.Header | None, fault: ack.Rejection, codec: Codec) -> bytes | None:
        """An HL7 message whose MSH cannot identify it: an AR if it can be answered, else dropped."""
        if header is None or fault not in ack.ANSWERABLE:
            # No control id to put in MSA-2 (or no way to read it): any answer would mislead.
            self._problem(fault.text, "message with %s; dropped without ACK", fault.text)
            return None
        return self._nak(block, fault, codec)

    def _log_content_failure(self, what: str, failure: Failure) -> None:
        """With ``log_content`` only: the failure in full, text and traceback, on the content logger."""
        if self.settings.log_content:
            content_log.error(
                "%s: %s failed", self.peer, what, exc_info=(failure.type, failure.value, failure.getTracebackObject())
            )

    def _problem(self, kind: str, text: str, *args: object) -> None:
        """A peer caused a problem: log it if it is the first of its kind here, and count it."""
        problems = self._problems
        if problems is None:
            problems = self._problems = {}
            self._summary_due = self.loop.time() + PROBLEM_SUMMARY_INTERVAL
        seen = problems.get(kind, 0)
        problems[kind] = seen + 1
        if self.engine.metrics is not None:
            self.engine.metrics.problem(kind)
        if not seen:
            log.warning("%s: " + text, self.peer, *args)
            return
        self._unreported += 1
        if self.loop.time() >= self._summary_due:
            self._summarise()

    def _summarise(self) -> None:
        """One line with the count of each kind of problem so far, if any went unlogged."""
        if self._unreported and self._problems:
            counts = ", ".join(f"{kind} x{count}" for kind, count in self._problems.items())
            log.warning("%s: problems on this connection so far: %s", self.peer, counts)
            self._unreported = 0
        self._summary_due = self.loop.time() + PROBLEM_SUMMARY_INTERVAL

    # Answers out, in arrival order

    def _submit(self, reply: Reply) -> None:
        """Queue a reply behind those of earlier messages; send what is ready."""
        if self._pending:
            if isinstance(reply, Answer):
                reply.session = self
            self._pending.append(reply)
        elif not isinstance(reply, Answer):
            self._send(reply)
        elif reply.ready:
            self._deliver(reply)
        else:
            reply.session = self
            self._pending.append(reply)

    def _settled(self, answer: Answer) -> None:
        if not self._closed and self._pending and self._pending[0] is answer:
            self._flush()

    def _flush(self) -> None:
        """Send the replies at the head of the queue that are ready; take held frames if slots freed."""
        pending = self._pending
        while pending:
            head = pending[0]
            if isinstance(head, Answer):
                if not head.ready:
                    break
                pending.pop(0)
                self._deliver(head)
            else:
                pending.pop(0)
                self._send(head)
        if self._held is not None:
            self._release()
        self._close_if_answered()

    def _deliver(self, answer: Answer) -> None:
        sent = self._send(answer.value)
        if answer.observed is not None:
            self._record(answer.observed, answer.value, True, sent)

    def _abandon_pending(self) -> int:
        """The connection is closing: replies still to come can no longer be sent."""
        unsent = 0
        for reply in self._pending:
            if isinstance(reply, Answer):
                reply.session = None
                if reply.timer is not None:
                    reply.timer.cancel()
                if reply.task is not None:
                    self.engine._adopt(reply.task)
                if reply.observed is not None:
                    self._record(reply.observed, reply.value if reply.done else None, reply.done, False)
            unsent += 1
        if unsent:
            log.warning("%s: connection closed with %d ACKs unsent", self.peer, unsent)
        self._pending.clear()
        self._held = self._unread = None
        return unsent

    def _send(self, data: bytes | None) -> bool:
        """Write one answer (None: nothing to write); False if the connection was gone."""
        if data is None:
            return True
        if self.writer.is_closing():
            self._problem("ACK not sent", "connection closed before an ACK could be sent")
            return False
        self.writer.writeblock(data)
        if self.writer.transport.get_write_buffer_size() > WRITE_BACKLOG and not self._paused & _BACKLOG:
            # The peer is not reading its ACKs: read no more until it does.
            self._pause(_BACKLOG)
            self._drain_task = self.loop.create_task(self._drain())
        return True

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError:
            return
        self._drain_task = None
        self._resume(_BACKLOG)

    def _pause(self, reason: int) -> None:
        if not self._paused:
            # Python 3.10's asyncio TLS transport raises AttributeError once the
            # connection under it is gone (it may not say it is closing yet).
            with contextlib.suppress(AttributeError):
                self.writer.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and not self._closed:
                with contextlib.suppress(AttributeError):  # as in _pause
                    self.writer.transport.resume_reading()

    # Timeouts

    def _track_frame(self, finished: bool) -> None:
        """Note when the message now arriving started, for ``frame_timeout``.

        Only a finished message restarts the clock: a sender that keeps
        restarting a block (or dribbling junk) does not.
        """
        if not self._deframer.waiting:
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
        if self._pending or self._held is not None:
            self._last_activity = now
        elif idle_timeout is not None and now >= self._last_activity + idle_timeout:
            self.stop(f"idle for {idle_timeout}s")
            return
        self._arm_timer()


def peer_name(peer: object) -> str:
    """A peer address as logs show it: ``host:port``, or the address as it is."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "peer")
