"""The txHL7 receiver API, same names and meaning, on hl7bridge's engine.

A receiver implements :class:`IHL7Receiver`: ``parseMessage(raw)`` turns the
decoded text of one message into a :class:`MessageContainer`,
``handleMessage(container)`` acts on it and returns the ACK text (or a Deferred
or coroutine of it; ``None`` sends nothing), ``getCodec()`` names the codec and
``getTimeout()`` the idle timeout. Porting from txHL7 is an import change:
``from txHL7.receiver import ...`` becomes ``from hl7bridge.receiver import ...``.
Receivers still written against txHL7 itself are accepted as they are
(:func:`check_receiver`).

No I/O happens here.
"""

from __future__ import annotations

import codecs
import logging
import sys
from collections.abc import Callable
from typing import Any

import hl7
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from hl7bridge.ack import HANDLER_FAILED, Header, build_ack, build_nak, read_header
from hl7bridge.errors import NotAReceiver
from hl7bridge.parse import parse

log = logging.getLogger("hl7bridge.receiver")

#: txHL7 decodes with ``sys.getdefaultencoding()`` when ``getCodec()`` gives
#: nothing; on Python 3 that is always UTF-8 (hl7.mllp would use ASCII).
DEFAULT_ENCODING = "utf-8"
DEFAULT_ERRORS = "strict"

RECEIVER_METHODS = ("parseMessage", "handleMessage", "getCodec", "getTimeout")


class MessageContainer:
    """One received message, as given to ``handleMessage``.

    Args:
        raw_message: the message text, decoded with the receiver's codec, MLLP
            framing removed.
    """

    def __init__(self, raw_message: str) -> None:
        self.raw_message = raw_message

    def ack(self, ack_code: str = "AA") -> str | None:
        """The ACK text with MSA-1 ``ack_code``, or None to send nothing."""
        return None

    def err(self, failure: Failure) -> str | None:
        """The answer when ``handleMessage`` fails: ``self.ack("AR")``, as in txHL7.

        This base container's ``ack`` gives None, so it answers nothing;
        :class:`HL7MessageContainer` answers an AR. hl7bridge has already
        logged ``failure`` once; override to answer differently.
        """
        return self.ack(ack_code="AR")


class HL7MessageContainer(MessageContainer):
    """A message parsed into an ``hl7.Message`` the first time ``.message`` is used.

    Its ACK is built from the MSH segment alone, the same text
    ``self.message.create_ack(code)`` would give (MSH-7 and MSH-10 aside), so a
    receiver that only acknowledges never pays for a full parse.
    """

    def __init__(self, raw_message: str) -> None:
        super().__init__(raw_message)
        self._message: hl7.Message | None = None
        self._header: Header | None = None

    @property
    def message(self) -> hl7.Message:
        """The message as ``hl7.parse`` gives it, parsed once, on first use.

        :func:`hl7bridge.parse.parse` builds it: the same tree, several times
        faster.
        """
        if self._message is None:
            self._message = parse(self.raw_message)
        return self._message

    @message.setter
    def message(self, value: hl7.Message) -> None:
        self._message = value

    @property
    def header(self) -> Header | None:
        """The message's MSH segment split into fields, or None if it has none."""
        if self._header is None:
            self._header = read_header(self.raw_message)
        return self._header

    def ack(self, ack_code: str = "AA") -> str:
        """The ACK for this message with MSA-1 ``ack_code``.

        Raises:
            ValueError: the message has no MSH segment.
        """
        header = self.header
        if header is None:
            raise ValueError("the message has no MSH segment to acknowledge")
        return build_ack(header, ack_code)

    def err(self, failure: Failure) -> str | None:
        """The answer when ``handleMessage`` fails: an AR with a reason and an ERR segment.

        hl7bridge has already logged ``failure`` once. The answer never carries
        the exception's text, which may quote patient data.
        """
        header = self.header
        if header is None:
            raise ValueError("the message has no MSH segment to acknowledge")
        return build_nak(header, HANDLER_FAILED)


class IHL7Receiver(Interface):
    """What an MLLP listener needs from a receiver (txHL7's interface)."""

    def parseMessage(raw_message):  # noqa: N802,N805
        """Turn the decoded text of one message into a :class:`MessageContainer`."""

    def handleMessage(message_container):  # noqa: N802,N805
        """Act on a message; return the ACK text, a Deferred or a coroutine of it, or None.

        Blocking work belongs in a thread (``deferToThread``) or an executor:
        the listener serves every connection on one loop.
        """

    def getCodec():  # type: ignore[misc]  # noqa: N802
        """The codec name, or ``(name, errors)``, to decode and encode messages; None for UTF-8."""

    def getTimeout():  # type: ignore[misc]  # noqa: N802
        """Seconds of idleness after which a connection is closed; None for never."""


@implementer(IHL7Receiver)
class AbstractReceiver:
    """Base class for receivers; subclasses write ``handleMessage``."""

    message_cls: type[MessageContainer] = MessageContainer

    def parseMessage(self, raw_message: str) -> MessageContainer:  # noqa: N802
        return self.message_cls(raw_message)

    def getCodec(self) -> Any:  # noqa: N802
        return None, None

    def getTimeout(self) -> float | None:  # noqa: N802
        return None


class AbstractHL7Receiver(AbstractReceiver):
    """Base class for receivers of HL7 v2 messages (:class:`HL7MessageContainer`)."""

    message_cls = HL7MessageContainer


class LoggingReceiver(AbstractHL7Receiver):
    """Acknowledges every message with AA and logs its type and control id.

    Unlike txHL7's, it never logs the message itself: HL7 carries patient data.
    """

    def handleMessage(self, message_container: MessageContainer) -> defer.Deferred[str | None]:  # noqa: N802
        header = read_header(message_container.raw_message)
        if header is not None:
            log.info("received %s control id %s", header.message_type, header.control_id)
        return defer.succeed(message_container.ack())


def check_receiver(receiver: Any) -> Any:
    """Return ``receiver`` if it has the four IHL7Receiver methods.

    Receivers declared against hl7bridge's interface, txHL7's, or none at all are
    accepted alike: what matters is the methods.

    Raises:
        NotAReceiver: a method is missing or not callable.
    """
    missing = [name for name in RECEIVER_METHODS if not callable(getattr(receiver, name, None))]
    if missing:
        raise NotAReceiver(f"{receiver!r} is not an IHL7Receiver: it lacks {', '.join(missing)}")
    return receiver


def codec_of(receiver: Any) -> tuple[str | None, str]:
    """The ``(encoding, errors)`` pair a receiver's ``getCodec()`` asks for, txHL7's way.

    ``getCodec()`` may give a name, a ``(name, errors)`` pair, or None in either
    place. The encoding stays None when the receiver names none: the listener
    then uses UTF-8, as txHL7 did, or MSH-18 if told to follow it.

    Raises:
        LookupError: the codec or error handler does not exist (found at start-up,
            not on the first message).
    """
    codec = receiver.getCodec()
    errors = None
    if isinstance(codec, tuple):
        codec, errors = codec
    errors = errors or DEFAULT_ERRORS
    if codec:
        codecs.lookup(codec)
    codecs.lookup_error(errors)
    return codec or None, errors


def message_parser(receiver: Any) -> Callable[[str], Any]:
    """What turns a message's text into the container ``receiver.handleMessage`` takes.

    That is ``receiver.parseMessage``, except for a receiver that keeps txHL7's
    own ``AbstractReceiver.parseMessage`` with txHL7's ``HL7MessageContainer``
    (or a subclass that leaves its ``__init__`` alone): txHL7 builds that
    container with ``hl7.parse``, and hl7bridge builds the same container, with
    the same attributes and the same tree, with :func:`hl7bridge.parse.parse`,
    several times faster. A receiver that overrides either gets its own.
    """
    txhl7 = sys.modules.get("txHL7.receiver")
    if txhl7 is None:
        return receiver.parseMessage
    container_class = getattr(receiver, "message_cls", None)
    parse_message = getattr(type(receiver), "parseMessage", None)
    if (
        parse_message is not txhl7.AbstractReceiver.parseMessage
        or not isinstance(container_class, type)
        or not issubclass(container_class, txhl7.HL7MessageContainer)
        or getattr(container_class, "__init__", None) is not txhl7.HL7MessageContainer.__init__
        or getattr(container_class, "__slots__", None) is not None
    ):
        return receiver.parseMessage

    def build(raw_message: str) -> Any:
        container: Any = object.__new__(container_class)
        container.raw_message = raw_message  # as txHL7's MessageContainer.__init__ sets it
        container.message = parse(raw_message)  # as its HL7MessageContainer.__init__, faster
        return container

    return build
