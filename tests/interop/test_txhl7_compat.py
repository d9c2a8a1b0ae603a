"""A receiver written for txHL7 answers the same through txHL7 and through both hl7bridge faces."""

from __future__ import annotations

import asyncio
from typing import Any

import hl7
import pytest
import txHL7.receiver
from twisted.internet import reactor
from txHL7.mllp import MLLPFactory as TxHL7Factory
from zope.interface import implementer

from hl7bridge.defer import to_future
from hl7bridge.testing import asyncio_test
from tests.legacy.cp1252_receiver import EXPECTED_SURNAME, Cp1252Receiver
from tests.support import BACKLOG, FACES, HOST, Peer, frame, listening, message, msa, without_time_and_id

# Non-ASCII in the patient name (checked by the receiver) and in the
# receiving facility (copied into the ACK's MSH-4, so the ACK's encoding shows).
MESSAGES = [
    message("CP0001", body=f"PID|1||4711||{EXPECTED_SURNAME}^Zo\u00eb\r").replace("RECVFAC", "Klinik G\u00f6rlitz"),
    message("CP0002", "A08", body="PID|1||4712||Someone^Else\r"),
    message("CP0003", "A03", body=f"PID|1||4713||{EXPECTED_SURNAME}^\u00c9lo\u00efse\r"),
]


async def answers(port: int) -> list[bytes]:
    peer = await Peer.connect(port)
    replies = []
    for text in MESSAGES:
        # One at a time: txHL7 does not keep ACKs in order.
        await peer.send(frame(text.encode("cp1252")))
        replies.append(await peer.reply())
    await peer.close()
    return replies


async def txhl7_answers(receiver: Any) -> list[bytes]:
    port = reactor.listenTCP(0, TxHL7Factory(receiver), backlog=BACKLOG, interface=HOST)
    try:
        return await answers(port.getHost().port)
    finally:
        await to_future(port.stopListening(), asyncio.get_running_loop())


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_legacy_cp1252_receiver_acks_match_txhl7(face: str) -> None:
    reference = await txhl7_answers(Cp1252Receiver())
    async with listening(face, Cp1252Receiver()) as port:
        ours = await answers(port)
    assert [msa(r.decode("cp1252"))[1] for r in ours] == ["AA", "AE", "AA"]
    assert "Klinik G\u00f6rlitz".encode("cp1252") in ours[0]
    assert [without_time_and_id(r.decode("cp1252")) for r in ours] == [
        without_time_and_id(r.decode("cp1252")) for r in reference
    ]


@implementer(txHL7.receiver.IHL7Receiver)
class DeclaredOnly:
    """Declares txHL7's interface without its base classes; txHL7's container, latin-1, a plain answer."""

    def parseMessage(self, raw_message: str) -> Any:  # noqa: N802
        return txHL7.receiver.HL7MessageContainer(raw_message)

    def handleMessage(self, message_container: Any) -> Any:  # noqa: N802
        if str(message_container.message.segment("MSH")(10)) == "FAIL":
            raise RuntimeError("receiver bug")
        return message_container.ack()

    def getCodec(self) -> Any:  # noqa: N802
        return "latin-1", "strict"

    def getTimeout(self) -> Any:  # noqa: N802
        return None


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_receiver_declaring_txhl7_interface_only_is_served_as_txhl7_serves_it(face: str) -> None:
    async def answers_to(port: int) -> list[bytes]:
        peer = await Peer.connect(port)
        replies = []
        for text in MESSAGES:
            await peer.send(frame(text.encode("latin-1")))
            replies.append(await peer.reply())
        await peer.close()
        return replies

    txhl7_port = reactor.listenTCP(0, TxHL7Factory(DeclaredOnly()), backlog=BACKLOG, interface=HOST)
    try:
        reference = await answers_to(txhl7_port.getHost().port)
    finally:
        await to_future(txhl7_port.stopListening(), asyncio.get_running_loop())
    async with listening(face, DeclaredOnly()) as port:
        ours = await answers_to(port)
        # A failure goes to the txHL7 container's own err(): a plain AR.
        peer = await Peer.connect(port)
        await peer.send(frame(message("FAIL").encode()))
        failed = (await peer.reply()).decode("latin-1")
        await peer.close()
    assert "Klinik G\u00f6rlitz".encode("latin-1") in ours[0]
    assert [without_time_and_id(r.decode("latin-1")) for r in ours] == [
        without_time_and_id(r.decode("latin-1")) for r in reference
    ]
    assert msa(failed)[1:3] == ["AR", "FAIL"] and "ERR" not in failed


def test_unchanged_txhl7_receivers_get_the_very_containers_txhl7_builds_only_faster() -> None:
    """The same class, the same attributes, the same python-hl7 tree; overridden parts are left alone."""
    from hl7bridge.receiver import message_parser
    from tests.test_parse import assert_same_tree

    receiver = Cp1252Receiver()
    fast = message_parser(receiver)
    assert fast != receiver.parseMessage  # the faster path was taken
    texts = [text for text in MESSAGES] + [text for _, text in corpus_messages_or_none()]
    for text in texts:
        theirs, ours = receiver.parseMessage(text), fast(text)
        assert type(ours) is type(theirs) and set(vars(ours)) == set(vars(theirs)) == {"raw_message", "message"}
        assert ours.raw_message == theirs.raw_message
        assert_same_tree(ours.message, theirs.message)

    class OwnInit(txHL7.receiver.HL7MessageContainer):
        def __init__(self, raw_message: str) -> None:
            super().__init__(raw_message)
            self.seen = True

    class OwnParse(txHL7.receiver.AbstractHL7Receiver):
        def parseMessage(self, raw_message: str) -> Any:  # noqa: N802
            return super().parseMessage(raw_message)

    own_init = txHL7.receiver.AbstractHL7Receiver()
    own_init.message_cls = OwnInit
    for kept in (own_init, OwnParse(), txHL7.receiver.AbstractReceiver()):
        assert message_parser(kept) == kept.parseMessage


def corpus_messages_or_none() -> list[tuple[str, str]]:
    """The corpus messages python-hl7 parses (none without the corpus)."""
    from tests.support import corpus_messages

    try:
        found = corpus_messages()
    except pytest.skip.Exception:
        return []
    parsed = []
    for name, text in found:
        try:
            hl7.parse(text)
        except Exception:
            continue
        parsed.append((name, text))
    return parsed
