"""The engine on both faces: txHL7's receiver behaviour, ordering, framing on the wire."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import hl7
import pytest
from twisted.internet import defer, reactor, threads

import hl7bridge
import hl7bridge.receiver
from hl7bridge.framing import FRAMING_MODES, LENIENT
from hl7bridge.receiver import AbstractHL7Receiver, AbstractReceiver, HL7MessageContainer, MessageContainer
from hl7bridge.testing import asyncio_test
from tests.cases import CASES, Case
from tests.legacy.ping_receiver import PingReceiver
from tests.support import FACES, FS, VT, Peer, control_id, frame, listening, message, msa


class Recording(AbstractHL7Receiver):
    """ACKs every message and remembers what it was given."""

    def __init__(self, codec: Any = None, timeout: float | None = None) -> None:
        self.codec = codec
        self.timeout = timeout
        self.received: list[str] = []

    def getCodec(self) -> Any:  # noqa: N802
        return self.codec

    def getTimeout(self) -> float | None:  # noqa: N802
        return self.timeout

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        self.received.append(container.raw_message)
        return container.ack()


def ids(replies: list[bytes]) -> list[str]:
    return [msa(reply.decode())[2] for reply in replies]


async def exchange(face: str, receiver: Any, data: bytes, count: int, **options: Any) -> list[bytes]:
    async with listening(face, receiver, **options) as port:
        peer = await Peer.connect(port)
        await peer.send(data)
        replies = await peer.replies(count)
        await peer.no_reply(0.1)
        await peer.close()
    return replies


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_ack_answers_the_message(face: str) -> None:
    receiver = Recording()
    text = message("ABC123")
    [reply] = await exchange(face, receiver, frame(text.encode()), 1)
    ack = reply.decode()
    assert ack.startswith("MSH|^~\\&|RECVAPP|RECVFAC|SENDAPP|SENDFAC|")
    assert msa(ack)[1:] == ["AA", "ABC123"]
    assert receiver.received == [text]


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_codec_name_and_errors_come_from_the_receiver(face: str) -> None:
    text = message("CP1", body="PID|1||7||M\u00fcller^J\u00f6rg\r")
    receiver = Recording(codec="cp1252")
    [reply] = await exchange(face, receiver, frame(text.encode("cp1252")), 1)
    assert receiver.received == [text]
    assert msa(reply.decode("cp1252"))[1:] == ["AA", "CP1"]

    lossy = Recording(codec=("ascii", "replace"))
    await exchange(face, lossy, frame(text.encode("cp1252")), 1)
    assert "M\ufffdller" in lossy.received[0]


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_no_codec_means_utf8_not_ascii(face: str) -> None:
    text = message("U1", body="PID|1||7||\u00c5ngstr\u00f6m^\u00c9mile\r")
    receiver = Recording(codec=(None, None))
    await exchange(face, receiver, frame(text.encode("utf-8")), 1)
    assert receiver.received == [text]


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_undecodable_message_gets_ar_and_connection_goes_on(face: str) -> None:
    receiver = Recording(codec="ascii")
    bad = message("BAD1", body="PID|1||7||M\u00fcller\r").encode("latin-1")
    replies = await exchange(face, receiver, frame(bad) + frame(message("GOOD1").encode()), 2)
    assert [msa(r.decode())[1:3] for r in replies] == [["AR", "BAD1"], ["AA", "GOOD1"]]
    assert msa(replies[0].decode())[3] == "undecodable message"
    assert len(receiver.received) == 1


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_idle_timeout_closes_only_idle_connections(face: str) -> None:
    receiver = Recording(timeout=0.5)
    async with listening(face, receiver) as port:
        idle, busy = await Peer.connect(port), await Peer.connect(port)
        started = time.monotonic()
        for number in range(4):
            await busy.send(frame(message(f"B{number}").encode()))
            assert ids([await busy.reply()]) == [f"B{number}"]
            await asyncio.sleep(0.25)
        assert await idle.closed_by_peer()
        assert 0.4 < time.monotonic() - started < 5
        await busy.send(frame(message("B9").encode()))
        assert ids([await busy.reply()]) == ["B9"]
        assert await busy.closed_by_peer()
        await idle.close()
        await busy.close()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_no_timeout_keeps_connection_open(face: str) -> None:
    async with listening(face, Recording(timeout=None)) as port:
        peer = await Peer.connect(port)
        await peer.no_reply(0.8)
        await peer.send(frame(message("LATE").encode()))
        assert ids([await peer.reply()]) == ["LATE"]
        await peer.close()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_listener_idle_timeout_applies_when_get_timeout_gives_none(face: str) -> None:
    async with listening(face, Recording(timeout=None), idle_timeout=0.3) as port:
        peer = await Peer.connect(port)
        started = time.monotonic()
        assert await peer.closed_by_peer()
        assert 0.2 < time.monotonic() - started < 5
        await peer.close()
    # The receiver's getTimeout() wins over the listener's default.
    async with listening(face, Recording(timeout=30), idle_timeout=0.3) as port:
        peer = await Peer.connect(port)
        await asyncio.sleep(0.8)
        await peer.send(frame(message("STILL").encode()))
        assert ids([await peer.reply()]) == ["STILL"]
        await peer.close()


class Selective(AbstractHL7Receiver):
    """Answers None (no ACK) for messages whose control id starts with N."""

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        return None if control_id(container.raw_message).startswith("N") else container.ack()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_none_ack_writes_nothing(face: str) -> None:
    data = b"".join(frame(message(i).encode()) for i in ("A1", "N1", "A2", "N2", "A3"))
    replies = await exchange(face, Selective(), data, 3)
    assert ids(replies) == ["A1", "A2", "A3"]


class Failing(AbstractHL7Receiver):
    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        kind = control_id(container.raw_message)
        if kind == "RAISE":
            raise RuntimeError("handler bug")
        if kind == "DEFERRED":
            return defer.fail(KeyError("lookup failed"))
        if kind == "CORO":
            return self.failing_coroutine()
        return container.ack()

    async def failing_coroutine(self) -> str:
        await asyncio.sleep(0.01)
        raise ValueError("async handler bug")


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_failure_goes_to_err_which_answers_ar_and_is_logged_once(
    face: str, caplog: pytest.LogCaptureFixture
) -> None:
    names = ["RAISE", "OK1", "DEFERRED", "CORO", "OK2"]
    data = b"".join(frame(message(name).encode()) for name in names)
    replies = await exchange(face, Failing(), data, 5)
    assert [msa(r.decode())[1:3] for r in replies] == [
        ["AR", "RAISE"],
        ["AA", "OK1"],
        ["AR", "DEFERRED"],
        ["AR", "CORO"],
        ["AA", "OK2"],
    ]
    failures = [r.getMessage() for r in caplog.records if "handleMessage failed" in r.getMessage()]
    assert len(failures) == 3
    assert [line.split(": ")[2].split()[0] for line in failures] == ["RuntimeError", "KeyError", "ValueError"]
    # Where it failed, not what the exception said (it may quote the message).
    assert "in handleMessage (" in failures[0] and "in failing_coroutine (" in failures[2]
    assert not any(text in line for line in failures for text in ("handler bug", "lookup failed"))


class ErrorIsAE(AbstractHL7Receiver):
    message_cls = type("AEContainer", (HL7MessageContainer,), {"err": lambda self, failure: self.ack("AE")})

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        raise RuntimeError("always")


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_container_err_override_decides_the_answer(face: str) -> None:
    [reply] = await exchange(face, ErrorIsAE(), frame(message("E1").encode()), 1)
    assert msa(reply.decode())[1:3] == ["AE", "E1"]


class Delayed(AbstractHL7Receiver):
    """Finishes each message after a delay given in its control id (ms), by several means."""

    def __init__(self, how: str) -> None:
        self.how = how

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        delay = int(control_id(container.raw_message).split("-")[1]) / 1000
        if self.how == "deferToThread":
            return threads.deferToThread(lambda: (time.sleep(delay), container.ack())[1])
        if self.how == "callLater":
            d: defer.Deferred[str] = defer.Deferred()
            reactor.callLater(delay, d.callback, container.ack())
            return d
        return self.later(delay, container)

    async def later(self, delay: float, container: MessageContainer) -> str:
        await asyncio.sleep(delay)
        return container.ack()


@pytest.mark.parametrize("how", ["deferToThread", "callLater", "coroutine"])
@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_acks_leave_in_arrival_order_when_handlers_finish_out_of_order(face: str, how: str) -> None:
    names = ["M0-300", "M1-10", "M2-200", "M3-0", "M4-100", "M5-50"]
    data = b"".join(frame(message(name).encode()) for name in names)
    started = time.monotonic()
    replies = await exchange(face, Delayed(how), data, len(names))
    assert ids(replies) == names
    # Handlers ran side by side: far less than the 660 ms they add up to
    # (deferToThread has a pool of 10 threads, so all six overlap too).
    assert time.monotonic() - started < 5


class Counting(AbstractReceiver):
    """Counts parseMessage calls; reads each message's PID twice before acknowledging it."""

    def __init__(self) -> None:
        self.parsed = 0

    def parseMessage(self, raw_message: str) -> MessageContainer:  # noqa: N802
        self.parsed += 1
        return HL7MessageContainer(raw_message)

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        assert isinstance(container, HL7MessageContainer)
        assert str(container.message.segment("PID")(3)) == str(container.message.segment("PID")(3))
        return container.ack()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_parse_message_is_called_once_per_message(face: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """parseMessage once per message, and the HL7 parser at most once, with metrics and logs on."""
    parses: list[str] = []
    real_parse = hl7bridge.receiver.parse
    monkeypatch.setattr(
        hl7bridge.receiver,
        "parse",
        lambda text, *args, **kwargs: parses.append(text) or real_parse(text, *args, **kwargs),
    )
    monkeypatch.setattr(hl7, "parse", lambda *args, **kwargs: pytest.fail("hl7.parse used: no fast path"))
    receiver = Counting()
    texts = [message(f"P{i}") for i in range(5)]
    await exchange(face, receiver, b"".join(frame(text.encode()) for text in texts), 5, metrics=True)
    assert receiver.parsed == 5
    assert parses == texts


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("mode", FRAMING_MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@asyncio_test
async def test_framing_case_on_the_wire_at_every_split_point(face: str, mode: str, case: Case) -> None:
    """Each case, cut at every point (one connection per cut, all at once), then byte by byte.

    Strict mode answers the messages before a rejection and then closes the
    connection, so the rest of the stream may meet a reset: the replies are
    read while sending, and a failed send is no failure of the test.
    """
    receiver = Recording()
    messages = case.messages if mode == LENIENT else case.strict_messages
    expected = [control_id(m.decode()) for m in messages]

    async def one(cut: int | None) -> list[str]:
        peer = await Peer.connect(port)
        replies = asyncio.ensure_future(peer.replies(len(expected)))
        with contextlib.suppress(OSError):
            if cut is None:
                await peer.send(case.stream, chunk=1)
            else:
                await peer.send(case.stream[:cut])
                await asyncio.sleep(0.005)
                await peer.send(case.stream[cut:])
            peer.writer.write_eof()
        answered = ids(await replies)
        assert await peer.closed_by_peer()
        await peer.close()
        return answered

    async with listening(face, receiver, framing=mode) as port:
        cuts: list[int | None] = [*range(len(case.stream) + 1), None]
        results = await asyncio.gather(*(one(cut) for cut in cuts))
    assert results == [expected] * len(cuts)
    assert sorted(receiver.received) == sorted([m.decode() for m in messages] * len(cuts))


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_strict_framing_closes_on_a_deviation_after_answering_what_came_before(
    face: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with listening(face, Recording(), framing="strict") as port:
        peer = await Peer.connect(port)
        await peer.send(frame(message("S1").encode()) + b"junk" + frame(message("S2").encode()))
        assert ids([await peer.reply()]) == ["S1"]
        assert await peer.closed_by_peer()
        await peer.close()
    assert any("strict framing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_oversized_message_gets_ar_and_the_next_one_is_served(face: str) -> None:
    big = message("BIG1", body="OBX|1|ED|PDF||" + "A" * 200_000 + "\r").encode()
    replies = await exchange(
        face, Recording(), frame(big) + frame(message("SMALL").encode()), 2, max_message_size=100_000
    )
    assert [msa(r.decode())[1:4] for r in replies] == [["AR", "BIG1", "message too large"], ["AA", "SMALL"]]


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_deviations_are_logged_once_per_connection_without_content(
    face: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = b"".join(VT + message(f"D{i}").encode() + FS for i in range(3))  # FS without CR, three times
    await exchange(face, Recording(), data, 3)
    for _ in range(100):  # the listener may see the connection close after the peer has moved on
        logged = [r.getMessage() for r in caplog.records if r.name.startswith("hl7bridge")]
        if any(line.endswith(": closed") for line in logged):
            break
        await asyncio.sleep(0.05)
    # Once, with its kind and the stream offset of the byte where CR was due.
    first = len(VT + message("D0").encode() + FS)
    deviations = [line for line in logged if "framing deviation tolerated" in line]
    assert len(deviations) == 1
    assert deviations[0].endswith(f": framing deviation tolerated: end block not followed by CR at byte {first}")
    # The repeat is counted, and the count given once when the connection closes.
    [summary] = [line for line in logged if "problems on this connection" in line]
    assert summary.endswith(": problems on this connection so far: framing: end block not followed by CR x2")
    assert not [line for line in logged if "DOE" in line or "SENDAPP" in line]


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_peer_closing_mid_handler_leaves_nothing_behind(face: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    receiver = Delayed("coroutine")
    async with listening(face, receiver) as port:
        peer = await Peer.connect(port)
        await peer.send(frame(message("SLOW-300").encode()))
        await asyncio.sleep(0.05)
        peer.writer.transport.abort()
        await asyncio.sleep(0.5)
        other = await Peer.connect(port)
        await other.send(frame(message("NEXT-0").encode()))
        assert ids([await other.reply()]) == ["NEXT-0"]
        await other.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class CannedAck(AbstractHL7Receiver):
    """Answers every message with the same ACK text: reads no header, keeps nothing."""

    ACK = "MSH|^~\\&|RECVAPP|RECVFAC|SENDAPP|SENDFAC|20240102030405||ACK^A01^ACK|CANNED|P|2.5\rMSA|AA|CANNED\r"

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        return self.ACK


#: Bytes that hl7bridge's own code may hold per open connection once it has
#: served a message and waits for the next: the session, its deframer, its
#: task's coroutine frames and, on the Twisted face, the stream objects it
#: builds. Measured at 1.5 KB (asyncio face) and 2.1 KB (Twisted face) on
#: CPython 3.11 to 3.13, 3.1 and 3.3 KB on 3.10 (bigger frames, and the
#: reader's feed_data override turns its shared-key __dict__ into a full one);
#: 2.8 to 3.7 KB and 4.3 to 4.6 KB before sessions stopped allocating a deque
#: and a set up front. docs/performance.md has the whole listener's figures.
IDLE_CONNECTION_BUDGET = 2560 if sys.version_info >= (3, 11) else 3840


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_an_idle_connection_keeps_little_memory_in_hl7bridge(face: str, caplog: pytest.LogCaptureFixture) -> None:
    # Captured log records would hold the per-message log line's arguments.
    caplog.set_level(logging.WARNING, logger="hl7bridge.messages")
    count = 200
    ours = [tracemalloc.Filter(True, str(Path(hl7bridge.__file__).parent / "*"))]
    tracing = tracemalloc.is_tracing()
    async with listening(face, CannedAck()) as port:
        # What a first connection loads (modules, caches) is not per connection.
        warm = await Peer.connect(port)
        await warm.send(frame(message("WARM").encode()))
        await warm.reply()
        await warm.close()
        await asyncio.sleep(0.1)
        if not tracing:
            tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot().filter_traces(ours)
            peers = [await Peer.connect(port) for _ in range(count)]
            for number, peer in enumerate(peers):
                await peer.send(frame(message(f"IDLE{number}").encode()))
                assert msa((await peer.reply()).decode())[1:] == ["AA", "CANNED"]
            after = tracemalloc.take_snapshot().filter_traces(ours)
        finally:
            if not tracing:
                tracemalloc.stop()
        held = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / count
        for peer in peers:
            await peer.close()
    assert 0 < held <= IDLE_CONNECTION_BUDGET


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_a_custom_container_gets_blocks_that_are_no_hl7(face: str) -> None:
    replies = await exchange(face, PingReceiver(), frame(b"PING") + frame(b"\r\nSTATUS?\r\n"), 2)
    assert replies == [b"GOT:PING", b"GOT:\r\nSTATUS?\r\n"]


class Concurrency(AbstractHL7Receiver):
    """Acknowledges each message a moment later, counting how many it holds at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        self.running += 1
        self.most = max(self.most, self.running)
        d: defer.Deferred[str] = defer.Deferred()
        reactor.callLater(0, d.callback, container.ack())
        return d.addBoth(self._done)

    def _done(self, result: Any) -> Any:
        self.running -= 1
        return result


@pytest.mark.parametrize("limit", [1, 3])
@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_max_in_flight_holds_for_messages_that_arrive_in_one_read(face: str, limit: int) -> None:
    receiver = Concurrency()
    names = [f"B{i:04d}" for i in range(400)]
    data = b"".join(frame(message(name).encode()) for name in names)  # ~60 KB: a few reads at most
    replies = await exchange(face, receiver, data, len(names), max_in_flight=limit)
    assert ids(replies) == names
    assert receiver.most == limit
