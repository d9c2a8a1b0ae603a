"""Clients hl7bridge did not write, on the shared corpus, against both faces."""

from __future__ import annotations

import asyncio

import hl7
import pytest
from hl7.client import MLLPClient
from hl7.mllp import open_hl7_connection

from hl7bridge.receiver import AbstractHL7Receiver
from hl7bridge.testing import asyncio_test
from tests.support import FACES, HOST, control_id, corpus_messages, listening, msa, msh_complete


class AckAll(AbstractHL7Receiver):
    def handleMessage(self, container):  # noqa: N802
        return container.ack()


def sendable() -> list[tuple[str, str]]:
    """Every corpus file with a control id: a batch (FHS...) is answered for its first message, as txHL7 did.

    A message without MSH-10 gets no answer (an ACK would carry an empty MSA-2);
    these clients would wait for one forever.
    """
    return [(name, text) for name, text in corpus_messages() if control_id(text)]


def expected_code(text: str) -> str:
    """AA, or AR where the MSH lacks a required field (MSH-2 or MSH-9 here)."""
    return "AA" if msh_complete(text) else "AR"


def ack_ids(ack_text: str) -> tuple[str, str]:
    """MSA-1 and MSA-2 read by python-hl7, not by hl7bridge."""
    parsed = hl7.parse(ack_text)
    return str(parsed.segment("MSA")(1)), str(parsed.segment("MSA")(2))


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_python_hl7_mllpclient_on_the_corpus(face: str) -> None:
    messages = sendable()
    assert len(messages) > 80

    def send_all(port: int) -> list[str]:
        with MLLPClient(HOST, port) as client:
            return [client.send_message(text).decode("utf-8") for _, text in messages]

    async with listening(face, AckAll()) as port:
        raw_acks = await asyncio.get_running_loop().run_in_executor(None, send_all, port)
    for (name, text), raw in zip(messages, raw_acks, strict=True):
        assert raw.startswith("\x0b") and raw.endswith("\x1c\r"), name
        assert ack_ids(raw[1:-2]) == (expected_code(text), control_id(text)), name


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_hl7_mllp_open_hl7_connection_on_the_corpus(face: str) -> None:
    messages = sendable()
    async with listening(face, AckAll()) as port:
        reader, writer = await open_hl7_connection(HOST, port, encoding="utf-8")
        try:
            for name, text in messages:
                writer.writeblock(text.encode("utf-8"))
                await writer.drain()
                ack = await asyncio.wait_for(reader.readmessage(), 10)
                assert str(ack.segment("MSA")(2)) == control_id(text), name
                assert msa(str(ack))[1] == expected_code(text), name
        finally:
            writer.close()
            await writer.wait_closed()
