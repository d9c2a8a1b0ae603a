"""hl7bridge: run txHL7 receivers on python-hl7's ``hl7.mllp`` under Twisted's asyncio reactor.

Importing hl7bridge never installs a Twisted reactor: call
:func:`hl7bridge.reactor.install` (or run ``twistd --reactor asyncio``) first.
"""

from hl7bridge.client import DeferredSender, Sender
from hl7bridge.errors import (
    AckMismatch,
    AckTimeout,
    ConnectTimeout,
    HL7BridgeError,
    LocalError,
    MissingExtra,
    NegativeAck,
    NotAReceiver,
    ReceiverNotLoaded,
    RemoteError,
    WrongReactor,
)
from hl7bridge.handlers import HandlerReceiver, as_receiver
from hl7bridge.server import serve, shutdown, stream_callback
from hl7bridge.session import Settings

__version__ = "0.1.0"

__all__ = [
    "AckMismatch",
    "AckTimeout",
    "ConnectTimeout",
    "DeferredSender",
    "HL7BridgeError",
    "HandlerReceiver",
    "LocalError",
    "MissingExtra",
    "NegativeAck",
    "NotAReceiver",
    "ReceiverNotLoaded",
    "RemoteError",
    "Sender",
    "Settings",
    "WrongReactor",
    "as_receiver",
    "serve",
    "shutdown",
    "stream_callback",
]
