"""hl7bridge's metrics in a ``prometheus_client`` registry (the ``prometheus`` extra).

For a process that already exposes its metrics with ``prometheus_client``::

    from hl7bridge.prometheus import register

    factory = MLLPFactory(router, metrics=True)
    register(factory.engine.metrics, router.report)

The series are those of ``/metrics`` (:mod:`hl7bridge.metrics`), read from the
same objects at each scrape. ``hl7bridge serve --metrics-endpoint`` needs none
of this: it writes the text format itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from hl7bridge.errors import MissingExtra
from hl7bridge.metrics import Family

try:
    from prometheus_client.core import REGISTRY, Metric
except ImportError as exc:
    raise MissingExtra("hl7bridge.prometheus", "prometheus") from exc


class Source(Protocol):
    """What describes its series: :class:`~hl7bridge.metrics.Metrics` and ``ShadowReport``."""

    def families(self) -> list[Family]: ...


class Collector:
    """A ``prometheus_client`` collector for the sources given (a None source is left out)."""

    def __init__(self, *sources: Source | None) -> None:
        self.sources = [source for source in sources if source is not None]

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            for family in source.families():
                metric = Metric(family.name, family.help, family.kind)
                for suffix, labels, value in family.samples:
                    metric.add_sample(family.name + suffix, labels, value)
                yield metric


def register(*sources: Source | None, registry: Any = None) -> Collector:
    """Add the sources' series to ``registry`` (``prometheus_client``'s default one if None)."""
    collector = Collector(*sources)
    (REGISTRY if registry is None else registry).register(collector)
    return collector
