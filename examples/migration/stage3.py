"""Stage 3: the new ADT^A01 handler shadows the receiver; senders still get the receiver's ACKs.

    cd examples/migration
    PYTHONPATH=. hl7bridge serve --endpoint tcp:2575:interface=127.0.0.1 --receiver stage3.router

Each ACK of the shadow that differs from the receiver's (MSH-7 and MSH-10 aside)
is logged at WARNING as "shadow differed on ADT^A01 ...", naming the fields.
"""

from hl7bridge.migration import Route, Router
from myinterface.handlers import admissions
from myinterface.receivers import AdmissionsReceiver

legacy = AdmissionsReceiver()
router = Router(
    [Route("ADT^A01", legacy, shadow=admissions.handle)],
    default=legacy,  # every other type: answered as before
    codec=legacy.getCodec(),  # a router decodes for all its routes: give it the receiver's codec
    timeout=legacy.getTimeout(),
)
