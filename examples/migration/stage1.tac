"""Stage 1: txHL7 out, hl7bridge in. The receiver did not change.

    cd examples/migration
    PYTHONPATH=. twistd -n --reactor asyncio -y stage1.tac

It listens on $MLLP_ENDPOINT (tcp:2575:interface=127.0.0.1 if unset). Against
stage0.tac: one import, plus the two lines twistd's hl7bridge plugin would add
(drain on stop, hl7bridge's log lines in twistd's log).
"""

import os

from twisted.application import service, strports

from hl7bridge.mllp import MLLPFactory  # was: from txHL7.mllp import MLLPFactory
from hl7bridge.tap import DrainingService, log_to_twisted
from myinterface.receivers import AdmissionsReceiver

log_to_twisted()

application = service.Application("myinterface")
endpoint = os.environ.get("MLLP_ENDPOINT", "tcp:2575:interface=127.0.0.1")
factory = MLLPFactory(AdmissionsReceiver())
listener = DrainingService(factory)  # on stop: stop listening, then answer what is in flight
strports.service(endpoint, factory).setServiceParent(listener)
listener.setServiceParent(application)
