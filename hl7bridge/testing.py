"""A pytest plugin for mixed reactor tests: hl7bridge listeners on a free port.

Installed with hl7bridge (entry point ``pytest11``); it needs pytest-twisted
and the asyncio reactor (``pytest --reactor=asyncio``). Write tests as
``async def`` under :func:`asyncio_test`, and start listeners from the
``hl7bridge_listener`` fixture, which gives a sender for each listener::

    from hl7bridge.testing import asyncio_test

    @asyncio_test
    async def test_admissions_are_acknowledged(hl7bridge_listener):
        listener = await hl7bridge_listener.start(AdmissionsReceiver(), face="twisted")
        ack = await listener.send(ADMISSION)
        assert "MSA|AA|" in ack

Every listener started is shut down gracefully when the test ends.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from hl7bridge.client import Sender
from hl7bridge.defer import to_deferred, to_future
from hl7bridge.reactor import event_loop

FACES = ("asyncio", "twisted")
HOST = "127.0.0.1"


def asyncio_test(test: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run an ``async def`` test as an asyncio task on the reactor's loop.

    pytest-twisted would drive a coroutine with ``ensureDeferred``, which
    cannot await asyncio futures; a Deferred over a task can. The test may
    await both asyncio code and Deferreds (``await d.asFuture(loop)``).
    """

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        return to_deferred(test(*args, **kwargs), event_loop())

    return run


class Listener:
    """A listener started by the ``hl7bridge_listener`` fixture."""

    def __init__(self, face: str, port: int, stop: Callable[[], Awaitable[None]]) -> None:
        self.face = face
        self.host = HOST
        self.port = port
        self._stop = stop
        self._senders: list[Sender] = []

    def sender(self, **options: Any) -> Sender:
        """A :class:`hl7bridge.Sender` for this listener (closed when the listener stops).

        Unlike :meth:`send`, it keeps its connection, checks each ACK and raises
        ``NegativeAck``, ``AckMismatch`` or ``AckTimeout``; ``options`` are those of ``Sender``.
        """
        sender = Sender(self.host, self.port, **options)
        self._senders.append(sender)
        return sender

    async def send(self, message: str | bytes, *, encoding: str = "utf-8", timeout: float = 10) -> str:
        """Send one message on a new connection; return the ACK's text."""
        from hl7.mllp import open_hl7_connection

        reader, writer = await open_hl7_connection(self.host, self.port)
        try:
            writer.writeblock(message.encode(encoding) if isinstance(message, str) else message)
            await writer.drain()
            return (await asyncio.wait_for(reader.readblock(), timeout)).decode(encoding)
        finally:
            writer.close()
            await writer.wait_closed()

    async def stop(self) -> None:
        """Stop gracefully: senders closed, no new connections, messages in flight answered."""
        for sender in self._senders:
            await sender.close()
        await self._stop()


class ListenerKit:
    """What the ``hl7bridge_listener`` fixture gives: ``await kit.start(target, face=...)``."""

    def __init__(self) -> None:
        self.started: list[Listener] = []

    async def start(self, target: Any, face: str = "asyncio", **options: Any) -> Listener:
        """Serve ``target`` (receiver or handler) on 127.0.0.1, a free port, with one face."""
        if face == "asyncio":
            import hl7bridge

            server = await hl7bridge.serve(target, HOST, 0, **options)
            listener = Listener(face, server.sockets[0].getsockname()[1], lambda: hl7bridge.shutdown(server))
        elif face == "twisted":
            from twisted.internet import reactor

            from hl7bridge.mllp import MLLPFactory

            factory = MLLPFactory(target, **options)
            tcp: Any = reactor  # its interfaces are declared with zope, which mypy cannot follow
            port = tcp.listenTCP(0, factory, interface=HOST)

            async def stop() -> None:
                loop = asyncio.get_running_loop()
                await to_future(port.stopListening(), loop)
                await to_future(factory.drain(), loop)

            listener = Listener(face, port.getHost().port, stop)
        else:
            raise ValueError(f"face must be one of {FACES}, not {face!r}")
        self.started.append(listener)
        return listener


@pytest.fixture
def hl7bridge_listener() -> Iterator[ListenerKit]:
    """Start hl7bridge listeners in a test; they are stopped when it ends."""
    import pytest_twisted

    kit = ListenerKit()
    yield kit
    for listener in kit.started:
        pytest_twisted.blockon(to_deferred(listener.stop(), event_loop()))
