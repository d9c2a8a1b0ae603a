"""MLLP framing rules: bytes in, frames and deviations out.

This module does no I/O and imports neither asyncio nor Twisted (a test checks
that). A :class:`Deframer` is fed the bytes of one connection in whatever chunks
they arrive and returns events: :class:`Frame` for each complete block,
:class:`Deviation` for each departure from the MLLP rule that was tolerated,
:class:`Oversized` for a block past the size limit, :class:`Rejected` when strict
framing meets a departure it will not tolerate.

MLLP (HL7 v2 Transport Specification, MLLP release 2, section 1) frames a
message as ``<VT> message <FS><CR>``. Many senders that worked against txHL7
bend that rule, because txHL7 split the stream on FS alone and stripped VT. The
lenient mode (the default) accepts what txHL7 accepted and more:

* FS without CR, and CR, LF or CRLF (or other bytes) between frames;
* junk before VT, skipped;
* a block with no VT at all, ended by FS (txHL7 took its bytes as a message);
* a second VT inside a block: the sender gave up on the block and started
  again, so the unfinished part is dropped.

Strict mode takes ``<VT> message <FS><CR>`` only; the first departure gives a
:class:`Rejected` event and the deframer accepts nothing more, since after a
framing error nothing in the stream can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"

_WHITESPACE = b" \t\r\n"

#: Whitespace bytes after a block that are still part of its ending (CR LF after FS).
_TRAILER = 2

#: Bytes of a too-large block kept so that a NAK can be built from its MSH.
HEAD_SIZE = 4096

#: Default maximum size of one block. Real ORU messages carry embedded PDFs of
#: several MB, far past hl7.mllp's 64 KiB stream limit.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

LENIENT = "lenient"
STRICT = "strict"
FRAMING_MODES = (LENIENT, STRICT)


@dataclass(frozen=True)
class Frame:
    """A complete block, VT and FS removed."""

    data: bytes


@dataclass(frozen=True)
class Deviation:
    """A departure from MLLP that was tolerated; ``offset`` is the stream offset."""

    kind: str
    offset: int


@dataclass(frozen=True)
class Oversized:
    """A block longer than the limit: its first bytes and its size, the rest dropped."""

    head: bytes
    size: int


@dataclass(frozen=True)
class Rejected:
    """Strict framing met a departure; no more frames will come from this stream."""

    kind: str
    offset: int


Event = Frame | Deviation | Oversized | Rejected

# Kinds of deviation, named once so logs and tests agree.
JUNK_BEFORE_START = "junk before start block"
MISSING_CR_AFTER_END = "end block not followed by CR"
MISSING_START = "block without start block"
RESTARTED_BLOCK = "start block inside block"
TRUNCATED_BLOCK = "connection closed inside block"


class Deframer:
    """Split one connection's byte stream into MLLP frames.

    Args:
        mode: ``"lenient"`` (default) or ``"strict"``.
        max_message_size: largest block accepted, in bytes.
    """

    # One per connection: no __dict__.
    __slots__ = (
        "_after_block",
        "_buffer",
        "_dropping",
        "_head",
        "_in_block",
        "_loose",
        "_max",
        "_offset",
        "_rejected",
        "_scanned",
        "_start",
        "_strict",
        "_unstarted",
    )

    def __init__(self, mode: str = LENIENT, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if mode not in FRAMING_MODES:
            raise ValueError(f"framing mode must be one of {FRAMING_MODES}, not {mode!r}")
        if max_message_size < 1:
            raise ValueError("max_message_size must be at least 1")
        self._strict = mode == STRICT
        self._max = max_message_size
        self._buffer = bytearray()
        self._offset = 0  # stream offset of _buffer[0]
        self._in_block = False
        self._after_block = False  # an FS ended the last block; its CR is due
        self._dropping = 0  # > 0: inside an oversized block, bytes seen so far
        self._head = b""  # the first HEAD_SIZE bytes of the oversized block
        self._unstarted = False  # the block dropped has no VT: it may yet prove to be junk
        self._start = 0  # stream offset where that block began
        self._rejected = False
        self._scanned = 0  # bytes of _buffer known to hold neither VT nor FS
        self._loose = 0  # whitespace bytes skipped since the last block ended

    def feed(self, data: bytes) -> list[Event]:
        """Take the next bytes of the stream; return the events they complete."""
        if self._rejected or not data:
            return []
        if self._is_one_whole_frame(data):
            # The usual case, one message per read: no buffering, one copy.
            self._offset += len(data)
            self._loose = 0
            return [Frame(data[1:-2])] if len(data) > 3 else []
        self._buffer += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def end(self) -> list[Event]:
        """Take the end of the stream; return what it leaves unfinished."""
        if self._rejected:
            return []
        events: list[Event] = []
        if self._unstarted:
            events.append(Deviation(JUNK_BEFORE_START, self._start))
        elif self._in_block and (self._buffer or self._dropping):
            events.append(Deviation(TRUNCATED_BLOCK, self._offset))
        elif not self._in_block and self._buffer.strip(_WHITESPACE):
            events.append(Deviation(JUNK_BEFORE_START, self._offset))
        self._consume(len(self._buffer))
        self._in_block = self._unstarted = False
        self._dropping = 0
        return events

    def _is_one_whole_frame(self, data: bytes) -> bool:
        """Whether ``data`` is exactly ``<VT> block <FS><CR>`` and nothing is pending."""
        end = len(data) - 2
        return (
            not self._buffer
            and not self._in_block
            and not self._after_block
            and data[:1] == START_BLOCK
            and data.endswith(END_BLOCK + CARRIAGE_RETURN)
            and end - 1 <= self._max
            and data.find(END_BLOCK, 1) == end
            and data.find(START_BLOCK, 1, end) < 0
        )

    @property
    def waiting(self) -> bool:
        """Whether bytes have come since the last block ended that no block has ended yet.

        A block being received, junk, or more whitespace than the CR or CRLF
        some senders put after FS: a peer sending only these is as stuck as one
        that never finishes a block.
        """
        return self._in_block or bool(self._buffer) or self._loose > _TRAILER

    def partial_head(self) -> bytes:
        """The first bytes of the unfinished block (up to HEAD_SIZE), to answer it."""
        return self._head if self._dropping else bytes(self._buffer[:HEAD_SIZE])

    @property
    def buffered(self) -> int:
        """Bytes held for a block not yet complete."""
        return len(self._buffer)

    def _consume(self, count: int) -> None:
        del self._buffer[:count]
        self._offset += count
        self._scanned = 0

    def _reject(self, events: list[Event], kind: str, offset: int) -> bool:
        events.append(Rejected(kind, offset))
        self._rejected = True
        self._buffer.clear()
        return False

    def _step(self, events: list[Event]) -> bool:
        """Make one step of progress; return False when more bytes are needed."""
        if self._in_block:
            return self._step_in_block(events)
        return self._step_between_blocks(events)

    def _step_between_blocks(self, events: list[Event]) -> bool:
        buffer = self._buffer
        if self._after_block:
            if not buffer:
                return False
            self._after_block = False
            if buffer[0:1] == CARRIAGE_RETURN:
                self._consume(1)
            elif self._strict:
                return self._reject(events, MISSING_CR_AFTER_END, self._offset)
            else:
                events.append(Deviation(MISSING_CR_AFTER_END, self._offset))
        if not self._strict and not self._scanned:
            # Whitespace between blocks (CR, LF, CRLF) is common and harmless.
            blank = len(buffer) - len(buffer.lstrip(_WHITESPACE))
            if blank:
                self._loose += blank
                self._consume(blank)
        if not buffer:
            return False
        # Bytes already searched are not searched again: junk that trickles in
        # costs time linear in its length.
        start = buffer.find(START_BLOCK, self._scanned)
        if self._strict:
            if start != 0:
                return self._reject(events, JUNK_BEFORE_START, self._offset)
        else:
            end = buffer.find(END_BLOCK, self._scanned, start if start >= 0 else len(buffer))
            if end >= 0:
                return self._unstarted_block(events, end)
            if start < 0:
                # Other bytes wait: they may still turn out to be a block
                # without VT, ended by an FS not yet received.
                self._scanned = len(buffer)
                return self._check_size(events, len(buffer))
            if start:
                events.append(Deviation(JUNK_BEFORE_START, self._offset))
        self._consume(start + 1)
        self._in_block = True
        return True

    def _unstarted_block(self, events: list[Event], end: int) -> bool:
        """Lenient: bytes ended by FS with no VT before them (txHL7 took these)."""
        if end:
            events.append(Deviation(MISSING_START, self._offset))
            self._complete(events, end)
        self._consume(end + 1)
        self._after_block = True
        self._loose = 0
        return True

    def _complete(self, events: list[Event], end: int) -> None:
        """``_buffer[:end]`` is a whole block: a Frame, or Oversized past the limit."""
        if end > self._max:
            events.append(Oversized(bytes(self._buffer[: min(end, HEAD_SIZE)]), end))
        elif end:
            events.append(Frame(bytes(self._buffer[:end])))

    def _step_in_block(self, events: list[Event]) -> bool:
        buffer = self._buffer
        # A large block arrives in many reads: search only the new bytes, and
        # for FS only up to the next VT, so that a stream of restarted blocks
        # costs time linear in its length.
        restart = buffer.find(START_BLOCK, self._scanned)
        end = buffer.find(END_BLOCK, self._scanned, restart if restart >= 0 else len(buffer))
        if end >= 0:
            restart = -1
        if restart >= 0:
            if self._strict:
                return self._reject(events, RESTARTED_BLOCK, self._offset + restart)
            if self._unstarted:
                # The oversized "block" had no VT: it was junk before this one.
                events.append(Deviation(JUNK_BEFORE_START, self._start))
            elif restart or self._dropping:
                events.append(Deviation(RESTARTED_BLOCK, self._offset + restart))
            self._consume(restart + 1)
            self._dropping = 0
            self._unstarted = False
            return True
        if end < 0:
            self._scanned = len(buffer)
            return self._check_size(events, len(buffer))
        if self._dropping:
            if self._unstarted:
                events.append(Deviation(MISSING_START, self._start))
            self._drop(end)
            events.append(Oversized(self._head, self._dropping))
            self._dropping = 0
            self._unstarted = False
            self._consume(1)
        else:
            self._complete(events, end)
            self._consume(end + 1)
        self._in_block = False
        self._after_block = True
        self._loose = 0
        return True

    def _check_size(self, events: list[Event], size: int) -> bool:
        """Drop the buffered part of a block that has grown past the limit."""
        if not self._dropping and size > self._max:
            self._head = b""
            self._start = self._offset
            if not self._in_block:
                # A block without VT: it ends at FS, or proves to be junk at VT.
                self._in_block = self._unstarted = True
        if self._dropping or size > self._max:
            self._drop(size)
        return False

    def _drop(self, count: int) -> None:
        """Drop the first ``count`` buffered bytes of an oversized block, keeping its head."""
        if len(self._head) < HEAD_SIZE:
            self._head += bytes(self._buffer[: min(count, HEAD_SIZE - len(self._head))])
        self._dropping += count
        self._consume(count)
