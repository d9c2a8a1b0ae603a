"""HL7 v2 acknowledgements built from the MSH segment alone.

No I/O, no asyncio, no Twisted. Reading the MSH is enough to acknowledge a
message (HL7 v2.5 chapter 2.9, original mode), so hl7bridge never parses a
whole message just to answer it, and it can still answer (with a NAK) a message
whose body python-hl7 cannot parse.

For any message python-hl7 parses, :func:`build_ack` gives the same text as
``str(hl7.parse(text).create_ack(code))`` apart from MSH-7 (time) and MSH-10
(a fresh control id); the test suite checks this on every corpus message.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

SEGMENT_END = "\r"

#: HL7 Table 0008 acknowledgment codes.
ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})


@dataclass(frozen=True)
class Rejection:
    """Why hl7bridge itself refuses a message: MSA-1, MSA-3 and the ERR-3 code.

    ``error_code`` and ``error_text`` come from HL7 Table 0357 (message error
    condition codes).
    """

    code: str
    text: str
    error_code: str
    error_text: str


UNDECODABLE = Rejection("AR", "undecodable message", "102", "Data type error")
UNPARSEABLE = Rejection("AR", "message could not be parsed", "100", "Segment sequence error")
TOO_LARGE = Rejection("AR", "message too large", "207", "Application internal error")
INCOMPLETE = Rejection("AR", "message not completed in time", "207", "Application internal error")
HANDLER_FAILED = Rejection("AR", "handler failed", "207", "Application internal error")
HANDLER_TIMEOUT = Rejection("AE", "handler timed out", "207", "Application internal error")


@dataclass(frozen=True)
class Header:
    """The MSH segment of a message, split into fields.

    ``field(n)`` follows HL7's numbering: MSH-1 is the field separator itself,
    MSH-2 the encoding characters, MSH-9 the message type.
    """

    segment: str
    fields: tuple[str, ...]

    @property
    def field_separator(self) -> str:
        return self.segment[3]

    @property
    def component_separator(self) -> str:
        encoding = self.field(2)
        return encoding[0] if encoding else "^"

    @property
    def repetition_separator(self) -> str:
        encoding = self.field(2)
        return encoding[1] if len(encoding) > 1 else "~"

    def field(self, number: int) -> str:
        """MSH-``number`` as text, or "" where the segment is shorter."""
        if number == 1:
            return self.field_separator
        return self.fields[number - 1] if number - 1 < len(self.fields) else ""

    def component(self, number: int, component: int) -> str:
        """Component ``component`` of the first repetition of MSH-``number``."""
        first = self.field(number).split(self.repetition_separator, 1)[0]
        parts = first.split(self.component_separator)
        return parts[component - 1] if component - 1 < len(parts) else ""

    @property
    def charset(self) -> str:
        """MSH-18's first repetition: the character set the message declares."""
        return self.field(18).split(self.repetition_separator, 1)[0]

    @property
    def message_type(self) -> str:
        """MSH-9.1 and MSH-9.2 as ``"ADT^A01"`` (or ``"ADT"``), for logs and routing."""
        trigger = self.component(9, 2)
        code = self.component(9, 1)
        return f"{code}^{trigger}" if trigger else code

    @property
    def control_id(self) -> str:
        """MSH-10, the id the sender expects back in MSA-2."""
        return self.field(10)


#: Segments a block may start with: a message, or a batch (file or batch header).
BLOCK_HEADERS = ("MSH", "FHS", "BHS")


def read_header(text: str) -> Header | None:
    """Split the MSH segment at the start of ``text``; None if it has none.

    Leading whitespace is skipped, as python-hl7's parser does. The segment ends
    at the first CR (the HL7 segment terminator) or LF (a common misframing).
    In a batch (``FHS``/``BHS`` first) it is the first message's MSH, the one
    txHL7 (through python-hl7) acknowledged.
    """
    text = text.lstrip()
    if text.startswith(("FHS", "BHS")):
        found = min((i for i in (text.find("\rMSH"), text.find("\nMSH")) if i >= 0), default=-1)
        text = text[found + 1 :] if found >= 0 else ""
    if not text.startswith("MSH") or len(text) < 4:
        return None
    separator = text[3]
    if separator in "\r\n":
        return None
    end = len(text)
    for terminator in "\r\n":
        found = text.find(terminator, 4)
        if 0 <= found < end:
            end = found
    segment = text[:end]
    return Header(segment, tuple(segment.split(separator)))


def new_control_id() -> str:
    """A fresh 20-character MSH-10 (HL7 allows 20 in v2.3 to v2.5)."""
    return os.urandom(10).hex().upper()


def hl7_timestamp(now: float | None = None) -> str:
    """UTC time as an HL7 TS to the second, ``YYYYMMDDHHMMSS``, as python-hl7 writes it."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(now))


def build_ack(
    header: Header,
    code: str = "AA",
    *,
    text: str | None = None,
    control_id: str | None = None,
    timestamp: str | None = None,
) -> str:
    """Build an original-mode ACK for the message whose MSH is ``header``.

    Sender and receiver swap places (MSH-3/4 <-> MSH-5/6), MSH-9 becomes
    ``ACK^<trigger>^ACK``, MSH-11 and MSH-12 are copied, and MSA-2 carries the
    message's MSH-10 (HL7 v2.5 section 2.9.2).

    Args:
        header: the message's MSH, from :func:`read_header`.
        code: MSA-1, one of :data:`ACK_CODES`.
        text: MSA-3, a short reason; it must not contain the message's separators.
        control_id: MSH-10 of the ACK; a fresh one by default.
        timestamp: MSH-7 of the ACK; now (UTC) by default.

    Returns:
        The ACK as text, each segment ended by CR.

    Raises:
        ValueError: ``code`` is not an HL7 acknowledgment code.
    """
    if code not in ACK_CODES:
        raise ValueError(f"{code!r} is not an HL7 acknowledgment code ({sorted(ACK_CODES)})")
    sep = header.field_separator
    comp = header.component_separator
    field = header.field
    msh = sep.join(
        (
            "MSH",
            field(2),
            field(5),
            field(6),
            field(3),
            field(4),
            timestamp if timestamp is not None else hl7_timestamp(),
            "",
            f"ACK{comp}{header.component(9, 2)}{comp}ACK",
            control_id if control_id is not None else new_control_id(),
            field(11),
            field(12),
        )
    )
    msa = sep.join(("MSA", code, field(10)) if text is None else ("MSA", code, field(10), text))
    return msh + SEGMENT_END + msa + SEGMENT_END


def build_nak(header: Header, rejection: Rejection) -> str:
    """A negative ACK: MSA-1 and MSA-3 from ``rejection``, and an ERR segment.

    The ERR segment uses the v2.5 layout (ERR-3 HL7 error code, ERR-4 severity
    E); receivers of older versions ignore fields they do not know.
    """
    sep, comp = header.field_separator, header.component_separator
    err = sep.join(("ERR", "", "", comp.join((rejection.error_code, rejection.error_text, "HL70357")), "E"))
    return build_ack(header, rejection.code, text=rejection.text) + err + SEGMENT_END
