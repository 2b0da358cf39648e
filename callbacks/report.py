"""The report: every finding so far plus what checks add (the tie map), as JSON and as a console table."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from callbacks.findings import SEVERITY_RANK, Finding


@dataclasses.dataclass
class Report:
    """Findings and per-check sections. ``str(report)`` is the console summary; :meth:`to_json` the file."""

    findings: list[Finding] = dataclasses.field(default_factory=list)
    sections: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        """Findings of severity ``error``."""
        return [f for f in self.findings if f.severity == "error"]

    def counts(self) -> dict[str, int]:
        """Number of findings per code."""
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.code] = out.get(f.code, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: findings, counts per code and check sections."""
        return {"findings": [f.to_dict() for f in self.findings], "counts": self.counts(),
                "sections": self.sections}

    def to_json(self) -> str:
        """The report as a JSON document."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per code: severity, count, first event/step, parameters (first few), fix."""
        rows: dict[str, dict[str, Any]] = {}
        for f in self.findings:
            row = rows.get(f.code)
            if row is None:
                rows[f.code] = row = {"code": f.code, "severity": f.severity, "count": 0,
                                      "first": f.event if f.step is None else f"{f.event}@{f.step}",
                                      "params": [], "fix": f.hint}
            row["count"] += 1
            row["params"].extend(p for p in f.params if p not in row["params"])
        return sorted(rows.values(), key=lambda r: (SEVERITY_RANK[r["severity"]], r["code"]))

    def __str__(self) -> str:
        return format_table(self.summary_rows(), self.sections.get("ties", {}).get("tie_map"))


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def format_table(rows: Sequence[dict[str, Any]], tie_map: dict[str, Any] | None = None) -> str:
    """The console summary: a table of codes, counts, first step and parameters, then the fix of each code."""
    lines = ["integrity report"]
    if tie_map:
        groups = tie_map.get("groups", [])
        lines.append(
            f"  tie map: {len(groups)} tie group(s); parameters {tie_map['parameters_unique']:,} unique / "
            f"{tie_map['parameters_with_duplicates']:,} counting every name")
        for group in groups[:10]:
            lines.append(f"    tied: {' = '.join(group['names'])}")
    if not rows:
        lines.append("  no findings")
        return "\n".join(lines)
    header = ("severity", "code", "count", "first", "parameters")
    widths = (8, 24, 5, 16, 60)
    table = [header] + [
        (r["severity"], r["code"], str(r["count"]), r["first"],
         ", ".join(r["params"][:3]) + (f" (+{len(r['params']) - 3})" if len(r["params"]) > 3 else ""))
        for r in rows
    ]
    for cells in table:
        lines.append("  " + "  ".join(_cell(c, w).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    lines.append("  fixes:")
    codes_by_fix: dict[str, list[str]] = {}
    for r in rows:  # codes that share a fix (one cause seen by several checks) say it once
        codes_by_fix.setdefault(r["fix"], []).append(r["code"])
    for fix, codes in codes_by_fix.items():
        lines.append(f"    {', '.join(codes)}: {fix}")
    return "\n".join(lines)
