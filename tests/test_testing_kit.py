"""The pytest kit users get with hl7bridge (entry point pytest11), used as its docs show."""

from __future__ import annotations

import hl7
import pytest

from hl7bridge.errors import NegativeAck
from hl7bridge.receiver import LoggingReceiver
from hl7bridge.testing import FACES, ListenerKit, asyncio_test
from tests.handlers import admissions
from tests.support import message, msa


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_kit_serves_a_receiver_and_a_handler(hl7bridge_listener: ListenerKit, face: str) -> None:
    legacy = await hl7bridge_listener.start(LoggingReceiver(), face=face)
    new = await hl7bridge_listener.start(admissions.handle, face=face)
    assert msa(await legacy.send(message("KIT1")))[1:3] == ["AA", "KIT1"]
    ack = hl7.parse(await new.send(message("KIT2")))
    assert str(ack.segment("MSA")(2)) == "KIT2"
    assert legacy.port != new.port


def test_plugin_is_registered_by_entry_point(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.has_plugin("hl7bridge")


@asyncio_test
async def test_kit_refuses_an_unknown_face(hl7bridge_listener: ListenerKit) -> None:
    with pytest.raises(ValueError, match="face must be one of"):
        await hl7bridge_listener.start(LoggingReceiver(), face="carrier-pigeon")


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_kit_gives_a_checking_sender_for_a_listener(hl7bridge_listener: ListenerKit, face: str) -> None:
    listener = await hl7bridge_listener.start(admissions.handle, face=face)
    sender = listener.sender(ack_timeout=5)
    assert msa(await sender.send(message("KIT3")))[1:3] == ["AA", "KIT3"]
    with pytest.raises(NegativeAck) as raised:
        await sender.send(message("KIT4", body="PID|1||||DOE^JANE\r"))
    assert raised.value.code == "AE"
