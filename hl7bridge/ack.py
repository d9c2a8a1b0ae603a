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

import itertools
import os
import re
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
JOURNAL_UNAVAILABLE = Rejection("AR", "message journal unavailable", "207", "Application internal error")

# MSH faults (see header_fault). Those in ANSWERABLE still leave the control id
# readable, so an AR can carry it in MSA-2; the others leave none to put there,
# or no reliable way to read it.
MISSING_MESSAGE_TYPE = Rejection("AR", "required field missing (MSH-9)", "101", "Required field missing")
MISSING_ENCODING_CHARACTERS = Rejection("AR", "required field missing (MSH-2)", "101", "Required field missing")
MISSING_CONTROL_ID = Rejection("AR", "required field missing (MSH-10)", "101", "Required field missing")
UNUSABLE_SEPARATORS = Rejection("AR", "unusable separators (MSH-1 and MSH-2)", "101", "Required field missing")
NO_HEADER = Rejection("AR", "no readable MSH segment", "100", "Segment sequence error")
ANSWERABLE = frozenset({MISSING_MESSAGE_TYPE, MISSING_ENCODING_CHARACTERS})


#: Fields of MSH an ACK or a journal key reads (MSH-21 at most); a shorter MSH is padded with empty fields up to here.
_PADDED = 22


class Header:
    """The MSH segment of a message, split into fields.

    ``field(n)`` follows HL7's numbering: MSH-1 is the field separator itself,
    MSH-2 the encoding characters, MSH-9 the message type. A field past the
    end of the segment is "".
    """

    __slots__ = ("component_separator", "field_separator", "fields", "padded", "repetition_separator", "segment")

    def __init__(self, segment: str, fields: tuple[str, ...]) -> None:
        self.segment = segment
        self.fields = fields
        self.field_separator = segment[3]
        encoding = fields[1] if len(fields) > 1 else ""
        self.component_separator = encoding[0] if encoding else "^"
        self.repetition_separator = encoding[1] if len(encoding) > 1 else "~"
        # Index n holds MSH-n: MSH-1 is the separator, which split() leaves out;
        # "" up to MSH-21 where the segment is shorter.
        padded = ("", self.field_separator, *fields[1:])
        self.padded = padded + ("",) * (_PADDED - len(padded)) if len(padded) < _PADDED else padded

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Header) and other.segment == self.segment

    def __hash__(self) -> int:
        return hash(self.segment)

    def __repr__(self) -> str:
        return f"Header({self.segment[:40]!r}...)"

    def field(self, number: int) -> str:
        """MSH-``number`` as text, or "" where the segment is shorter."""
        padded = self.padded
        return padded[number] if number < len(padded) else ""

    def component(self, number: int, component: int) -> str:
        """Component ``component`` of the first repetition of MSH-``number``."""
        value = self.field(number)
        if self.repetition_separator in value:
            value = value.split(self.repetition_separator, 1)[0]
        parts = value.split(self.component_separator, component)
        return parts[component - 1] if component - 1 < len(parts) else ""

    @property
    def charset(self) -> str:
        """MSH-18's first repetition: the character set the message declares."""
        return self.field(18).split(self.repetition_separator, 1)[0]

    @property
    def message_type(self) -> str:
        """MSH-9.1 and MSH-9.2 as ``"ADT^A01"`` (or ``"ADT"``), for logs and routing."""
        value = self.padded[9].split(self.repetition_separator, 1)[0]
        parts = value.split(self.component_separator, 2)
        return f"{parts[0]}^{parts[1]}" if len(parts) > 1 and parts[1] else parts[0]

    @property
    def control_id(self) -> str:
        """MSH-10, the id the sender expects back in MSA-2."""
        return self.padded[10]


#: Segments a block may start with: a message, or a batch (file or batch header).
BLOCK_HEADERS = ("MSH", "FHS", "BHS")

_LEADING_WHITESPACE = re.compile(r"\s*")


def read_header(text: str) -> Header | None:
    """Split the MSH segment at the start of ``text``; None if it has none.

    Leading whitespace is skipped, as python-hl7's parser does. The segment ends
    at the first CR (the HL7 segment terminator) or LF (a common misframing).
    In a batch (``FHS``/``BHS`` first) it is the first message's MSH, the one
    txHL7 (through python-hl7) acknowledged.
    """
    # Offsets, not copies: a message can be megabytes long.
    start = 0 if text.startswith("MSH") else _LEADING_WHITESPACE.match(text).end()  # type: ignore[union-attr]
    if text.startswith(("FHS", "BHS"), start):
        found = [i for i in (text.find("\rMSH", start), text.find("\nMSH", start)) if i >= 0]
        if not found:
            return None
        start = min(found) + 1
    if not text.startswith("MSH", start) or len(text) < start + 4:
        return None
    separator = text[start + 3]
    if separator in "\r\n":
        return None
    end = text.find("\r", start + 4)
    if end < 0:
        end = len(text)
    newline = text.find("\n", start + 4, end)
    if newline >= 0:
        end = newline
    segment = text[start:end]
    return Header(segment, tuple(segment.split(separator)))


#: MSH-2 holds 1 to 5 encoding characters (component, repetition, escape,
#: subcomponent separators and, from v2.7, the truncation character).
_MAX_ENCODING_CHARACTERS = 5


def header_fault(header: Header | None) -> Rejection | None:
    """What stops an ACK from identifying the message whose MSH is ``header``; None if nothing.

    MSH-1 must be neither a letter, a digit nor whitespace; MSH-2 must hold at
    most 5 encoding characters, distinct, none of them MSH-1, a letter, a digit
    or whitespace (more means MSH-1 was not the separator the sender used);
    MSH-9 (message type), MSH-10 (control id) and MSH-2 must be present (HL7
    v2.5 section 2.14.9). An ACK to a message with a fault outside
    :data:`ANSWERABLE` would carry an empty or wrong MSA-2.
    """
    if header is None:
        return NO_HEADER
    separators = header.field_separator + header.field(2)
    if (
        len(separators) > _MAX_ENCODING_CHARACTERS + 1
        or len(set(separators)) != len(separators)
        or any(character.isalnum() or character.isspace() for character in separators)
    ):
        return UNUSABLE_SEPARATORS
    if not header.control_id.strip():
        return MISSING_CONTROL_ID
    if len(separators) == 1:
        return MISSING_ENCODING_CHARACTERS
    if not header.field(9).strip():
        return MISSING_MESSAGE_TYPE
    return None


_CONTROL_ID_PREFIX = os.urandom(6).hex().upper()
_control_ids = itertools.count(int.from_bytes(os.urandom(3), "big"))


def new_control_id() -> str:
    """A fresh 20-character MSH-10 (HL7 allows 20 in v2.3 to v2.5).

    A random prefix per process and a counter: unique within the process,
    and across processes and restarts by the prefix.
    """
    return f"{_CONTROL_ID_PREFIX}{next(_control_ids) & 0xFFFFFFFF:08X}"


_timestamp_cache: tuple[int, str] = (-1, "")


def hl7_timestamp(now: float | None = None) -> str:
    """UTC time as an HL7 TS to the second, ``YYYYMMDDHHMMSS``, as python-hl7 writes it."""
    global _timestamp_cache
    second = int(time.time() if now is None else now)
    cached_second, text = _timestamp_cache
    if second != cached_second:
        text = time.strftime("%Y%m%d%H%M%S", time.gmtime(second))
        _timestamp_cache = (second, text)
    return text


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
    f = header.padded
    msh = sep.join(
        (
            "MSH",
            f[2],
            f[5],
            f[6],
            f[3],
            f[4],
            timestamp if timestamp is not None else hl7_timestamp(),
            "",
            f"ACK{comp}{header.component(9, 2)}{comp}ACK",
            control_id if control_id is not None else new_control_id(),
            f[11],
            f[12],
        )
    )
    msa = f"MSA{sep}{code}{sep}{f[10]}" if text is None else sep.join(("MSA", code, f[10], text))
    return f"{msh}{SEGMENT_END}{msa}{SEGMENT_END}"


def read_ack(text: str) -> tuple[str, str]:
    """MSA-1 (the ACK code) and MSA-2 (the control id acknowledged) of an ACK; "" where missing."""
    start = text.find("MSA")
    while start > 0 and text[start - 1] not in "\r\n":
        start = text.find("MSA", start + 1)
    if start < 0 or len(text) < start + 4:
        return "", ""
    end = min((i for i in (text.find("\r", start), text.find("\n", start)) if i >= 0), default=len(text))
    fields = text[start:end].split(text[start + 3])
    return (fields[1] if len(fields) > 1 else ""), (fields[2] if len(fields) > 2 else "")


def read_ack_code(data: bytes) -> str:
    """MSA-1 of an encoded ACK, "?" if it has none; without decoding it, for a log line per message."""
    start = data.find(b"\rMSA")
    if start < 0 or len(data) < start + 6:
        return read_ack(data.decode("latin-1"))[0] or "?"
    separator = data[start + 4 : start + 5]
    code = data[start + 5 : start + 7]
    if code.isalpha() and data[start + 7 : start + 8] in (separator, b"\r"):  # two letters, as table 0008's
        return code.decode("latin-1")
    end = start + 5
    while end < len(data) and data[end : end + 1] not in (separator, b"\r", b"\n"):
        end += 1
    return data[start + 5 : end].decode("latin-1") or "?"


def build_nak(header: Header, rejection: Rejection) -> str:
    """A negative ACK: MSA-1 and MSA-3 from ``rejection``, and an ERR segment.

    The ERR segment uses the v2.5 layout (ERR-3 HL7 error code, ERR-4 severity
    E); receivers of older versions ignore fields they do not know.
    """
    sep, comp = header.field_separator, header.component_separator
    err = sep.join(("ERR", "", "", comp.join((rejection.error_code, rejection.error_text, "HL70357")), "E"))
    return build_ack(header, rejection.code, text=rejection.text) + err + SEGMENT_END
