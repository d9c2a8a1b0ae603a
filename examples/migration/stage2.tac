"""Stage 2: the txHL7 listener and an hl7bridge listener side by side, in one process.

    cd examples/migration
    PYTHONPATH=. twistd -n --reactor asyncio -y stage2.tac

txHL7 keeps $MLLP_ENDPOINT (tcp:2575:interface=127.0.0.1 if unset) for the senders
not moved yet; hl7bridge listens on $MLLP_NEW_ENDPOINT (tcp:2576:interface=127.0.0.1
if unset), and senders move to it one at a time. Both serve the same receiver.
"""

import os

from twisted.application import service, strports
from txHL7.mllp import MLLPFactory as TxHL7Factory

from hl7bridge.mllp import MLLPFactory
from hl7bridge.tap import DrainingService, log_to_twisted
from myinterface.receivers import AdmissionsReceiver

log_to_twisted()

application = service.Application("myinterface")

old_endpoint = os.environ.get("MLLP_ENDPOINT", "tcp:2575:interface=127.0.0.1")
strports.service(old_endpoint, TxHL7Factory(AdmissionsReceiver())).setServiceParent(application)

new_endpoint = os.environ.get("MLLP_NEW_ENDPOINT", "tcp:2576:interface=127.0.0.1")
factory = MLLPFactory(AdmissionsReceiver())
bridged = DrainingService(factory)
strports.service(new_endpoint, factory).setServiceParent(bridged)
bridged.setServiceParent(application)
