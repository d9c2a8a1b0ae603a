"""New-style handlers: ``async def handle(message: hl7.Message)``, served anywhere.

A handler is written against python-hl7 alone: it takes the parsed
``hl7.Message`` and returns the answer (an ``hl7.Message`` such as
``message.create_ack()``, its text, or None for no answer). It imports neither
Twisted nor hl7bridge, so the same file keeps working once Twisted is gone.

:func:`as_receiver` turns a handler into an ``IHL7Receiver`` (and leaves a
receiver as it is), so hl7bridge's listeners, the router and the shadow runner
take either kind.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import hl7

from hl7bridge.errors import NotAReceiver
from hl7bridge.receiver import RECEIVER_METHODS, AbstractHL7Receiver, HL7MessageContainer, check_receiver

Answer: TypeAlias = "hl7.Message | str | None"
Handler: TypeAlias = Callable[[hl7.Message], "Awaitable[Answer] | Answer"]


class HandlerReceiver(AbstractHL7Receiver):
    """An ``IHL7Receiver`` that passes each parsed message to a handler.

    Args:
        handler: ``async def handle(message: hl7.Message) -> hl7.Message | str | None``
            (a plain function works too).
        codec: what ``getCodec()`` gives: None for UTF-8 (or MSH-18 if followed).
        timeout: what ``getTimeout()`` gives: idle seconds, None for the listener's.
    """

    def __init__(self, handler: Handler, codec: Any = None, timeout: float | None = None) -> None:
        self.handler = handler
        self.codec = codec
        self.timeout = timeout

    def getCodec(self) -> Any:  # noqa: N802
        return self.codec

    def getTimeout(self) -> float | None:  # noqa: N802
        return self.timeout

    def handleMessage(self, message_container: HL7MessageContainer) -> Any:  # noqa: N802
        return self.handler(message_container.message)

    def __repr__(self) -> str:
        return f"HandlerReceiver({getattr(self.handler, '__qualname__', self.handler)!r})"


def as_receiver(target: Any) -> Any:
    """``target`` as an ``IHL7Receiver``: a receiver as it is, a handler wrapped.

    Raises:
        NotAReceiver: ``target`` is neither a receiver nor callable.
    """
    if all(hasattr(target, name) for name in RECEIVER_METHODS):
        return check_receiver(target)
    if callable(target):
        return HandlerReceiver(target)
    raise NotAReceiver(f"{target!r} is neither an IHL7Receiver nor a handler (a callable taking an hl7.Message)")
