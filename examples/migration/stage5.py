"""Stage 5: every type answered by a handler; the txHL7 receiver is no longer served.

    cd examples/migration
    PYTHONPATH=. hl7bridge serve --endpoint tcp:2575:interface=127.0.0.1 --receiver stage5.router

Against stage4.py: the default is the ported handler of every other type. Nothing
here or in the handlers imports Twisted or txHL7; hl7bridge still serves them.
"""

from hl7bridge.migration import Route, Router
from myinterface.handlers import admissions, general

router = Router([Route("ADT^A01", admissions.handle)], default=general.handle)
