"""Routing by type and sender, unmatched messages, and shadow runs, on both faces."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import hl7
import pytest
from twisted.internet import defer

from hl7bridge.migration import Route, Router, ShadowReport, compare_acks
from hl7bridge.receiver import AbstractHL7Receiver, MessageContainer
from hl7bridge.testing import asyncio_test
from tests.support import FACES, frame, message, msa
from tests.test_session import exchange


class Named(AbstractHL7Receiver):
    """Answers AA with MSA-3 naming itself, so a test sees who answered; counts its parses."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.parsed = 0

    def parseMessage(self, raw_message: str) -> Any:  # noqa: N802
        self.parsed += 1
        return super().parseMessage(raw_message)

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        return container.ack().rstrip("\r") + f"|{self.name}\r"


def typed(control_id: str, message_type: str, sending_application: str = "SENDAPP") -> bytes:
    text = message(control_id).replace("ADT^A01^ADT_A01", message_type).replace("SENDAPP", sending_application)
    return frame(text.encode())


def answered_by(reply: bytes) -> str:
    return msa(reply.decode())[3] if len(msa(reply.decode())) > 3 else ""


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_routes_by_type_wildcard_sender_and_default(face: str) -> None:
    admit, adt, lab, rest = Named("admit"), Named("adt"), Named("lab"), Named("rest")
    router = Router(
        [
            Route("ADT^A01", admit),
            Route("ADT^*", adt),
            Route("ORU^R01", lab, sending_application="LAB*"),
        ],
        default=rest,
    )
    data = (
        typed("R1", "ADT^A01^ADT_A01")
        + typed("R2", "ADT^A08^ADT_A01")
        + typed("R3", "ORU^R01^ORU_R01", "LABSYS")
        + typed("R4", "ORU^R01^ORU_R01", "RADIOLOGY")
        + typed("R5", "ORM^O01")
    )
    replies = await exchange(face, router, data, 5)
    assert [answered_by(r) for r in replies] == ["admit", "adt", "lab", "rest", "rest"]
    assert (admit.parsed, adt.parsed, lab.parsed, rest.parsed) == (1, 1, 1, 2)


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_unmatched_type_gets_a_clear_ar(face: str) -> None:
    router = Router([Route("ADT^*", Named("adt"))])
    replies = await exchange(face, router, typed("U1", "ORU^R01^ORU_R01") + typed("U2", "ADT^A03"), 2)
    nak = replies[0].decode().split("\r")
    assert nak[1] == "MSA|AR|U1|no route for this message type"
    assert nak[2] == "ERR|||200^Unsupported message type^HL70357|E"
    assert answered_by(replies[1]) == "adt"


async def agreeing(message: hl7.Message) -> str:
    return str(message.create_ack("AA"))


async def disagreeing(message: hl7.Message) -> str:
    return str(message.create_ack("AE"))


async def raising(message: hl7.Message) -> str:
    raise RuntimeError("shadow bug")


async def hanging(message: hl7.Message) -> str:
    await asyncio.Event().wait()
    raise AssertionError("never")


class Primary(AbstractHL7Receiver):
    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        return defer.succeed(container.ack())


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_shadow_agreeing_differing_raising_and_hanging(face: str, caplog: pytest.LogCaptureFixture) -> None:
    router = Router(
        [
            Route("ADT^A01", Primary(), shadow=agreeing),
            Route("ADT^A02", Primary(), shadow=disagreeing),
            Route("ADT^A03", Primary(), shadow=raising),
            Route("ADT^A04", Primary(), shadow=hanging),
        ],
        shadow_timeout=0.5,
    )
    data = b"".join(typed(f"S{n}", f"ADT^A0{n}^ADT_A01") for n in (1, 2, 3, 4, 1))
    started = time.monotonic()
    replies = await exchange(face, router, data, 5)
    # The primary answered at once: the hanging shadow did not hold it up.
    assert time.monotonic() - started < 0.45
    assert [msa(r.decode())[1:3] for r in replies] == [["AA", f"S{n}"] for n in (1, 2, 3, 4, 1)]
    await router.wait_for_shadows()
    assert router.report.as_dict() == {
        "ADT^A01": {"agreed": 2, "differed": 0, "failed": 0},
        "ADT^A02": {"agreed": 0, "differed": 1, "failed": 0},
        "ADT^A03": {"agreed": 0, "differed": 0, "failed": 1},
        "ADT^A04": {"agreed": 0, "differed": 0, "failed": 1},
    }
    logged = [r.getMessage() for r in caplog.records if r.name == "hl7bridge.migration"]
    assert "shadow differed on ADT^A02 (control id S2): MSA-1" in logged
    assert any("shadow failed on ADT^A04" in line and "TimeoutError" in line for line in logged)
    assert not [line for line in logged if "DOE" in line or "12345" in line]


def test_compare_acks_names_fields_and_ignores_time_and_id() -> None:
    base = "MSH|^~\\&|A|B|C|D|20240101||ACK^A01^ACK|ID1|P|2.5\rMSA|AA|X1\r"
    later = base.replace("20240101", "20250101").replace("ID1", "ID2")
    assert compare_acks(base, later) == []
    assert compare_acks(base, later.replace("MSA|AA", "MSA|AE")) == ["MSA-1"]
    assert compare_acks(base, later.replace("|A|B|", "|Z|B|")) == ["MSH-3"]
    assert compare_acks(base, later + "ERR|||207\r") == ["segment 3"]
    assert compare_acks(base, base.replace("X1\r", "X1|text\r")) == ["MSA-3"]
    assert compare_acks(None, None) == []
    assert compare_acks(base, None) == ["no ACK"]


def test_report_format_and_bad_outcome() -> None:
    report = ShadowReport()
    report.record("ADT^A01", "agreed")
    report.record("ADT^A01", "differed")
    assert report.format().splitlines()[1].split() == ["ADT^A01", "1", "1", "0"]
    with pytest.raises(ValueError):
        report.record("ADT^A01", "maybe")


def test_router_refuses_an_unknown_codec() -> None:
    with pytest.raises(LookupError):
        Router([], codec="no-such-codec")


def test_route_to_something_that_is_not_a_receiver_is_refused() -> None:
    with pytest.raises(TypeError):
        Router([Route("ADT^*", 42)])


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_logs_of_routing_carry_no_content(face: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    router = Router([Route("ADT^A01", Primary(), shadow=disagreeing)])
    await exchange(face, router, typed("C1", "ADT^A01^ADT_A01") + typed("C2", "ORU^R01"), 2)
    await router.wait_for_shadows()
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "DOE" not in text and "JANE" not in text and "12345" not in text


@asyncio_test
async def test_twistd_service_logs_the_shadow_report_when_it_stops(caplog: pytest.LogCaptureFixture) -> None:
    from twisted.internet import reactor

    from hl7bridge.defer import to_future
    from hl7bridge.mllp import MLLPFactory
    from hl7bridge.tap import DrainingService
    from tests.support import HOST, Peer

    factory = MLLPFactory(Router([Route("ADT^A01", Primary(), shadow=hanging)], shadow_timeout=0.3))
    port = reactor.listenTCP(0, factory, interface=HOST)
    peer = await Peer.connect(port.getHost().port)
    await peer.send(typed("E1", "ADT^A01^ADT_A01"))
    assert msa((await peer.reply()).decode())[1:3] == ["AA", "E1"]
    await peer.close()
    loop = asyncio.get_running_loop()
    await to_future(port.stopListening(), loop)
    started = time.monotonic()
    # The service waits for the hanging shadow (up to shadow_timeout), then logs the report.
    await to_future(DrainingService(factory).stopService(), loop)
    assert time.monotonic() - started < 5
    logged = [r.getMessage() for r in caplog.records if r.name == "hl7bridge.migration"]
    assert "shadow report ADT^A01: agreed 0, differed 0, failed 1" in logged


def test_route_matches_type_trigger_wildcards_and_sender_fields() -> None:
    from hl7bridge.ack import read_header

    def header(msh9: str, app: str = "LAB^1.2.3^ISO", facility: str = "NORTH^9^ISO") -> Any:
        return read_header(f"MSH|^~\\&|{app}|{facility}|R|F|20240101||{msh9}|C1|P|2.5\r")

    assert Route("ADT^A01", None).matches(header("ADT^A01^ADT_A01"))
    assert not Route("ADT^A01", None).matches(header("ADT^A011"))
    assert Route("ADT^A0?", None).matches(header("ADT^A04"))
    assert Route("ADT", None).matches(header("ADT")) and not Route("ADT", None).matches(header("ADT^A01"))
    assert Route("*", None).matches(header("ORU^R01"))
    # MSH-3 and MSH-4 by their first component, with wildcards.
    by_sender = Route("ORU^*", None, sending_application="LAB", sending_facility="NORTH*")
    assert by_sender.matches(header("ORU^R01"))
    assert not by_sender.matches(header("ORU^R01", facility="SOUTH"))
    assert not by_sender.matches(header("ORU^R01", app="RAD"))
