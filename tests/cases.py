"""Byte-stream cases run against the deframer and against both listening faces.

Each case gives the stream a sender writes and what must come out of it: the
blocks in lenient mode (the default), the deviations reported, and what strict
mode makes of it (the blocks before the first rejection, and the rejection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hl7bridge import framing as f
from tests.support import message

M1 = message("CTRL0001", "A01").encode()
M2 = message("CTRL0002", "A04").encode()
VT, FS, CR, LF = b"\x0b", b"\x1c", b"\r", b"\n"


@dataclass(frozen=True)
class Case:
    name: str
    stream: bytes
    blocks: list[bytes]
    deviations: set[str] = field(default_factory=set)
    strict_blocks: list[bytes] | None = None  # None: same as blocks
    strict_rejection: str | None = None

    @property
    def messages(self) -> list[bytes]:
        """The blocks a receiver sees: those that are HL7 messages."""
        return [block for block in self.blocks if block.startswith(b"MSH")]

    @property
    def strict_messages(self) -> list[bytes]:
        """The same in strict mode: the messages before the rejection, if any."""
        blocks = self.blocks if self.strict_blocks is None else self.strict_blocks
        return [block for block in blocks if block.startswith(b"MSH")]


CASES = [
    Case("one frame", VT + M1 + FS + CR, [M1]),
    Case("two frames in one read", VT + M1 + FS + CR + VT + M2 + FS + CR, [M1, M2]),
    Case(
        "FS without CR",
        VT + M1 + FS + VT + M2 + FS,
        [M1, M2],
        {f.MISSING_CR_AFTER_END},
        strict_blocks=[M1],
        strict_rejection=f.MISSING_CR_AFTER_END,
    ),
    Case(
        "LF instead of CR after FS",
        VT + M1 + FS + LF + VT + M2 + FS + LF,
        [M1, M2],
        {f.MISSING_CR_AFTER_END},
        strict_blocks=[M1],
        strict_rejection=f.MISSING_CR_AFTER_END,
    ),
    Case(
        "CRLF after FS",
        VT + M1 + FS + CR + LF + VT + M2 + FS + CR + LF,
        [M1, M2],
        strict_blocks=[M1],
        strict_rejection=f.JUNK_BEFORE_START,
    ),
    Case(
        "junk before VT",
        b"\x00garbage\r\n" + VT + M1 + FS + CR,
        [M1],
        {f.JUNK_BEFORE_START},
        strict_blocks=[],
        strict_rejection=f.JUNK_BEFORE_START,
    ),
    Case(
        "no VT at all, as txHL7 accepted",
        M1 + FS + CR + M2 + FS + CR,
        [M1, M2],
        {f.MISSING_START},
        strict_blocks=[],
        strict_rejection=f.JUNK_BEFORE_START,
    ),
    Case("empty frame as keep-alive", VT + FS + CR + VT + M1 + FS + CR, [M1]),
    Case(
        "sender restarts a frame",
        VT + M1[:30] + VT + M2 + FS + CR,
        [M2],
        {f.RESTARTED_BLOCK},
        strict_blocks=[],
        strict_rejection=f.RESTARTED_BLOCK,
    ),
    Case(
        "block that is no HL7 message",
        VT + b"hello, is anybody there?" + FS + CR + VT + M1 + FS + CR,
        [b"hello, is anybody there?", M1],
    ),
    Case(
        "connection closed inside a frame",
        VT + M1 + FS + CR + VT + M2[:40],
        [M1],
        {f.TRUNCATED_BLOCK},
    ),
]
