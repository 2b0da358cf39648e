"""Finding counts as metrics, for the trainer's own loggers (TensorBoard, W&B, CSV) to plot beside the loss."""

from __future__ import annotations

from collections.abc import Iterable

from callbacks.findings import Finding

#: metric names are ``integrity/<CODE>`` and ``integrity/errors`` (all error findings so far)
PREFIX = "integrity/"


def finding_metrics(findings: Iterable[Finding]) -> dict[str, float]:
    """Cumulative number of findings per code so far, plus the number of error findings (always present, so a
    clean run logs a flat zero line)."""
    metrics: dict[str, float] = {f"{PREFIX}errors": 0.0}
    for finding in findings:
        key = PREFIX + finding.code
        metrics[key] = metrics.get(key, 0.0) + 1.0
        if finding.severity == "error":
            metrics[f"{PREFIX}errors"] += 1.0
    return metrics
