"""The whole gateway's metrics from its workers' (`workers` > 1): each worker counts alone, and
the metrics process (gateway.metrics_hub) adds them up at every scrape.

Counters and histograms are sums. Gauges are sums too (requests in flight), except the `_up`
gauges, whose whole-gateway value is the worst worker's (0 if any worker cannot reach the
directory or Redis), and the `_created` and `_timestamp_seconds` times, the earliest (the oldest
configuration any worker runs). A pure function of the workers' expositions: tested as a table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]


def merge(expositions: Iterable[str]) -> str:
    """One exposition (Prometheus text format 0.0.4) adding up several of the same metrics."""
    kinds: dict[str, str] = {}
    helps: dict[str, str] = {}
    values: dict[str, dict[tuple[str, Labels], float]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            kinds.setdefault(family.name, family.type)
            helps.setdefault(family.name, family.documentation)
            samples = values.setdefault(family.name, {})
            worst = family.type == "gauge" and family.name.endswith("_up")
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif worst or sample.name.endswith(("_created", "_timestamp_seconds")):  # the earliest
                    samples[key] = min(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    lines: list[str] = []
    for name, samples in values.items():
        kind = kinds[name]
        lines.append(f"# HELP {_exposed_name(name, kind)} {_escape_help(helps[name])}")
        lines.append(f"# TYPE {_exposed_name(name, kind)} {kind}")
        for (sample_name, labels), value in samples.items():
            lines.append(f"{sample_name}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n" if lines else ""


def _exposed_name(name: str, kind: str) -> str:
    # The parser drops a counter's `_total` from the family name; the text format keeps it.
    return name + "_total" if kind == "counter" else name


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape_value(value)}"' for key, value in labels)
    return "{" + inner + "}"


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
