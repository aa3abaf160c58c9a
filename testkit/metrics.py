"""Reading the service's Prometheus exposition with prometheus-client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``; ``default`` when there is
    none (else KeyError, so a misspelt name fails loudly)."""
    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                found = True
    if not found and default is not None:
        return default
    if not found:
        raise KeyError(f"no sample {name} {labels}")
    return total


def moved(before: str, after: str, name: str, **labels: str) -> float:
    """How much ``name`` (with ``labels``) grew from the exposition ``before`` to ``after``; a series
    that did not exist before counts from 0."""
    return metric(after, name, None, **labels) - metric(before, name, 0.0, **labels)
