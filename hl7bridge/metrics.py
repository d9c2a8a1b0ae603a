"""Counters and latency histograms per message type and ACK code. No I/O.

A listener keeps one :class:`Metrics` when its ``metrics`` setting is on.
Read it as Python (:meth:`Metrics.snapshot`), as Prometheus's text exposition
format (:meth:`Metrics.prometheus_text`, which ``hl7bridge serve
--metrics-endpoint`` serves at ``/metrics`` with no Prometheus library), or
through ``prometheus_client`` (:mod:`hl7bridge.prometheus`, the ``prometheus``
extra). All of them come from :meth:`Metrics.families`, the one description of
the series; a shadow run's :class:`~hl7bridge.migration.shadow.ShadowReport`
describes its counts the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

#: Upper bounds of the latency buckets, in seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Family:
    """One metric family as Prometheus sees it: name, ``counter`` or ``histogram``, help, samples.

    Each sample is ``(suffix, labels, value)``: ``"_total"`` for a counter,
    ``"_bucket"`` (with an ``le`` label), ``"_count"`` and ``"_sum"`` for a histogram.
    """

    name: str
    kind: str
    help: str
    samples: list[tuple[str, dict[str, str], float]]


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        for index, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[index] += 1
                break

    def cumulative(self) -> dict[float, int]:
        running, buckets = 0, {}
        for bound, n in zip(BUCKETS, self.counts, strict=True):
            running += n
            buckets[bound] = running
        return buckets


class Metrics:
    """What a listener answered: messages and their handling time per (message type, ACK code)."""

    def __init__(self) -> None:
        self.messages: Counter[tuple[str, str]] = Counter()
        self.problems: Counter[str] = Counter()
        self.retransmissions: Counter[str] = Counter()
        self._latency: dict[tuple[str, str], _Histogram] = {}

    def problem(self, kind: str) -> None:
        """A peer sent something wrong: ``kind`` says what (see ``docs/reliability.md``)."""
        self.problems[kind] += 1

    def retransmission(self, message_type: str) -> None:
        """A message already answered came again and got its journaled answer, the handler not run."""
        self.retransmissions[message_type] += 1

    def record(self, message_type: str, ack_code: str, seconds: float) -> None:
        """One message of ``message_type`` answered ``ack_code`` ("none" for no ACK) after ``seconds``."""
        self.messages[message_type, ack_code] += 1
        histogram = self._latency.get((message_type, ack_code))
        if histogram is None:
            histogram = self._latency[message_type, ack_code] = _Histogram()
        histogram.observe(seconds)

    def snapshot(self) -> dict[str, dict[str, dict[str, object]]]:
        """``{type: {ack_code: {"count": n, "seconds_total": s, "buckets": {bound: cumulative n}}}}``."""
        result: dict[str, dict[str, dict[str, object]]] = {}
        for (kind, code), histogram in sorted(self._latency.items()):
            result.setdefault(kind, {})[code] = {
                "count": histogram.count,
                "seconds_total": histogram.total,
                "buckets": histogram.cumulative(),
            }
        return result

    def families(self) -> list[Family]:
        """The series: ``hl7bridge_messages_total``, ``hl7bridge_handling_seconds``, ``hl7bridge_problems_total``."""
        counter = [
            ("_total", {"message_type": kind, "ack_code": code}, float(n))
            for (kind, code), n in sorted(self.messages.items())
        ]
        histogram: list[tuple[str, dict[str, str], float]] = []
        for (kind, code), data in sorted(self._latency.items()):
            labels = {"message_type": kind, "ack_code": code}
            histogram += [("_bucket", {**labels, "le": str(bound)}, n) for bound, n in data.cumulative().items()]
            histogram += [
                ("_bucket", {**labels, "le": "+Inf"}, data.count),
                ("_sum", labels, data.total),
                ("_count", labels, data.count),
            ]
        return [
            Family("hl7bridge_messages", "counter", "Messages answered, by message type and ACK code.", counter),
            Family(
                "hl7bridge_handling_seconds",
                "histogram",
                "Time from a message's last byte to its answer, by message type and ACK code.",
                histogram,
            ),
            Family(
                "hl7bridge_problems",
                "counter",
                "Problems with what peers sent, by kind; each kind is logged once per connection.",
                [("_total", {"kind": kind}, float(n)) for kind, n in sorted(self.problems.items())],
            ),
            Family(
                "hl7bridge_retransmissions",
                "counter",
                "Messages answered from the journal without running the handler, by message type.",
                [("_total", {"message_type": kind}, float(n)) for kind, n in sorted(self.retransmissions.items())],
            ),
        ]

    def prometheus_text(self) -> str:
        """The metrics in Prometheus's text exposition format (version 0.0.4)."""
        return prometheus_text(self.families())


def prometheus_text(families: Iterable[Family]) -> str:
    """Metric families in Prometheus's text exposition format (version 0.0.4)."""
    lines = []
    for family in families:
        # In this format a counter's family is named with its _total suffix.
        name = family.name + "_total" if family.kind == "counter" else family.name
        lines += [f"# HELP {name} {family.help}", f"# TYPE {name} {family.kind}"]
        for suffix, labels, value in family.samples:
            text = ",".join(f'{key}="{_label(label)}"' for key, label in labels.items())
            lines.append(f"{family.name}{suffix}{{{text}}} {_number(value)}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _label(value: str) -> str:
    # The exposition format escapes backslash, double quote and newline in label values.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
