"""Stage 6: the interface on python-hl7's hl7.mllp alone: no Twisted, txHL7 or hl7bridge.

    cd examples/migration
    MLLP_HOST=127.0.0.1 MLLP_PORT=2575 python stage6.py

It prints "listening on HOST:PORT" once it listens (MLLP_PORT=0 picks a free port)
and serves until stopped. The serving loop is the one of MIGRATION.md, stage 6,
with the routing of stage5.py as a dict.
"""

import asyncio
import contextlib
import logging
import os

import hl7
from hl7.mllp import start_hl7_server

from myinterface.handlers import admissions, general
from myinterface.messages import message_type

log = logging.getLogger("myinterface")

HANDLERS = {("ADT", "A01"): admissions.handle}  # every other type: general.handle


def rejection(message: hl7.Message) -> hl7.Message | None:
    """A bare AR, as txHL7 answered a failure; None where python-hl7 cannot build one."""
    try:
        return message.create_ack("AR")
    except Exception:  # create_ack raises for an MSH-9 without a trigger event
        return None


async def serve_connection(reader, writer) -> None:
    """One sender: read a message, answer it, and again, until the sender closes."""
    peer = writer.get_extra_info("peername")
    try:
        while True:
            try:
                message = await reader.readmessage()
            except asyncio.IncompleteReadError:
                break  # the sender closed the connection
            except Exception as exc:  # bad framing, a block past the limit, bytes that do not decode or parse
                log.warning("closing the connection from %s: %s", peer, type(exc).__name__)
                break
            handle = HANDLERS.get(message_type(message), general.handle)
            try:
                answer = await handle(message)
            except Exception:
                log.exception("handler failed on a message from %s", peer)
                answer = rejection(message)
            if answer is not None:
                writer.writemessage(answer)
                await writer.drain()
    finally:
        writer.close()


async def main() -> None:
    host = os.environ.get("MLLP_HOST", "127.0.0.1")
    port = int(os.environ.get("MLLP_PORT", "2575"))
    server = await start_hl7_server(serve_connection, host, port, encoding="utf-8", limit=16 * 1024 * 1024)
    address = server.sockets[0].getsockname()
    print(f"listening on {address[0]}:{address[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends serving; no traceback for it
        asyncio.run(main())
