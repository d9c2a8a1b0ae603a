"""New-style handlers on both faces, under plain hl7.mllp, and with no Twisted at all."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7.mllp import start_hl7_server

import hl7bridge
from hl7bridge.errors import NotAReceiver
from hl7bridge.handlers import HandlerReceiver, as_receiver
from hl7bridge.receiver import LoggingReceiver
from hl7bridge.testing import asyncio_test
from tests.handlers import admissions
from tests.legacy.adt_receiver import ADTReceiver
from tests.support import FACES, HOST, Peer, frame, message, msa
from tests.test_session import exchange

HANDLER_FILE = Path(admissions.__file__)


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_async_handler_on_both_faces(face: str) -> None:
    replies = await exchange(face, admissions.handle, frame(message("H1").encode()), 1)
    assert msa(replies[0].decode())[1:3] == ["AA", "H1"]
    assert "H1" in admissions.SEEN


async def as_text(message: hl7.Message) -> str:
    return str(message.create_ack("AE"))


def no_answer(message: hl7.Message) -> None:
    return None


async def broken(message: hl7.Message) -> hl7.Message:
    raise LookupError("no such ward")


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_handler_answers_text_none_or_failure(face: str) -> None:
    [reply] = await exchange(face, as_text, frame(message("T1").encode()), 1)
    assert msa(reply.decode())[1:3] == ["AE", "T1"]
    await exchange(face, no_answer, frame(message("N1").encode()), 0)
    [reply] = await exchange(face, broken, frame(message("B1").encode()), 1)
    assert msa(reply.decode())[1:4] == ["AR", "B1", "handler failed"]


@pytest.mark.parametrize("kind", ["handler", "txHL7 receiver"])
@asyncio_test
async def test_stream_callback_serves_on_a_plain_hl7_mllp_server(kind: str) -> None:
    target = admissions.handle if kind == "handler" else ADTReceiver()
    server = await start_hl7_server(hl7bridge.stream_callback(target), HOST, 0)
    try:
        peer = await Peer.connect(server.sockets[0].getsockname()[1])
        await peer.send(frame(message("S1").encode()) + frame(message("S2", body="PID|1||||DOE^JANE\r").encode()))
        replies = await peer.replies(2)
        assert [msa(reply.decode())[1:3] for reply in replies] == [["AA", "S1"], ["AE", "S2"]]
        await peer.close()
    finally:
        server.close()


def test_as_receiver_keeps_receivers_and_wraps_handlers() -> None:
    receiver = LoggingReceiver()
    assert as_receiver(receiver) is receiver
    wrapped = as_receiver(admissions.handle)
    assert isinstance(wrapped, HandlerReceiver) and wrapped.handler is admissions.handle
    assert wrapped.getCodec() is None and wrapped.getTimeout() is None
    with pytest.raises(NotAReceiver, match="neither an IHL7Receiver nor a handler"):
        as_receiver(42)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_handler_file_runs_with_twisted_gone() -> None:
    """Stage 6 of MIGRATION.md: the handler under plain hl7.mllp, with Twisted unimportable."""
    assert imported_modules(HANDLER_FILE) <= {"asyncio", "hl7"}
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.modules["twisted"] = None  # any Twisted import now fails
        sys.modules["hl7bridge"] = None
        sys.path.insert(0, {str(HANDLER_FILE.parent)!r})
        import hl7
        from hl7.mllp import open_hl7_connection, start_hl7_server
        from admissions import handle

        async def serve_one(reader, writer):
            try:
                while True:
                    message = await reader.readmessage()
                    writer.writemessage(await handle(message))
                    await writer.drain()
            except asyncio.IncompleteReadError:
                writer.close()

        async def main():
            server = await start_hl7_server(serve_one, "127.0.0.1", 0)
            reader, writer = await open_hl7_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            writer.writemessage(hl7.parse({message("NOTW1")!r}))
            ack = await reader.readmessage()
            print(ack.segment("MSA")(1), ack.segment("MSA")(2))
            writer.close()
            server.close()

        asyncio.run(main())
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["AA", "NOTW1"], result.stderr


def test_handler_module_is_picked_by_the_cli_path() -> None:
    from hl7bridge.tap import load_receiver

    target: Any = load_receiver("tests.handlers.admissions.handle")
    assert target is admissions.handle
    assert isinstance(as_receiver(target), HandlerReceiver)
