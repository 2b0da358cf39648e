"""The HTML report: the summary table, a timeline of findings per step, the tie map and every finding.

One self-contained file (inline CSS, no scripts, nothing fetched), written beside the JSON report::

    from callbacks.report_html import write_html
    write_html(monitor.report, "out/integrity.html")
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any

from callbacks.findings import Finding
from callbacks.report import Report

#: timeline columns in training order; steps sit between ``load``/``init`` and ``checkpoint``/``merge``/``end``
_EVENT_ORDER = {"load": 0, "init": 1, "step": 2, "checkpoint": 3, "merge": 4, "end": 5}

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em} h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .5em;vertical-align:top}
th{background:#f3f3f3;text-align:left} .error{background:#fbe0e0} .warning{background:#fff3cd} .info{background:#e8f0fe}
.timeline td{text-align:center;min-width:2.2em} .timeline td.code{text-align:left;white-space:nowrap}
.none{color:#2a7a2a} code{font-size:.95em}
"""


def timeline_columns(findings: Sequence[Finding]) -> list[tuple[str, int | None]]:
    """The (event, step) moments at which findings appeared, in training order."""
    moments = {(f.event, f.step) for f in findings}
    return sorted(moments, key=lambda m: (m[1] if m[1] is not None else -1, _EVENT_ORDER.get(m[0], 9), m[0]))


def _label(moment: tuple[str, int | None]) -> str:
    event, step = moment
    return event if step is None else f"{event}@{step}"


def _timeline(findings: Sequence[Finding], rows: Sequence[dict[str, Any]]) -> str:
    columns = timeline_columns(findings)
    counts: dict[tuple[str, tuple[str, int | None]], int] = {}
    for f in findings:
        key = (f.code, (f.event, f.step))
        counts[key] = counts.get(key, 0) + 1
    head = "".join(f"<th>{html.escape(_label(c))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            n = counts.get((row["code"], column), 0)
            cells.append(f'<td class="{row["severity"]}">{n}</td>' if n else "<td></td>")
        body.append(f'<tr><td class="code">{html.escape(row["code"])}</td>{"".join(cells)}</tr>')
    return f'<table class="timeline"><tr><th>code \\ event@step</th>{head}</tr>{"".join(body)}</table>'


def render_html(report: Report, title: str = "integrity report") -> str:
    """The report as one HTML document."""
    rows = report.summary_rows()
    findings = report.findings
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if not rows:
        parts.append('<p class="none">no findings</p>')
    else:
        parts.append("<h2>Summary</h2><table><tr><th>severity</th><th>code</th><th>count</th><th>first</th>"
                     "<th>parameters</th><th>fix</th></tr>")
        for r in rows:
            params = ", ".join(r["params"][:8]) + (f" (+{len(r['params']) - 8})" if len(r["params"]) > 8 else "")
            parts.append(f'<tr class="{r["severity"]}"><td>{r["severity"]}</td><td>{html.escape(r["code"])}</td>'
                         f'<td>{r["count"]}</td><td>{html.escape(str(r["first"]))}</td>'
                         f"<td><code>{html.escape(params)}</code></td><td>{html.escape(r['fix'] or '')}</td></tr>")
        parts.append("</table><h2>Timeline (findings per code at each event and step)</h2>")
        parts.append(_timeline(findings, rows))
    tie_map = report.sections.get("ties", {}).get("tie_map") if isinstance(report.sections.get("ties"), dict) else None
    if tie_map:
        groups = tie_map.get("groups", [])
        parts.append(f"<h2>Tie map</h2><p>{len(groups)} tie group(s); parameters "
                     f"{tie_map.get('parameters_unique', 0):,} unique / "
                     f"{tie_map.get('parameters_with_duplicates', 0):,} counting every name</p><ul>")
        parts.extend(f"<li><code>{html.escape(' = '.join(g['names']))}</code></li>" for g in groups)
        parts.append("</ul>")
    if findings:
        parts.append("<h2>Findings</h2><table><tr><th>event@step</th><th>code</th><th>parameters</th>"
                     "<th>message</th></tr>")
        for f in findings:
            parts.append(f'<tr class="{f.severity}"><td>{html.escape(_label((f.event, f.step)))}</td>'
                         f"<td>{html.escape(f.code)}</td><td><code>{html.escape(', '.join(f.params[:8]))}</code>"
                         f"</td><td>{html.escape(f.message)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)


def write_html(report: Report, path: str | os.PathLike[str], title: str = "integrity report") -> str:
    """Write :func:`render_html` to ``path`` (folders created); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render_html(report, title))
    return path
