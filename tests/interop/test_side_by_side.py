"""Both stacks in one process on one reactor: Twisted clients, asyncio clients, three listeners."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import hl7
from twisted.internet import defer, protocol, reactor
from txHL7.mllp import MLLPFactory as TxHL7Factory

from hl7bridge.defer import to_future
from hl7bridge.testing import asyncio_test
from tests.legacy.adt_receiver import ADTReceiver
from tests.support import (
    CR,
    FS,
    HOST,
    VT,
    Peer,
    corpus_messages,
    frame,
    listening,
    message,
    msa,
    msh_complete,
    without_time_and_id,
)
from tests.test_cli import ROOT


class TwistedSender(protocol.Protocol):
    """A Twisted MLLP client as txHL7-era code writes one: one message, one ACK."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.buffer = b""
        self.answered: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(VT + self.data + FS + CR)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.buffer += data
        if self.buffer.endswith(FS + CR):
            self.transport.loseConnection()
            self.answered.callback(self.buffer[1:-2])


async def twisted_send(port: int, data: bytes) -> bytes:
    sender = TwistedSender(data)
    await to_future(protocol.ClientCreator(reactor, lambda: sender).connectTCP(HOST, port), asyncio.get_running_loop())
    return await asyncio.wait_for(to_future(sender.answered, asyncio.get_running_loop()), 10)


@asyncio_test
async def test_twisted_client_to_asyncio_listener_and_asyncio_client_to_twisted_listener() -> None:
    async with listening("asyncio", ADTReceiver()) as asyncio_port, listening("twisted", ADTReceiver()) as twisted_port:
        from_twisted = await twisted_send(asyncio_port, message("TW1").encode())
        peer = await Peer.connect(twisted_port)
        await peer.send(frame(message("AS1").encode()))
        from_asyncio = await peer.reply()
        await peer.close()
    assert msa(from_twisted.decode())[1:3] == ["AA", "TW1"]
    assert msa(from_asyncio.decode())[1:3] == ["AA", "AS1"]


def acknowledgeable_by_python_hl7(text: str) -> bool:
    """Whether txHL7 can answer it at all: its ACKs come from python-hl7's create_ack.

    (An MSH without fields makes create_ack raise; txHL7 then sends nothing,
    where hl7bridge sends an ACK built from what the MSH has.)
    """
    try:
        hl7.parse(text).create_ack()
    except Exception:
        return False
    return True


@asyncio_test
async def test_same_receiver_file_on_txhl7_and_hl7bridge_answers_alike_on_the_corpus() -> None:
    # A message whose MSH lacks a required field gets an ordinary ACK from txHL7
    # (without MSH-10, one with an empty MSA-2) and, on purpose, an AR or nothing
    # from hl7bridge (tests/test_reliability.py checks those).
    messages = [text for _, text in corpus_messages() if acknowledgeable_by_python_hl7(text) and msh_complete(text)]
    assert len(messages) > 80
    txhl7_port = reactor.listenTCP(0, TxHL7Factory(ADTReceiver()), interface=HOST)
    try:
        async with listening("asyncio", ADTReceiver()) as bridged_port:
            for text in messages:
                theirs = await twisted_send(txhl7_port.getHost().port, text.encode())
                ours = await twisted_send(bridged_port, text.encode())
                assert without_time_and_id(ours.decode()) == without_time_and_id(theirs.decode()), text[:80]
    finally:
        await to_future(txhl7_port.stopListening(), asyncio.get_running_loop())


def test_side_by_side_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "side_by_side.py"), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in lines[1:4]] == ["txHL7", "hl7bridge", "hl7.mllp"]
    assert all(" AA for SBS-" in line for line in lines[1:4])
    assert lines[4] == "counts: {'hl7.mllp': 1, 'hl7bridge': 1, 'txHL7': 1}"
    assert "Traceback" not in result.stderr
