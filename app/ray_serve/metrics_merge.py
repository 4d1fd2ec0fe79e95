"""Every replica's Prometheus text as one exposition, each series labelled ``replica``.

Families are merged by name (one ``# HELP``/``# TYPE`` each, their samples together), so that the
result is valid Prometheus text and a dashboard's ``sum by (exit_layer)`` works unchanged across
replicas.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"


class _Merged:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge(texts: Mapping[str, str]) -> bytes:
    """``texts``: replica id → that replica's ``/metrics`` text."""
    merged: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
            for s in family.samples:
                labels = {**s.labels, REPLICA_LABEL: replica}
                target.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(merged.values()))  # type: ignore[arg-type]
    return generate_latest(registry)
