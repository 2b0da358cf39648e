"""Exceptions of the package. Configuration errors are ``ValueError`` subclasses raised at construction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from callbacks.findings import Finding


class IntegrityError(RuntimeError):
    """Raised under policy ``raise`` when error findings appear; ``.findings`` holds them."""

    def __init__(self, findings: Sequence[Finding]):
        self.findings = list(findings)
        lines = [f"{len(self.findings)} integrity error(s):"]
        lines += [f"  {f.log_line(fix_at='below')}" for f in self.findings]
        codes_by_fix: dict[str, list[str]] = {}
        for finding in self.findings:  # one cause seen by several checks: its fix once
            codes = codes_by_fix.setdefault(finding.hint, [])
            if finding.code not in codes:
                codes.append(finding.code)
        lines.append("fixes:")
        lines += [f"  {', '.join(codes)}: {fix}" for fix, codes in codes_by_fix.items()]
        super().__init__("\n".join(lines))


class ConfigError(ValueError):
    """A bad argument or configuration value; the message names the key, what was given and what is allowed."""


class RecipeError(ConfigError):
    """A recipe file that cannot be used: the message names the file, the key path and what is allowed."""

    def __init__(self, path: str, key: str, problem: str):
        self.path, self.key, self.problem = str(path), key, problem
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {problem}")
