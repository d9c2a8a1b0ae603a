"""Every other type, ported from the rest of AdmissionsReceiver (stage 5)."""

import hl7

from myinterface.messages import acknowledge, has_results, message_type

ORDERS = ("ORM", "OML")


async def handle(message: hl7.Message) -> hl7.Message:
    code, _ = message_type(message)
    if code in ORDERS:
        return acknowledge(message, "AA")
    if code == "ORU":
        return acknowledge(message, "AA") if has_results(message) else acknowledge(message, "AE", "no results")
    return acknowledge(message, "AR", "message type not accepted")
