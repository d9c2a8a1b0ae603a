"""Fuzzing the framing and dispatch path: random streams against live listeners.

Thousands of streams built from MLLP's special bytes, pieces of MSH segments,
whole messages and random bytes go to a listener of each face. Whatever comes
in, no exception escapes (nothing reaches the loop's exception handler or
Twisted's log as an error), every reply is a well-framed ACK of a message that
was sent, and the listener keeps serving.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hl7bridge.framing import Deframer, Frame
from hl7bridge.testing import asyncio_test
from tests.cases import CR, FS, M1, M2, VT
from tests.support import FACES, Peer, Unhandled, control_id, frame, listening, message, msa
from tests.test_session import Recording

PIECES = st.one_of(
    st.sampled_from([VT, FS, CR, b"\n", VT + FS, FS + CR, M1, M2, b"MSH|", b"MSH|^~\\&|", b"|ADT^A01|", b"\xff\xfe"]),
    st.binary(max_size=24),
    st.builds(lambda n: message(f"FZ{n}").encode(), st.integers(0, 999)),
)
STREAMS = st.lists(PIECES, max_size=12).map(b"".join)


class Listeners:
    """One listener per face for the whole module, and the errors nobody handled while fuzzing."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.unhandled = Unhandled()

    @property
    def errors(self) -> list[Any]:
        return self.unhandled.errors

    async def start(self) -> None:
        self.unhandled.start()
        self._contexts = [listening(face, Recording(), max_message_size=4096, frame_timeout=2) for face in FACES]
        for face, context in zip(FACES, self._contexts, strict=True):
            self.ports[face] = await context.__aenter__()

    async def stop(self) -> None:
        for context in self._contexts:
            await context.__aexit__(None, None, None)
        self.unhandled.collect()
        self.unhandled.stop()


@pytest.fixture(scope="module")
def listeners() -> Iterator[Listeners]:
    found = Listeners()
    pytest_twisted.blockon(asyncio_test(found.start)())
    yield found
    pytest_twisted.blockon(asyncio_test(found.stop)())
    assert found.errors == []


def expected_ids(stream: bytes) -> list[str]:
    """MSH-10 of each complete block (split by the pure deframer) that has an MSH to answer."""
    ids = []
    for event in Deframer(max_message_size=4096).feed(stream):
        if isinstance(event, Frame):
            try:
                text = event.data.decode("utf-8")
            except UnicodeDecodeError:
                text = event.data.decode("latin-1")  # answered with an AR all the same
            start = text.lstrip()
            if start.startswith("MSH") and len(start) > 3 and start[3] not in "\r\n":
                ids.append(control_id(text))
            elif start.startswith(("FHS", "BHS")) and re.search("[\r\n]MSH[^\r\n]", start):
                ids.append(control_id(text))  # a batch: answered for its first message
    return ids


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=STREAMS)
def test_random_streams_never_break_a_listener(listeners: Listeners, stream: bytes) -> None:
    async def check() -> None:
        for face in FACES:
            peer = await Peer.connect(listeners.ports[face])
            await peer.send(stream)
            peer.writer.write_eof()
            data = await asyncio.wait_for(peer.reader.read(), 10)
            await peer.close()
            replies = data.split(FS + CR)
            assert replies[-1] == b"", f"{face}: unframed bytes in the reply {data!r}"
            answered = []
            for reply in replies[:-1]:
                assert reply.startswith(VT), (face, data)
                answered.append(msa(reply[1:].decode("utf-8", "replace"))[2])
            # Exactly one answer per message with an MSH, in order; one the
            # receiver could not decode gets its (negative) answer too.
            assert answered == expected_ids(stream), (face, stream)
        assert listeners.errors == []

    return asyncio_test(check)()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_listeners_still_serve_after_fuzzing(listeners: Listeners, face: str) -> None:
    peer = await Peer.connect(listeners.ports[face])
    await peer.send(frame(message("ALIVE").encode()))
    assert msa((await peer.reply()).decode())[1:3] == ["AA", "ALIVE"]
    await peer.close()
