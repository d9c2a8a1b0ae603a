# twistd -n --reactor asyncio hl7bridge --endpoint tcp:2575 --receiver package.module.Class
from twisted.application.service import ServiceMaker

hl7bridge = ServiceMaker("hl7bridge", "hl7bridge.tap", "MLLP listener for txHL7 receivers on hl7.mllp", "hl7bridge")
