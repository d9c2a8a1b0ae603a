"""The txHL7 receiver API: names, codecs, containers, receivers from txHL7 itself."""

from __future__ import annotations

import logging

import hl7
import pytest
import txHL7.receiver
from twisted.python.failure import Failure

from hl7bridge.errors import NotAReceiver
from hl7bridge.mllp import MLLPFactory
from hl7bridge.receiver import (
    AbstractHL7Receiver,
    AbstractReceiver,
    HL7MessageContainer,
    IHL7Receiver,
    LoggingReceiver,
    MessageContainer,
    check_receiver,
    codec_of,
)
from tests.support import message, msa
from tests.test_parse import OWN, assert_same_tree


class Codec(AbstractReceiver):
    def __init__(self, codec: object) -> None:
        self.codec = codec

    def getCodec(self) -> object:  # noqa: N802
        return self.codec


@pytest.mark.parametrize(
    ("codec", "expected"),
    [
        (None, (None, "strict")),
        ((None, None), (None, "strict")),
        ("cp1252", ("cp1252", "strict")),
        (("latin-1", "replace"), ("latin-1", "replace")),
        (("utf-8", None), ("utf-8", "strict")),
    ],
)
def test_codec_follows_txhl7(codec: object, expected: tuple[str, str]) -> None:
    assert codec_of(Codec(codec)) == expected


def test_unknown_codec_fails_at_start_up() -> None:
    with pytest.raises(LookupError):
        codec_of(Codec("no-such-codec"))
    with pytest.raises(LookupError):
        codec_of(Codec(("utf-8", "no-such-handler")))


def test_base_receivers_provide_the_interface() -> None:
    assert IHL7Receiver.providedBy(LoggingReceiver())
    assert AbstractReceiver().getTimeout() is None
    assert AbstractReceiver().getCodec() == (None, None)
    assert isinstance(AbstractHL7Receiver().parseMessage(message()), HL7MessageContainer)


def test_something_that_is_not_a_receiver_is_refused() -> None:
    class Half:
        def parseMessage(self, raw):  # noqa: N802
            return raw

    with pytest.raises(NotAReceiver, match="lacks handleMessage, getCodec, getTimeout"):
        check_receiver(Half())
    with pytest.raises(NotAReceiver):
        MLLPFactory(object())


def test_receivers_written_against_txhl7_are_accepted() -> None:
    class Legacy(txHL7.receiver.AbstractHL7Receiver):
        def handleMessage(self, container):  # noqa: N802
            return container.ack()

    receiver = Legacy()
    assert txHL7.receiver.IHL7Receiver.providedBy(receiver)
    assert MLLPFactory(receiver).receiver is receiver


def test_container_parses_once_and_only_when_asked() -> None:
    container = HL7MessageContainer(message("L1"))
    assert container._message is None
    assert msa(container.ack())[1:] == ["AA", "L1"]
    assert container._message is None
    parsed = container.message
    assert isinstance(parsed, hl7.Message) and container.message is parsed
    assert str(parsed.segment("MSH")(10)) == "L1"


@pytest.mark.parametrize("text", [*OWN, "PID|1\r"])
def test_container_message_is_the_tree_hl7_parse_gives(text: str) -> None:
    try:
        expected = hl7.parse(text)
    except hl7.ParseException:
        with pytest.raises(hl7.ParseException):
            _ = HL7MessageContainer(text).message
        return
    assert_same_tree(HL7MessageContainer(text).message, expected)


def test_container_without_msh_cannot_ack() -> None:
    with pytest.raises(ValueError, match="no MSH"):
        HL7MessageContainer("PID|1\r").ack()


def test_base_container_sends_nothing_and_err_defaults_to_ar() -> None:
    failure = Failure(RuntimeError("boom with patient DOE"))
    assert MessageContainer(message()).ack() is None
    assert MessageContainer(message()).err(failure) is None
    nak = HL7MessageContainer(message("E1")).err(failure)
    assert msa(nak)[1:] == ["AR", "E1", "handler failed"]
    assert nak.split("\r")[2] == "ERR|||207^Application internal error^HL70357|E"
    assert "boom" not in nak


def test_logging_receiver_logs_no_message_content(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    text = message("LOG1", body="PID|1||987654||SECRETNAME^PATIENT\r")
    receiver = LoggingReceiver()
    result = []
    receiver.handleMessage(receiver.parseMessage(text)).addCallback(result.append)
    assert msa(result[0])[1:] == ["AA", "LOG1"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "ADT^A01" in logged and "LOG1" in logged
    assert "SECRETNAME" not in logged and "987654" not in logged
