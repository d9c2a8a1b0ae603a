"""A whole cut-over rehearsed: txHL7 receiver, shadow, switch, then no Twisted in the handler."""

from __future__ import annotations

import pytest

from hl7bridge.migration import Route, Router
from hl7bridge.testing import asyncio_test
from tests.handlers import admissions
from tests.legacy.adt_receiver import ADTReceiver
from tests.support import CORPUS, Peer, frame, listening, message, without_time_and_id
from tests.test_handlers import HANDLER_FILE, imported_modules


def admissions_messages() -> list[str]:
    """ADT^A01 messages: our own (with and without a patient id) and the corpus's, if present."""
    own = [message(f"CUT{n}") for n in range(5)] + [message("CUTNOID", body="PID|1||||DOE^JANE\r")]
    folder = CORPUS / "cdc-trusted-intermediary"
    corpus = []
    if folder.is_dir():
        for path in sorted(folder.glob("*.hl7")):
            text = path.read_text(encoding="utf-8").replace("\r\n", "\r").replace("\n", "\r")
            if "|ADT^A01" in text.split("\r")[0]:
                corpus.append(text)
    return own + corpus


async def answers(face: str, receiver: object, texts: list[str]) -> list[str]:
    async with listening(face, receiver) as port:
        peer = await Peer.connect(port)
        replies = []
        for text in texts:
            await peer.send(frame(text.encode()))
            replies.append(without_time_and_id((await peer.reply()).decode()))
        await peer.close()
    return replies


@pytest.mark.parametrize("face", ["twisted", "asyncio"])
@asyncio_test
async def test_cut_over_admissions_from_txhl7_receiver_to_async_handler(face: str) -> None:
    texts = admissions_messages()
    other = message("CUTOTHER", "A08")

    # Stage 1: the txHL7 receiver, unchanged, on hl7bridge.
    before = await answers(face, ADTReceiver(), [*texts, other])
    assert "MSA|AE|CUTNOID" in before[5]

    # Stage 3: the new handler shadows ADT^A01; the sender still gets the legacy ACKs.
    shadowed = Router([Route("ADT^A01", ADTReceiver(), shadow=admissions.handle)], default=ADTReceiver())
    assert await answers(face, shadowed, [*texts, other]) == before
    await shadowed.wait_for_shadows()
    assert shadowed.report.as_dict() == {"ADT^A01": {"agreed": len(texts), "differed": 0, "failed": 0}}

    # Stage 4: ADT^A01 switched to the handler; every other type stays on the legacy receiver.
    admissions.SEEN.clear()
    switched = Router([Route("ADT^A01", admissions.handle)], default=ADTReceiver())
    assert await answers(face, switched, [*texts, other]) == before
    assert len(admissions.SEEN) == len(texts)

    # Stage 6: the handler needs nothing of Twisted (run without it in test_handlers).
    assert imported_modules(HANDLER_FILE) <= {"asyncio", "hl7"}
