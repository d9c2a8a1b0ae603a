"""Stage 4: ADT^A01 is answered by the new handler; every other type by the receiver.

    cd examples/migration
    PYTHONPATH=. hl7bridge serve --endpoint tcp:2575:interface=127.0.0.1 --receiver stage4.router

Against stage3.py: the handler moved from shadow= to the route's target.
"""

from hl7bridge.migration import Route, Router
from myinterface.handlers import admissions
from myinterface.receivers import AdmissionsReceiver

legacy = AdmissionsReceiver()
router = Router(
    [Route("ADT^A01", admissions.handle)],
    default=legacy,
    codec=legacy.getCodec(),
    timeout=legacy.getTimeout(),
)
