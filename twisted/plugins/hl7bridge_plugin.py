# twistd -n --reactor asyncio hl7bridge --endpoint tcp:2575 --receiver package.module.Class
# and the mtls: server endpoint string (TLS that requires client certificates).
from twisted.application.service import ServiceMaker

from hl7bridge.endpoints import MutualTLSServerParser

hl7bridge = ServiceMaker("hl7bridge", "hl7bridge.tap", "MLLP listener for txHL7 receivers on hl7.mllp", "hl7bridge")
mtls = MutualTLSServerParser()
