"""ADT^A01, ported from AdmissionsReceiver.admit (written at stage 3, shadowed, routed at stage 4)."""

import asyncio

import hl7

from myinterface.messages import acknowledge, patient_id


def look_up_patient(message: hl7.Message) -> str:
    """Blocking work, as in the receiver (a database lookup in the real service)."""
    return patient_id(message)


async def handle(message: hl7.Message) -> hl7.Message:
    if not await asyncio.to_thread(look_up_patient, message):
        return acknowledge(message, "AE", "patient id missing")
    return acknowledge(message, "AA")
