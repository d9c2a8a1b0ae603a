"""The asyncio face: serve a receiver with ``hl7.mllp.start_hl7_server``."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any

from hl7.mllp import HL7StreamReader, HL7StreamWriter, start_hl7_server

from hl7bridge.reactor import check_loop
from hl7bridge.session import Engine, Settings

# The engine of each server serve() started, for shutdown().
_engines: weakref.WeakKeyDictionary[asyncio.Server, Engine] = weakref.WeakKeyDictionary()


async def serve(target: Any, host: str | None = None, port: int | None = None, **options: Any) -> asyncio.Server:
    """Listen for MLLP on ``host``:``port`` and serve ``target`` on every connection.

    Args:
        target: an ``IHL7Receiver`` (hl7bridge's, txHL7's, or any object with
            its four methods) or a handler (``async def handle(message)``).
        host, port: where to listen, as for ``loop.create_server``.
        **options: the fields of :class:`hl7bridge.session.Settings`
            (``framing``, ``max_message_size``, the timeouts and limits);
            anything else goes to ``loop.create_server`` (``ssl``,
            ``backlog``, ``reuse_port``, ...). With ``journal``, the journal
            is opened before the server starts.

    Returns:
        The ``asyncio.Server``; :func:`shutdown` stops it gracefully.

    Raises:
        WrongReactor: a Twisted reactor is installed that does not run on this loop.
        Exception: the journal's database cannot be reached or used (what its driver raised).
    """
    check_loop(asyncio.get_running_loop())
    engine = Engine(target, Settings.take(options))
    await engine.open()
    server = await start_hl7_server(engine.connected, host, port, **options)
    _engines[server] = engine
    return server


def stream_callback(target: Any, **options: Any) -> Callable[[HL7StreamReader, HL7StreamWriter], None]:
    """A callback for ``hl7.mllp.start_hl7_server`` that serves ``target`` (receiver or handler).

    For code that starts its ``hl7.mllp`` servers itself: each connection is
    served as :func:`serve` would, with the settings given as ``options``.
    """
    return Engine(target, Settings(**options)).connected


def engine_of(server: asyncio.Server) -> Engine:
    """The engine of a listener :func:`serve` started: its ``metrics``, ``connections``, ``receiver``.

    Raises:
        KeyError: ``server`` was not started by :func:`serve`.
    """
    return _engines[server]


async def shutdown(server: asyncio.Server, drain_timeout: float | None = None) -> None:
    """Stop a listener from :func:`serve` gracefully.

    It stops accepting at once; connections stop reading, the messages in
    flight are handled and answered (for up to ``drain_timeout`` seconds, the
    listener's ``drain_timeout`` setting by default), then every connection
    is closed.
    """
    server.close()
    await _engines[server].close(drain_timeout)
    await server.wait_closed()
