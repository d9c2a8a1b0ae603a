"""What the receiver and the handlers share: a message's type and patient id, and ACKs.

It needs python-hl7 only, so it serves at every stage of the migration, the last
one included.
"""

from __future__ import annotations

import hl7

# Every ACK names this interface as its sender (MSH-3, MSH-4).
APPLICATION = "MYINTERFACE"
FACILITY = "EXAMPLE"


def message_type(message: hl7.Message) -> tuple[str, str]:
    """MSH-9 as (message code, trigger event), with "" for a part that is missing."""
    parts = str(message.segment("MSH")(9)).split(message.separators[3])
    return parts[0], parts[1] if len(parts) > 1 else ""


def patient_id(message: hl7.Message) -> str:
    """PID-3 of the first PID segment, or "" if there is none."""
    for segment in message:
        if str(segment[0]) == "PID":
            return str(segment(3)) if len(segment) > 3 else ""
    return ""


def has_results(message: hl7.Message) -> bool:
    return any(str(segment[0]) == "OBX" for segment in message)


def acknowledge(message: hl7.Message, code: str, text: str = "") -> hl7.Message:
    """The interface's ACK of ``message``: MSA-1 ``code``, and ``text`` in MSA-3 if given.

    python-hl7's ``create_ack`` raises TypeError for a message whose MSH-9 has no
    trigger event; the receiver and the handlers let it, as the service always did.
    """
    ack = message.create_ack(code, application=APPLICATION, facility=FACILITY)
    if text:
        ack.segment("MSA").assign_field(text, 3)
    return ack
