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
        lines = "\n".join(f"  {f}" for f in self.findings)
        super().__init__(f"{len(self.findings)} integrity error(s):\n{lines}")


class ConfigError(ValueError):
    """A bad argument or configuration value; the message names the key, what was given and what is allowed."""


class RecipeError(ConfigError):
    """A recipe file that cannot be used: the message names the file, the key path and what is allowed."""

    def __init__(self, path: str, key: str, problem: str):
        self.path, self.key, self.problem = str(path), key, problem
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {problem}")
