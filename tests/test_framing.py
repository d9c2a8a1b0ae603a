"""The MLLP framing rules, pure: no sockets, no loop."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hl7bridge import framing as f
from tests.cases import CASES, CR, FS, M1, M2, VT, Case


def run(deframer: f.Deframer, chunks: list[bytes]) -> list[f.Event]:
    events: list[f.Event] = []
    for chunk in chunks:
        events += deframer.feed(chunk)
    return events + deframer.end()


def blocks(events: list[f.Event]) -> list[bytes]:
    return [event.data for event in events if isinstance(event, f.Frame)]


def kinds(events: list[f.Event]) -> set[str]:
    return {event.kind for event in events if isinstance(event, f.Deviation)}


def splits(stream: bytes) -> list[list[bytes]]:
    """Every way to cut the stream in two, and byte by byte."""
    return [[stream[:i], stream[i:]] for i in range(len(stream) + 1)] + [[bytes([b]) for b in stream]]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_lenient_case_at_every_split_point(case: Case) -> None:
    whole = run(f.Deframer(), [case.stream])
    assert blocks(whole) == case.blocks
    assert kinds(whole) == case.deviations
    for chunks in splits(case.stream):
        assert run(f.Deframer(), chunks) == whole, chunks


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_strict_case_at_every_split_point(case: Case) -> None:
    whole = run(f.Deframer(f.STRICT), [case.stream])
    expected = case.blocks if case.strict_blocks is None else case.strict_blocks
    assert blocks(whole) == expected
    rejections = [event.kind for event in whole if isinstance(event, f.Rejected)]
    assert rejections == ([case.strict_rejection] if case.strict_rejection else [])
    for chunks in splits(case.stream):
        assert run(f.Deframer(f.STRICT), chunks) == whole, chunks


def test_deviation_offsets_are_stream_offsets() -> None:
    junk = b"xyz"
    events = run(f.Deframer(), [VT + M1 + FS + CR + junk + VT + M2 + FS + CR])
    assert f.Deviation(f.JUNK_BEFORE_START, len(M1) + 3) in events


def test_strict_stops_after_rejection() -> None:
    deframer = f.Deframer(f.STRICT)
    assert [type(e) for e in deframer.feed(b"junk" + VT + M1 + FS + CR)] == [f.Rejected]
    assert deframer.feed(VT + M2 + FS + CR) == []


@pytest.mark.parametrize("mode", f.FRAMING_MODES)
def test_oversized_block_is_dropped_with_its_head_kept(mode: str) -> None:
    big = M1 + b"OBX|1|ED|PDF||" + b"A" * 5000 + b"\r"
    deframer = f.Deframer(mode, max_message_size=1000)
    events = []
    for start in range(0, len(big), 700):
        events += deframer.feed((VT if start == 0 else b"") + big[start : start + 700])
        assert deframer.buffered <= 1000 + 700
    events += deframer.feed(FS + CR + VT + M2 + FS + CR)
    oversized, after = events
    assert isinstance(oversized, f.Oversized) and oversized.size == len(big)
    # The head keeps what the limit let in (up to HEAD_SIZE): enough for the MSH.
    assert big.startswith(oversized.head) and 1000 < len(oversized.head) <= f.HEAD_SIZE
    assert after == f.Frame(M2)


@pytest.mark.parametrize("mode", f.FRAMING_MODES)
def test_block_over_the_limit_is_refused_however_it_arrives(mode: str) -> None:
    """Whole in one read, or ended in a read that also brings more of it, it is Oversized."""
    limit = len(M1) - 1
    for chunks in ([VT + M1 + FS + CR], [VT + M1[:50], M1[50:] + FS + CR], [VT, M1 + FS + CR + VT + M2[:10]]):
        events = run(f.Deframer(mode, limit), chunks)
        assert events[0] == f.Oversized(M1, len(M1)), chunks
    # A block without VT, in lenient mode, the same.
    events = run(f.Deframer(f.LENIENT, limit), [M1[:50], M1[50:] + FS + CR])
    assert events == [f.Deviation(f.MISSING_START, 0), f.Oversized(M1, len(M1))]


def test_junk_past_the_limit_is_junk_however_it_arrives() -> None:
    """Bytes without VT grow past the limit before a VT arrives: still junk, at its offset."""
    junk = b"\x00" * 300
    stream = b"\r\n" + junk + VT + M1 + FS + CR
    expected = [f.Deviation(f.JUNK_BEFORE_START, 2), f.Frame(M1)]
    assert run(f.Deframer(max_message_size=200), [stream]) == expected
    assert run(f.Deframer(max_message_size=200), [stream[:250], stream[250:]]) == expected


def test_block_exactly_at_the_limit_is_accepted() -> None:
    assert run(f.Deframer(max_message_size=len(M1)), [VT + M1 + FS + CR]) == [f.Frame(M1)]


@pytest.mark.parametrize("mode", f.FRAMING_MODES)
def test_block_one_byte_over_the_limit_is_oversized_however_it_arrives(mode: str) -> None:
    """The limit holds for a block that ends in the read that takes it past the limit, too."""
    small = M2[:40]
    for chunks in splits(VT + M1 + FS + CR + VT + small + FS + CR):
        events = run(f.Deframer(mode, max_message_size=len(M1) - 1), chunks)
        assert events == [f.Oversized(M1, len(M1)), f.Frame(small)], chunks


def test_block_without_start_over_the_limit_is_oversized() -> None:
    events = run(f.Deframer(max_message_size=len(M1) - 1), [M1 + FS + CR + VT + M2[:40] + FS + CR])
    assert events == [f.Deviation(f.MISSING_START, 0), f.Oversized(M1, len(M1)), f.Frame(M2[:40])]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="framing mode"):
        f.Deframer("sloppy")
    with pytest.raises(ValueError, match="max_message_size"):
        f.Deframer(max_message_size=0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([M1, M2, b"MSH|^~\\&|X|\xc3\xa9\r"]), min_size=1, max_size=6),
    st.lists(st.integers(min_value=1, max_value=80), min_size=1, max_size=40),
)
def test_any_chunking_of_valid_frames_gives_the_same_blocks(messages: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(VT + m + FS + CR for m in messages)
    chunks, position, index = [], 0, 0
    while position < len(stream):
        size = sizes[index % len(sizes)]
        chunks.append(stream[position : position + size])
        position += size
        index += 1
    for mode in f.FRAMING_MODES:
        assert run(f.Deframer(mode), chunks) == [f.Frame(m) for m in messages]


def test_framing_and_ack_import_no_io_framework() -> None:
    """The protocol core is I/O-free: loading it alone pulls in neither asyncio nor Twisted."""
    package = Path(f.__file__).parent
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        for name in ("framing", "ack"):
            spec = importlib.util.spec_from_file_location(name, {str(package)!r} + "/" + name + ".py")
            sys.modules[name] = module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        print(",".join(m for m in ("asyncio", "twisted") if m in sys.modules) or "none")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "none"


# Pieces of a stream: MLLP's bytes, parts of messages, and bytes of any kind.
PIECES = [VT, FS, CR, b"\n", VT + FS + CR, b"\r\n", M1[:20], M1, M2, b"junk", b"\x00\xff"]


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(PIECES), st.binary(min_size=1, max_size=8)), max_size=12).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
    st.sampled_from(f.FRAMING_MODES),
    st.sampled_from([8, 100, f.DEFAULT_MAX_MESSAGE_SIZE]),
)
def test_any_stream_gives_the_same_events_however_it_is_cut(
    stream: bytes, cuts: list[int], mode: str, limit: int
) -> None:
    """Fuzz: frames, NAK heads, deviations and offsets do not depend on how the bytes arrive."""
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    chunks = [stream[start:end] for start, end in zip([0, *points], [*points, len(stream)], strict=True)]
    whole = run(f.Deframer(mode, limit), [stream])
    assert run(f.Deframer(mode, limit), chunks) == whole
    for event in whole:
        if isinstance(event, f.Frame):
            assert 0 < len(event.data) <= limit
        elif isinstance(event, f.Oversized):
            assert event.size > limit and len(event.head) == min(event.size, f.HEAD_SIZE)


# What a hostile or broken peer may send for as long as it likes, in the 64 KiB
# reads a socket delivers: junk with neither VT nor FS, whitespace, and blocks
# restarted every few bytes.
HOSTILE_READS = {
    "junk": b"x" * 65536,
    "whitespace": b" \r\n\t" * 16384,
    "restarted blocks": (VT + b"MSH|^~\\&|") * 6553,
}


def cpu_per_megabyte(read: bytes, megabytes: int) -> float:
    deframer = f.Deframer()
    started = time.process_time()
    for _ in range(megabytes * (1 << 20) // len(read)):
        deframer.feed(read)
    return (time.process_time() - started) / megabytes


@pytest.mark.parametrize("kind", HOSTILE_READS)
def test_deframing_costs_time_linear_in_the_bytes_whatever_they_are(kind: str) -> None:
    """CPU per MB stays flat from 1 to 32 MB (a search from the start of the buffer on every read did not)."""
    read = HOSTILE_READS[kind]
    small = min(cpu_per_megabyte(read, 1) for _ in range(3))
    large = cpu_per_megabyte(read, 32)
    assert large < 3 * small + 0.002, (kind, small, large)


def test_whitespace_and_junk_keep_the_deframer_waiting_but_a_block_ending_does_not() -> None:
    deframer = f.Deframer()
    deframer.feed(VT + M1 + FS + CR + b"\n")
    assert not deframer.waiting  # CR LF after FS is how some senders end a block
    deframer.feed(b"  ")
    assert deframer.waiting  # more whitespace than that is a peer stuck between blocks
    deframer.feed(VT + M2 + FS + CR)
    assert not deframer.waiting
    deframer.feed(b"junk")
    assert deframer.waiting
