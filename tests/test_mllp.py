"""The Twisted face driven by hand, the way txHL7 shops unit-test their receivers.

No listener, no socket, no running event loop: a ``MinimalLowerLayerProtocol``
gets a factory and a ``mock.Mock()`` transport, ``dataReceived`` is called
directly, and the ACK is read from ``transport.write`` as soon as the call
returns. The asyncio reactor is installed at import, as a txHL7 shop's test
module would do it; the same file also runs under plain pytest, without
pytest-twisted (the last test checks that).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from hl7bridge.reactor import install

install()  # as a test module of a txHL7 shop would, before Twisted's reactor is imported

from hl7bridge.mllp import MinimalLowerLayerProtocol, MLLPFactory  # noqa: E402
from hl7bridge.receiver import AbstractHL7Receiver, AbstractReceiver, MessageContainer  # noqa: E402
from tests.legacy.cp1252_receiver import EXPECTED_SURNAME, Cp1252Receiver  # noqa: E402
from tests.legacy.ping_receiver import PingReceiver  # noqa: E402
from tests.support import frame, message  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def ack_pattern(code: str, control_id: str) -> bytes:
    """A whole framed ACK with MSA-1 ``code`` acknowledging ``control_id``."""
    return rb"\x0bMSH\|\^~\\&\|RECVAPP\|RECVFAC\|SENDAPP\|SENDFAC\|\d{14}\|\|ACK\^A01\^ACK\|\w+\|P\|2\.5\rMSA\|" + (
        code.encode() + rb"\|" + control_id.encode() + rb"[|\r].*\x1c\r$"
    )


def by_hand(receiver: Any) -> MinimalLowerLayerProtocol:
    """A protocol as txHL7's own tests build one: factory and transport set, never connected."""
    proto = MinimalLowerLayerProtocol()
    proto.factory = MLLPFactory(receiver)
    proto.transport = mock.Mock()
    return proto


def written(proto: MinimalLowerLayerProtocol) -> list[bytes]:
    return [call.args[0] for call in proto.transport.write.call_args_list]  # type: ignore[attr-defined]


class Answers(AbstractHL7Receiver):
    """Answers each message with what ``reply(container)`` gives."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply

    def handleMessage(self, container: Any) -> Any:  # noqa: N802
        return self.reply(container)


def test_a_protocol_never_connected_answers_within_data_received() -> None:
    proto = by_hand(Answers(lambda container: container.ack()))
    proto.dataReceived(frame(message("LAZY01").encode()))
    assert re.match(ack_pattern("AA", "LAZY01"), proto.transport.write.call_args[0][0], re.DOTALL)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(lambda container: container.ack(), id="value"),
        pytest.param(lambda container: defer.succeed(container.ack()), id="defer.succeed"),
        pytest.param(lambda container: _fired(container.ack()), id="fired Deferred"),
    ],
)
def test_an_answer_ready_at_once_is_written_before_data_received_returns(reply: Any) -> None:
    proto = by_hand(Answers(reply))
    proto.makeConnection(proto.transport)
    proto.dataReceived(frame(message("READY1").encode()))
    [ack] = written(proto)
    assert re.match(ack_pattern("AA", "READY1"), ack, re.DOTALL)


def _fired(value: str) -> defer.Deferred[str]:
    d: defer.Deferred[str] = defer.Deferred()
    d.callback(value)
    return d


def test_two_messages_in_one_call_are_answered_in_that_call_in_order() -> None:
    proto = by_hand(Answers(lambda container: container.ack()))
    proto.dataReceived(frame(message("PAIR01").encode()) + frame(message("PAIR02").encode()))
    first, second = written(proto)
    assert re.match(ack_pattern("AA", "PAIR01"), first, re.DOTALL)
    assert re.match(ack_pattern("AA", "PAIR02"), second, re.DOTALL)


def test_a_message_split_across_calls_is_answered_by_the_call_that_completes_it() -> None:
    data = frame(message("SPLIT1").encode())
    for cut in range(1, len(data)):
        proto = by_hand(Answers(lambda container: container.ack()))
        proto.dataReceived(data[:cut])
        # FS alone ends a block (txHL7 split on FS): the last cut leaves only the CR to come.
        assert written(proto) == [] or cut == len(data) - 1, cut
        proto.dataReceived(data[cut:])
        [ack] = written(proto)
        assert re.match(ack_pattern("AA", "SPLIT1"), ack, re.DOTALL), cut


def test_a_pending_answer_is_written_when_its_deferred_fires_and_keeps_later_ones_behind_it() -> None:
    later: list[defer.Deferred[str]] = []

    def reply(container: Any) -> Any:
        if "SLOW01" in container.raw_message:
            later.append(defer.Deferred())
            return later[0].addCallback(lambda _: container.ack())
        return container.ack()

    proto = by_hand(Answers(reply))
    proto.dataReceived(frame(message("SLOW01").encode()) + frame(message("FAST01").encode()))
    assert written(proto) == []  # the second answer waits for the first: ACKs go in arrival order
    later[0].callback(None)
    slow, fast = written(proto)
    assert re.match(ack_pattern("AA", "SLOW01"), slow, re.DOTALL)
    assert re.match(ack_pattern("AA", "FAST01"), fast, re.DOTALL)


@pytest.mark.parametrize("receiver_class", [Cp1252Receiver, AbstractHL7Receiver], ids=["txHL7", "hl7bridge"])
def test_the_receivers_codec_decodes_the_message_and_encodes_the_ack(receiver_class: type) -> None:
    seen: list[str] = []

    class Receiver(receiver_class):  # type: ignore[misc,valid-type]
        def getCodec(self) -> str:  # noqa: N802
            return "cp1252"

        def handleMessage(self, container: Any) -> Any:  # noqa: N802
            seen.append(container.raw_message)
            return container.ack()

    text = message("CP1252", body=f"PID|1||4711||{EXPECTED_SURNAME}^Zo\u00eb\r").replace("RECVFAC", "G\u00f6rlitz")
    proto = by_hand(Receiver())
    proto.dataReceived(frame(text.encode("cp1252")))
    assert seen == [text]
    [ack] = written(proto)
    assert "|G\u00f6rlitz|".encode("cp1252") in ack  # MSH-4 of the message, now MSH-3 of the ACK
    assert b"MSA|AA|CP1252\r" in ack


def test_a_txhl7_receiver_unchanged_is_answered_by_hand() -> None:
    proto = by_hand(Cp1252Receiver())
    proto.dataReceived(frame(message("TXR001", body=f"PID|1||1||{EXPECTED_SURNAME}^A\r").encode("cp1252")))
    proto.dataReceived(frame(message("TXR002", body="PID|1||2||Other^B\r").encode("cp1252")))
    first, second = written(proto)
    assert b"MSA|AA|TXR001\r" in first
    assert b"MSA|AE|TXR002\r" in second


def test_a_failing_handler_gets_an_ar_written() -> None:
    def fail(container: Any) -> Any:
        raise RuntimeError("database down")

    proto = by_hand(Answers(fail))
    proto.dataReceived(frame(message("FAIL01").encode()))
    [ack] = written(proto)
    assert re.match(ack_pattern("AR", "FAIL01"), ack, re.DOTALL)


def test_a_failed_deferred_gets_an_ar_written() -> None:
    proto = by_hand(Answers(lambda container: defer.fail(Failure(RuntimeError("database down")))))
    proto.dataReceived(frame(message("FAIL02").encode()))
    [ack] = written(proto)
    assert re.match(ack_pattern("AR", "FAIL02"), ack, re.DOTALL)


def test_the_base_message_container_writes_nothing() -> None:
    class Silent(AbstractReceiver):
        def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
            return defer.succeed(container.ack())

    proto = by_hand(Silent())
    proto.dataReceived(frame(message("QUIET1").encode()))
    assert written(proto) == []


def test_a_custom_container_gets_a_block_that_is_no_hl7() -> None:
    proto = by_hand(PingReceiver())
    proto.dataReceived(frame(b"PING") + frame(b'  {"kind": "ping"}'))
    assert written(proto) == [frame(b"GOT:PING"), frame(b'GOT:  {"kind": "ping"}')]


def test_an_hl7_receiver_still_drops_a_block_that_is_no_hl7_and_answers_the_next() -> None:
    proto = by_hand(Answers(lambda container: container.ack()))
    proto.dataReceived(frame(b"PING") + frame(message("AFTER1").encode()))
    [ack] = written(proto)
    assert re.match(ack_pattern("AA", "AFTER1"), ack, re.DOTALL)


def test_this_file_passes_under_plain_pytest_without_pytest_twisted() -> None:
    if os.environ.get("HL7BRIDGE_PLAIN_PYTEST"):
        pytest.skip("this is the plain pytest run")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:twisted",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            str(Path(__file__).relative_to(ROOT)),
        ],
        cwd=ROOT,
        env={**os.environ, "HL7BRIDGE_PLAIN_PYTEST": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pytest-twisted" not in run.stdout
    assert re.search(r"\b\d+ passed, 1 skipped\b", run.stdout), run.stdout
