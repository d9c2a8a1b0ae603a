"""A receiver written for txHL7 answers the same through txHL7 and through both hl7bridge faces."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from twisted.internet import reactor
from txHL7.mllp import MLLPFactory as TxHL7Factory

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
