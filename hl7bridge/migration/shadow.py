"""Comparing a shadow handler's ACK with the primary's, and counting the outcomes.

No I/O. Two ACKs agree when their segments are the same apart from MSH-7
(time) and MSH-10 (control id), which differ on every ACK. Differences are
named by field (``MSA-1``, ``MSH-3``) or segment (``ERR``), never by value, so
they can be logged without message content.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hl7bridge.metrics import Family

AGREED = "agreed"
DIFFERED = "differed"
FAILED = "failed"
OUTCOMES = (AGREED, DIFFERED, FAILED)

_IGNORED_MSH_FIELDS = (7, 10)


def _segments(ack_text: str) -> list[list[str]]:
    segments = []
    for segment in ack_text.replace("\n", "\r").split("\r"):
        if len(segment) > 3:
            segments.append(segment.split(segment[3]))
    return segments


def compare_acks(primary: str | None, shadow: str | None) -> list[str]:
    """The names of what differs between two ACKs; empty when they agree.

    ``None`` (no ACK) agrees only with ``None``. MSH-7 and MSH-10 are ignored.
    In MSH the field separator is MSH-1, so field ``n`` of the split is MSH-(n+1).
    """
    if primary is None or shadow is None:
        return [] if primary is shadow else ["ACK sent" if shadow is not None else "no ACK"]
    ours, theirs = _segments(primary), _segments(shadow)
    differences = []
    for index in range(max(len(ours), len(theirs))):
        left = ours[index] if index < len(ours) else []
        right = theirs[index] if index < len(theirs) else []
        name = (left or right)[0]
        if not left or not right or left[0] != right[0]:
            differences.append(f"segment {index + 1}")
            continue
        offset = 1 if name == "MSH" else 0  # MSH-1 is the separator itself
        for number in range(1, max(len(left), len(right))):
            if name == "MSH" and number + offset in _IGNORED_MSH_FIELDS:
                continue
            a = left[number] if number < len(left) else ""
            b = right[number] if number < len(right) else ""
            if a != b:
                differences.append(f"{name}-{number + offset}")
    return differences


@dataclass
class ShadowReport:
    """How often a shadow agreed with, differed from, or failed beside its primary, per message type."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)

    def record(self, message_type: str, outcome: str, times: int = 1) -> None:
        """Count ``times`` comparisons of ``message_type`` that ended in ``outcome``."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}")
        self.counts.setdefault(message_type, Counter())[outcome] += times

    def as_dict(self) -> dict[str, dict[str, int]]:
        """``{message_type: {"agreed": n, "differed": n, "failed": n}}``."""
        return {
            kind: {outcome: counts[outcome] for outcome in OUTCOMES} for kind, counts in sorted(self.counts.items())
        }

    def families(self) -> list[Family]:
        """The counts as the series ``hl7bridge_shadow_comparisons_total{message_type, outcome}``."""
        samples = [
            ("_total", {"message_type": kind, "outcome": outcome}, float(n))
            for kind, counts in self.as_dict().items()
            for outcome, n in counts.items()
        ]
        return [
            Family(
                "hl7bridge_shadow_comparisons",
                "counter",
                "Shadow answers compared with the primary's, by message type and outcome (agreed, differed, failed).",
                samples,
            )
        ]

    def format(self) -> str:
        """The report as a text table."""
        rows: list[tuple[str, ...]] = [("message type", *OUTCOMES)]
        rows += [(kind, *(str(n) for n in counts.values())) for kind, counts in self.as_dict().items()]
        return text_table(rows)


def text_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells as lines of left-aligned columns, two spaces apart (the first row is the heading)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)
