"""Stage 0: the interface as it runs today, txHL7 on Twisted's asyncio reactor.

    cd examples/migration
    PYTHONPATH=. twistd -n --reactor asyncio -y stage0.tac

It listens on $MLLP_ENDPOINT (a Twisted endpoint string, tcp:2575:interface=127.0.0.1
if unset). Without --reactor asyncio it is the service as it ran before stage 0.
"""

import os

from twisted.application import service, strports
from txHL7.mllp import MLLPFactory

from myinterface.receivers import AdmissionsReceiver

application = service.Application("myinterface")
endpoint = os.environ.get("MLLP_ENDPOINT", "tcp:2575:interface=127.0.0.1")
strports.service(endpoint, MLLPFactory(AdmissionsReceiver())).setServiceParent(application)
