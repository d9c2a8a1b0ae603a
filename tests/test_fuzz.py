"""Fuzzing the framing and dispatch path: random streams against live listeners.

``FUZZ_EXAMPLES`` streams built from MLLP's special bytes, pieces of MSH
segments, whole messages and random bytes go to a listener of each face, each
cut in two at a random point. Whatever comes in, no exception escapes (nothing
reaches the loop's exception handler or Twisted's log as an error), every reply
is a well-framed ACK of a message that was sent, and the listener keeps serving.

A property test sends valid messages cut at random points: the receiver gets
the same messages, and the sender the same ACKs in the same order.
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
from hl7bridge.receiver import MessageContainer
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

#: Streams tried on each face; the module's fixture checks that they all ran.
FUZZ_EXAMPLES = 2000

TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=20)
MESSAGES = st.builds(
    lambda number, trigger, name: message(f"PC{number}", trigger, body=f"PID|1||{number}||{name}\r"),
    st.integers(0, 10**6),
    st.sampled_from(["A01", "A04", "A08"]),
    TEXT,
)


class Shuffling(Recording):
    """Records each message and answers it after 0 to 3 turns of the loop, so answers finish out of order."""

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        self.received.append(container.raw_message)
        turns = sum(map(ord, control_id(container.raw_message))) % 4
        return self.later(container, turns) if turns else container.ack()

    async def later(self, container: MessageContainer, turns: int) -> str | None:
        for _ in range(turns):
            await asyncio.sleep(0)
        return container.ack()


class Listeners:
    """One listener per face for the whole module, and the errors nobody handled while fuzzing."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.receivers = {face: Shuffling() for face in FACES}
        self.unhandled = Unhandled()
        self.tried = 0

    @property
    def errors(self) -> list[Any]:
        return self.unhandled.errors

    async def start(self) -> None:
        self.unhandled.start()
        self._contexts = [
            listening(face, self.receivers[face], max_message_size=4096, frame_timeout=2) for face in FACES
        ]
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
    # Hypothesis ran every example it was asked for, unless the fuzz was not selected.
    assert found.tried in (0, FUZZ_EXAMPLES) or found.tried > FUZZ_EXAMPLES


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
                msh = start
            elif start.startswith(("FHS", "BHS")) and (inner := re.search("[\r\n]MSH[^\r\n]", start)):
                msh = start[inner.start() + 1 :]  # a batch: answered for its first message
            else:
                continue
            if identifies_itself(msh):
                ids.append(control_id(text))
    return ids


def identifies_itself(msh: str) -> bool:
    """Whether an ACK can name this message: sane separators (MSH-1, MSH-2) and an MSH-10."""
    segment = re.split("[\r\n]", msh, maxsplit=1)[0]
    separators = segment[3] + segment[4:].split(segment[3], 1)[0]
    sane = len(separators) <= 6 and len(set(separators)) == len(separators)
    sane = sane and not any(c.isalnum() or c.isspace() for c in separators)
    fields = segment.split(segment[3])
    return sane and len(fields) > 9 and bool(fields[9].strip())


async def send_in_pieces(peer: Peer, stream: bytes, cuts: list[int]) -> None:
    """Send ``stream`` cut at ``cuts`` (taken modulo its length), one piece per read of the listener.

    Listener and peer share the loop: after two turns of it, the listener has
    read the piece sent before (on loopback it arrives as it is sent).
    """
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    for start, end in zip([0, *points], [*points, len(stream)], strict=True):
        if start:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        await peer.send(stream[start:end])


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=STREAMS, cut=st.integers(0, 10**4))
def test_random_streams_never_break_a_listener(listeners: Listeners, stream: bytes, cut: int) -> None:
    async def check() -> None:
        listeners.tried += 1
        for face in FACES:
            peer = await Peer.connect(listeners.ports[face])
            await send_in_pieces(peer, stream, [cut])
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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(MESSAGES, min_size=1, max_size=6), cuts=st.lists(st.integers(0, 10**4), max_size=12))
def test_any_chunking_of_valid_frames_gives_the_same_messages_and_acks_in_order(
    listeners: Listeners, texts: list[str], cuts: list[int]
) -> None:
    stream = b"".join(frame(text.encode()) for text in texts)

    async def check() -> None:
        for face in FACES:
            receiver = listeners.receivers[face]
            receiver.received.clear()
            peer = await Peer.connect(listeners.ports[face])
            await send_in_pieces(peer, stream, cuts)
            peer.writer.write_eof()
            data = await asyncio.wait_for(peer.reader.read(), 10)
            await peer.close()
            assert data.startswith(VT) and data.endswith(FS + CR), face
            replies = [msa(reply.decode()) for reply in data[1:-2].split(FS + CR + VT)]
            assert receiver.received == texts, face
            assert [reply[1:3] for reply in replies] == [["AA", control_id(text)] for text in texts], face
        assert listeners.errors == []

    return asyncio_test(check)()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_listeners_still_serve_after_fuzzing(listeners: Listeners, face: str) -> None:
    peer = await Peer.connect(listeners.ports[face])
    await peer.send(frame(message("ALIVE").encode()))
    assert msa((await peer.reply()).decode())[1:3] == ["AA", "ALIVE"]
    await peer.close()
