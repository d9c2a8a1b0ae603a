"""Routing messages by type (and sender) to legacy receivers or new handlers.

A :class:`Router` is an ``IHL7Receiver``: serve it with ``hl7bridge.serve``,
``MLLPFactory``, ``hl7bridge serve --receiver`` or ``twistd hl7bridge``. Its
routes are plain Python, declared in one place::

    router = Router(
        [
            Route("ADT^A01", new_admit, shadow=None),
            Route("ADT^*", LegacyADTReceiver()),
            Route("ORU^R01", LegacyResults(), shadow=new_results, sending_application="LAB"),
        ],
        default=LegacyEverythingElse(),
    )

The first route that matches wins. A message that matches none (and with no
default) gets an AR with ERR 200, "Unsupported message type". The receiver a
message is routed to parses it with its own ``parseMessage``, once.

A route with a ``shadow`` sends every message to the shadow too, after the
primary has it: the primary's ACK is what the sender gets, the shadow's is
compared with it (:func:`~hl7bridge.migration.shadow.compare_acks`) and counted
in :attr:`Router.report`, never sent. The shadow runs in a task of its own,
bounded by ``shadow_timeout``: a slow, hanging or failing shadow does not delay
or change the primary's answer.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from dataclasses import dataclass
from typing import Any

from twisted.python.failure import Failure

from hl7bridge.ack import Header, Rejection, build_nak
from hl7bridge.defer import settle
from hl7bridge.handlers import as_receiver
from hl7bridge.migration.shadow import AGREED, DIFFERED, FAILED, ShadowReport, compare_acks
from hl7bridge.receiver import HL7MessageContainer, MessageContainer, codec_of, message_parser

log = logging.getLogger("hl7bridge.migration")

NO_ROUTE = Rejection("AR", "no route for this message type", "200", "Unsupported message type")


@dataclass(frozen=True)
class Route:
    """Where messages of a type go.

    Args:
        message_type: MSH-9 as ``"ADT^A01"``; ``*`` and ``?`` are wildcards
            (``"ADT^*"``, ``"*"``). A type without trigger event matches ``"ADT"``.
        target: a receiver (``IHL7Receiver``) or a handler (``async def``).
        shadow: a receiver or handler that sees the same messages and whose
            ACK is compared with the target's, never sent.
        sending_application: if given, MSH-3 (its first component) must match it.
        sending_facility: if given, MSH-4 (its first component) must match it.
    """

    message_type: str
    target: Any
    shadow: Any = None
    sending_application: str | None = None
    sending_facility: str | None = None

    def matches(self, header: Header) -> bool:
        """Whether a message with this MSH goes this way."""
        return (
            fnmatch.fnmatchcase(header.message_type, self.message_type)
            and _matches(self.sending_application, header.component(3, 1))
            and _matches(self.sending_facility, header.component(4, 1))
        )


def _matches(pattern: str | None, value: str) -> bool:
    return pattern is None or fnmatch.fnmatchcase(value, pattern)


class RoutedContainer(MessageContainer):
    """A message on its way: the route it took and the container its receiver parsed."""

    def __init__(self, raw_message: str, header: Header | None, route: _Compiled | None, inner: Any) -> None:
        super().__init__(raw_message)
        self.header = header
        self.route = route
        self.inner = inner

    def ack(self, ack_code: str = "AA") -> str | None:
        return self.inner.ack(ack_code) if self.inner is not None else None

    def err(self, failure: Failure) -> str | None:
        # The receiver that failed decides its answer, as it did before routing.
        return self.inner.err(failure) if self.inner is not None else None


@dataclass(frozen=True)
class _Compiled:
    route: Route
    receiver: Any
    shadow: Any
    parse_message: Any  # the receiver's parseMessage, or its faster equal (receiver.message_parser)


class Router:
    """An ``IHL7Receiver`` that sends each message where its route says.

    Args:
        routes: tried in order; the first that matches wins.
        default: receiver or handler for messages no route matches; None to
            answer those with an AR.
        codec: the codec of the listener (``getCodec()``): one for all routes.
        timeout: idle timeout of the listener (``getTimeout()``).
        shadow_timeout: seconds a shadow may take before it counts as failed.
    """

    def __init__(
        self,
        routes: list[Route],
        default: Any = None,
        *,
        codec: Any = None,
        timeout: float | None = None,
        shadow_timeout: float = 5.0,
    ) -> None:
        self._routes = [_compile(route) for route in routes]
        self._default = None if default is None else _compile(Route("*", default))
        self.codec = codec
        codec_of(self)  # an unknown codec fails here, at start-up
        self.timeout = timeout
        self.shadow_timeout = shadow_timeout
        self.report = ShadowReport()
        self._shadows: set[asyncio.Task[None]] = set()

    def getCodec(self) -> Any:  # noqa: N802
        return self.codec

    def getTimeout(self) -> float | None:  # noqa: N802
        return self.timeout

    def route_for(self, header: Header | None) -> Route | None:
        """The route a message with this MSH takes, or None."""
        compiled = self._compiled_for(header)
        return compiled.route if compiled is not None else None

    def _compiled_for(self, header: Header | None) -> _Compiled | None:
        if header is not None:
            for compiled in self._routes:
                if compiled.route.matches(header):
                    return compiled
        return self._default

    def parseMessage(self, raw_message: str) -> RoutedContainer:  # noqa: N802
        header = HL7MessageContainer(raw_message).header
        compiled = self._compiled_for(header)
        inner = compiled.parse_message(raw_message) if compiled is not None else None
        return RoutedContainer(raw_message, header, compiled, inner)

    def handleMessage(self, container: RoutedContainer) -> Any:  # noqa: N802
        compiled, header = container.route, container.header
        if compiled is None:
            if header is None:
                return None
            log.warning("no route for %s (control id %s); AR sent", header.message_type, header.control_id)
            return build_nak(header, NO_ROUTE)
        result = compiled.receiver.handleMessage(container.inner)
        if compiled.shadow is None:
            return result
        return self._beside_shadow(result, container, compiled)

    async def _beside_shadow(self, result: Any, container: RoutedContainer, compiled: _Compiled) -> Any:
        loop = asyncio.get_running_loop()
        shadow = loop.create_task(self._shadow_answer(compiled.shadow, container.raw_message))
        try:
            primary = await settle(result, loop)
        except BaseException:
            shadow.cancel()
            raise
        comparison = loop.create_task(self._compare(container, primary, shadow))
        self._shadows.add(comparison)
        comparison.add_done_callback(self._shadows.discard)
        return primary

    async def _shadow_answer(self, shadow: Any, raw_message: str) -> str | None:
        loop = asyncio.get_running_loop()
        answer = shadow.handleMessage(shadow.parseMessage(raw_message))
        settled = await asyncio.wait_for(settle(answer, loop), self.shadow_timeout)
        return None if settled is None else _text(settled)

    async def _compare(self, container: RoutedContainer, primary: Any, shadow: asyncio.Task[str | None]) -> None:
        header = container.header
        kind = header.message_type if header is not None else "?"
        control_id = header.control_id if header is not None else "?"
        try:
            theirs = await shadow
        except Exception as exc:
            self.report.record(kind, FAILED)
            log.warning("shadow failed on %s (control id %s): %s", kind, control_id, type(exc).__name__)
            return
        differences = compare_acks(None if primary is None else _text(primary), theirs)
        self.report.record(kind, DIFFERED if differences else AGREED)
        if differences:
            log.warning("shadow differed on %s (control id %s): %s", kind, control_id, ", ".join(differences))

    async def wait_for_shadows(self) -> None:
        """Wait until every shadow started so far has been compared (for tests and shutdown)."""
        while self._shadows:
            await asyncio.wait(set(self._shadows))


def _compile(route: Route) -> _Compiled:
    shadow = None if route.shadow is None else as_receiver(route.shadow)
    target = as_receiver(route.target)
    return _Compiled(route, target, shadow, message_parser(target))


def _text(answer: Any) -> str:
    return answer.decode("utf-8", "replace") if isinstance(answer, bytes) else str(answer)
