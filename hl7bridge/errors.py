"""The one family of errors hl7bridge raises.

``RemoteError`` and its subclasses mean the peer sent something wrong; they are
answered on the wire (a NAK where an MSH can be read, else a logged close) and
never stop a listener. ``LocalError`` and its subclasses mean hl7bridge was used
wrongly in this process (wrong reactor, a receiver that is not one); they are
raised to the caller with a message that says what to do.
"""

from __future__ import annotations


class HL7BridgeError(Exception):
    """Base class of every error hl7bridge raises."""


class RemoteError(HL7BridgeError):
    """The peer sent bytes hl7bridge cannot accept."""


class LocalError(HL7BridgeError):
    """hl7bridge was used in a way that cannot work."""


class WrongReactor(LocalError):
    """The installed Twisted reactor is not the asyncio reactor hl7bridge needs."""


class NotAReceiver(LocalError, TypeError):
    """An object given as a receiver lacks the IHL7Receiver methods."""


class MissingExtra(LocalError, ImportError):
    """An optional feature was asked for, but its extra is not installed."""

    def __init__(self, feature: str, extra: str) -> None:
        super().__init__(f"{feature} needs an optional dependency: pip install 'hl7bridge[{extra}]'")
        self.extra = extra
