"""Three MLLP listeners in one process, on one loop: txHL7, hl7bridge and plain hl7.mllp.

Stage 2 of MIGRATION.md. All three count messages in one shared dict; the
hl7bridge receiver mixes Twisted (deferToThread) and asyncio (asyncio.sleep)
in one handler.

    python examples/side_by_side.py            # listen on 2575, 2576, 2577 until Ctrl-C
    python examples/side_by_side.py --once     # free ports; send one message to each, print, exit
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

from hl7bridge.reactor import install

reactor = install()  # before anything imports twisted.internet.reactor

import hl7  # noqa: E402
from hl7.mllp import open_hl7_connection, start_hl7_server  # noqa: E402
from twisted.internet import threads  # noqa: E402
from txHL7.mllp import MLLPFactory as TxHL7Factory  # noqa: E402
from txHL7.receiver import AbstractHL7Receiver as TxHL7Receiver  # noqa: E402

import hl7bridge  # noqa: E402
from hl7bridge.defer import to_deferred  # noqa: E402
from hl7bridge.receiver import AbstractHL7Receiver  # noqa: E402

COUNTS: Counter[str] = Counter()  # shared by all three listeners


def look_up_ward(message: hl7.Message) -> str:
    """Blocking work, such as a database call, that belongs in a thread."""
    return str(message.segment("PV1")(3)) if "PV1" in str(message) else ""


class LegacyReceiver(TxHL7Receiver):
    """Unchanged txHL7 code: a Deferred from a thread."""

    def handleMessage(self, message_container):  # noqa: N802
        COUNTS["txHL7"] += 1
        return threads.deferToThread(look_up_ward, message_container.message).addCallback(
            lambda ward: message_container.ack()
        )


class BridgedReceiver(AbstractHL7Receiver):
    """The same receiver API on hl7bridge, mixing Twisted and asyncio in one handler."""

    def handleMessage(self, message_container):  # noqa: N802
        return self.handle(message_container)

    async def handle(self, message_container):
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.001)  # asyncio code
        await threads.deferToThread(look_up_ward, message_container.message).asFuture(loop)  # Twisted code
        COUNTS["hl7bridge"] += 1
        return message_container.ack()


async def plain_hl7_mllp(reader, writer):
    """A listener as hl7.mllp's own documentation writes one."""
    try:
        while not reader.at_eof():
            message = await reader.readmessage()
            COUNTS["hl7.mllp"] += 1
            writer.writemessage(message.create_ack())
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


MESSAGE = (
    "MSH|^~\\&|EXAMPLE|CLINIC|BRIDGE|HOSPITAL|20240101120000||ADT^A01^ADT_A01|{id}|P|2.5\r"
    "PID|1||000042||EXAMPLE^PATIENT\rPV1|1|I|WARD7\r"
)


async def start(once: bool) -> list[int]:
    ports = (0, 0, 0) if once else (2575, 2576, 2577)
    txhl7_port = reactor.listenTCP(ports[0], TxHL7Factory(LegacyReceiver()), interface="127.0.0.1")
    bridged = await hl7bridge.serve(BridgedReceiver(), "127.0.0.1", ports[1])
    plain = await start_hl7_server(plain_hl7_mllp, "127.0.0.1", ports[2])
    numbers = [txhl7_port.getHost().port, bridged.sockets[0].getsockname()[1], plain.sockets[0].getsockname()[1]]
    print("listening: txHL7 on {}, hl7bridge on {}, hl7.mllp on {}".format(*numbers), flush=True)
    return numbers


async def send_one_to_each(ports: list[int]) -> None:
    for name, port in zip(("txHL7", "hl7bridge", "hl7.mllp"), ports, strict=True):
        reader, writer = await open_hl7_connection("127.0.0.1", port)
        writer.writemessage(hl7.parse(MESSAGE.format(id=f"SBS-{port}")))
        ack = await asyncio.wait_for(reader.readmessage(), 10)
        writer.close()
        print(f"{name}: {ack.segment('MSA')(1)} for {ack.segment('MSA')(2)}", flush=True)
    print("counts:", dict(sorted(COUNTS.items())), flush=True)


async def main(once: bool) -> None:
    ports = await start(once)
    if once:
        await send_one_to_each(ports)
        reactor.stop()


if __name__ == "__main__":
    reactor.callWhenRunning(lambda: to_deferred(main("--once" in sys.argv)))
    reactor.run()
