"""The one family of errors hl7bridge raises.

``RemoteError`` and its subclasses mean the peer answered something a sender
cannot accept (a NAK, a wrong ACK, no ACK in time). A listener never raises
them: what a peer sends it wrongly is answered on the wire (a NAK where an MSH
can be read, else a logged close) and never stops it. ``LocalError`` and its subclasses mean hl7bridge was used
wrongly in this process (wrong reactor, a receiver that is not one); they are
raised to the caller with a message that says what to do.
"""

from __future__ import annotations


class HL7BridgeError(Exception):
    """Base class of every error hl7bridge raises."""


class RemoteError(HL7BridgeError):
    """The peer answered in a way hl7bridge cannot accept (raised to senders)."""


class ConnectTimeout(RemoteError, TimeoutError):
    """The listener did not take the connection (TCP, and TLS if used) in time."""


class AckTimeout(RemoteError, TimeoutError):
    """No whole ACK arrived in time."""


class NegativeAck(RemoteError):
    """The peer answered AE, AR, CE or CR.

    Attributes:
        code: MSA-1 of the answer.
        ack: the answer's text.
    """

    def __init__(self, code: str, ack: str) -> None:
        super().__init__(f"the peer answered {code or 'without an MSA-1'}")
        self.code = code
        self.ack = ack


class AckMismatch(RemoteError):
    """The ACK's MSA-2 does not name the message sent."""

    def __init__(self, expected: str, acknowledged: str, ack: str) -> None:
        super().__init__(f"the ACK is for control id {acknowledged!r}, not {expected!r}")
        self.expected = expected
        self.acknowledged = acknowledged
        self.ack = ack


class LocalError(HL7BridgeError):
    """hl7bridge was used in a way that cannot work."""


class WrongReactor(LocalError):
    """The installed Twisted reactor is not the asyncio reactor hl7bridge needs."""


class NotAReceiver(LocalError, TypeError):
    """An object given as a receiver lacks the IHL7Receiver methods."""


class ReceiverNotLoaded(LocalError, ImportError):
    """A receiver named by a dotted path could not be imported or created; the message says why and where."""


class MissingExtra(LocalError, ImportError):
    """An optional feature was asked for, but its extra is not installed."""

    def __init__(self, feature: str, extra: str) -> None:
        super().__init__(f"{feature} needs an optional dependency: pip install 'hl7bridge[{extra}]'")
        self.extra = extra
