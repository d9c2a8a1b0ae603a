"""A router for ``hl7bridge serve --receiver tests.migration.routes.router``: a shadow run in a real process."""

import hl7

from hl7bridge.migration import Route, Router
from hl7bridge.receiver import LoggingReceiver
from tests.handlers import admissions
from tests.legacy.adt_receiver import ADTReceiver


async def rejects_everything(message: hl7.Message) -> hl7.Message:
    return message.create_ack("AR")


router = Router(
    [
        Route("ADT^A01", ADTReceiver(), shadow=admissions.handle),
        Route("ADT^A08", ADTReceiver(), shadow=rejects_everything),
    ],
    default=LoggingReceiver(),
)
