"""Reading the service's Prometheus endpoint the way Prometheus does: over HTTP, with its text parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.service import RunningService

__all__ = ["Samples", "scrape"]

#: (sample name, sorted labels) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(svc: RunningService) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples
