"""Counters and latency histograms per message type and ACK code. No I/O.

A listener keeps one :class:`Metrics` when its ``metrics`` setting is on.
Read it as Python (:meth:`Metrics.snapshot`) or as Prometheus's text
exposition format (:meth:`Metrics.prometheus_text`), which ``hl7bridge serve
--metrics-endpoint`` serves at ``/metrics``; no Prometheus library is needed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

#: Upper bounds of the latency buckets, in seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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


class Metrics:
    """What a listener answered: messages per (type, ACK code), handling time per type."""

    def __init__(self) -> None:
        self.messages: Counter[tuple[str, str]] = Counter()
        self._latency: dict[str, _Histogram] = {}

    def record(self, message_type: str, ack_code: str, seconds: float) -> None:
        """One message of ``message_type`` answered ``ack_code`` ("none" for no ACK) after ``seconds``."""
        self.messages[message_type, ack_code] += 1
        histogram = self._latency.get(message_type)
        if histogram is None:
            histogram = self._latency[message_type] = _Histogram()
        histogram.observe(seconds)

    def snapshot(self) -> dict[str, dict[str, object]]:
        """``{type: {"acks": {code: n}, "count": n, "seconds_total": s, "buckets": {bound: cumulative n}}}``."""
        result: dict[str, dict[str, object]] = {}
        for kind, histogram in sorted(self._latency.items()):
            acks = {code: n for (t, code), n in sorted(self.messages.items()) if t == kind}
            cumulative, buckets = 0, {}
            for bound, n in zip(BUCKETS, histogram.counts, strict=True):
                cumulative += n
                buckets[bound] = cumulative
            result[kind] = {
                "acks": acks,
                "count": histogram.count,
                "seconds_total": histogram.total,
                "buckets": buckets,
            }
        return result

    def prometheus_text(self) -> str:
        """The metrics in Prometheus's text exposition format (version 0.0.4)."""
        lines = [
            "# HELP hl7bridge_messages_total Messages answered, by message type and ACK code.",
            "# TYPE hl7bridge_messages_total counter",
        ]
        for (kind, code), n in sorted(self.messages.items()):
            lines.append(f'hl7bridge_messages_total{{message_type="{_label(kind)}",ack_code="{_label(code)}"}} {n}')
        lines += [
            "# HELP hl7bridge_handling_seconds Time from a message's last byte to its answer.",
            "# TYPE hl7bridge_handling_seconds histogram",
        ]
        for kind, data in self.snapshot().items():
            label = f'message_type="{_label(kind)}"'
            for bound, n in data["buckets"].items():  # type: ignore[attr-defined]
                lines.append(f'hl7bridge_handling_seconds_bucket{{{label},le="{bound}"}} {n}')
            lines.append(f'hl7bridge_handling_seconds_bucket{{{label},le="+Inf"}} {data["count"]}')
            lines.append(f"hl7bridge_handling_seconds_sum{{{label}}} {data['seconds_total']}")
            lines.append(f"hl7bridge_handling_seconds_count{{{label}}} {data['count']}")
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    # The exposition format escapes backslash, double quote and newline in label values.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
