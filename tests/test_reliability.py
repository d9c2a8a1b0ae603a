"""Hard to break: limits, timeouts, faults, charsets and shutdown, on both faces.

docs/reliability.md lists these tests by name; a test here keeps that table true.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, reactor, threads

import hl7bridge
from hl7bridge.defer import to_future
from hl7bridge.mllp import MLLPFactory
from hl7bridge.receiver import AbstractHL7Receiver, AbstractReceiver, HL7MessageContainer, MessageContainer
from hl7bridge.testing import asyncio_test
from tests.support import (
    BACKLOG,
    ENGINES,
    FACES,
    HOST,
    Peer,
    Unhandled,
    all_closed,
    control_id,
    corpus_messages,
    frame,
    listening,
    message,
    msa,
    msh_complete,
    open_fds,
)
from tests.test_session import Recording, exchange, ids

ROOT = Path(__file__).resolve().parents[1]


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# Connection limits


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "connection refused" in r.getMessage()]


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_connections_past_the_limit_are_closed_and_others_served(
    face: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with listening(face, Recording(), max_connections=2) as port:
        first, second = await Peer.connect(port), await Peer.connect(port)
        await first.send(frame(message("L1").encode()))
        assert ids([await first.reply()]) == ["L1"]
        third = await Peer.connect(port)
        assert await third.closed_by_peer()
        # The log line names the setting and the option that refused the connection.
        [refused] = refusals(caplog)
        assert refused.endswith("2 connections open, the limit set by max_connections (--max-connections)")
        await second.send(frame(message("L2").encode()))
        assert ids([await second.reply()]) == ["L2"]
        await first.close()
        await asyncio.sleep(0.2)
        fourth = await Peer.connect(port)
        await fourth.send(frame(message("L4").encode()))
        assert ids([await fourth.reply()]) == ["L4"]
        for peer in (second, third, fourth):
            await peer.close()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_connections_per_peer_address_are_limited(face: str, caplog: pytest.LogCaptureFixture) -> None:
    async with listening(face, Recording(), max_connections_per_peer=1) as port:
        first = await Peer.connect(port)
        second = await Peer.connect(port)
        assert await second.closed_by_peer()
        [refused] = refusals(caplog)
        assert refused.endswith(
            "1 connections open from this address, "
            "the limit set by max_connections_per_peer (--max-connections-per-peer)"
        )
        # Another address on the loopback network is another peer.
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=("127.0.0.2", 0))
        other = Peer(reader, writer)
        await other.send(frame(message("P2").encode()))
        assert ids([await other.reply()]) == ["P2"]
        await first.send(frame(message("P1").encode()))
        assert ids([await first.reply()]) == ["P1"]
        for peer in (first, second, other):
            await peer.close()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_default_settings_answer_many_connections_from_one_address(face: str) -> None:
    """Senders behind one NAT or balancer share an address: by default only the total is limited."""
    defaults = hl7bridge.Settings()
    limits = {
        "max_connections": defaults.max_connections,
        "max_connections_per_peer": defaults.max_connections_per_peer,
    }
    async with listening(face, Recording(), **limits) as port:
        peers = [await Peer.connect(port) for _ in range(160)]
        for number, peer in enumerate(peers):
            await peer.send(frame(message(f"NAT{number}").encode()))
        replies = await asyncio.gather(*(peer.reply() for peer in peers))
        assert ids(list(replies)) == [f"NAT{number}" for number in range(160)]
        for peer in peers:
            await peer.close()


# Timeouts


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_slow_sender_gets_ar_and_is_closed_while_others_are_served(face: str) -> None:
    async with listening(face, Recording(), frame_timeout=0.5) as port:
        slow, fast = await Peer.connect(port), await Peer.connect(port)
        data = frame(message("SLOW1").encode())
        started = time.monotonic()

        async def dribble() -> None:
            # The MSH at once, then one byte every 50 ms: never idle, never
            # finishing (slowloris).
            head = data.index(b"\r") + 1
            slow.writer.write(data[:head])
            for byte in data[head:-2]:
                if slow.writer.is_closing():
                    return
                slow.writer.write(bytes([byte]))
                await asyncio.sleep(0.05)

        sending = asyncio.ensure_future(dribble())
        for number in range(3):
            await fast.send(frame(message(f"FAST{number}").encode()))
            assert ids([await fast.reply()]) == [f"FAST{number}"]
        reply = await slow.reply()
        assert msa(reply.decode())[1:4] == ["AR", "SLOW1", "message not completed in time"]
        assert await slow.closed_by_peer()
        assert 0.4 < time.monotonic() - started < 5
        sending.cancel()
        await slow.close()
        await fast.close()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_stuck_frame_without_msh_is_closed_without_ack(face: str, caplog: pytest.LogCaptureFixture) -> None:
    async with listening(face, Recording(), frame_timeout=0.3) as port:
        peer = await Peer.connect(port)
        await peer.send(b"\x0bMS")
        assert await peer.closed_by_peer()
        await peer.close()
    assert any("no MSH segment to answer" in r.getMessage() for r in caplog.records)


class Hanging(AbstractHL7Receiver):
    """Never answers messages whose control id starts with HANG; answers LATE after 0.6 s."""

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        name = control_id(container.raw_message)
        if name.startswith("HANG"):
            return defer.Deferred()
        if name.startswith("LATE"):
            return self.late(container)
        return container.ack()

    async def late(self, container: MessageContainer) -> str | None:
        await asyncio.sleep(0.6)
        return container.ack()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_handler_timeout_answers_ae_once_and_the_connection_goes_on(
    face: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with listening(face, Hanging(), handler_timeout=0.3) as port:
        peer = await Peer.connect(port)
        await peer.send(b"".join(frame(message(n).encode()) for n in ("HANG1", "LATE1", "OK1")))
        replies = await peer.replies(3)
        assert [msa(r.decode())[1:4] for r in replies] == [
            ["AE", "HANG1", "handler timed out"],
            ["AE", "LATE1", "handler timed out"],
            ["AA", "OK1"],
        ]
        # LATE1's handler finishes after its AE: nothing more is sent.
        await peer.no_reply(0.6)
        await peer.close()
    assert any("finished after its timeout" in r.getMessage() for r in caplog.records)


# Faults


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count file descriptors")
@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_peer_reset_mid_frame_leaves_the_listener_serving(face: str, caplog: pytest.LogCaptureFixture) -> None:
    async with Unhandled(), listening(face, Recording()) as port:
        fds_before = open_fds()
        for _ in range(5):
            peer = await Peer.connect(port)
            await peer.send(frame(message("HALF").encode())[:60])
            await asyncio.sleep(0.02)
            peer.reset()
        await all_closed(port)
        assert open_fds() <= fds_before
        other = await Peer.connect(port)
        await other.send(frame(message("AFTER").encode()))
        assert ids([await other.reply()]) == ["AFTER"]
        await other.close()
    assert errors_logged(caplog) == []


class Unfinished(AbstractHL7Receiver):
    """Answers (or fails) 0.3 s after each message, by one of the means receivers use."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.finished = 0

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        if self.how == "coroutine":
            return self.later(container)
        if self.how == "deferToThread":
            return threads.deferToThread(self.work, container)
        d: defer.Deferred[str] = defer.Deferred()
        if self.how == "failing Deferred":
            reactor.callLater(0.3, self.fail, d)
        else:
            reactor.callLater(0.3, lambda: d.callback(self.work(container, 0)))
        return d

    def work(self, container: MessageContainer, delay: float = 0.3) -> str:
        time.sleep(delay)
        self.finished += 1
        return container.ack()

    def fail(self, d: defer.Deferred[str]) -> None:
        self.finished += 1
        d.errback(RuntimeError("lookup failed"))

    async def later(self, container: MessageContainer) -> str:
        await asyncio.sleep(0.3)
        return self.work(container, 0)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count file descriptors")
@pytest.mark.parametrize("how", ["coroutine", "deferToThread", "Deferred", "failing Deferred"])
@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_peer_reset_mid_handler_leaves_no_task_error_or_descriptor(
    face: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Unfinished(how)
    async with Unhandled(), listening(face, receiver) as port:
        fds_before = open_fds()
        peers = [await Peer.connect(port) for _ in range(3)]
        for number, peer in enumerate(peers):
            await peer.send(frame(message(f"GONE{number}").encode()))
        await asyncio.sleep(0.1)
        for peer in peers:
            peer.reset()
        await all_closed(port)
        while receiver.finished < 3:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        assert open_fds() <= fds_before
        other = await Peer.connect(port)
        await other.send(frame(message("AFTER").encode()))
        assert msa((await other.reply()).decode())[2] == "AFTER"
        await other.close()
    # The failures are the handler's own, logged once each; nothing else is an error.
    failures = ["handleMessage failed" in line for line in errors_logged(caplog)]
    assert failures == ([True] * 4 if how == "failing Deferred" else [])


class StrictParser(AbstractReceiver):
    """Parses like an old receiver that refuses message types it does not know."""

    def parseMessage(self, raw_message: str) -> MessageContainer:  # noqa: N802
        if "|ZZZ^" in raw_message:
            raise ValueError("unknown message type")
        return HL7MessageContainer(raw_message)

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        return container.ack()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_parse_failure_gets_ar_with_err_segment(face: str) -> None:
    bad = message("Z1").replace("ADT^A01^ADT_A01", "ZZZ^Z01")
    replies = await exchange(face, StrictParser(), frame(bad.encode()) + frame(message("OK1").encode()), 2)
    nak = replies[0].decode().split("\r")
    assert nak[1] == "MSA|AR|Z1|message could not be parsed"
    assert nak[2] == "ERR|||100^Segment sequence error^HL70357|E"
    assert ids(replies[1:]) == ["OK1"]


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_ten_megabyte_frame_over_a_one_megabyte_limit(face: str) -> None:
    big = message("HUGE", body="OBX|1|ED|PDF^Base64||" + "QUJD" * (10 * 1024 * 1024 // 4) + "\r").encode()
    async with listening(face, Recording(), max_message_size=1024 * 1024) as port:
        peer, other = await Peer.connect(port), await Peer.connect(port)
        sending = asyncio.ensure_future(peer.send(frame(big) + frame(message("NEXT").encode())))
        # Another connection is served while the large frame streams in.
        await other.send(frame(message("OTHER").encode()))
        assert msa((await other.reply()).decode())[1:3] == ["AA", "OTHER"]
        replies = await peer.replies(2, timeout=30)
        await sending
        assert [msa(r.decode())[1:4] for r in replies] == [["AR", "HUGE", "message too large"], ["AA", "NEXT"]]
        await peer.close()
        await other.close()


class Refusing(AbstractReceiver):
    """Decodes ASCII only, cannot parse ZZZ messages, fails on FAIL and never answers HANG."""

    def getCodec(self) -> str:  # noqa: N802
        return "ascii"

    def parseMessage(self, raw_message: str) -> MessageContainer:  # noqa: N802
        if "|ZZZ^" in raw_message:
            raise ValueError("unknown message type")
        return HL7MessageContainer(raw_message)

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        name = control_id(container.raw_message)
        if name == "FAIL":
            raise RuntimeError("database down")
        return defer.Deferred() if name == "HANG" else container.ack()


def check_nak(reply: bytes, sent_id: str, code: str, reason: str, error: str) -> str:
    """Check a NAK field by field (HL7 v2.5 original mode); return its MSH-10."""
    segments = reply.decode("ascii").split("\r")
    msh = segments[0].split("|")
    # Sender and receiver swapped, type, processing id and version as the message had them.
    assert msh[2:6] == ["RECVAPP", "RECVFAC", "SENDAPP", "SENDFAC"], segments[0]
    assert msh[8] == "ACK^A01^ACK" and msh[10:12] == ["P", "2.5"], segments[0]
    assert msh[9] and msh[9] != sent_id, segments[0]
    assert segments[1] == f"MSA|{code}|{sent_id}|{reason}"
    assert segments[2] == f"ERR|||{error}^HL70357|E"
    return msh[9]


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_every_nak_is_built_from_the_msh_with_a_reason_and_an_err_segment(face: str) -> None:
    undecodable = message("BAD", body="PID|1||7||M\u00fcller\r").encode("latin-1")
    unparseable = message("ZZZ").replace("ADT^A01^ADT_A01", "ZZZ^A01").encode()
    large = message("BIG", body="OBX|1|ED|PDF||" + "A" * 4000 + "\r").encode()
    sent = [undecodable, unparseable, large, *(message(name).encode() for name in ("FAIL", "HANG", "OK"))]
    options = {"max_message_size": 3000, "handler_timeout": 0.3, "frame_timeout": 0.5}
    async with listening(face, Refusing(), **options) as port:
        peer, stuck = await Peer.connect(port), await Peer.connect(port)
        await peer.send(b"".join(frame(data) for data in sent))
        # The MSH whole, then nothing more: answered when frame_timeout passes.
        partial = frame(message("SLOW").encode())
        await stuck.send(partial[: partial.index(b"EVN")])
        replies = await peer.replies(6)
        stuck_reply = await stuck.reply()
        await peer.close()
        await stuck.close()
    control_ids = [
        check_nak(replies[0], "BAD", "AR", "undecodable message", "102^Data type error"),
        check_nak(replies[1], "ZZZ", "AR", "message could not be parsed", "100^Segment sequence error"),
        check_nak(replies[2], "BIG", "AR", "message too large", "207^Application internal error"),
        check_nak(replies[3], "FAIL", "AR", "handler failed", "207^Application internal error"),
        check_nak(replies[4], "HANG", "AE", "handler timed out", "207^Application internal error"),
        check_nak(stuck_reply, "SLOW", "AR", "message not completed in time", "207^Application internal error"),
    ]
    assert msa(replies[5].decode())[1:3] == ["AA", "OK"]
    # Each NAK has a control id of its own.
    assert len(set(control_ids)) == len(control_ids)


# Charsets


class NoCodec(Recording):
    pass


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_msh18_is_followed_when_asked_and_the_ack_encoded_alike(face: str) -> None:
    def declared(charset: str, name: str) -> str:
        text = message(name, body="PID|1||9||M\u00fcller^J\u00fcrgen\r").replace("RECVFAC", "H\u00f4pital")
        return text.replace("|P|2.5\r", f"|P|2.5||||||{charset}\r", 1)

    latin = declared("8859/1", "C1")
    utf8 = declared("UNICODE UTF-8", "C2")
    receiver = NoCodec(codec=None)
    data = frame(latin.encode("latin-1")) + frame(utf8.encode("utf-8"))
    replies = await exchange(face, receiver, data, 2, follow_msh18=True)
    assert receiver.received == [latin, utf8]
    assert "H\u00f4pital".encode("latin-1") in replies[0]
    assert "H\u00f4pital".encode("utf-8") in replies[1]

    # The receiver's codec wins over MSH-18.
    forced = NoCodec(codec="cp1252")
    await exchange(face, forced, frame(utf8.encode("utf-8")), 1, follow_msh18=True)
    assert "M\u00c3\u00bcller" in forced.received[0]


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_bytes_that_break_the_declared_charset_get_ar_not_a_crash(face: str) -> None:
    def declared(charset: str, name: str) -> str:
        return message(name, body="PID|1||9||M\u00fcller\r").replace("|P|2.5\r", f"|P|2.5||||||{charset}\r", 1)

    receiver = NoCodec(codec=None)
    data = b"".join(
        [
            frame(declared("UNICODE UTF-8", "U1").encode("latin-1")),  # not UTF-8
            frame(declared("ASCII", "A1").encode("latin-1")),  # 8-bit in ASCII
            frame(declared("NO SUCH CHARSET", "X1").encode("utf-8")),  # unknown: UTF-8
            frame(declared("8859/1", "L1").encode("latin-1")),
        ]
    )
    replies = await exchange(face, receiver, data, 4, follow_msh18=True)
    assert [msa(r.decode("latin-1"))[1:4] for r in replies[:2]] == [
        ["AR", "U1", "undecodable message"],
        ["AR", "A1", "undecodable message"],
    ]
    assert [msa(r.decode("latin-1"))[1:3] for r in replies[2:]] == [["AA", "X1"], ["AA", "L1"]]
    assert receiver.received == [declared("NO SUCH CHARSET", "X1"), declared("8859/1", "L1")]


# Shutdown


class Slow(AbstractHL7Receiver):
    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        return self.later(container)

    async def later(self, container: MessageContainer) -> str | None:
        await asyncio.sleep(0.3)
        return container.ack()


async def start(face: str, receiver: Any, **options: Any) -> tuple[int, Any]:
    """A listener and the coroutine function that shuts it down gracefully."""
    if face == "asyncio":
        server = await hl7bridge.serve(receiver, HOST, 0, backlog=BACKLOG, **options)
        return server.sockets[0].getsockname()[1], lambda: hl7bridge.shutdown(server)
    factory = MLLPFactory(receiver, **options)
    port = reactor.listenTCP(0, factory, backlog=BACKLOG, interface=HOST)

    async def stop() -> None:
        await to_future(port.stopListening(), asyncio.get_running_loop())
        await to_future(factory.drain(), asyncio.get_running_loop())

    return port.getHost().port, stop


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_shutdown_answers_messages_in_flight_then_closes(face: str) -> None:
    port, stop = await start(face, Slow())
    peer = await Peer.connect(port)
    await peer.send(b"".join(frame(message(f"D{i}").encode()) for i in range(3)))
    await asyncio.sleep(0.1)
    stopping = asyncio.ensure_future(stop())
    assert ids(await peer.replies(3)) == ["D0", "D1", "D2"]
    assert await peer.closed_by_peer()
    await stopping
    with pytest.raises(OSError):
        await Peer.connect(port)
    await peer.close()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_shutdown_is_bounded_by_the_drain_timeout(face: str, caplog: pytest.LogCaptureFixture) -> None:
    port, stop = await start(face, Hanging(), drain_timeout=0.3)
    peer = await Peer.connect(port)
    await peer.send(frame(message("HANG9").encode()))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await stop()
    assert time.monotonic() - started < 3
    assert await peer.closed_by_peer()
    await peer.close()
    assert any("1 ACKs unsent" in r.getMessage() for r in caplog.records)


# Load


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count file descriptors")
@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_load_300_connections_30_messages_each_acked_exactly_once(
    face: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hl7bridge")
    try:
        texts = [text for _, text in corpus_messages() if text.startswith("MSH") and msh_complete(text)]
    except pytest.skip.Exception:
        texts = [message(f"OWN{i}") for i in range(30)]

    async def sender(number: int, peer: Peer) -> list[tuple[str, str]]:
        sent = []
        for index in range(30):
            text = texts[(number + index) % len(texts)]
            await peer.send(frame(text.encode()))
            reply = msa((await peer.reply(timeout=60)).decode())
            sent.append((control_id(text), reply[2]))
            assert reply[1] == "AA"
        await peer.no_reply(0.05)
        await peer.close()
        return sent

    async with Unhandled(), listening(face, Recording()) as port:
        # Counted with the listener open: Twisted keeps one descriptor in
        # reserve from its first listenTCP on.
        fds_before = open_fds()
        started = time.monotonic()
        peers = await asyncio.gather(*(Peer.connect(port) for _ in range(300)))
        # All 300 are served at once before the first message goes.
        while ENGINES[port].connections < 300:
            assert time.monotonic() - started < 30, ENGINES[port].connections
            await asyncio.sleep(0.01)
        results = await asyncio.gather(*(sender(n, peer) for n, peer in enumerate(peers)))
        elapsed = time.monotonic() - started
        await all_closed(port)
        fds_after = open_fds()
    assert elapsed < 120
    pairs = [pair for result in results for pair in result]
    assert len(pairs) == 9000
    assert all(sent == acked for sent, acked in pairs)
    assert fds_after <= fds_before
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# The table in docs/reliability.md


def test_reliability_table_names_only_tests_that_exist() -> None:
    table = (ROOT / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(test_\w+)`", table))
    sources = "".join(path.read_text() for path in (ROOT / "tests").rglob("test_*.py"))
    defined = set(re.findall(r"def (test_\w+)", sources))
    assert named, "docs/reliability.md names no tests"
    assert named <= defined, sorted(named - defined)


# Hostile and broken input


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_random_bytes_give_a_bounded_number_of_log_lines(face: str, caplog: pytest.LogCaptureFixture) -> None:
    noise = random.Random(1234).randbytes(1 << 20)
    async with listening(face, Recording(), metrics=True) as port:
        peer = await Peer.connect(port)
        await peer.send(noise)
        peer.writer.write_eof()
        await peer.closed_by_peer(timeout=30)
        await peer.close()
        engine = ENGINES[port]
        for _ in range(100):
            if not engine.connections:
                break
            await asyncio.sleep(0.05)
        assert engine.metrics is not None
        problems = dict(engine.metrics.problems)
    name = peer.writer.get_extra_info("sockname")
    lines = [r.getMessage() for r in caplog.records if f"{name[0]}:{name[1]}:" in r.getMessage()]
    warnings = [line for line in lines if "problems on this connection" not in line]
    # One line per kind of problem (a dozen kinds at most), and one summary at close.
    assert sum(problems.values()) > 100, problems
    assert len(warnings) <= 12 + 4, warnings
    [summary] = [line for line in lines if "problems on this connection" in line]
    assert all(f"{kind} x{count}" in summary for kind, count in problems.items() if count > 1)


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_a_peer_sending_only_whitespace_is_closed_by_the_frame_timeout(face: str) -> None:
    async with listening(face, Recording(), frame_timeout=0.5) as port:
        peer, other = await Peer.connect(port), await Peer.connect(port)
        started = time.monotonic()

        async def trickle() -> None:
            while not peer.writer.is_closing() and time.monotonic() - started < 10:
                peer.writer.write(b" ")
                await asyncio.sleep(0.05)

        sending = asyncio.ensure_future(trickle())
        await other.send(frame(message("CALM1").encode()))
        assert ids([await other.reply()]) == ["CALM1"]
        assert await peer.closed_by_peer()
        assert time.monotonic() - started < 5
        sending.cancel()
        await peer.close()
        await other.close()


# (what the peer sends, the MSA the listener answers with, or None for no answer)
BROKEN_HEADERS = [
    ("MSH", None),
    ("MSH|", None),
    ("MSH|\rPID|1||1\r", None),
    ("MSH|^~\\&|SND|SFAC|RCV|RFAC|20240101||ADT^A01||P|2.5\r", None),  # MSH-10 empty
    ("MSH|^~\\&|SND|SFAC|RCV|RFAC|20240101||ADT^A01|   |P|2.5\r", None),  # MSH-10 blank
    ("MSH^~\\&|SND|SFAC|RCV|RFAC|20240101||ADT^A01|CTRL9|P|2.5\r", None),  # MSH-1 ^: fields unreadable
    ("MSHA^~\\&ASNDASFAC\r", None),  # a letter as the field separator
    ("MSH|^~\\&|SND|SFAC|RCV|RFAC|20240101|||NOTYPE|P|2.5\r", ["AR", "NOTYPE", "required field missing (MSH-9)"]),
    ("MSH||SND|SFAC|RCV|RFAC|20240101||ADT^A01|NOENC|P|2.5\r", ["AR", "NOENC", "required field missing (MSH-2)"]),
]


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_an_msh_that_cannot_identify_its_message_is_never_acked(
    face: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No ACK with an empty or wrong MSA-2, no traceback: an AR 101 where MSH-10 can be read, else one line."""
    receiver = Recording()
    async with listening(face, receiver) as port:
        peer = await Peer.connect(port)
        for text, expected in BROKEN_HEADERS:
            await peer.send(frame(text.encode()) + frame(message("NEXT1").encode()))
            replies = [await peer.reply()]
            if expected is not None:
                replies.append(await peer.reply())
                assert msa(replies[0].decode())[1:4] == expected, text
                assert "|101^Required field missing^HL70357|" in replies[0].decode()
            assert ids(replies[-1:]) == ["NEXT1"], text
        await peer.close()
    assert receiver.received == [message("NEXT1")] * len(BROKEN_HEADERS)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_a_handler_failure_is_logged_without_the_patient_data_it_quotes(
    face: str, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.handlers.leaky import LeakyReceiver

    text = message("LEAK1", body="PID|1||4711||SECRETNAME^ANNA\r")
    async with listening(face, LeakyReceiver()) as port:
        peer = await Peer.connect(port)
        await peer.send(frame(text.encode()))
        assert msa((await peer.reply()).decode())[1:3] == ["AR", "LEAK1"]
        await peer.close()
    [line] = [r.getMessage() for r in caplog.records if "handleMessage failed" in r.getMessage()]
    assert "tests.handlers.leaky.BedNotFound in handleMessage (" in line
    assert 'leaky.py", line ' in line  # each frame: file, line, function
    assert "SECRETNAME" not in caplog.text and "bed not found" not in caplog.text


@asyncio_test
async def test_with_log_content_the_failure_text_goes_to_the_content_logger(caplog: pytest.LogCaptureFixture) -> None:
    from tests.handlers.leaky import LeakyReceiver

    text = message("LEAK2", body="PID|1||4711||SECRETNAME^ANNA\r")
    async with listening("asyncio", LeakyReceiver(), log_content=True) as port:
        peer = await Peer.connect(port)
        await peer.send(frame(text.encode()))
        await peer.reply()
        await peer.close()
    quoting = [
        r
        for r in caplog.records
        if "SECRETNAME" in r.getMessage() or (r.exc_info and "SECRETNAME" in str(r.exc_info[1]))
    ]
    assert quoting and {r.name for r in quoting} == {"hl7bridge.content"}


class ClosesFirst(AbstractHL7Receiver):
    """Answers a moment later, by when the sender has gone."""

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        d: defer.Deferred[str] = defer.Deferred()
        reactor.callLater(0.2, d.callback, container.ack())
        return d


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_the_message_log_says_not_sent_when_the_sender_left_first(
    face: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with listening(face, ClosesFirst()) as port:
        peer = await Peer.connect(port)
        await peer.send(frame(message("GONE1").encode()))
        peer.reset()
        for _ in range(100):
            lines = [r.getMessage() for r in caplog.records if r.name == "hl7bridge.messages"]
            if lines:
                break
            await asyncio.sleep(0.05)
    [line] = lines
    # The handler was still running, or its AA was ready, when the connection went: never sent.
    assert re.search(r" ADT\^A01 GONE1 (AA|none) not sent \d+\.\dms$", line), line
