"""The asyncio face: serve a receiver with ``hl7.mllp.start_hl7_server``."""

from __future__ import annotations

import asyncio
from typing import Any

from hl7.mllp import HL7StreamReader, HL7StreamWriter, start_hl7_server

from hl7bridge.reactor import check_loop
from hl7bridge.session import Engine, Settings


async def serve(receiver: Any, host: str | None = None, port: int | None = None, **options: Any) -> asyncio.Server:
    """Listen for MLLP on ``host``:``port`` and serve ``receiver`` on every connection.

    Args:
        receiver: an ``IHL7Receiver`` (hl7bridge's, txHL7's, or any object with
            its four methods).
        host, port: where to listen, as for ``loop.create_server``.
        **options: the fields of :class:`hl7bridge.session.Settings`
            (``framing``, ``max_message_size``, ``idle_timeout``,
            ``max_in_flight``); anything else goes to ``loop.create_server``
            (``ssl``, ``backlog``, ``reuse_port``, ...).

    Returns:
        The ``asyncio.Server``; close it and ``await server.wait_closed()`` to stop.

    Raises:
        WrongReactor: a Twisted reactor is installed that does not run on this loop.
    """
    loop = asyncio.get_running_loop()
    check_loop(loop)
    setting_names = Settings.__dataclass_fields__.keys()
    settings = Settings(**{name: options.pop(name) for name in list(options) if name in setting_names})
    engine = Engine(receiver, settings)

    def connected(reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        engine.start_connection(reader, writer, loop)

    return await start_hl7_server(connected, host, port, **options)
