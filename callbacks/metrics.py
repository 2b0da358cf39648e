"""Finding counts as metrics, for the trainer's own loggers (TensorBoard, W&B, CSV) to plot beside the loss."""

from __future__ import annotations

from collections.abc import Iterable

from callbacks.findings import Finding
from callbacks.report import Report

#: metric names are ``integrity/<CODE>`` and ``integrity/errors`` (all error findings so far)
PREFIX = "integrity/"


def finding_metrics(findings: Iterable[Finding]) -> dict[str, float]:
    """Cumulative number of findings per code so far, plus the number of error findings (always present, so a
    clean run logs a flat zero line)."""
    report = Report(findings=list(findings))
    metrics = {f"{PREFIX}errors": float(len(report.errors))}
    metrics.update({PREFIX + code: float(count) for code, count in report.counts().items()})
    return metrics
